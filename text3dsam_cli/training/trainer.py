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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from text3dsam_cli import __version__
from text3dsam_cli.devices import autocast_dtype, resolve_device
from text3dsam_cli.errors import OutputError, UsageError
from text3dsam_cli.io.atomic import write_json
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

#: ``--freeze`` choices and the model parts each one freezes (the text projector stays trainable, except with
#: ``decoder-only``, which trains the mask decoder and nothing else).
FREEZE_PARTS: dict[str, tuple[str, ...]] = {
    "text": ("text_encoder",), "image": ("image_encoder",), "none": (),
    "decoder-only": ("image_encoder", "text_encoder", "text_projector", "seg_decoder.prompt_encoder")}
CHECKPOINTS = "checkpoints"
LOG_FILE = "train_log.jsonl"
ARGS_FILE = "training_args.json"
STATE_FILE = "trainer_state.json"
#: Config fields that must agree between a checkpoint and the run resuming it.
ARCHITECTURE_FIELDS = ("image_size", "patch_size", "embed_dim", "pass_num", "transformer_depth", "mlp_dim",
                       "num_heads", "text_config")


@dataclass
class TrainingArguments:
    """Everything a training run needs besides the model; written to ``OUTPUT/training_args.json``.

    ``max_steps`` (optimizer steps) wins over ``epochs``. ``resume`` None means "resume when OUTPUT holds
    checkpoints". ``save_every`` 0 disables intermediate checkpoints; ``val_every`` defaults to ``save_every``.
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


def save_final_model(model: Text3DSAM, output: str | os.PathLike[str]) -> Path:
    """Write the model into ``output`` (a ``load_model`` folder) so that no half-written model is ever visible.

    Files go to a hidden temporary folder first; then ``config.json`` is removed, the other files are moved
    in, and ``config.json`` comes last: until then the folder is not a checkpoint at all.
    """
    from text3dsam_cli.model import save_model

    out = Path(output)
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(model, tmp)
        with contextlib.suppress(FileNotFoundError):
            (out / "config.json").unlink()
        for item in sorted(tmp.iterdir()):
            if item.name != "config.json":
                os.replace(item, out / item.name)
        os.replace(tmp / "config.json", out / "config.json")
    except OSError as exc:
        raise OutputError(f"cannot write the trained model ({exc.strerror or exc})", out) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _architecture(config: Text3DSAMConfig) -> dict[str, Any]:
    data = config.to_dict()
    data["text_config"] = dict(config.text_config or {})
    return {k: data.get(k) for k in ARCHITECTURE_FIELDS}


# -- validation ---------------------------------------------------------------------------------------------------


def evaluate_dice(model: Text3DSAM, cases: Sequence[ValidationCase], device: str | torch.device = "cpu",
                  precision: str = "auto") -> dict[str, Any]:
    """Segment each case on its full grid (as ``text3dsam segment``) and score Dice per class present in its GT.

    Returns ``{"cases": {case: {class: dice}}, "case_mean": {case: mean}, "mean_dice": mean over cases}``.
    The model is left in eval mode.
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
    return {"cases": per_case, "case_mean": means, "mean_dice": nan_mean(means.values())}


# -- the loop ------------------------------------------------------------------------------------------------------


def _reset_accelerate() -> None:
    """Forget a previous single-process Accelerator (its state is a process-wide singleton)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


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


class _Log:
    """``train_log.jsonl``: one JSON object per line, appended and flushed as it goes (main process only)."""

    def __init__(self, path: Path, keep_until: int | None, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        if keep_until is None:
            path.write_text("", encoding="utf-8")
        elif path.is_file():  # drop what an interrupted run logged after its last checkpoint
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("type") != "done" and record.get("step", 0) <= keep_until:
                        kept.append(line + "\n")
            path.write_text("".join(kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record."""
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=float) + "\n")


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
                 run_info: dict[str, Any] | None = None) -> None:
        if model.tokenizer is None:
            raise UsageError("the model has no tokenizer attached; load it with load_model()")
        self.args = args
        self.model = model
        self.tokenizer = model.tokenizer
        self.train_set = train_set
        self.val_cases = list(val_cases or [])
        # Every process takes part in validation barriers; only the main one holds the cases.
        self.validating = bool(args.val) or bool(self.val_cases)
        self.accelerator = accelerator
        self.callback = callback
        self.run_info = dict(run_info or {})
        self.output = Path(args.output)
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        per_step = args.batch_size * args.grad_accum * self.world
        n = len(train_set)
        self.total = args.max_steps or max(1, math.ceil(args.epochs * n / per_step))
        self._perms: dict[int, np.ndarray] = {}
        self._lora: Any = None
        self._eval_modules: tuple[str, ...] = ()

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
            write_json(tmp / STATE_FILE, {"step": step, "total_steps": self.total, "loss": loss,
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
        if self.args.resume is False or not found:
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
                                 "use --no-resume or another --output")

    # validation ---------------------------------------------------------------------------------------------------
    def validate(self, step: int, model: torch.nn.Module, log: _Log) -> dict[str, Any] | None:
        """Dice on the validation cases (main process; the others wait), then back to training mode."""
        acc = self.accelerator
        metrics = None
        if self.val_cases and acc.is_main_process:
            t0 = time.perf_counter()
            metrics = evaluate_dice(acc.unwrap_model(model), self.val_cases, acc.device, self.args.precision)
            metrics["seconds"] = round(time.perf_counter() - t0, 3)
            log.write({"type": "val", "step": step, **metrics})
            self.emit("val", step=step, metrics=metrics)
        acc.wait_for_everyone()
        set_train_mode(model, self.args.freeze, self._eval_modules)
        return metrics

    # main ---------------------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Resume or start, train ``total`` optimizer steps, validate, and save the final model."""
        args, acc = self.args, self.accelerator
        start, checkpoint = self._resume_point()
        if checkpoint is not None:
            self._check_resumable()
        elif args.resume:
            self.emit("info", message=f"no checkpoint in {self.output / CHECKPOINTS}; starting from step 0")
        if acc.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            if args.resume is False and (self.output / CHECKPOINTS).is_dir():
                shutil.rmtree(self.output / CHECKPOINTS)
                self.emit("info", message="--no-resume: discarded the checkpoints of a previous run")
            info = {"text3dsam_version": __version__, "torch_version": torch.__version__,
                    "processes": self.world, "device": str(acc.device),
                    "mixed_precision": str(acc.mixed_precision), "total_steps": self.total,
                    "samples": len(self.train_set), "cases": len(self.train_set.cases),
                    "architecture": _architecture(self.model.config), **self.run_info, "args": args.to_dict()}
            write_json(self.output / ARGS_FILE, info, default=str)
        log = _Log(self.output / LOG_FILE, start if checkpoint is not None else None, acc.is_main_process)

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
        groups = _param_groups(model, args.weight_decay)
        if not any(g["params"] for g in groups):
            raise UsageError("nothing to train: every parameter is frozen")
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8)
        warmup = math.ceil(args.warmup_ratio * self.total)
        scheduler = cosine_schedule_with_warmup(optimizer, warmup, self.total)
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
        val_every = args.save_every if args.val_every is None else args.val_every
        self.emit("start", step=start)

        began = time.perf_counter()
        step_times: list[float] = []
        loss_value: float | None = None
        metrics: dict[str, Any] | None = None
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
            done = step + 1
            epoch = done * args.batch_size * args.grad_accum * self.world / len(self.train_set)
            log.write({"type": "train", "step": done, "epoch": round(epoch, 4), "loss": loss_value, "lr": lr,
                       "seconds": round(seconds, 4), "elapsed": round(time.perf_counter() - began, 3)})
            self.emit("step", step=done, loss=loss_value, lr=lr, seconds=seconds)
            last = done == self.total
            if args.save_every and (done % args.save_every == 0 or last):
                self.save_checkpoint(done, loss_value)
            if self.validating and val_every and done % val_every == 0 and not last:
                metrics = self.validate(done, model, log)

        if self.validating:
            metrics = self.validate(self.total, model, log)
        acc.wait_for_everyone()
        if self._lora is not None:  # the saved model is a plain checkpoint: adapters folded into the weights
            from text3dsam_cli.training.lora import merge_lora

            merge_lora(self._lora)
            self._lora, self._eval_modules = None, ()
        if acc.is_main_process:
            save_final_model(acc.unwrap_model(model), self.output)
        acc.wait_for_everyone()
        seconds = time.perf_counter() - began
        per_step = float(np.mean(step_times[1:] if len(step_times) > 1 else step_times)) if step_times else None
        log.write({"type": "done", "step": self.total, "loss": loss_value, "seconds": round(seconds, 3),
                   "seconds_per_step": per_step})
        self.emit("done", step=self.total, loss=loss_value, seconds=per_step, message=str(self.output),
                  metrics=metrics)
        return TrainResult(self.output, self.total, start, loss_value, seconds, per_step, metrics)


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
        size = "x".join(str(s) for s in model.config.image_size)
        raise UsageError(f"image size {size} leaves the image encoder's BatchNorm one value per channel at batch "
                         "size 1: use --batch-size 2 or more, a larger size, or --freeze image")
    output = Path(args.output).expanduser()
    source = model.source.get("path") if isinstance(getattr(model, "source", None), dict) else None
    _prepare_output(output, Path(source) if source else None)
    accelerator = make_accelerator(args)
    from accelerate.utils import set_seed

    set_seed(args.seed)
    emit: Callback = callback if (callback is not None and accelerator.is_main_process) else (lambda e: None)
    if data is None:
        data, val_data = check_training_data(args, callback)
    for note in data.notes:
        emit(TrainEvent("info", message=note))
    # The model sees NIfTI/DICOM training images in the orientation it will see them in at inference: the
    # table it came with (the published model's default when it has none), recorded in the saved config.
    orientation = model_table(model.config.inference)
    model.config.inference = {**(model.config.inference or {}), "orientation": orientation}
    if data.layout != "npz":
        table = ", ".join(f"{m} {c}" for m, c in orientation.items()) or "empty"
        emit(TrainEvent("info", message=f"images reoriented by modality ({table}; other modalities as stored)"))
    train_set = TrainingSet(data, model.config.image_size, args.window, args.modality, args.cache,
                            on_case=lambda i, n, name: emit(TrainEvent("load", i + 1, n, message=name)),
                            orientation=orientation)
    for note in train_set.notes[len(data.notes):]:
        emit(TrainEvent("info", message=note))
    val_cases = None
    if args.val:
        val_source = val_data or discover_cases(args.val, args.prompts)
        val_cases = (load_validation(val_source, args.window, args.modality, orientation)
                     if accelerator.is_main_process else [])
    trainer = Trainer(model, train_set, args, accelerator, val_cases, callback, run_info)
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
