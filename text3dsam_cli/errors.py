"""Exceptions that the CLI turns into one-line messages and exit codes.

Library code raises these (never prints or exits); ``text3dsam_cli.cli`` maps them to
``error: <message>`` on stderr and a non-zero exit status, with the traceback only under ``--debug``.
"""

from __future__ import annotations

from pathlib import Path


class Text3DSAMError(Exception):
    """Base class of every error the tool reports to the user without a traceback."""

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(Text3DSAMError):
    """An input file or folder that cannot be read or is not a usable image."""


class OutputError(Text3DSAMError):
    """An output location that cannot be written."""


class CheckpointError(Text3DSAMError):
    """A checkpoint folder whose config, tensors or tokenizer do not fit the model."""


class ModelNotFoundError(Text3DSAMError):
    """The model could be found neither locally, nor in the cache, nor on the hub."""


class UsageError(Text3DSAMError):
    """Bad command-line usage (exit status 2, like Typer's own usage errors)."""

    exit_code = 2
