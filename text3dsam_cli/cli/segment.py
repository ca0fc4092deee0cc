"""``text3dsam segment``: thin wrapper over :mod:`text3dsam_cli.pipeline`."""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from text3dsam_cli.cli.app import app, err_console, handle_errors, is_debug, one_line, parse_triple, print_error
from text3dsam_cli.cli.model_cmds import MODEL_HELP
from text3dsam_cli.errors import UsageError
from text3dsam_cli.io import formats

if TYPE_CHECKING:  # rich.table is imported where a table is drawn (start-up time)
    from concurrent.futures import Future

    from rich.table import Table


def _read_first(items: list[Any], series_uid: str | None) -> dict[int, Future]:
    """Start reading the first input on a thread of its own, so that it overlaps importing torch and loading the
    model (ISA-L and ITK release the GIL while they decompress); {index: future volume} for ``SegmentRun.run``."""
    if not items or items[0].error is not None or items[0].kind == "dicomweb":  # a URL is read by the run
        return {}
    from concurrent.futures import ThreadPoolExecutor

    from text3dsam_cli.io import read_volume

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="text3dsam-read-first")
    future = pool.submit(read_volume, items[0].path, series_uid=series_uid)
    pool.shutdown(wait=False)
    return {0: future}


def quality_table(labels: list[dict[str, Any]]) -> Table:
    """The per-scan stderr table: prompt, volume, components and flags of each label."""
    from rich import box
    from rich.table import Table

    from text3dsam_cli.quality import flags

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("label", justify="right")
    table.add_column("prompt", overflow="fold", max_width=48)
    table.add_column("ml", justify="right")
    table.add_column("components", justify="right")
    table.add_column("flags")
    for entry in labels:
        marks = flags(entry)
        style = "yellow" if marks else ""
        table.add_row(str(entry["label"]), escape(str(entry["prompt"])), f"{entry['volume_ml']:.1f}",
                      str(entry.get("components", "")), f"[{style}]{', '.join(marks)}[/]" if marks else "")
    return table


def print_path(path: str) -> None:
    """One output path on its own stdout line; a name that is not valid UTF-8 is written as its raw bytes."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        sys.stdout.flush()
        sys.stdout.buffer.write(os.fsencode(path) + b"\n")
        sys.stdout.buffer.flush()
        return
    typer.echo(path)
    sys.stdout.flush()


@app.command("segment")
@handle_errors
def segment_command(
    input: str = typer.Argument(..., help=f"One input ({formats.input_help()}), a folder of those, a DICOMweb "
                                "study/series URL, or '-' to read paths or URLs from stdin (one per line).",
                                show_default=False),
    prompts: list[str] = typer.Argument(None, help="Free-text prompts; label values 1..K in this order. "
                                        "Optional for challenge npz that carry text_prompts.", show_default=False),
    prompt_file: str = typer.Option(None, "--prompt-file", help='Prompts from a file: JSON {"1": "liver", '
                                    '"5": "spleen"} (label values as given) or one prompt per line.'),
    preset: list[str] = typer.Option(None, "--preset", help="Also segment a named prompt set: one training "
                                     "dataset's classes (e.g. CT_AMOS; 'text3dsam prompts --presets' lists them). "
                                     "Repeatable; combines with PROMPT arguments and --prompt-file."),
    output: str = typer.Option(None, "--output", "-o", help=f"Output file ({formats.output_help()}, one input) "
                               "or folder (created). Default: ./text3dsam_output/."),
    model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit of the hub repo."),
    device: str = typer.Option("auto", "--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", "--precision", help="auto (= fp32, TF32 off), fp32, bf16, fp16 (CUDA only)."),
    mode: str = typer.Option("auto", "--mode", help="whole (resize the volume to the model input, the paper's "
                             "way), sliding (windows at --spacing), auto (the checkpoint's recorded choice)."),
    spacing: str = typer.Option(None, "--spacing", help="Sliding-window target spacing in mm, 'x,y,z' or one "
                                "number (default: the checkpoint's, else the input's)."),
    overlap: float = typer.Option(0.5, "--overlap", help="Sliding-window overlap (0..1)."),
    sw_batch_size: int = typer.Option(2, "--sw-batch-size", help="Windows encoded per batch."),
    fmt: str = typer.Option(None, "--format", help=formats.format_help()),
    series: str = typer.Option(None, "--series", help="SeriesInstanceUID to read from a DICOM folder "
                               "(default: the series with the most files)."),
    modality: str = typer.Option(None, "--modality", help="CT, MR, PT, US, ... (default: the DICOM tag or a "
                                 "BIDS suffix of the file name, else the prompts when all known ones belong to "
                                 "one modality, else a heuristic: CT if the minimum is below -500)."),
    window: str = typer.Option("soft_tissue", "--window", help="CT window: soft_tissue (W400/L40), lung "
                               "(W1500/L-600), bone (W1500/L500) or 'level,width'."),
    orientation: str = typer.Option("auto", "--orientation", help="Voxel order the model sees: auto (the "
                                    "model's table per modality: CT/PT LAS, MR LPS for the published model; "
                                    "others as stored), native (as stored) or a code such as LAS. Outputs "
                                    "are always on the input's grid."),
    largest_component: bool = typer.Option(False, "--largest-component", help="Keep only the largest "
                                           "26-connected component of each label (before any output is written)."),
    min_size_ml: float = typer.Option(None, "--min-size-ml", help="Drop components smaller than this many ml "
                                      "from each label (before any output is written)."),
    split: bool = typer.Option(False, "--split", help="Also write one binary mask per prompt."),
    probabilities: bool = typer.Option(False, "--probabilities", help=formats.probabilities_help()),
    preview: bool = typer.Option(False, "--preview", help="Also write a PNG: three orthogonal slices per label."),
    dicom_seg: bool = typer.Option(False, "--dicom-seg", help=formats.DicomSeg().help()),
    strict_prompts: bool = typer.Option(False, "--strict-prompts", help="Refuse prompts that are not phrasings "
                                        "the model was trained on (see 'text3dsam prompts'); default: warn."),
    rtstruct: bool = typer.Option(False, "--rtstruct", help=formats.RTStruct().help()),
    statistics: bool = typer.Option(False, "--statistics", help="Add intensity statistics of the input's own "
                                    "values (HU for CT) inside each label to the sidecar: mean, std, min, p5, "
                                    "median, p95, max."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Skip inputs that are done: their sidecar "
                                       "lists every output this run would write and all of them exist; for a "
                                       "DICOMweb input, also when the server holds its SEG/RTSTRUCT from these "
                                       "prompts."),
    store: bool = typer.Option(False, "--store", help="Send the DICOM outputs (--dicom-seg, --rtstruct) with "
                               "STOW-RS to the DICOMweb server the input came from (or --store-to); see docs/pacs.md."),
    store_to: str = typer.Option(None, "--store-to", help="DICOMweb URL to store the DICOM outputs to (implies "
                                 "--store)."),
    dicomweb_token: str = typer.Option(None, "--dicomweb-token", help="Bearer token for DICOMweb URLs (default: "
                                       "$DICOMWEB_TOKEN; basic auth: $DICOMWEB_USER/$DICOMWEB_PASSWORD).",
                                       show_default=False),
    max_prompts: int = typer.Option(256, "--max-prompts", help="Refuse an input with more prompts than this "
                                    "(each prompt is decoded separately; 0: no limit)."),
    shard: str = typer.Option(None, "--shard", help="Process shard i of n of the input list ('i/n', 1-based), "
                              "or 'auto': i/n from torchrun (RANK/WORLD_SIZE), a SLURM job array or srun tasks."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch and every parallel step (reading "
                                "DICOM slabs, normalisation, quality report, compression); default: the usable "
                                "cores."),
    no_embedding_cache: bool = typer.Option(False, "--no-embedding-cache", help="Encode every prompt with the "
                                            "text encoder; neither read nor write the prompt-embedding store "
                                            "($TEXT3DSAM_CACHE, else ~/.cache/text3dsam)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or log output on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout instead of output paths."),
) -> None:
    """Segment 3-D images from free-text prompts.

    Writes a label map on the input's exact grid (label k = k-th prompt), a JSON sidecar with prompts, volumes
    and timings, and optional extras. stdout lists each written label map, one per line; logs go to stderr.
    Exit status: 0 all inputs done, 1 some input failed (the others are still written), 2 usage error.
    """
    # torch (1.5 s of import) comes after the first input has started reading: see _read_first below.
    from text3dsam_cli.io import expand_inputs, select_shard
    from text3dsam_cli.io.itk import silence_itk_warnings
    from text3dsam_cli.orientation import check_request
    from text3dsam_cli.prompts import (
        add_presets,
        check_prompts,
        describe_unknown,
        find_preset,
        match_prompt,
        read_prompt_file,
        unknown_prompts,
    )

    def warn(message: str) -> None:
        err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)

    if not is_debug():
        silence_itk_warnings()

    prompts = check_prompts(list(prompts or []))  # empty, invisible or not UTF-8: exit 2 before anything else
    for prompt in prompts:
        if ("/" in prompt or os.sep in prompt or formats.input_format(prompt)) and os.path.exists(prompt):
            raise UsageError(f"prompt {prompt!r} is an existing path: segment takes ONE input (a file, a folder "
                             "of inputs, or '-' to read paths from stdin) followed by text prompts")
    label_values = None
    if prompt_file:
        if prompts:
            raise UsageError("give PROMPT arguments or --prompt-file, not both")
        prompts, label_values = read_prompt_file(prompt_file)
    presets = [find_preset(name).name for name in preset or []]  # usage error (exit 2) for an unknown name
    if presets:
        prompts, label_values = add_presets(presets, prompts, label_values)
    unknown = unknown_prompts(prompts)
    if strict_prompts and unknown:
        more = f"; also unknown: {', '.join(repr(p) for p, _ in unknown[1:])}" if len(unknown) > 1 else ""
        raise UsageError(f"--strict-prompts: {describe_unknown(*unknown[0])}{more} (see 'text3dsam prompts')")
    warned: set[str] = set()
    if not quiet:
        for prompt, match in unknown:
            warn(describe_unknown(prompt, match))
            warned.add(prompt)
    try:
        orientation = check_request(orientation)
    except UsageError as exc:
        raise UsageError(f"--orientation: {exc}") from None
    if max_prompts < 0:
        raise UsageError(f"--max-prompts {max_prompts}: give a positive number, or 0 for no limit")
    if max_prompts and len(prompts) > max_prompts:
        raise UsageError(f"{len(prompts)} prompts, more than --max-prompts {max_prompts} (each prompt is decoded "
                         "separately; raise the limit to run them all)")
    target_spacing = parse_triple(spacing, "--spacing", float, "1.5,1.5,3 (mm, x,y,z)")
    items = select_shard(expand_inputs([input], stdin=sys.stdin if input == "-" else None), shard)
    from text3dsam_cli.parallel import set_thread_budget

    set_thread_budget(threads)  # before the first read starts (its DICOM slabs); set_threads adds torch's later
    early = {} if skip_existing else _read_first(items, series)

    from text3dsam_cli.devices import set_threads
    from text3dsam_cli.inference import Segmenter
    from text3dsam_cli.model import load_model
    from text3dsam_cli.pipeline import (
        SegmentOptions,
        SegmentRun,
        check_input_prompts,
        check_options,
        plan_outputs,
        write_behind_setting,
    )

    options = SegmentOptions(output=output, fmt=fmt, series_uid=series, modality=modality, window=window,
                             orientation=orientation, split=split, probabilities=probabilities, preview=preview,
                             dicom_seg=dicom_seg, rtstruct=rtstruct, skip_existing=skip_existing,
                             strict_prompts=strict_prompts, largest_component=largest_component,
                             min_size_ml=min_size_ml, max_prompts=max_prompts or None, statistics=statistics,
                             presets=tuple(presets), store=store or bool(store_to), store_to=store_to,
                             dicomweb_token=dicomweb_token)
    check_options(options)
    write_behind_setting()  # a bad TEXT3DSAM_WRITE_BEHIND is a usage error before the model loads
    set_threads(threads)
    plan_outputs(items, options)  # usage errors (-o one file for several inputs) before the model loads
    check_input_prompts(items, prompts)  # an npz's own text_prompts too
    if not quiet:
        err_console.print(f"[dim]{len(items)} input(s); loading model…[/]")
    net = load_model(model, revision)
    segmenter = Segmenter(net, device=device, precision=precision, mode=mode, spacing=target_spacing,
                          overlap=overlap, sw_batch_size=sw_batch_size, embedding_cache=not no_embedding_cache)
    if not quiet:
        where = net.source.get("model")
        err_console.print(f"[dim]model {where} on {segmenter.device} ({segmenter.mode} volume mode)[/]")

    def on_event(kind: str, data: dict[str, Any]) -> None:
        if kind != "done":
            return
        outcome = data["outcome"]
        if outcome.status == "ok" and not as_json:
            print_path(outcome.outputs[0])
        if quiet:
            return
        for entry in (outcome.sidecar or {}).get("labels", []):  # prompts read from the input (npz)
            if not entry["vocabulary"]["known"] and entry["prompt"] not in warned:
                warned.add(entry["prompt"])
                warn(describe_unknown(entry["prompt"], match_prompt(entry["prompt"])))
        warning = ((outcome.sidecar or {}).get("modality") or {}).get("warning")
        if warning:
            warn(f"{one_line(outcome.input)}: {warning}")
        if outcome.status == "ok":
            err_console.print(f"[green]done[/] {escape(one_line(outcome.input))} [dim]({outcome.seconds:.1f} s)[/]",
                              highlight=False)
            if outcome.sidecar:
                err_console.print(quality_table(outcome.sidecar.get("labels", [])))
        elif outcome.status == "skipped":
            why = "its outputs are complete" if outcome.outputs else "the DICOMweb server holds its DICOM outputs"
            err_console.print(f"[yellow]skipped[/] {escape(one_line(outcome.input))} (done: {why})", highlight=False)
        else:
            if is_debug() and outcome.exception is not None:
                err_console.print("".join(traceback.format_exception(outcome.exception)), markup=False)
            print_error(outcome.error)

    summary = SegmentRun(segmenter, prompts, options, on_event, label_values=label_values).run(items, early)
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
    if not quiet:
        info = summary.to_dict()
        rate = f", {info['images_per_minute']} images/min" if info["images_per_minute"] else ""
        err_console.print(f"{info['succeeded']} done, {info['skipped']} skipped, {info['failed']} failed "
                          f"in {summary.seconds:.1f} s{rate}")
    if summary.failed:
        raise typer.Exit(1)
