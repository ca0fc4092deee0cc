"""``Text3DSAMConfig``: the published ``med3d_seg`` configuration, plus the fields our checkpoints add."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# Fields of the published config.json (MagicXin/Text3DSAM), in its order.
PUBLISHED_FIELDS = (
    "architectures", "model_type", "image_size", "patch_size", "embed_dim", "pass_num",
    "transformer_depth", "mlp_dim", "num_heads", "focal_weight", "dice_weight", "text_model",
    "vision_encoder",
)


@dataclass
class Text3DSAMConfig:
    """Hyper-parameters of a Text3DSAM model, named exactly as the published ``config.json`` names them.

    ``text_config`` (a BERT config dict) and ``inference`` (preferred mode / spacing / window) are our
    additions; the published file has neither. Unknown keys are kept in ``extra`` and written back.
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

    @property
    def feat_size(self) -> tuple[int, int, int]:
        """Spatial size of the deepest image feature map (image_size // patch_size)."""
        return tuple(s // p for s, p in zip(self.image_size, self.patch_size))  # type: ignore[return-value]

    @property
    def logits_size(self) -> tuple[int, int, int]:
        """Spatial size of the decoder's low-resolution logits (a quarter of image_size)."""
        return tuple(f * 16 for f in self.feat_size)  # type: ignore[return-value]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Text3DSAMConfig:
        """Build from a ``config.json`` dict; unknown keys go to ``extra``."""
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | Path) -> Text3DSAMConfig:
        """Read a ``config.json``."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` content: published fields first, then ours, then unknown extras."""
        data = asdict(self)
        extra = data.pop("extra")
        data["image_size"] = list(self.image_size)
        data["patch_size"] = list(self.patch_size)
        ordered = {k: data[k] for k in PUBLISHED_FIELDS}
        for key in ("text_config", "inference"):
            if data[key] is not None:
                ordered[key] = data[key]
        ordered.update(extra)
        return ordered
