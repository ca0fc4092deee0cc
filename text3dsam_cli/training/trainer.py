"""Training loop on ``accelerate``: the paper's recipe, resumable checkpoints, validation, atomic final save.

One optimizer step sees ``batch_size x grad_accum x processes`` samples. Sample ``p`` of the run (counted over
all processes) is element ``p mod N`` of epoch ``p // N``'s permutation, seeded by ``(seed, epoch)``, and its
prompt phrasing and augmentation are drawn from a generator seeded by ``(seed, p)``. So the data a step sees
depend only on the step number: a resumed run continues exactly where the checkpoint left off.

Library code never prints: progress goes to ``callback(TrainEvent)`` (on the main process only).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from text3dsam_cli import __version__
from text3dsam_cli.devices import autocast_dtype, resolve_device
from text3dsam_cli.errors import OutputError, UsageError
from text3dsam_cli.io.atomic import write_json
from text3dsam_cli.io.volume import shape_text
from text3dsam_cli.model import Text3DSAM, Text3DSAMConfig
from text3dsam_cli.model.scratch import new_model
from text3dsam_cli.orientation import model_table
from text3dsam_cli.preprocess import DEFAULT_WINDOW
from text3dsam_cli.training.augment import AugmentConfig, augment
from text3dsam_cli.training.data import (
    DataSource,
    TrainingSet,
    ValidationCase,
    discover_cases,
    load_validation,
)
from text3dsam_cli.training.loss import build_loss, segmentation_loss
from text3dsam_cli.training.progress import (
    LOG_FILE,
    PLOT_FILE,
    TENSORBOARD_DIR,
    RunLog,
    TensorBoard,
    check_tensorboard,
    plot_progress,
    remove_run_files,
)
from text3dsam_cli.training.resume import (
    ARGS_FILE,
    data_fingerprint,
    differences,
    prompts_fingerprint,
    read_record,
    refusal,
)
from text3dsam_cli.training.splits import (
    SPLITS_FILE,
    Split,
    case_ids,
    check_split_options,
    resolve_split,
    save_split,
    split_summary,
    subset,
)

#: ``--freeze`` choices and the model parts each one freezes (the text projector stays trainable, except with
#: ``decoder-only``, which trains the mask decoder and nothing else).
FREEZE_PARTS: dict[str, tuple[str, ...]] = {
    "text": ("text_encoder",), "image": ("image_encoder",), "none": (),
    "decoder-only": ("image_encoder", "text_encoder", "text_projector", "seg_decoder.prompt_encoder")}
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
SUMMARY_FILE = "training_summary.json"
#: ``OUTPUT/last/``: the last step's weights, a complete model folder (``OUTPUT/`` itself holds the best).
LAST_DIR = "last"
#: ``OUTPUT/checkpoints/best/``: the best-validation weights so far, with ``best.json`` (step, mean Dice).
BEST_DIR = "best"
#: Config fields that must agree between a checkpoint and the run resuming it.
ARCHITECTURE_FIELDS = ("image_size", "patch_size", "embed_dim", "pass_num", "transformer_depth", "mlp_dim",
                       "num_heads", "text_config")


@dataclass
class TrainingArguments:
    """Everything a training run needs besides the model; written to ``OUTPUT/training_args.json``.

    ``max_steps`` (optimizer steps) wins over ``epochs``. ``resume`` None means "resume when OUTPUT holds
    checkpoints"; ``resume=False`` and ``overwrite`` start over. ``save_every`` 0 checkpoints only at the end.
    Without ``val``, ``val_fraction`` of the cases (or fold ``fold`` of ``folds``) are held out for validation
    (:mod:`text3dsam_cli.training.splits`); ``val_every`` defaults to once per epoch; ``early_stop`` N stops
    after N validations without a better mean Dice (0: never). Which fields may differ when a run resumes:
    :data:`text3dsam_cli.training.resume.MAY_DIFFER`.
    """

    data: str
    output: str
    prompts: str | None = None
    val: str | None = None
    modality: str | None = None
    window: str = DEFAULT_WINDOW
    max_steps: int | None = None
    epochs: float = 10.0
    learning_rate: float = 1e-4
    weight_decay: float = 1e-5
    warmup_ratio: float = 0.03
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    device: str = "auto"
    precision: str = "auto"
    freeze: tuple[str, ...] = ()
    seed: int = 42
    resume: bool | None = None
    save_every: int = 250
    keep_checkpoints: int = 2
    val_every: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache: bool = True
    skip_bad_cases: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ()
    val_fraction: float = 0.2
    fold: int | None = None
    folds: int | None = None
    early_stop: int = 0
    overwrite: bool = False
    tensorboard: bool = False

    def check(self) -> None:
        """Refuse impossible values with a :class:`UsageError`."""
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError("--max-steps must be at least 1")
        if self.max_steps is None and not self.epochs > 0:
            raise UsageError("--epochs must be positive")
        if not self.learning_rate > 0:
            raise UsageError("--lr must be positive")
        if self.weight_decay < 0:
            raise UsageError("--weight-decay must not be negative")
        if not 0 <= self.warmup_ratio < 1:
            raise UsageError("--warmup-ratio must be in [0, 1)")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise UsageError("--batch-size and --grad-accum must be at least 1")
        if self.save_every < 0 or (self.val_every is not None and self.val_every < 0):
            raise UsageError("--save-every and --val-every must not be negative")
        if self.keep_checkpoints < 1:
            raise UsageError("--keep-checkpoints must be at least 1")
        if self.early_stop < 0:
            raise UsageError("--early-stop must not be negative")
        check_split_options(self.val_fraction, self.fold, self.folds, self.val)
        if self.tensorboard:
            check_tensorboard()
        self.freeze = parse_freeze(self.freeze)
        if self.lora_rank < 0:
            raise UsageError("--lora-rank must not be negative (0: no LoRA)")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise UsageError("--lora-alpha must be positive")
        if self.lora_rank and self.freeze:
            raise UsageError("--freeze does not combine with --lora-rank (with LoRA only the adapters train)")
        self.lora_targets = tuple(self.lora_targets)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        data = asdict(self)
        data["freeze"] = list(self.freeze)
        data["augment"] = self.augment.to_dict()
        data["lora_targets"] = list(self.lora_targets)
        return data

    def record(self) -> dict[str, Any]:
        """:meth:`to_dict` with the paths resolved: what ``training_args.json`` records and resume compares."""
        data = json.loads(json.dumps(self.to_dict(), default=str))
        for key in ("data", "output", "prompts", "val"):
            if data.get(key):
                data[key] = str(Path(data[key]).expanduser().resolve())
        return data


@dataclass
class TrainEvent:
    """A progress report: ``kind`` is load, info, start, step, checkpoint, val or done."""

    kind: str
    step: int = 0
    total: int = 0
    loss: float | None = None
    lr: float | None = None
    seconds: float | None = None
    message: str | None = None
    metrics: dict[str, Any] | None = None


Callback = Callable[[TrainEvent], None]


@dataclass
class TrainResult:
    """What a finished run produced."""

    output: Path
    steps: int
    start_step: int
    loss: float | None
    seconds: float
    seconds_per_step: float | None
    validation: dict[str, Any] | None = None
    best_step: int | None = None
    best_val_dice: float | None = None
    stopped_early: bool = False
    #: True when OUTPUT already held this run, finished: nothing was trained.
    already_done: bool = False


# -- freezing ----------------------------------------------------------------------------------------------------


def parse_freeze(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"text"``, ``"image"``, ``"decoder-only"``, ``"none"``, ``"text,image"`` or a sequence of those -> parts
    to freeze."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    parts = []
    for item in (str(i).strip().lower() for i in items):
        if not item:
            continue
        if item not in FREEZE_PARTS:
            raise UsageError(f"--freeze {item!r}: choose text, image, decoder-only or none (or text,image)")
        if item != "none" and item not in parts:
            parts.append(item)
    return tuple(parts)


def apply_freeze(model: Text3DSAM, parts: Sequence[str]) -> None:
    """Stop gradients into the frozen parts (``text``: BERT encoder; ``image``: image encoder; ``decoder-only``:
    everything but the mask decoder)."""
    for part in parts:
        for name in FREEZE_PARTS[part]:
            model.get_submodule(name).requires_grad_(False)


def set_train_mode(model: torch.nn.Module, parts: Sequence[str], modules: Sequence[str] = ()) -> None:
    """``model.train()``, but frozen parts (and the named ``modules``) stay in eval mode (no dropout, BatchNorm
    statistics kept). ``model`` may be wrapped (DDP): its ``module`` is used."""
    model.train()
    inner = getattr(model, "module", model)
    names = [name for part in parts for name in FREEZE_PARTS[part]] + list(modules)
    for name in names:
        inner.get_submodule(name).eval()


def freezes_image_encoder(args: TrainingArguments) -> bool:
    """Whether the image encoder is frozen (and in eval mode): ``--freeze image`` / ``decoder-only`` or LoRA."""
    return bool(args.lora_rank) or any("image_encoder" in FREEZE_PARTS[p] for p in args.freeze)


# -- checkpoints ---------------------------------------------------------------------------------------------------


def list_checkpoints(output: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints ``OUTPUT/checkpoints/step-N`` (with their state file), oldest first."""
    folder = Path(output) / CHECKPOINTS
    found = []
    if folder.is_dir():
        for entry in folder.iterdir():
            name = entry.name
            if entry.is_dir() and name.startswith("step-") and name[5:].isdigit() and (entry / STATE_FILE).is_file():
                found.append((int(name[5:]), entry))
    return sorted(found)


def _prune_checkpoints(output: Path, keep: int) -> None:
    folder = output / CHECKPOINTS
    for _, path in list_checkpoints(output)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                shutil.rmtree(entry, ignore_errors=True)


def _move_into(tmp: Path, out: Path) -> None:
    """Move a complete model folder's files from ``tmp`` into ``out``, ``config.json`` last (see
    :func:`save_final_model`)."""
    with contextlib.suppress(FileNotFoundError):
        (out / "config.json").unlink()
    for item in sorted(tmp.iterdir()):
        if item.name != "config.json":
            os.replace(item, out / item.name)
    os.replace(tmp / "config.json", out / "config.json")


@contextlib.contextmanager
def _model_folder(output: Path) -> Iterator[Path]:
    """A hidden temporary folder to fill with a complete model; its files then replace ``output``'s model,
    ``config.json`` last (:func:`_move_into`), so that no half-written model is ever visible there."""
    tmp = output / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        output.mkdir(parents=True, exist_ok=True)
        yield tmp
        _move_into(tmp, output)
    except OSError as exc:
        raise OutputError(f"cannot write the trained model ({exc.strerror or exc})", output) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_final_model(model: Text3DSAM, output: str | os.PathLike[str]) -> Path:
    """Write the model into ``output`` (a ``load_model`` folder) so that no half-written model is ever visible.

    Files go to a hidden temporary folder first; then ``config.json`` is removed, the other files are moved
    in, and ``config.json`` comes last: until then the folder is not a checkpoint at all.
    """
    from text3dsam_cli.model import save_model

    out = Path(output)
    with _model_folder(out) as tmp:
        save_model(model, tmp)
    return out


def install_model_folder(source: Path, output: Path) -> Path:
    """Make ``output`` hold the model of the folder ``source`` (hard links where possible, else copies), with
    the same no-half-written-model rule as :func:`save_final_model`."""
    with _model_folder(output) as tmp:
        tmp.mkdir()
        for item in sorted(source.iterdir()):
            if item.is_file() and item.name != "best.json":
                try:
                    os.link(item, tmp / item.name)
                except OSError:
                    shutil.copy2(item, tmp / item.name)
    return output


def save_best(model: Text3DSAM, output: Path, step: int, mean_dice: float) -> Path:
    """Keep ``model`` as the best so far: ``checkpoints/best/`` (model folder + ``best.json``), replaced whole."""
    from text3dsam_cli.model import save_model

    folder = output / CHECKPOINTS
    final, tmp, old = folder / BEST_DIR, folder / f".{BEST_DIR}.tmp", folder / f".{BEST_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(model, tmp)
        write_json(tmp / "best.json", {"step": step, "mean_dice": mean_dice})
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    except OSError as exc:
        raise OutputError(f"cannot write the best model ({exc.strerror or exc})", final) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_best(output: Path, recover: bool = True) -> tuple[int | None, float]:
    """(step, mean Dice) of ``checkpoints/best/``; with ``recover`` (one process only), a swap interrupted
    between its two renames is undone first."""
    folder = output / CHECKPOINTS
    final, old = folder / BEST_DIR, folder / f".{BEST_DIR}.old"
    if recover and not final.exists() and old.is_dir():
        os.replace(old, final)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads((final / "best.json").read_text(encoding="utf-8"))
        if (final / "config.json").is_file():
            return int(data["step"]), float(data["mean_dice"])
    return None, -math.inf


def _architecture(config: Text3DSAMConfig) -> dict[str, Any]:
    data = config.to_dict()
    data["text_config"] = dict(config.text_config or {})
    return {k: data.get(k) for k in ARCHITECTURE_FIELDS}


# -- validation ---------------------------------------------------------------------------------------------------


def evaluate_dice(model: Text3DSAM, cases: Sequence[ValidationCase], device: str | torch.device = "cpu",
                  precision: str = "auto") -> dict[str, Any]:
    """Segment each case on its full grid (as ``text3dsam segment``) and score Dice per class present in its GT.

    Returns ``{"cases": {case: {class: dice}}, "case_mean": {case: mean}, "class_mean": {class: mean over the
    cases that have it}, "mean_dice": mean over cases}``. The model is left in eval mode.
    """
    from text3dsam_cli.inference import Segmenter
    from text3dsam_cli.metrics import dice, nan_mean

    segmenter = Segmenter(model, device=device, precision=precision)
    per_case: dict[str, dict[str, float]] = {}
    means: dict[str, float] = {}
    for case in cases:
        prompts = [spec.prompts[0] for spec in case.classes]
        result = segmenter.segment(case.image, prompts, list(range(1, len(prompts) + 1)))
        scores = {}
        for k, spec in enumerate(case.classes, start=1):
            truth = spec.mask(case.labels)
            if truth.any():
                scores[spec.key] = float(dice(result.labels == k, truth))
        per_case[case.name] = scores
        means[case.name] = nan_mean(scores.values())
    keys: list[str] = []
    for scores in per_case.values():
        keys.extend(k for k in scores if k not in keys)
    class_mean = {k: nan_mean(s[k] for s in per_case.values() if k in s) for k in keys}
    return {"cases": per_case, "case_mean": means, "class_mean": class_mean, "mean_dice": nan_mean(means.values())}


# -- the loop ------------------------------------------------------------------------------------------------------


def _reset_accelerate() -> None:
    """Forget a previous single-process Accelerator (its state is a process-wide singleton)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``: ``seed`` itself on rank 0 (a one-process run is seeded as before), a
    different seed derived from ``(seed, rank)`` on each other rank, so that dropout differs between ranks
    while every rank stays reproducible."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, rank]).generate_state(1)[0])


def seed_process(seed: int, rank: int) -> int:
    """Seed Python, numpy and torch (and CUDA) of this process with :func:`rank_seed`; returns the seed."""
    from accelerate.utils import set_seed

    value = rank_seed(seed, rank)
    set_seed(value)
    return value


def make_accelerator(args: TrainingArguments) -> Any:
    """An ``Accelerator`` for ``--device`` / ``--precision`` (under torchrun / accelerate launch: one per rank)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not distributed:
        _reset_accelerate()
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is not None and not distributed:
        torch.cuda.set_device(device.index)
    precision = args.precision
    if precision == "auto" and device.type == "cuda":  # training: mixed precision by default on GPUs
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = autocast_dtype(device, precision)
    if args.precision == "auto" and os.environ.get("ACCELERATE_MIXED_PRECISION"):
        mixed = None  # accelerate launch --mixed_precision ... decides
    else:
        mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")  # type: ignore[arg-type]
    # Some decoder heads and the BERT pooler never receive gradients: DDP must be told.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed, gradient_accumulation_steps=args.grad_accum,
                       step_scheduler_with_optimizer=False, kwargs_handlers=[ddp])


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (biases, norms and layer scales excluded, as the HF Trainer does)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_schedule_with_warmup(optimizer: torch.optim.Optimizer, warmup: int,
                                total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base rate over ``warmup`` steps, then half a cosine down to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    """Runs the paper's recipe on a :class:`TrainingSet` with a given model; see :func:`run_training`."""

    def __init__(self, model: Text3DSAM, train_set: TrainingSet, args: TrainingArguments, accelerator: Any,
                 val_cases: Sequence[ValidationCase] | None = None, callback: Callback | None = None,
                 run_info: dict[str, Any] | None = None, record: dict[str, Any] | None = None,
                 split: Split | None = None, validating: bool | None = None) -> None:
        if model.tokenizer is None:
            raise UsageError("the model has no tokenizer attached; load it with load_model()")
        self.args = args
        self.model = model
        self.tokenizer = model.tokenizer
        self.train_set = train_set
        self.val_cases = list(val_cases or [])
        # Every process takes part in validation barriers; only the main one holds the cases.
        self.validating = (bool(args.val) or bool(self.val_cases)) if validating is None else validating
        self.record = dict(record) if record is not None else {"args": args.record()}
        self.split = split
        self.fresh = args.overwrite or args.resume is False
        self.accelerator = accelerator
        self.callback = callback
        self.run_info = dict(run_info or {})
        self.output = Path(args.output)
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        per_step = args.batch_size * args.grad_accum * self.world
        n = len(train_set)
        self.total = args.max_steps or max(1, math.ceil(args.epochs * n / per_step))
        self.steps_per_epoch = max(1, math.ceil(n / per_step))
        #: validate every this many steps (0: only at the end); default once per epoch
        self.val_every = self.steps_per_epoch if args.val_every is None else args.val_every
        self.warmup = math.ceil(args.warmup_ratio * self.total)
        self._perms: dict[int, np.ndarray] = {}
        self._lora: Any = None
        self._eval_modules: tuple[str, ...] = ()

    def _savable(self, model: Text3DSAM) -> Text3DSAM:
        """``model`` as a plain checkpoint: with LoRA adapters training, a copy with them merged (the training
        model keeps its adapters)."""
        if self._lora is None:
            return model
        from text3dsam_cli.training.lora import merged_copy

        return merged_copy(self._lora)

    # events -----------------------------------------------------------------------------------------------------
    def emit(self, kind: str, **fields: Any) -> None:
        """Send a :class:`TrainEvent` to the callback (main process only)."""
        if self.callback is not None and self.accelerator.is_main_process:
            self.callback(TrainEvent(kind, total=self.total, **fields))

    # data -------------------------------------------------------------------------------------------------------
    def _index(self, position: int) -> int:
        n = len(self.train_set)
        epoch = position // n
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.args.seed, 0, epoch]).permutation(n)
        return int(self._perms[epoch][position % n])

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """The micro-batch ``micro`` of optimizer step ``step`` (0-based) for this process, on its device."""
        b = self.args.batch_size
        first = ((step * self.args.grad_accum + micro) * self.world + self.rank) * b
        images, targets, prompts = [], [], []
        for position in range(first, first + b):
            rng = np.random.default_rng([self.args.seed, 1, position])
            image, target, prompt = self.train_set.item(self._index(position), rng)
            image, target = augment(image, target, rng, self.args.augment, prompt=prompt)
            images.append(image)
            targets.append(target)
            prompts.append(prompt)
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=512, return_tensors="pt")
        device = self.accelerator.device
        return {"image": torch.stack(images).to(device), "target": torch.stack(targets).to(device),
                "input_ids": tokens["input_ids"].to(device), "attention_mask": tokens["attention_mask"].to(device)}

    # checkpoints --------------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, loss: float | None) -> None:
        """``accelerate`` state into ``checkpoints/.step-N.tmp``, renamed to ``step-N`` once complete; prune old."""
        acc = self.accelerator
        folder = self.output / CHECKPOINTS
        tmp = folder / f".step-{step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_json(tmp / STATE_FILE, {"step": step, "total_steps": self.total, "warmup_steps": self.warmup,
                                           "loss": loss,
                                           "samples_seen": step * self.args.batch_size * self.args.grad_accum
                                           * self.world, "processes": self.world}, default=str)
            final = folder / f"step-{step}"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _prune_checkpoints(self.output, self.args.keep_checkpoints)
            self.emit("checkpoint", step=step, message=str(final))
        acc.wait_for_everyone()

    def _resume_point(self) -> tuple[int, Path | None]:
        found = list_checkpoints(self.output)
        if self.fresh or not found:
            return 0, None
        return found[-1]

    def _check_resumable(self) -> None:
        """Refuse to resume checkpoints written for another architecture."""
        path = self.output / ARGS_FILE
        if not path.is_file():
            return
        with contextlib.suppress(OSError, ValueError):
            previous = json.loads(path.read_text(encoding="utf-8")).get("architecture")
            current = json.loads(json.dumps(_architecture(self.model.config)))
            if previous and previous != current:
                diff = [k for k in ARCHITECTURE_FIELDS if previous.get(k) != current.get(k)]
                raise UsageError(f"{self.output} holds checkpoints of a model with different {', '.join(diff)}; "
                                 "use --overwrite or another --output")

    def _val_steps(self, until: int) -> list[int]:
        """Steps of the validations logged up to ``until`` (read-only: every process may call it)."""
        steps = []
        with contextlib.suppress(OSError):
            for line in (self.output / LOG_FILE).read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, AttributeError):
                    record = json.loads(line)
                    if record.get("type") == "val" and record.get("step", 0) <= until:
                        steps.append(int(record["step"]))
        return steps

    def _agree(self, flag: bool) -> bool:
        """The main process's ``flag`` on every process."""
        if self.world == 1:
            return flag
        from accelerate.utils import broadcast

        value = torch.tensor([1 if flag else 0], device=self.accelerator.device)
        return bool(broadcast(value, from_process=0).item())

    # validation ---------------------------------------------------------------------------------------------------
    def validate(self, step: int, model: torch.nn.Module) -> dict[str, Any] | None:
        """Dice on the validation cases (main process; the others wait), then back to training mode."""
        acc = self.accelerator
        metrics = None
        if self.val_cases and acc.is_main_process:
            t0 = time.perf_counter()
            metrics = evaluate_dice(acc.unwrap_model(model), self.val_cases, acc.device, self.args.precision)
            metrics["seconds"] = round(time.perf_counter() - t0, 3)
        acc.wait_for_everyone()
        set_train_mode(model, self.args.freeze, self._eval_modules)
        return metrics

    # main ---------------------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Resume or start, train ``total`` optimizer steps (validating, keeping the best), and save the models."""
        args, acc = self.args, self.accelerator
        main = acc.is_main_process
        start, checkpoint = self._resume_point()
        state: dict[str, Any] = {}
        if checkpoint is not None:
            self._check_resumable()
            with contextlib.suppress(OSError, ValueError):
                state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
            old_total = int(state.get("total_steps") or start)
            if self.total < old_total:
                raise UsageError(refusal(self.output, [f"total steps {old_total} -> {self.total} (only a larger "
                                                       "--max-steps or --epochs continues a run)"]))
            self.warmup = int(state.get("warmup_steps", math.ceil(args.warmup_ratio * old_total)))
        elif args.resume:
            self.emit("info", message=f"no checkpoint in {self.output / CHECKPOINTS}; starting from step 0")
        best_step, best_dice = read_best(self.output, recover=main) if checkpoint is not None else (None, -math.inf)
        since_best = len([v for v in self._val_steps(start) if best_step is None or v > best_step])
        loss_value: float | None = state.get("loss") if checkpoint is not None else None

        if checkpoint is not None:
            finished = self._finished(start, best_step, since_best)
            if finished is not None:
                return finished
            old_total = int(state.get("total_steps") or start)
            if self.total > old_total:
                self.emit("info", message=f"extending the run from {old_total} to {self.total} steps: warm-up stays "
                          f"{self.warmup} steps, the cosine decay now ends at step {self.total}")

        record = {"text3dsam_version": __version__, "torch_version": torch.__version__, "processes": self.world,
                  "device": str(acc.device), "mixed_precision": str(acc.mixed_precision), "total_steps": self.total,
                  "warmup_steps": self.warmup, "steps_per_epoch": self.steps_per_epoch,
                  "samples": len(self.train_set), "cases": len(self.train_set.cases),
                  "split": split_summary(self.split), "architecture": _architecture(self.model.config),
                  **self.run_info, **self.record, "args": self.record.get("args", args.record())}
        if main:
            self.output.mkdir(parents=True, exist_ok=True)
            write_json(self.output / ARGS_FILE, record, default=str)
            if self.split is not None:
                save_split(self.output, self.split)
        classes: list[str] = []
        for case in self.val_cases:
            classes.extend(c.key for c in case.classes if c.key not in classes)
        log = RunLog(self.output, start if checkpoint is not None else None, main, classes)
        board = TensorBoard(self.output, start if checkpoint is not None else None) if args.tensorboard and main \
            else None

        def write(entry: dict[str, Any]) -> None:
            log.write(entry)
            if board is not None:
                board.write(entry)

        model = self.model
        apply_freeze(model, args.freeze)
        if args.lora_rank:
            from text3dsam_cli.training.lora import LORA_EVAL_PARTS, add_lora, count_parameters

            self._lora = add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets or None)
            self._eval_modules = LORA_EVAL_PARTS
            trainable, total = count_parameters(model)
            self.emit("info", message=f"LoRA rank {args.lora_rank}: {trainable:,} trainable parameters of "
                      f"{total:,} ({100 * trainable / total:.2f} %)")
        set_train_mode(model, args.freeze, self._eval_modules)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total_parameters = sum(p.numel() for p in model.parameters())
        groups = _param_groups(model, args.weight_decay)
        if not any(g["params"] for g in groups):
            raise UsageError("nothing to train: every parameter is frozen")
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8)
        scheduler = cosine_schedule_with_warmup(optimizer, self.warmup, self.total)
        if acc.state.deepspeed_plugin is not None:  # DeepSpeed needs the micro-batch size without a dataloader
            acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.batch_size
        model, optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(scheduler)
        if checkpoint is not None:
            acc.load_state(str(checkpoint))
            # Re-derive the learning rate at this step (the run may have been extended with a larger --max-steps).
            scheduler.last_epoch = start - 1
            scheduler.step()
            self.emit("info", message=f"resuming from {checkpoint} (step {start} of {self.total})")
        set_train_mode(model, args.freeze, self._eval_modules)
        loss_fn = build_loss(self.model.config.dice_weight, self.model.config.focal_weight)
        size = tuple(self.model.config.image_size)
        params = [p for p in model.parameters() if p.requires_grad]
        self.emit("start", step=start)

        began = time.perf_counter()
        step_times: list[float] = []
        metrics: dict[str, Any] | None = None
        stopped = False
        last_step = start
        for step in range(start, self.total):
            t0 = time.perf_counter()
            lr = float(scheduler.get_last_lr()[0])
            losses = []
            for micro in range(args.grad_accum):
                batch = self.batch(step, micro)
                with acc.accumulate(model):
                    logits = model(batch["image"], batch["input_ids"], batch["attention_mask"])
                    loss = segmentation_loss(loss_fn, logits, batch["target"], size)
                    acc.backward(loss)
                    if acc.sync_gradients and args.max_grad_norm > 0:
                        acc.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
            scheduler.step()
            mean_loss = acc.reduce(torch.stack(losses).mean(), reduction="mean")
            loss_value = float(mean_loss)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"the loss became {loss_value} at step {step + 1}; try a lower --lr")
            seconds = time.perf_counter() - t0
            step_times.append(seconds)
            done = last_step = step + 1
            epoch = done * args.batch_size * args.grad_accum * self.world / len(self.train_set)
            write({"type": "train", "step": done, "epoch": round(epoch, 4), "loss": loss_value, "lr": lr,
                   "seconds": round(seconds, 4), "elapsed": round(time.perf_counter() - began, 3)})
            self.emit("step", step=done, loss=loss_value, lr=lr, seconds=seconds)
            last = done == self.total
            stop = False
            if self.validating and (last or (self.val_every and done % self.val_every == 0)):
                metrics = self.validate(done, model)
                if main and metrics is not None:
                    mean = metrics["mean_dice"]
                    improved = math.isfinite(mean) and mean > best_dice
                    if improved:
                        best_step, best_dice, since_best = done, mean, 0
                        save_best(self._savable(acc.unwrap_model(model)), self.output, done, mean)
                    else:
                        since_best += 1
                    metrics.update(improved=improved, best_step=best_step,
                                   best_mean_dice=best_dice if best_step is not None else None)
                    write({"type": "val", "step": done, **metrics})
                    self.emit("val", step=done, metrics=metrics)
                    plot_progress(log.records, self.output / PLOT_FILE, best_step)
                    stop = bool(args.early_stop) and since_best >= args.early_stop and not last
                stop = self._agree(stop)
            if last or stop or (args.save_every and done % args.save_every == 0):
                self.save_checkpoint(done, loss_value)
                if main and not self.validating:
                    plot_progress(log.records, self.output / PLOT_FILE)
            if stop:
                stopped = True
                self.emit("info", message=f"early stop at step {done}: no better validation Dice in "
                          f"{args.early_stop} validations (best {best_dice:.4f} at step {best_step})")
                break

        acc.wait_for_everyone()
        if self._lora is not None:  # the saved model is a plain checkpoint: adapters folded into the weights
            from text3dsam_cli.training.lora import merge_lora

            merge_lora(self._lora)
            self._lora, self._eval_modules = None, ()
        summary: dict[str, Any] = {}
        if main:
            save_final_model(acc.unwrap_model(model), self.output / LAST_DIR)
            best_folder = self.output / CHECKPOINTS / BEST_DIR
            use_best = best_step is not None and (best_folder / "config.json").is_file()
            install_model_folder(best_folder if use_best else self.output / LAST_DIR, self.output)
            per_step = float(np.mean(step_times[1:] if len(step_times) > 1 else step_times)) if step_times else None
            summary = {"model": "best" if use_best else "last", "best_step": best_step if use_best else None,
                       "best_val_dice": best_dice if use_best else None, "last_step": last_step,
                       "total_steps": self.total, "stopped_early": stopped,
                       "validations": len(log.validations()), "final_loss": loss_value,
                       "trainable_parameters": trainable, "total_parameters": total_parameters,
                       "train_cases": len(self.train_set.cases), "val_cases": len(self.val_cases),
                       "seconds_per_step": per_step}
            write_json(self.output / SUMMARY_FILE, summary)
            plot_progress(log.records, self.output / PLOT_FILE, summary["best_step"])
            if board is not None:
                board.close()
        acc.wait_for_everyone()
        seconds = time.perf_counter() - began
        per_step = float(np.mean(step_times[1:] if len(step_times) > 1 else step_times)) if step_times else None
        log.write({"type": "done", "step": last_step, "loss": loss_value, "seconds": round(seconds, 3),
                   "seconds_per_step": per_step})
        self.emit("done", step=last_step, loss=loss_value, seconds=per_step, message=str(self.output),
                  metrics=summary or None)
        use = summary.get("model") == "best"
        return TrainResult(self.output, last_step, start, loss_value, seconds, per_step, metrics,
                           best_step if use else None, best_dice if use else None, stopped)

    def _finished(self, start: int, best_step: int | None, since_best: int) -> TrainResult | None:
        """The result of a run that OUTPUT already holds, finished with these settings (else None)."""
        try:
            summary = json.loads((self.output / SUMMARY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        complete = (self.output / "config.json").is_file() and (self.output / LAST_DIR / "config.json").is_file()
        if not isinstance(summary, dict) or summary.get("last_step") != start or not complete:
            return None
        early = bool(self.args.early_stop) and best_step is not None and since_best >= self.args.early_stop
        if start < self.total and not early:
            return None
        best = summary.get("best_step")
        what = f"best validation Dice {summary.get('best_val_dice'):.4f} at step {best}" if best is not None \
            else "the last weights"
        more = "a larger --early-stop (or 0)" if early else "a larger --max-steps"
        self.emit("info", message=f"{self.output}: this run is already finished (step {start}"
                  f"{' of ' + str(self.total) if not early else ', stopped early'}; the model is {what}); nothing "
                  f"to do. {more[0].upper() + more[1:]} continues it, --overwrite starts over")
        return TrainResult(self.output, start, start, summary.get("final_loss"), 0.0, None, None,
                           best, summary.get("best_val_dice"), bool(summary.get("stopped_early")), True)


def _start_over(output: Path) -> bool:
    """Remove what a previous run left in ``output`` (``--overwrite``); True when there was something."""
    found = False
    for name in (CHECKPOINTS, LAST_DIR, TENSORBOARD_DIR):
        if (output / name).is_dir():
            shutil.rmtree(output / name)
            found = True
    for name in (SPLITS_FILE, SUMMARY_FILE, ARGS_FILE, "config.json", LOG_FILE):
        if (output / name).is_file():
            found = True
    for name in (SPLITS_FILE, SUMMARY_FILE, ARGS_FILE, "config.json"):
        with contextlib.suppress(FileNotFoundError):
            (output / name).unlink()
    remove_run_files(output)
    return found


def _prepare_output(output: Path, model_source: Path | None) -> None:
    if output.exists() and not output.is_dir():
        raise OutputError("exists and is not a folder", output)
    if model_source is not None and output.exists() and output.resolve() == model_source.resolve():
        raise UsageError("--output must not be the folder of the model being fine-tuned")


def run_training(model: Text3DSAM, args: TrainingArguments, callback: Callback | None = None,
                 run_info: dict[str, Any] | None = None, data: DataSource | None = None,
                 val_data: DataSource | None = None) -> TrainResult:
    """Train ``model`` on ``args.data`` and save it (plus log and arguments) into ``args.output``.

    ``data`` (``val_data``) is ``discover_cases(args.data (args.val), args.prompts)`` passed through
    :func:`check_training_data` when the caller has it already; otherwise that is done here.
    """
    args.check()
    deepest = math.prod(s // 64 for s in model.config.image_size)
    if not freezes_image_encoder(args) and args.batch_size * deepest < 2:
        raise UsageError(f"image size {shape_text(model.config.image_size)} leaves the image encoder's BatchNorm "
                         "one value per channel at batch size 1: use --batch-size 2 or more, a larger size, or "
                         "--freeze image")
    output = Path(args.output).expanduser()
    source = model.source.get("path") if isinstance(getattr(model, "source", None), dict) else None
    _prepare_output(output, Path(source) if source else None)
    accelerator = make_accelerator(args)
    main = accelerator.is_main_process
    seed_process(args.seed, accelerator.process_index)
    emit: Callback = callback if (callback is not None and main) else (lambda e: None)
    if data is None:
        data, val_data = check_training_data(args, callback)
    info = dict(run_info or {})
    base = info.get("base_model") if isinstance(info.get("base_model"), dict) else None
    record = {"args": args.record(), "processes": accelerator.num_processes,
              "starting_model": {"mode": info.get("mode"), "model": (base or {}).get("model"),
                                 "commit": (base or {}).get("commit"), "architecture": _architecture(model.config),
                                 "notes": info.get("notes")},
              "data_fingerprint": data_fingerprint(data), "prompts_fingerprint": prompts_fingerprint(data),
              "rank_seeds": [rank_seed(args.seed, r) for r in range(accelerator.num_processes)]}

    # What OUTPUT holds decides: start over (--overwrite), refuse (other settings), or go on.
    fresh = args.overwrite or args.resume is False
    if fresh:
        accelerator.wait_for_everyone()
        if main and output.is_dir() and _start_over(output):
            emit(TrainEvent("info", message=f"{'--overwrite' if args.overwrite else '--no-resume'}: discarded the "
                            f"previous run in {output}"))
        accelerator.wait_for_everyone()
    elif list_checkpoints(output):
        previous = read_record(output)
        diffs = differences(previous, record) if previous is not None else []
        if diffs:
            raise UsageError(refusal(output, diffs))
    elif (output / "config.json").is_file():
        raise UsageError(f"{output}: holds a trained model but no checkpoint to continue from; add --overwrite to "
                         "start over, or choose another --output")

    for note in data.notes:
        emit(TrainEvent("info", message=note))
    split: Split | None = None
    if args.val:
        train_source, val_source = data, val_data or discover_cases(args.val, args.prompts)
    else:
        split, notes = resolve_split(data, output, args.val_fraction, args.fold, args.folds, reuse=not fresh)
        for note in notes:
            emit(TrainEvent("info", message=note))
        ids = case_ids(data)
        train_source = subset(data, ids, split.train)
        val_source = subset(data, ids, split.val) if split.val else None
    # The model sees NIfTI/DICOM training images in the orientation it will see them in at inference: the
    # table it came with (the published model's default when it has none), recorded in the saved config.
    orientation = model_table(model.config.inference)
    model.config.inference = {**(model.config.inference or {}), "orientation": orientation}
    if data.layout != "npz":
        table = ", ".join(f"{m} {c}" for m, c in orientation.items()) or "empty"
        emit(TrainEvent("info", message=f"images reoriented by modality ({table}; other modalities as stored)"))
    train_set = TrainingSet(train_source, model.config.image_size, args.window, args.modality, args.cache,
                            on_case=lambda i, n, name: emit(TrainEvent("load", i + 1, n, message=name)),
                            orientation=orientation)
    for note in train_set.notes[len(data.notes):]:
        emit(TrainEvent("info", message=note))
    val_cases = None
    if val_source is not None:
        val_cases = load_validation(val_source, args.window, args.modality, orientation) if main else []
    trainer = Trainer(model, train_set, args, accelerator, val_cases, callback, info, record, split,
                      validating=val_source is not None)
    return trainer.run()


def check_training_data(args: TrainingArguments, callback: Callback | None = None,
                        ) -> tuple[DataSource, DataSource | None]:
    """Discover and check the training (and ``--val``) cases before anything is loaded or trained.

    Each bad case and each label value missing from the prompt map is reported as an ``info`` event (main
    process only); bad cases stop the run with an :class:`InputError`, or with ``args.skip_bad_cases`` are
    left out with a note (see :mod:`text3dsam_cli.training.check`).
    """
    from text3dsam_cli.training.check import require_good_cases

    main = callback is not None and int(os.environ.get("RANK", "0")) == 0
    report = (lambda line: callback(TrainEvent("info", message=line))) if main else None  # type: ignore[misc]
    data = require_good_cases(discover_cases(args.data, args.prompts), args.skip_bad_cases, report, "training")
    val_data = None
    if args.val:
        val_data = require_good_cases(discover_cases(args.val, args.prompts), args.skip_bad_cases, report,
                                      "validation")
    return data, val_data


def finetune(args: TrainingArguments, model: str | os.PathLike[str] | Text3DSAM | None = None,
             revision: str | None = None, callback: Callback | None = None) -> TrainResult:
    """Fine-tune a checkpoint (folder, hub id, or a loaded model) on ``args.data``; see ``docs/train.md``."""
    from text3dsam_cli.model import load_model

    args.check()
    data, val_data = check_training_data(args, callback)  # bad data fails before a model is loaded
    loaded = model if isinstance(model, Text3DSAM) else load_model(model, revision)
    return run_training(loaded, args, callback, {"mode": "finetune", "base_model": loaded.source}, data, val_data)


# -- training from scratch ---------------------------------------------------------------------------------------


def train_from_scratch(args: TrainingArguments, config: Text3DSAMConfig,
                       tokenizer: str | os.PathLike[str] | None = None, pretrained_text: bool = True,
                       callback: Callback | None = None) -> TrainResult:
    """Build a new model for ``config`` and train it on ``args.data``; see ``docs/train.md``."""
    from accelerate.utils import set_seed

    args.check()
    data, val_data = check_training_data(args, callback)  # bad data fails before a model is built
    set_seed(args.seed)  # the initial weights follow --seed too
    model, notes = new_model(config, tokenizer, pretrained_text)
    if callback is not None and int(os.environ.get("RANK", "0")) == 0:
        for note in notes:
            callback(TrainEvent("info", message=note))
    return run_training(model, args, callback, {"mode": "train", "notes": notes}, data, val_data)
