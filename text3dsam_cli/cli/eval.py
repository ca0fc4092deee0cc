"""``text3dsam eval`` (placeholder until the evaluation module lands)."""

import typer

from text3dsam_cli.cli.app import app, fail


@app.command("eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def eval_command(ctx: typer.Context) -> None:
    """Score predictions against ground truth with the challenge's metrics (DSC, NSD, F1, DSC_TP)."""
    fail("`text3dsam eval` is not available yet", 2)
