"""Names of a package imported on first use (PEP 562): the one rule for ``text3dsam_cli`` and ``text3dsam_cli.io``,
so that importing a light part of the package (``text3dsam --help``, the format registry) loads no heavy library."""

from __future__ import annotations

import importlib
from collections.abc import Callable, MutableMapping
from typing import Any


def lazy_exports(package: str, exports: dict[str, str],
                 namespace: MutableMapping[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``: name -> ``exports[name]`` (a submodule of
    ``package``), imported when first asked for and then kept in ``namespace`` (the package's globals)."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
