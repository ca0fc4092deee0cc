"""``text3dsam download`` and ``text3dsam info`` (placeholders until weight resolution lands)."""

from text3dsam_cli.cli.app import app, fail


@app.command("download")
def download_command() -> None:
    """Pre-fetch model weights into the Hugging Face cache (for offline machines)."""
    fail("`text3dsam download` is not available yet", 2)


@app.command("info")
def info_command() -> None:
    """Show the resolved model and revision, device and versions."""
    fail("`text3dsam info` is not available yet", 2)
