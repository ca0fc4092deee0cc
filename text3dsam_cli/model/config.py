"""``Text3DSAMConfig``: the published ``med3d_seg`` configuration, plus the fields our checkpoints add."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Fields of the published config.json (MagicXin/Text3DSAM), in its order.
PUBLISHED_FIELDS = (
    "architectures", "model_type", "image_size", "patch_size", "embed_dim", "pass_num",
    "transformer_depth", "mlp_dim", "num_heads", "focal_weight", "dice_weight", "text_model",
    "vision_encoder",
)


@dataclass
class ImageEncoderConfig:
    """Shape of the image encoder; the defaults are the published model's (a variant is another config).

    ``channels`` are the widths of stages s0..s4, ``blocks`` the blocks per stage, ``kernels`` the depthwise
    kernel lengths of the convolutional stages s1..s3, ``stem_kernel`` the stride-4 stem's first kernel,
    ``num_heads`` the attention heads of stage s4 and ``mlp_ratio`` the hidden width of every block's MLP.
    The decoder reads stages s0, s2 and s4, so their widths must be embed_dim/16, embed_dim/4 and embed_dim.
    """

    channels: tuple[int, ...] = (48, 96, 192, 384, 768)
    blocks: tuple[int, ...] = (1, 2, 3, 6, 2)
    kernels: tuple[int, ...] = (13, 11, 9)
    stem_kernel: int = 7
    num_heads: int = 8
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.blocks = tuple(int(b) for b in self.blocks)
        self.kernels = tuple(int(k) for k in self.kernels)
        if len(self.channels) != 5 or len(self.blocks) != 5 or len(self.kernels) != 3:
            raise ValueError("image_encoder needs 5 channels, 5 blocks and 3 kernels")
        if min(self.blocks) < 1 or min(self.channels) < 1 or any(k < 1 or k % 2 == 0 for k in self.kernels):
            raise ValueError("image_encoder blocks and channels must be positive and kernels odd")
        if self.channels[4] % self.num_heads:
            raise ValueError(f"image_encoder channels[4]={self.channels[4]} is not a multiple of num_heads")

    def to_dict(self) -> dict[str, Any]:
        """JSON form (lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Text3DSAMConfig:
    """Hyper-parameters of a Text3DSAM model, named exactly as the published ``config.json`` names them.

    ``text_config`` (a BERT config dict), ``image_encoder`` (:class:`ImageEncoderConfig`, the published
    shape by default) and ``inference`` (preferred mode / spacing / orientation) are our additions; the
    published file has none of them. Unknown keys are kept in ``extra`` and written back.
    """

    image_size: tuple[int, int, int] = (128, 256, 256)
    patch_size: tuple[int, int, int] = (64, 64, 64)
    embed_dim: int = 768
    pass_num: int = 2
    transformer_depth: int = 2
    mlp_dim: int = 2048
    num_heads: int = 8
    focal_weight: float = 1.0
    dice_weight: float = 1.0
    text_model: str = "nlpie/tiny-clinicalbert"
    vision_encoder: str = ""
    model_type: str = "med3d_seg"
    architectures: list[str] = field(default_factory=lambda: ["Med3DSeg"])
    text_config: dict[str, Any] | None = None
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    inference: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_size = tuple(int(s) for s in self.image_size)  # type: ignore[assignment]
        self.patch_size = tuple(int(s) for s in self.patch_size)  # type: ignore[assignment]
        if len(self.image_size) != 3 or len(self.patch_size) != 3:
            raise ValueError("image_size and patch_size must have three entries (D, H, W)")
        for size, patch in zip(self.image_size, self.patch_size):
            if size % patch:
                raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if isinstance(self.image_encoder, dict):
            self.image_encoder = ImageEncoderConfig(**self.image_encoder)
        widths = self.image_encoder.channels
        needed = (self.embed_dim // 16, self.embed_dim // 4, self.embed_dim)
        if (widths[0], widths[2], widths[4]) != needed:
            raise ValueError(f"image_encoder channels {list(widths)}: stages s0, s2, s4 must be "
                             f"{list(needed)} for embed_dim {self.embed_dim}")

    @property
    def feat_size(self) -> tuple[int, int, int]:
        """Spatial size of the deepest image feature map (image_size // patch_size)."""
        return tuple(s // p for s, p in zip(self.image_size, self.patch_size))  # type: ignore[return-value]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Text3DSAMConfig:
        """Build from a ``config.json`` dict; unknown keys go to ``extra``."""
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` content: published fields first, then ours, then unknown extras."""
        data = asdict(self)
        extra = data.pop("extra")
        data["image_size"] = list(self.image_size)
        data["patch_size"] = list(self.patch_size)
        data["image_encoder"] = self.image_encoder.to_dict()
        ordered = {k: data[k] for k in PUBLISHED_FIELDS}
        for key in ("text_config", "image_encoder", "inference"):
            if data[key] is not None:
                ordered[key] = data[key]
        ordered.update(extra)
        return ordered
