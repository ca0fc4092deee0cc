"""The Typer application, the shared ``--debug`` switch, and the mapping of errors to exit codes."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from text3dsam_cli import __version__
from text3dsam_cli.cli.help import HelpGroup
from text3dsam_cli.errors import Text3DSAMError, UsageError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="text3dsam",
    help="Segment 3-D medical images from free-text prompts with Text3DSAM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    cls=HelpGroup,  # clean help for every command: flags without placeholders, metavars, verbatim text
)

#: Progress, logs and errors go to stderr; stdout carries only machine-readable output.
err_console = Console(stderr=True)
_state = {"debug": False}


def is_debug() -> bool:
    """Whether ``--debug`` was given (tracebacks are then shown)."""
    return _state["debug"]


def one_line(text: str) -> str:
    """``text`` with line breaks escaped (a file name may hold one), so that an error stays one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def print_error(message: str) -> None:
    """``error: <message>`` on stderr, on one line."""
    err_console.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error on stderr and exit with ``code``."""
    print_error(message)
    raise typer.Exit(code)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so that temporary files are cleaned up."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` (main thread only; elsewhere nothing changes)."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except (ValueError, OSError):  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def handle_errors(func: F) -> F:
    """Turn library errors into one-line messages and exit codes (tracebacks only with ``--debug``).

    Ctrl-C exits with status 130 ("interrupted"), SIGTERM with 143 ("terminated"); in both cases the
    temporary files of the output being written are removed first.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with sigterm_raises():
                return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Text3DSAMError as exc:
            if is_debug():
                err_console.print_exception()
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Terminated:
            fail("terminated (SIGTERM)", 143)
        except Exception as exc:
            if is_debug():
                err_console.print_exception()
            fail(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)

    return wrapper  # type: ignore[return-value]


def parse_triple(text: str | None, option: str, cast: Callable[[str], Any],
                 example: str) -> tuple[Any, Any, Any] | None:
    """``"a,b,c"`` (or ``"axbxc"``, or one value for all three) -> three positive values; else a usage error."""
    if not text:
        return None
    try:
        values = [cast(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or min(values) <= 0 or not all(math.isfinite(v) for v in values):
        raise UsageError(f"{option} {text!r}: give one or three positive numbers, e.g. {example}")
    return values[0], values[1], values[2]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"text3dsam {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Segment 3-D medical images from free-text prompts with Text3DSAM."""
    _state["debug"] = debug
    quiet_libraries(debug)


def quiet_libraries(debug: bool) -> None:
    """Keep library chatter off stderr (the CLI reports its own one-line messages): numpy RuntimeWarnings and
    nibabel's notes (commands that use ITK also call ``silence_itk_warnings``). ``--debug`` keeps them."""
    if debug:
        return
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    logging.getLogger("nibabel").setLevel(logging.ERROR)


def main() -> None:
    """Console-script entry point.

    Once the command has finished (every output written, atomically, and closed), the process ends without
    the interpreter's teardown: freeing torch's and the model's objects one by one took about 0.5 s of a
    7 s `segment` run. Streams and logging are flushed first; the exit status is the command's.
    """
    try:
        app(prog_name="text3dsam")
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # SystemExit("message"): printed to stderr with status 1, as the interpreter would
            print(exc.code, file=sys.stderr)
            code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)

