"""``text3dsam view``: a local web viewer: type a prompt, see the mask over the scan.

:class:`ViewSession` (no web dependencies) holds the scan, the model and the encoded image;
``text3dsam_cli.view.app.create_app`` wraps it in a Starlette app and ``text3dsam_cli.view.server.serve``
runs that with uvicorn (both need the ``view`` extra: ``pip install 'text3dsam-cli[view]'``).
"""

from text3dsam_cli.view.session import CT_PRESETS, ViewSession, check_prompts, read_input

__all__ = ["CT_PRESETS", "ViewSession", "check_prompts", "read_input"]
