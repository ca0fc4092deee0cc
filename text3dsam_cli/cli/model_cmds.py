"""``text3dsam download`` (pre-fetch weights into the HF cache) and ``text3dsam info``."""

from __future__ import annotations

import json
import platform
from typing import Any

import typer

from text3dsam_cli import DEFAULT_MODEL, __version__
from text3dsam_cli.cli.app import app, err_console, handle_errors

MODEL_HELP = "Checkpoint folder or Hugging Face repo id (default: $TEXT3DSAM_MODEL or " + DEFAULT_MODEL + ")."


@app.command("download")
@handle_errors
def download_command(
    model: str = typer.Argument(None, help=MODEL_HELP, show_default=False),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit of the hub repo."),
    vocabulary: str = typer.Option(None, "--vocabulary", help="Prompts JSON ({dataset: {label: [phrasings]}}, "
                                   "like the challenge's) whose phrasings fill the prompt-embedding store "
                                   "(default: the packaged training vocabulary, when present)."),
    no_embedding_cache: bool = typer.Option(False, "--no-embedding-cache", help="Do not fill the "
                                            "prompt-embedding store."),
) -> None:
    """Pre-fetch model weights into the Hugging Face cache (honours HF_HOME, HF_ENDPOINT, HF_TOKEN).

    Also fills the prompt-embedding store ($TEXT3DSAM_CACHE, else ~/.cache/text3dsam) with the training
    vocabulary, so that runs with those prompts never load the text encoder's tokenizer. Run it on a connected
    machine; copy the caches to offline machines and set HF_HUB_OFFLINE=1 there. Interrupted downloads resume.
    Prints the snapshot folder on stdout.
    """
    from text3dsam_cli.model import download_model

    location = download_model(model, revision)
    err_console.print(f"model {location.repo_id or location.path} ready"
                      + (f" (commit {location.commit})" if location.commit else ""))
    if not no_embedding_cache:
        phrasings = vocabulary_phrasings(vocabulary)
        if phrasings:
            from text3dsam_cli.embedding_store import EmbeddingStore, fill_embedding_store
            from text3dsam_cli.model import load_model

            net = load_model(location)
            store = EmbeddingStore.for_model(net)
            added = fill_embedding_store(net, phrasings, store)
            err_console.print(f"prompt-embedding store {store.path}: {len(store)} prompts ({added} new)")
    typer.echo(str(location.path))


def vocabulary_phrasings(path: str | None) -> list[str]:
    """Phrasings of ``--vocabulary`` (a prompts JSON), else of the packaged vocabulary, else none."""
    if path:
        from text3dsam_cli.embedding_store import phrasings_from_prompts_json
        from text3dsam_cli.errors import InputError

        try:
            return phrasings_from_prompts_json(path)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read the vocabulary ({exc})", path) from None
    try:
        from text3dsam_cli.prompts import load_vocabulary  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return []
    return list(dict.fromkeys(p for entry in load_vocabulary() for p in entry.phrasings))


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


#: Extras for tests and development: not features, so ``info`` does not list them.
DEVELOPMENT_EXTRAS = ("test", "tests", "dev", "docs")
#: The core dependencies ``info`` reports when the package's metadata cannot be read (a source checkout).
CORE_PACKAGES = ("torch", "tokenizers", "huggingface_hub", "safetensors", "SimpleITK", "nibabel", "pydicom",
                 "monai", "numpy", "scipy", "typer")


def _requirements() -> tuple[list[str], dict[str, list[str]]]:
    """(core requirement names, {extra: requirement names}) from this package's metadata (pyproject); the
    development extras are left out. Without metadata: (:data:`CORE_PACKAGES`, {})."""
    import re
    from importlib import metadata

    try:
        requires = metadata.requires("text3dsam-cli") or []
    except metadata.PackageNotFoundError:
        return list(CORE_PACKAGES), {}
    core: list[str] = []
    extras: dict[str, list[str]] = {}
    for requirement in requires:
        name = re.match(r"\s*([A-Za-z0-9._-]+)", requirement)
        if not name or name.group(1).replace("_", "-").lower() == "text3dsam-cli":
            continue
        extra = re.search(r"extra\s*==\s*[\"']([^\"']+)[\"']", requirement)
        if extra is None:
            core.append(name.group(1))
        elif extra.group(1) not in DEVELOPMENT_EXTRAS:
            extras.setdefault(extra.group(1), []).append(name.group(1))
    return core, extras


def info_extras(extras: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """{extra: {"installed": every package present, "packages": {name: version or None}}}."""
    out: dict[str, dict[str, Any]] = {}
    for extra, names in sorted(extras.items()):
        packages = {name: _version(name) for name in names}
        out[extra] = {"installed": all(packages.values()), "packages": packages}
    return out


@app.command("info")
@handle_errors
def info_command(
    model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit of the hub repo."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    as_json: bool = typer.Option(False, "--json", help="Print the information as JSON (instead of a table)."),
) -> None:
    """Show the resolved model and revision, device, optional extras and versions (on stdout).

    info never downloads: it looks for the model in the Hugging Face cache only.
    """
    import torch

    from text3dsam_cli.devices import resolve_device
    from text3dsam_cli.errors import ModelNotFoundError
    from text3dsam_cli.model.hub import hub_cache_dir, hub_offline, requested_model, resolve_model

    info: dict[str, Any] = {"text3dsam": __version__, "python": platform.python_version()}
    try:
        info["model"] = resolve_model(model, revision, download=False).describe()
    except ModelNotFoundError as exc:
        info["model"] = {"model": requested_model(model), "revision": revision, "available": False,
                         "reason": str(exc)}
    resolved = resolve_device(device)
    info["device"] = {"resolved": str(resolved), "cuda_available": torch.cuda.is_available(),
                      "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                      "cpu_threads": torch.get_num_threads()}
    info["hub"] = {"cache": str(hub_cache_dir()), "offline": hub_offline()}
    core, extras = _requirements()
    info["extras"] = info_extras(extras)
    info["versions"] = {name: _version(name) for name in core}
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(show_header=False, box=None)
    model_info = info["model"]
    table.add_row("model", escape(str(model_info.get("model"))))
    if model_info.get("available") is False:
        table.add_row("", "[yellow]not in the cache[/] (run `text3dsam download`)")
    else:
        table.add_row("revision", escape(str(model_info.get("revision") or "main/default")))
        table.add_row("commit", str(model_info.get("commit") or "-"))
        table.add_row("path", escape(str(model_info.get("path"))))
    table.add_row("device", info["device"]["resolved"] + (f" ({', '.join(info['device']['cuda_devices'])})"
                                                          if info["device"]["cuda_devices"] else ""))
    table.add_row("cpu threads", str(info["device"]["cpu_threads"]))
    table.add_row("HF cache", escape(info["hub"]["cache"]) + "  (info looks in the cache only)")
    table.add_row("HF_HUB_OFFLINE", "set: segment and download use the cache only, never the network"
                  if info["hub"]["offline"] else "not set: segment and download fetch missing weights")
    table.add_row("text3dsam", __version__)
    for extra, state in info["extras"].items():
        if state["installed"]:
            text = ", ".join(f"{name} {version}" for name, version in state["packages"].items())
        else:
            text = escape(f"not installed (pip install 'text3dsam-cli[{extra}]')")
        table.add_row(f"extra {extra}", text)
    for name, version in info["versions"].items():
        table.add_row(name, version or "-")
    Console(highlight=False, soft_wrap=True).print(table)
