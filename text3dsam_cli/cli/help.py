"""How every command's ``--help`` reads: value names (metavars), flags without placeholders, text kept verbatim.

Typer renders an option's type as a placeholder (``--preview <bool>``, ``INPUT <str>``, usage ``{input}``) and
parses help texts as Rich markup, which eats anything that looks like a tag (``pip install 'text3dsam-cli[view]'``
loses ``[view]``). :class:`HelpGroup`, the application's group class (``typer.Typer(cls=HelpGroup)`` in
``cli/app.py``), fixes that once for every command and sub-command registered on the app, when the Click
command tree is built:

- a flag (``--preview``, ``--augment/--no-augment``) shows no value;
- an option that takes a value shows its metavar: the ``metavar=`` given to ``typer.Option``, else
  :data:`METAVARS` (one name per option flag, the same in every command), else one derived from the type
  (choices ``a|b``, ``PATH`` for ``pathlib.Path``, ``N`` for ``int``, ``NUMBER`` for ``float``, else the
  parameter's name in capitals);
- an argument shows its metavar (``INPUT``, ``PROMPT...``) in the usage line and the argument table, no type;
- help texts are escaped, so Rich prints them as written (brackets included), and the single line breaks of a
  command's docstring are joined, so that paragraphs wrap to the terminal.

``tests/test_help.py`` walks every command of the app and fails on a placeholder or a help text that does not
come out verbatim.
"""

from __future__ import annotations

import inspect
from enum import Enum
from pathlib import PurePath
from typing import Any

from rich.markup import escape
from typer.core import TyperArgument, TyperGroup, TyperOption

#: Metavars by option flag (options) or parameter name (arguments), shared by every command.
METAVARS: dict[str, str] = {
    # arguments
    "input": "INPUT",
    "prompts": "PROMPT",
    "data": "DATA",
    "query": "QUERY",
    "model": "MODEL",
    # options
    "--output": "PATH",
    "--model": "MODEL",
    "--revision": "REV",
    "--prompt-file": "PATH",
    "--prompts": "PATH",
    "--vocabulary": "PATH",
    "--tokenizer": "PATH",
    "--val": "DATA",
    "--json": "PATH",
    "--csv": "PATH",
    "--spacing": "MM",
    "--overlap": "FRACTION",
    "--warmup-ratio": "FRACTION",
    "--min-size-ml": "ML",
    "--format": "FORMAT",
    "--series": "UID",
    "--orientation": "CODE",
    "--shard": "I/N",
    "--image-size": "D,H,W",
    "--patch-size": "D,H,W",
    "--text-model": "NAME",
    "--lr": "RATE",
    "--freeze": "PARTS",
    "--host": "ADDRESS",
    "--port": "PORT",
}


def _bare(value: Any) -> str:
    return str(value.value) if isinstance(value, Enum) else str(value)


def derived_metavar(param: Any) -> str:
    """The metavar of a parameter that was given none: see the module docstring for the order."""
    if param.param_type_name == "argument":
        key = param.name or ""
    else:
        key = next((opt for opt in param.opts if opt.startswith("--")), param.opts[0] if param.opts else "")
    if key in METAVARS:
        return METAVARS[key]
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        if getattr(descriptor, "is_choice", False) and descriptor.choices:
            return "|".join(dict.fromkeys(_bare(c) for c in descriptor.choices))
        annotation = getattr(descriptor, "annotation", None)
        if getattr(descriptor, "is_path", False) or (isinstance(annotation, type)
                                                     and issubclass(annotation, PurePath)):
            return "PATH"
        if annotation is int:
            return "N"
        if annotation is float:
            return "NUMBER"
    else:  # Typer before its own parameter types: Click's
        click_type = getattr(param, "type", None)
        choices = getattr(click_type, "choices", None)
        if choices:
            return "|".join(dict.fromkeys(_bare(c) for c in choices))
        kind = getattr(click_type, "name", "")
        if kind in ("integer", "integer range"):
            return "N"
        if kind in ("float", "float range"):
            return "NUMBER"
        if kind in ("path", "file"):
            return "PATH"
    return (param.name or "value").upper()


def _is_flag(param: Any) -> bool:
    return bool(getattr(param, "is_flag", False)) and not getattr(param, "count", False)


class HelpOption(TyperOption):
    """A Typer option whose help shows its metavar, and nothing for a flag."""

    def display_type_rich(self, ctx: Any) -> str | None:
        if _is_flag(self):
            return None
        return self.metavar or derived_metavar(self)

    def display_type(self, ctx: Any) -> str:
        return "" if _is_flag(self) else (self.metavar or derived_metavar(self))


class HelpArgument(TyperArgument):
    """A Typer argument shown by its metavar (``INPUT``, ``[PROMPT]...``), without a type placeholder."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        name = (self.metavar or derived_metavar(self)).removesuffix("...")
        if not self.required:
            name = f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")

    def make_metavar(self, *args: Any, **kwargs: Any) -> str:  # the usage line of Typer before 0.2x (Click's)
        return self._usage_display_name()


def _unescape(text: str) -> str:
    """``text`` without Rich escapes written by hand (``\\[view]``): it is escaped here, once, for every text."""
    return text.replace("\\[", "[")


def _join_lines(text: str) -> str:
    """Paragraphs of ``text`` (a docstring) with their single line breaks joined; ``\\b`` paragraphs and what
    follows a ``\\f`` line are kept as they are."""
    text = inspect.cleandoc(text)
    head, cut, tail = text.partition("\f")
    paragraphs = [p if p.startswith("\b") else " ".join(line.strip() for line in p.splitlines())
                  for p in head.split("\n\n")]
    return "\n\n".join(paragraphs) + cut + tail


def clean_param(param: Any) -> None:
    """Give ``param`` (a Typer option or argument) its help behaviour; idempotent."""
    if isinstance(param, TyperOption) and not isinstance(param, HelpOption):
        param.__class__ = HelpOption
        if not _is_flag(param) and param.metavar is None:
            param.metavar = derived_metavar(param)
    elif isinstance(param, TyperArgument) and not isinstance(param, HelpArgument):
        param.__class__ = HelpArgument
        if param.metavar is None:
            param.metavar = derived_metavar(param) + ("..." if param.nargs != 1 else "")
    else:
        return
    if param.help:
        param.help = escape(_unescape(param.help))


def clean_command(command: Any) -> None:
    """Clean ``command``'s parameters (its ``--help`` option included), its help texts and, for a group, every
    command below it."""
    if getattr(command, "_text3dsam_help_clean", False):
        return
    command._text3dsam_help_clean = True
    for param in command.params:
        clean_param(param)
    if getattr(command, "add_help_option", False):
        help_option = command.get_help_option(command.context_class(command))
        if help_option is not None:
            clean_param(help_option)
    for attribute in ("help", "short_help", "epilog"):
        text = getattr(command, attribute, None)
        if text:
            setattr(command, attribute, escape(_unescape(_join_lines(text))))
    for sub in (getattr(command, "commands", None) or {}).values():
        clean_command(sub)


class HelpGroup(TyperGroup):
    """The application's group: every command registered on it (and below) gets clean help; see the module."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        clean_command(self)

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:  # Typer adds the completion options after building the group
            clean_param(param)
        return params

    def add_command(self, cmd: Any, name: str | None = None) -> None:
        super().add_command(cmd, name)
        clean_command(cmd)
