"""text3dsam: free-text-prompted 3D medical image segmentation (Text3DSAM) as a CLI and Python library."""

__version__ = "0.1.0"

DEFAULT_MODEL = "MagicXin/Text3DSAM"
