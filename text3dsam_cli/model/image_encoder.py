"""Image encoder: decomposed 3-D convolutions in stages 0-3, self-attention blocks in stage 4.

Module and parameter names follow the published checkpoint (``image_encoder.encoder.s0.0.0.c1.0.weight``
...): they are the checkpoint's interface, so they are kept even where other names would read better.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from text3dsam_cli.model.config import ImageEncoderConfig


class DecomposedConv3d(nn.Module):
    """Sum of three 1-D convolutions along D, H and W (each with optional BatchNorm): (B,Cin,...) -> (B,Cout,...)."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 norm: bool = True) -> None:
        super().__init__()
        pad = kernel_size // 2
        for name, axis in (("c1", 0), ("c2", 1), ("c3", 2)):
            kernel = [1, 1, 1]
            padding = [0, 0, 0]
            kernel[axis] = kernel_size
            padding[axis] = pad
            conv = nn.Conv3d(in_dim, out_dim, tuple(kernel), stride=stride, padding=tuple(padding), groups=groups)
            setattr(self, name, nn.Sequential(conv, nn.BatchNorm3d(out_dim) if norm else nn.Identity()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.c1(x) + self.c2(x) + self.c3(x)
        # Inference: fold each BatchNorm into its convolution (exact up to rounding) and sum in place.
        out = None
        for branch in (self.c1, self.c2, self.c3):
            conv, norm = branch[0], branch[1]
            weight, bias = conv.weight, conv.bias
            if isinstance(norm, nn.BatchNorm3d):
                scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
                weight = weight * scale.view(-1, 1, 1, 1, 1)
                bias = (bias - norm.running_mean) * scale + norm.bias
            y = F.conv3d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            out = y if out is None else out.add_(y)
        return out


class ChannelMLP(nn.Module):
    """Linear-GELU-Linear on the last axis (parameters ``mlp.0`` and ``mlp.3``, as published)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def decomposed_stem(in_channels: int, out_channels: int, kernel_size: int = 7) -> nn.Sequential:
    """Stride-4 stem: a decomposed 7-conv then three decomposed 3-convs, (B,1,D,H,W) -> (B,C,D/4,H/4,W/4).

    The published code passes ``nn.GELU()`` where the block expects its ``norm`` flag, so the stem has
    BatchNorm and *no* activation between its convolutions. The weights were trained that way.
    """
    return nn.Sequential(
        DecomposedConv3d(in_channels, out_channels, kernel_size, stride=4),
        DecomposedConv3d(out_channels, out_channels, 3),
        DecomposedConv3d(out_channels, out_channels, 3),
        DecomposedConv3d(out_channels, out_channels, 3),
    )


class ConvBlock(nn.Module):
    """ConvNeXt-like block: [maxpool + 1x1 projection] -> depthwise decomposed conv -> MLP x layer scale + skip."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, downsample: bool = False,
                 mlp_ratio: int = 4) -> None:
        super().__init__()
        self.downsample = downsample
        if downsample:
            self.pool = nn.MaxPool3d(3, 2, 1)
            self.proj = nn.Conv3d(in_dim, out_dim, 1, bias=False)
        self.dwconv = DecomposedConv3d(out_dim, out_dim, kernel_size, groups=out_dim)
        self.mlp = ChannelMLP(out_dim, out_dim * mlp_ratio)
        self.scale = nn.Parameter(torch.full((out_dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            x = self.proj(self.pool(x))
        y = self.dwconv(x).permute(0, 2, 3, 4, 1)
        y = self.mlp(y) * self.scale
        return x + y.permute(0, 4, 1, 2, 3)


class ConvPosEnc(nn.Module):
    """Convolutional position encoding: tokens + depthwise decomposed 3-conv of their 3-D arrangement."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = DecomposedConv3d(dim, dim, 3, groups=dim, norm=False)

    def forward(self, x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        b, _, c = x.shape
        grid = x.transpose(1, 2).reshape(b, c, *size)
        return x + self.proj(grid).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention without biases, (B,N,C) -> (B,N,C).

    The published model *multiplies* queries by sqrt(head_dim) (instead of dividing); the weights were
    trained with that scale, so it is kept.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** 0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SpatialAttentionBlock(nn.Module):
    """Pre-norm transformer block with convolutional position encodings, (B,N,C) -> (B,N,C)."""

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.cpe = nn.ModuleList([ConvPosEnc(dim), ConvPosEnc(dim)])
        self.attn = SelfAttention(dim, num_heads)
        self.layer_norm1 = nn.LayerNorm(dim)
        self.mlp1 = ChannelMLP(dim, dim * mlp_ratio)
        self.layer_norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        x = self.cpe[0](x, size)
        x = x + self.attn(self.layer_norm1(x))
        x = self.cpe[1](x, size)
        return x + self.mlp1(self.layer_norm2(x))


class TransformerBlock(nn.Module):
    """[maxpool + 1x1 projection] then a spatial attention block over all voxels, (B,C,D,H,W) -> same."""

    def __init__(self, in_dim: int, out_dim: int, downsample: bool = False, num_heads: int = 8,
                 mlp_ratio: int = 4) -> None:
        super().__init__()
        self.downsample = downsample
        if downsample:
            self.pool1 = nn.MaxPool3d(3, 2, 1)
            self.proj = nn.Conv3d(in_dim, out_dim, 1, bias=False)
        self.spatial_attention = SpatialAttentionBlock(out_dim, num_heads, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            x = self.proj(self.pool1(x))
        b, c, *size = x.shape
        tokens = self.spatial_attention(x.flatten(2).transpose(1, 2), tuple(size))
        return tokens.transpose(1, 2).reshape(b, c, *size)


class Encoder(nn.Module):
    """The five stages ``s0`` (stem, stride 4) to ``s4`` (stride 64); returns every stage's output."""

    def __init__(self, config: ImageEncoderConfig, in_channels: int = 1) -> None:
        super().__init__()
        channels, blocks, kernels, ratio = config.channels, config.blocks, config.kernels, config.mlp_ratio
        self.s0 = nn.Sequential(decomposed_stem(in_channels, channels[0], config.stem_kernel))
        for stage in (1, 2, 3):
            layers = [ConvBlock(channels[stage - 1], channels[stage], kernels[stage - 1], True, ratio)]
            layers += [ConvBlock(channels[stage], channels[stage], kernels[stage - 1], False, ratio)
                       for _ in range(blocks[stage] - 1)]
            setattr(self, f"s{stage}", nn.Sequential(*layers))
        layers = [TransformerBlock(channels[3], channels[4], True, config.num_heads, ratio)]
        layers += [TransformerBlock(channels[4], channels[4], False, config.num_heads, ratio)
                   for _ in range(blocks[4] - 1)]
        self.s4 = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in (self.s0, self.s1, self.s2, self.s3, self.s4):
            x = stage(x)
            features.append(x)
        return features


class ImageEncoder(nn.Module):
    """(B,1,D,H,W) float image in 0..255 -> five feature maps at strides 4, 8, 16, 32, 64."""

    def __init__(self, config: ImageEncoderConfig | None = None) -> None:
        super().__init__()
        self.encoder = Encoder(config or ImageEncoderConfig())

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(image)
