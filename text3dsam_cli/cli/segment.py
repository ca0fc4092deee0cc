"""``text3dsam segment`` (placeholder until inference lands)."""

import typer

from text3dsam_cli.cli.app import app, fail


@app.command("segment", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def segment_command(ctx: typer.Context) -> None:
    """Segment 3-D images from free-text prompts."""
    fail("`text3dsam segment` is not available yet", 2)
