"""``text3dsam train`` (from scratch) and ``text3dsam finetune``: thin wrappers over :mod:`text3dsam_cli.training`."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer

from text3dsam_cli.cli.app import app, err_console, handle_errors, parse_triple
from text3dsam_cli.cli.model_cmds import MODEL_HELP
from text3dsam_cli.errors import UsageError

DATA_HELP = ("Training data: a folder of challenge .npz cases (ground truth as 'gts' inside or CASE_gt.npz beside), "
             "one .npz, or an nnU-Net folder (dataset.json, imagesTr/, labelsTr/).")
OUTPUT_HELP = ("Output folder: becomes a checkpoint folder for --model (the best-validation weights; last/ holds "
               "the last ones), plus training_summary.json, training_args.json, splits.json, train_log.jsonl/.csv, "
               "progress.png and checkpoints/.")
PROMPTS_HELP = ("Prompt JSON keyed by dataset name ({dataset: {\"1\": [phrasings], \"instance_label\": 0}}, e.g. "
                "CVPR25_TextSegFMData_with_class.json; a case belongs to the dataset whose name begins its file "
                "name) or one label map ({\"1\": [phrasings]}). Default: the npz's text_prompts / dataset.json labels.")


@contextmanager
def _reporter(quiet: bool) -> Iterator[Any]:
    """A training callback drawing a rich progress bar and messages on stderr (nothing when ``quiet``).

    The bar starts with the first case loaded, so that messages and errors before it come without blank lines.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from text3dsam_cli.training import TrainEvent

    if quiet:
        yield lambda event: None
        return
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=err_console, transient=False)
    tasks: dict[str, Any] = {}
    best: dict[str, str] = {"text": ""}

    def say(text: str, style: str | None = None) -> None:
        (progress.console if progress.live.is_started else err_console).print(
            text, style=style, highlight=False, soft_wrap=True, markup=False)

    def callback(event: TrainEvent) -> None:
        if event.kind in ("load", "start") and not progress.live.is_started:
            progress.start()
        if event.kind == "load":
            if "load" not in tasks:
                tasks["load"] = progress.add_task("loading", total=event.total, info="")
            progress.update(tasks["load"], completed=event.step, info=event.message or "")
        elif event.kind == "info":
            say(event.message or "", "dim")
        elif event.kind == "start":
            tasks["train"] = progress.add_task("training", total=event.total, completed=event.step, info="")
        elif event.kind == "step":
            info = f"loss {event.loss:.4f}  lr {event.lr:.2e}  {event.seconds:.2f} s/step{best['text']}"
            progress.update(tasks["train"], completed=event.step, info=info)
        elif event.kind == "checkpoint":
            say(f"step {event.step}: checkpoint {event.message}", "dim")
        elif event.kind == "val" and event.metrics is not None:
            metrics = event.metrics
            mean = metrics.get("mean_dice", math.nan)
            classes = metrics.get("class_mean") or {}
            detail = ", ".join(f"{name} {value:.3f}" for name, value in classes.items()) if len(classes) <= 6 \
                else f"{len(classes)} classes"
            mark = " (best so far)" if metrics.get("improved") else \
                (f" (best {metrics['best_mean_dice']:.4f} at step {metrics['best_step']})"
                 if metrics.get("best_step") is not None else "")
            say(f"step {event.step}: validation mean Dice {mean:.4f}{mark}; per class: {detail}")
            if metrics.get("best_step") is not None:
                best["text"] = f"  best val {metrics['best_mean_dice']:.3f}"
        elif event.kind == "done":
            loss = f"{event.loss:.4f}" if event.loss is not None else "n/a"
            summary = event.metrics or {}
            if summary.get("model") == "best":
                which = (f"best validation Dice {summary['best_val_dice']:.4f} at step {summary['best_step']}; "
                         f"last weights in {event.message}/last")
            else:
                which = "last weights"
            say(f"done: {event.step} steps{' (stopped early)' if summary.get('stopped_early') else ''}, final loss "
                f"{loss}, model ({which}) saved to {event.message}", "green")

    try:
        yield callback
    finally:
        if progress.live.is_started:
            progress.stop()


@contextmanager
def _one_error_per_run() -> Iterator[None]:
    """Under torchrun / accelerate launch, let only rank 0 report an error that every rank hits.

    Another rank that fails waits a few seconds for rank 0 to report and for the launcher to stop it; if it is
    still running then (the error was its own), it reports the error itself, prefixed with its rank.
    """
    from text3dsam_cli.cli.app import Terminated, fail
    from text3dsam_cli.errors import Text3DSAMError

    rank = int(os.environ.get("RANK", "0") or 0)
    if rank == 0 or int(os.environ.get("WORLD_SIZE", "1") or 1) < 2:
        yield
        return
    try:
        yield
    except (typer.Exit, typer.Abort, SystemExit, KeyboardInterrupt, Terminated):
        raise
    except Exception as exc:
        try:
            time.sleep(_RANK_ERROR_WAIT)
        except Terminated:  # the launcher stops this rank after rank 0 reported
            raise typer.Exit(143) from None
        code = exc.exit_code if isinstance(exc, Text3DSAMError) else 1
        text = str(exc) if isinstance(exc, Text3DSAMError) else f"{type(exc).__name__}: {exc}"
        fail(f"rank {rank}: {text}", code)


_RANK_ERROR_WAIT = 10.0


def _common(data: str, output: str, max_steps: int | None, epochs: float, lr: float, batch_size: int,
            grad_accum: int, weight_decay: float, warmup_ratio: float, device: str, precision: str, freeze: str,
            prompts: str | None, val: str | None, val_every: int | None, resume: bool | None, seed: int,
            save_every: int, keep_checkpoints: int, modality: str | None, window: str, augment: str,
            threads: int | None, cache: bool, no_augment: bool = False, **more: Any) -> Any:
    from text3dsam_cli.devices import set_threads
    from text3dsam_cli.training import AugmentConfig, TrainingArguments

    set_threads(threads)
    args = TrainingArguments(
        data=data, output=output, prompts=prompts, val=val, modality=modality, window=window, max_steps=max_steps,
        epochs=epochs, learning_rate=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
        batch_size=batch_size, grad_accum=grad_accum, device=device, precision=precision, freeze=freeze,  # type: ignore[arg-type]
        seed=seed, resume=resume, save_every=save_every, keep_checkpoints=keep_checkpoints, val_every=val_every,
        augment=AugmentConfig.none() if no_augment else AugmentConfig.from_level(augment), cache=cache, **more)
    args.check()
    return args


# Options shared by both commands (Typer reads them from the signatures, so they are repeated there).
_STEPS = "Optimizer steps to run (wins over --epochs)."
_CACHE = ("Keep every case, resized to the model input, in memory (4-5 bytes per input voxel per case); "
          "--no-cache re-reads cases for each sample.")
_RESUME = ("Continue from the last checkpoint in OUTPUT (default: yes when OUTPUT has checkpoints); --no-resume "
           "is --overwrite.")
_VAL = "Validation data (same layouts): Dice per class on full volumes. Default: a split of DATA (--val-fraction)."
_VAL_EVERY = "Validate every N steps (default: once per epoch; 0: only at the end) and at the end."
_VAL_FRACTION = ("Without --val: hold out this fraction of DATA's cases for validation (at least one case when "
                 "there are two or more; 0: no validation), saved as OUTPUT/splits.json and reused on resume.")
_FOLD = "Without --val: validate on fold K of --folds (k-fold cross-validation as in nnU-Net; 0-based)."
_FOLDS = "Number of folds for --fold (default 5)."
_EARLY_STOP = "Stop after N validations without a better mean Dice (0: never)."
_TENSORBOARD = "Also write TensorBoard event files to OUTPUT/tensorboard (needs the tensorboard package)."
_OVERWRITE = "Start over: discard the run OUTPUT holds (checkpoints, logs, split, model) instead of continuing it."
_SAVE_EVERY = "Checkpoint every N steps (0: only at the end); a checkpoint is always written at the end."
_FREEZE = ("Freeze part of the model: text (the BERT text encoder; its projector still trains), image (the image "
           "encoder, kept in eval mode), decoder-only (train only the mask decoder) or none; 'text,image' freezes "
           "both.")
_AUGMENT = ("Augmentation level: none, light (small rotations and scaling, gamma, intensity), default (the paper's: "
            "90-degree rotations, intensity scale/shift) or heavy (adds elastic, mirroring, noise, blur, contrast; "
            "never mirrors left-right for prompts naming a side).")
_SKIP_BAD = ("Train on the cases that pass the data check (see `text3dsam check-data`) and leave out the others "
             "with a note, instead of stopping.")
_LORA_RANK = ("Train LoRA adapters of this rank on the attention and MLP layers of the image encoder and the "
              "decoder's transformer instead of all weights (needs the 'lora' extra); 0: off. The saved model "
              "has them merged.")
_LORA_ALPHA = "LoRA scale numerator: the adapters are scaled by alpha / rank (default alpha = rank)."


@app.command("finetune")
@handle_errors
@_one_error_per_run()
def finetune_command(
    data: str = typer.Argument(..., help=DATA_HELP, show_default=False),
    model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    output: str = typer.Option(..., "--output", "-o", help=OUTPUT_HELP, show_default=False),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit of the hub repo."),
    max_steps: int = typer.Option(None, "--max-steps", help=_STEPS),
    epochs: float = typer.Option(10.0, "--epochs", help="Passes over all (case, class) samples."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (AdamW, linear warmup, cosine decay)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Samples per process and micro-step."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-steps per optimizer step."),
    weight_decay: float = typer.Option(1e-5, "--weight-decay", help="AdamW weight decay (matrices only)."),
    warmup_ratio: float = typer.Option(0.03, "--warmup-ratio", help="Fraction of the steps spent warming up."),
    device: str = typer.Option("auto", "--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16."),
    freeze: str = typer.Option("none", "--freeze", help=_FREEZE),
    prompts: str = typer.Option(None, "--prompts", help=PROMPTS_HELP),
    val: str = typer.Option(None, "--val", help=_VAL),
    val_every: int = typer.Option(None, "--val-every", help=_VAL_EVERY),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help=_VAL_FRACTION),
    fold: int = typer.Option(None, "--fold", help=_FOLD),
    folds: int = typer.Option(None, "--folds", help=_FOLDS),
    early_stop: int = typer.Option(0, "--early-stop", help=_EARLY_STOP),
    tensorboard: bool = typer.Option(False, "--tensorboard", help=_TENSORBOARD),
    overwrite: bool = typer.Option(False, "--overwrite", help=_OVERWRITE),
    resume: bool = typer.Option(None, "--resume/--no-resume", help=_RESUME, show_default=False),
    seed: int = typer.Option(42, "--seed", help="Seed for sample order, prompts, augmentation and dropout."),
    save_every: int = typer.Option(250, "--save-every", help=_SAVE_EVERY),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", help="Checkpoints to keep."),
    modality: str = typer.Option(None, "--modality", help="Modality of raw scans (default: dataset.json, else the "
                                 "segment heuristic)."),
    window: str = typer.Option("soft_tissue", "--window", help="CT window for raw CT scans (as in segment)."),
    augment: str = typer.Option("default", "--augment", help=_AUGMENT),
    no_augment: bool = typer.Option(False, "--no-augment", help="Same as --augment none.", hidden=True),
    skip_bad_cases: bool = typer.Option(False, "--skip-bad-cases", help=_SKIP_BAD),
    lora_rank: int = typer.Option(0, "--lora-rank", help=_LORA_RANK),
    lora_alpha: float = typer.Option(None, "--lora-alpha", help=_LORA_ALPHA),
    cache: bool = typer.Option(True, "--cache/--no-cache", help=_CACHE),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output on stderr."),
) -> None:
    """Fine-tune a published or local Text3DSAM checkpoint on your own data (the paper's recipe).

    Each step trains one class present in a case's ground truth, with one of its prompt phrasings.
    OUTPUT ends up loadable by `text3dsam segment --model OUTPUT`; rerunning the command resumes.
    Multi-GPU: run it under torchrun or accelerate launch (see docs/train.md).
    """
    from text3dsam_cli.training import finetune

    args = _common(data, output, max_steps, epochs, lr, batch_size, grad_accum, weight_decay, warmup_ratio, device,
                   precision, freeze, prompts, val, val_every, resume, seed, save_every, keep_checkpoints, modality,
                   window, augment, threads, cache, no_augment, skip_bad_cases=skip_bad_cases, lora_rank=lora_rank,
                   lora_alpha=lora_alpha, val_fraction=val_fraction, fold=fold, folds=folds, early_stop=early_stop,
                   tensorboard=tensorboard, overwrite=overwrite)
    with _reporter(quiet or int(os.environ.get("RANK", "0")) != 0) as callback:
        finetune(args, model, revision, callback)


@app.command("train")
@handle_errors
@_one_error_per_run()
def train_command(
    data: str = typer.Argument(..., help=DATA_HELP, show_default=False),
    output: str = typer.Option(..., "--output", "-o", help=OUTPUT_HELP, show_default=False),
    image_size: str = typer.Option("128,256,256", "--image-size", help="Model input size D,H,W (multiples of "
                                   "--patch-size)."),
    patch_size: str = typer.Option("64,64,64", "--patch-size", help="Patch size D,H,W of the deepest feature map."),
    pass_num: int = typer.Option(2, "--pass-num", help="Decoder refinement passes (the published model: 2)."),
    transformer_depth: int = typer.Option(2, "--transformer-depth", help="Two-way transformer blocks."),
    mlp_dim: int = typer.Option(2048, "--mlp-dim", help="Decoder MLP width."),
    num_heads: int = typer.Option(8, "--num-heads", help="Decoder attention heads."),
    dice_weight: float = typer.Option(1.0, "--dice-weight", help="Weight of the Dice loss."),
    focal_weight: float = typer.Option(1.0, "--focal-weight", help="Weight of the focal loss."),
    text_model: str = typer.Option("nlpie/tiny-clinicalbert", "--text-model", help="BERT text encoder: hub name "
                                   "(geometry and weights from the HF cache when present) or a local folder."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Tokenizer folder (vocab.txt / tokenizer.json) or a "
                                  "vocab.txt file (default: the text model's, from the HF cache)."),
    pretrained_text: bool = typer.Option(True, "--pretrained-text/--no-pretrained-text", help="Start the text "
                                         "encoder from the text model's weights when available."),
    max_steps: int = typer.Option(None, "--max-steps", help=_STEPS),
    epochs: float = typer.Option(30.0, "--epochs", help="Passes over all (case, class) samples (paper: 30)."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (AdamW, linear warmup, cosine decay)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Samples per process and micro-step."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-steps per optimizer step."),
    weight_decay: float = typer.Option(1e-5, "--weight-decay", help="AdamW weight decay (matrices only)."),
    warmup_ratio: float = typer.Option(0.03, "--warmup-ratio", help="Fraction of the steps spent warming up."),
    device: str = typer.Option("auto", "--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16."),
    freeze: str = typer.Option("none", "--freeze", help=_FREEZE),
    prompts: str = typer.Option(None, "--prompts", help=PROMPTS_HELP),
    val: str = typer.Option(None, "--val", help=_VAL),
    val_every: int = typer.Option(None, "--val-every", help=_VAL_EVERY),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help=_VAL_FRACTION),
    fold: int = typer.Option(None, "--fold", help=_FOLD),
    folds: int = typer.Option(None, "--folds", help=_FOLDS),
    early_stop: int = typer.Option(0, "--early-stop", help=_EARLY_STOP),
    tensorboard: bool = typer.Option(False, "--tensorboard", help=_TENSORBOARD),
    overwrite: bool = typer.Option(False, "--overwrite", help=_OVERWRITE),
    resume: bool = typer.Option(None, "--resume/--no-resume", help=_RESUME, show_default=False),
    seed: int = typer.Option(42, "--seed", help="Seed for initial weights, sample order, prompts, augmentation."),
    save_every: int = typer.Option(250, "--save-every", help=_SAVE_EVERY),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", help="Checkpoints to keep."),
    modality: str = typer.Option(None, "--modality", help="Modality of raw scans (default: dataset.json, else the "
                                 "segment heuristic)."),
    window: str = typer.Option("soft_tissue", "--window", help="CT window for raw CT scans (as in segment)."),
    augment: str = typer.Option("default", "--augment", help=_AUGMENT),
    no_augment: bool = typer.Option(False, "--no-augment", help="Same as --augment none.", hidden=True),
    skip_bad_cases: bool = typer.Option(False, "--skip-bad-cases", help=_SKIP_BAD),
    lora_rank: int = typer.Option(0, "--lora-rank", help=_LORA_RANK),
    lora_alpha: float = typer.Option(None, "--lora-alpha", help=_LORA_ALPHA),
    cache: bool = typer.Option(True, "--cache/--no-cache", help=_CACHE),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output on stderr."),
) -> None:
    """Train a Text3DSAM model from scratch on challenge-style or nnU-Net-style data (the paper's recipe).

    Defaults are the published configuration: input 128x256x256, patch 64, 2 passes, tiny clinical BERT.
    OUTPUT ends up loadable by `text3dsam segment --model OUTPUT`; rerunning the command resumes.
    Multi-GPU: run it under torchrun or accelerate launch (see docs/train.md).
    """
    from text3dsam_cli.model import Text3DSAMConfig
    from text3dsam_cli.training import train_from_scratch

    for name, value in (("--pass-num", pass_num), ("--transformer-depth", transformer_depth),
                        ("--mlp-dim", mlp_dim), ("--num-heads", num_heads)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1")
    if dice_weight < 0 or focal_weight < 0 or dice_weight + focal_weight == 0:
        raise UsageError("--dice-weight and --focal-weight must be non-negative and not both zero")
    try:
        config = Text3DSAMConfig(image_size=parse_triple(image_size, "--image-size", int, "128,256,256"),  # type: ignore[arg-type]
                                 patch_size=parse_triple(patch_size, "--patch-size", int, "64,64,64"),  # type: ignore[arg-type]
                                 pass_num=pass_num, transformer_depth=transformer_depth, mlp_dim=mlp_dim,
                                 num_heads=num_heads, dice_weight=dice_weight, focal_weight=focal_weight,
                                 text_model=text_model)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    args = _common(data, output, max_steps, epochs, lr, batch_size, grad_accum, weight_decay, warmup_ratio, device,
                   precision, freeze, prompts, val, val_every, resume, seed, save_every, keep_checkpoints, modality,
                   window, augment, threads, cache, no_augment, skip_bad_cases=skip_bad_cases, lora_rank=lora_rank,
                   lora_alpha=lora_alpha, val_fraction=val_fraction, fold=fold, folds=folds, early_stop=early_stop,
                   tensorboard=tensorboard, overwrite=overwrite)
    with _reporter(quiet or int(os.environ.get("RANK", "0")) != 0) as callback:
        train_from_scratch(args, config, tokenizer, pretrained_text, callback)
