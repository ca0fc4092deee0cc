"""``text3dsam train`` and ``text3dsam finetune`` (placeholders until the training module lands)."""

import typer

from text3dsam_cli.cli.app import app, fail


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_command(ctx: typer.Context) -> None:
    """Train a Text3DSAM model from scratch on challenge-style or nnU-Net-style data."""
    fail("`text3dsam train` is not available yet", 2)


@app.command("finetune", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def finetune_command(ctx: typer.Context) -> None:
    """Fine-tune a published or local Text3DSAM checkpoint on your own data."""
    fail("`text3dsam finetune` is not available yet", 2)
