"""text3dsam: free-text-prompted 3D medical image segmentation (Text3DSAM) as a CLI and Python library.

``text3dsam_cli.segment(input, prompts)`` and ``text3dsam_cli.Text3DSAM`` (see :mod:`text3dsam_cli.api`) are
imported on first use (PEP 562), so that ``import text3dsam_cli`` and ``text3dsam --help`` stay fast (no torch).
"""

from __future__ import annotations

from text3dsam_cli.lazy import lazy_exports

__version__ = "0.2.0"

DEFAULT_MODEL = "MagicXin/Text3DSAM"

#: Public name -> module (under text3dsam_cli) that defines it.
_EXPORTS = {
    "segment": "api",
    "Text3DSAM": "api",
    "Segmentation": "api",
    "Text3DSAMError": "errors",
    "UsageError": "errors",
    "InputError": "errors",
}

__all__ = ["DEFAULT_MODEL", "__version__", *sorted(_EXPORTS)]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
