"""The ``text3dsam`` command line: thin Typer commands over the Python API.

Each command module registers itself on ``app`` when imported; importing this package registers them all.
"""

from text3dsam_cli.cli import check as _check  # noqa: F401  (registers `check-data`)
from text3dsam_cli.cli import eval as _eval  # noqa: F401  (registers `eval`)
from text3dsam_cli.cli import model_cmds as _model_cmds  # noqa: F401  (registers `download`, `info`)
from text3dsam_cli.cli import pacs as _pacs  # noqa: F401  (registers `pacs search`)
from text3dsam_cli.cli import prompts as _prompts  # noqa: F401  (registers `prompts`)
from text3dsam_cli.cli import report as _report  # noqa: F401  (registers `report`)
from text3dsam_cli.cli import segment as _segment  # noqa: F401  (registers `segment`)
from text3dsam_cli.cli import train as _train  # noqa: F401  (registers `train`, `finetune`)
from text3dsam_cli.cli import view as _view  # noqa: F401  (registers `view`)
from text3dsam_cli.cli.app import app, main

__all__ = ["app", "main"]
