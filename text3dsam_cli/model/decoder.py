"""SAM-style promptable decoder: prompt encoder, two-way transformer, mask decoder and refinement passes.

Parameter names follow the published checkpoint (``seg_decoder.mask_decoder....``,
``seg_decoder.prompt_encoder....``). Two exact rewrites of the published computation make decoding many
prompts cheap, and are checked against the authors' logits in the tests:

* the decoder's 1x1x1 convolutions run *before* the trilinear upsampling that precedes them (both maps are
  linear and trilinear weights sum to one, so they commute), i.e. at 1/16 and 1/4 of the voxels;
* everything that depends on the image only (skip-feature projections, positional encoding) is computed
  once per image in :meth:`SegDecoder.prepare` and shared by every prompt;
* the logits of the intermediate refinement passes are only ever read by the first layer of the mask
  downscaling, three 1-D convolutions with stride 4 in all axes: each reads voxels on lines of a 4-voxel
  lattice only (about 3/16 of the voxels). Intermediate passes evaluate their logits on exactly those lines.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from text3dsam_cli.model.image_encoder import DecomposedConv3d
from text3dsam_cli.model.interpolation import interpolation_matrix

#: Values per slab of the full-resolution decoder stage at inference on the CPU (2 MB of float32; a GPU
#: takes the whole volume at once).
FULL_STAGE_SLAB = 1 << 19
# Line sets read by the stride-4 decomposed convolution: branch c1 (kernel along D) reads every D at H, W
# multiples of 4; c2 every H at D, W multiples of 4; c3 every W at D, H multiples of 4.
LINE_AXES = (0, 1, 2)


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of (B,C,D,H,W) tensors (eps 1e-6, as published)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight.view(1, -1, 1, 1, 1) + self.bias.view(1, -1, 1, 1, 1)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the hypernetwork heads)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MLPBlock(nn.Module):
    """Linear-act-Linear feed-forward block of the two-way transformer (ReLU there)."""

    def __init__(self, dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class Attention(nn.Module):
    """Multi-head attention with an optional down-projected internal width, (B,Nq,C),(B,Nk,C) -> (B,Nq,C)."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        internal = dim // downsample_rate
        if internal % num_heads:
            raise ValueError("num_heads must divide the attention width")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, internal)
        self.k_proj = nn.Linear(dim, internal)
        self.v_proj = nn.Linear(dim, internal)
        self.out_proj = nn.Linear(internal, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image attention, MLP, image->token attention (SAM's block)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate=2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Tokens (B,T,C) and image (B,C,N) attend to each other; returns (tokens, image tokens (B,N,C))."""

    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, skip_first_layer_pe=(i == 0)) for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate=2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor,
                tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = image.transpose(1, 2)
        key_pe = image_pe.transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding; the (3, C/2) frequency matrix is a saved buffer, not redrawn."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        # empty + normal_ draws what torch.randn draws, and lets a skeleton build skip the draw (and torch's
        # meta-device reference path for randn, which imports sympy).
        self.register_buffer("positional_encoding_gaussian_matrix", nn.init.normal_(torch.empty(3, num_pos_feats)))

    def forward(self, size: tuple[int, int, int]) -> torch.Tensor:
        """(C, D, H, W) encoding of the voxel centres of a grid of ``size``."""
        matrix = self.positional_encoding_gaussian_matrix
        axes = [(torch.arange(n, device=matrix.device, dtype=matrix.dtype) + 0.5) / n for n in size]
        d, h, w = torch.meshgrid(*axes, indexing="ij")
        # The published code stacks (axis 1, axis 0, axis 2) as its (x, y, z); keep that order.
        coords = torch.stack([h, d, w], dim=-1) * 2 - 1
        coords = 2 * math.pi * (coords @ matrix)
        return torch.cat([coords.sin(), coords.cos()], dim=-1).permute(3, 0, 1, 2)


class PromptEncoder(nn.Module):
    """Text embedding (+ previous mask token) -> sparse tokens; previous mask probabilities -> dense embedding."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.mask_downscaling = nn.Sequential(
            DecomposedConv3d(1, embed_dim // 8, 7, stride=4), nn.GELU(),
            DecomposedConv3d(embed_dim // 8, embed_dim // 4, 5, stride=2), nn.GELU(),
            DecomposedConv3d(embed_dim // 4, embed_dim // 2, 3, stride=2), nn.GELU(),
            DecomposedConv3d(embed_dim // 2, embed_dim, 3),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def forward(self, text_embedding: torch.Tensor, mask_probs: torch.Tensor | tuple[torch.Tensor, ...] | None,
                prev_token: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return sparse tokens (K,1 or 2,C) and the dense embedding (K or 1,C,d,h,w or C,1,1,1).

        ``mask_probs`` is the previous pass's probabilities, full (K,1,D,H,W) or as the three line sets.
        """
        sparse = text_embedding.unsqueeze(1)
        if prev_token is not None:
            sparse = torch.cat([sparse, prev_token], dim=1)
        if mask_probs is None:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1)
        elif isinstance(mask_probs, torch.Tensor):
            dense = self.mask_downscaling(mask_probs)
        else:
            dense = self.mask_downscaling[1:](self._first_layer_on_lines(mask_probs))
        return sparse, dense

    def _first_layer_on_lines(self, lines: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The stride-4 first layer from the three line sets it reads (see ``LINE_AXES``)."""
        first = self.mask_downscaling[0]
        out = None
        for axis, branch, x in zip(LINE_AXES, (first.c1, first.c2, first.c3), lines):
            conv, norm = branch[0], branch[1]
            stride = [1, 1, 1]
            stride[axis] = conv.stride[axis]
            y = norm(F.conv3d(x, conv.weight, conv.bias, tuple(stride), conv.padding, conv.dilation, conv.groups))
            out = y if out is None else out + y
        return out


@dataclass
class ImageContext:
    """What the decoder needs from one image, computed once and shared by every prompt."""

    embedding: torch.Tensor  # (1, C, d, h, w): deepest image features
    pe: torch.Tensor  # (1, C, d*h*w): positional encoding of the embedding grid
    skip_s1: torch.Tensor  # (1, C/4, 4d, 4h, 4w): feat_conv1(stage-2 features)
    skip_s0: torch.Tensor  # (1, 16d, 16h, 16w, C/16): feat_conv0(stage-0 features), channels-last

    def skip_s0_lines(self, axis: int) -> torch.Tensor:
        """``skip_s0`` on the line set along ``axis`` (the other two axes taken every 4th voxel)."""
        index = [slice(None, None, 4)] * 3
        index[axis] = slice(None)
        return self.skip_s0[(slice(None), *index)]


class MaskDecoder(nn.Module):
    """Tokens + image context -> (K,1,4d·4,...) low-resolution mask logits and the first output token."""

    def __init__(self, dim: int, depth: int, mlp_dim: int, num_heads: int,
                 feat_size: tuple[int, int, int], num_mask_tokens: int = 4) -> None:
        super().__init__()
        self.feat_size = feat_size
        self.transformer = TwoWayTransformer(depth, dim, num_heads, mlp_dim)
        self.mask_tokens = nn.Embedding(num_mask_tokens, dim)
        mid_size = tuple(s * 4 for s in feat_size)
        out_size = tuple(s * 16 for s in feat_size)
        self.output_upscaling = nn.Sequential(
            nn.Upsample(size=mid_size, mode="trilinear", align_corners=False),
            nn.Conv3d(dim, dim // 4, 1), LayerNorm3d(dim // 4), nn.GELU(),
            nn.Upsample(size=out_size, mode="trilinear", align_corners=False),
            nn.Conv3d(dim // 4, dim // 16, 1), LayerNorm3d(dim // 16), nn.GELU(),
        )
        self.feat_conv0 = nn.Conv3d(dim // 16, dim // 16, 1)
        self.feat_conv1 = nn.Conv3d(dim // 4, dim // 4, 1)
        # Four hypernetwork heads as published; only the first mask is ever used.
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim // 4, dim // 16, 3) for _ in range(num_mask_tokens)
        )
        self.txt_align_upscaled_embedding = nn.Sequential(
            nn.Linear(dim, dim // 4), nn.LayerNorm(dim // 4), nn.GELU(), nn.Linear(dim // 4, dim // 16),
        )
        # Interpolation matrices of the last upsampling, per axis: full, and every 4th output row.
        for axis, (n_in, n_out) in enumerate(zip(mid_size, out_size)):
            matrix = interpolation_matrix(n_in, n_out)
            self.register_buffer(f"_interp{axis}", matrix, persistent=False)
            self.register_buffer(f"_interp{axis}_every4", matrix[::4].contiguous(), persistent=False)

    def _upsample_lines(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """(K,C,d,h,w) -> channels-last trilinear upsampling evaluated on the line set along ``axis``."""
        mats = [getattr(self, f"_interp{a}" if a == axis else f"_interp{a}_every4").to(x.dtype) for a in range(3)]
        x = torch.einsum("kcdhw,Ww->kcdhW", x, mats[2])
        x = torch.einsum("kcdhW,Hh->kcdHW", x, mats[1])
        return torch.einsum("kcdHW,Dd->kDHWc", x, mats[0])

    def _masks(self, x: torch.Tensor, skip: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Channels-last (K,D,H,W,C) features -> (K,1,D,H,W) logits: LayerNorm, + skip, GELU, · weights."""
        ln2 = self.output_upscaling[6]
        x = F.layer_norm(x, (x.shape[-1],), ln2.weight, ln2.bias, ln2.eps)
        x = F.gelu(x.add_(skip))
        masks = torch.matmul(x.flatten(1, 3), weights.unsqueeze(-1).to(x.dtype))
        return masks.reshape(x.shape[0], 1, *x.shape[1:4])

    def forward(self, ctx: ImageContext, text_embedding: torch.Tensor, sparse: torch.Tensor,
                dense: torch.Tensor, lines_only: bool = False) -> tuple[torch.Tensor | tuple[torch.Tensor, ...],
                                                                      torch.Tensor]:
        """Logits (K,1,D,H,W) and the first output token; with ``lines_only`` the logits on the line sets."""
        k = sparse.shape[0]
        tokens = torch.cat([self.mask_tokens.weight.unsqueeze(0).expand(k, -1, -1), sparse], dim=1)
        src = (ctx.embedding + dense).expand(k, -1, -1, -1, -1).flatten(2)
        hs, keys = self.transformer(src, ctx.pe, tokens)
        up1, conv1, ln1, act1, up2, conv2, _, _ = self.output_upscaling
        grid = keys.transpose(1, 2).reshape(k, -1, *self.feat_size)
        # 1x1 convolutions commute with trilinear upsampling: convolve at the lower resolution.
        x = act1(ln1(up1(conv1(grid)) + ctx.skip_s1))
        x = conv2(x)
        weights = self.output_hypernetworks_mlps[0](hs[:, 0]) + self.txt_align_upscaled_embedding(text_embedding)
        if lines_only:
            lines = tuple(self._masks(self._upsample_lines(x, axis), ctx.skip_s0_lines(axis), weights)
                          for axis in LINE_AXES)
            return lines, hs[:, 0:1]
        # The last stage is elementwise work on (K, 48, 16d, 16h, 16w): run it channels-last so LayerNorm is
        # one fused kernel over the contiguous channel axis, then contract channels with the per-prompt weights.
        x = x.contiguous(memory_format=torch.channels_last_3d)
        if torch.is_grad_enabled():
            x = F.interpolate(x, size=up2.size, mode="trilinear", align_corners=False).permute(0, 2, 3, 4, 1)
            return self._masks(x, ctx.skip_s0, weights), hs[:, 0:1]
        # Inference: one prompt at a time, in slabs of output slices small enough to stay in the CPU cache.
        return torch.cat([self._full_masks(x[i], ctx.skip_s0, weights[i : i + 1]) for i in range(k)]), hs[:, 0:1]

    def _full_masks(self, x: torch.Tensor, skip: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One prompt's (C, d, h, w) features -> (1, 1, D, H, W) logits at full resolution, slab by slab.

        The trilinear upsampling is separable: x and y by the interpolation matrices once, to (d, H, W, C), then
        z by one matrix product per slab straight into channels-last (S, H, W, C); LayerNorm, skip, GELU and the
        weights then run on the slab while it is in the cache (the whole stage, one pass per operation over
        (D, H, W, C), was memory-bound). Same matrices as the line sets of the intermediate passes.
        """
        d_out, h_out, w_out = (getattr(self, f"_interp{a}").shape[0] for a in range(3))
        mats = [getattr(self, f"_interp{a}").to(x.dtype) for a in range(3)]
        c = x.shape[0]
        x = torch.einsum("cdhw,Ww->cdhW", x, mats[2])
        x = torch.einsum("cdhW,Hh->dHWc", x, mats[1]).contiguous().view(x.shape[1], -1)  # (d, H*W*C)
        slab = max(1, FULL_STAGE_SLAB // (h_out * w_out * c)) if x.device.type == "cpu" else d_out
        out = []
        for z0 in range(0, d_out, slab):
            z1 = min(d_out, z0 + slab)
            part = torch.mm(mats[0][z0:z1], x).view(1, z1 - z0, h_out, w_out, c)
            out.append(self._masks(part, skip[:, z0:z1], weights))
        return torch.cat(out, 2)


class SegDecoder(nn.Module):
    """Decoder with ``pass_num`` refinement passes: each re-decodes from sigmoid(previous logits)."""

    def __init__(self, embed_dim: int, feat_size: tuple[int, int, int], pass_num: int,
                 transformer_depth: int, mlp_dim: int, num_heads: int) -> None:
        super().__init__()
        self.feat_size = feat_size
        self.pass_num = pass_num
        self.mask_decoder = MaskDecoder(embed_dim, transformer_depth, mlp_dim, num_heads, feat_size)
        self.prompt_encoder = PromptEncoder(embed_dim)

    def prepare(self, features: list[torch.Tensor]) -> ImageContext:
        """Image-only part of decoding, from the encoder's five feature maps (batch 1)."""
        md = self.mask_decoder
        pe = self.prompt_encoder.pe_layer(self.feat_size).to(features[4].dtype)
        skip_s0 = md.feat_conv0(features[0]).permute(0, 2, 3, 4, 1).contiguous()  # channels-last
        return ImageContext(features[4], pe.flatten(1).unsqueeze(0), md.feat_conv1(features[2]), skip_s0)

    def forward(self, ctx: ImageContext, text_embedding: torch.Tensor) -> torch.Tensor:
        """(K, C) text embeddings -> (K, 1, 16d, 16h, 16w) logits after all refinement passes."""
        sparse, dense = self.prompt_encoder(text_embedding, None, None)
        logits, token = self.mask_decoder(ctx, text_embedding, sparse, dense, lines_only=self.pass_num > 0)
        for i in range(self.pass_num):
            probs = tuple(torch.sigmoid(t) for t in logits)
            sparse, dense = self.prompt_encoder(text_embedding, probs, token)
            logits, token = self.mask_decoder(ctx, text_embedding, sparse, dense, lines_only=i < self.pass_num - 1)
        return logits
