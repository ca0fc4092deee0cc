"""Training and fine-tuning Text3DSAM (the paper's recipe on ``accelerate``); see ``docs/train.md``.

>>> from text3dsam_cli.training import TrainingArguments, finetune
>>> result = finetune(TrainingArguments(data="cases/", output="run/", max_steps=200), model="MagicXin/Text3DSAM")
"""

from text3dsam_cli.prompts import read_prompt_collection
from text3dsam_cli.training.augment import AugmentConfig, augment
from text3dsam_cli.training.data import (
    CaseSpec,
    ClassSpec,
    DataSource,
    TrainingSet,
    ValidationCase,
    discover_cases,
    load_case,
    load_validation,
    match_dataset,
)
from text3dsam_cli.training.loss import build_loss, segmentation_loss
from text3dsam_cli.training.trainer import (
    FREEZE_PARTS,
    Trainer,
    TrainEvent,
    TrainingArguments,
    TrainResult,
    evaluate_dice,
    finetune,
    list_checkpoints,
    new_model,
    parse_freeze,
    run_training,
    save_final_model,
    train_from_scratch,
)

__all__ = [
    "FREEZE_PARTS",
    "AugmentConfig",
    "CaseSpec",
    "ClassSpec",
    "DataSource",
    "TrainEvent",
    "TrainResult",
    "Trainer",
    "TrainingArguments",
    "TrainingSet",
    "ValidationCase",
    "augment",
    "build_loss",
    "discover_cases",
    "evaluate_dice",
    "finetune",
    "list_checkpoints",
    "load_case",
    "load_validation",
    "match_dataset",
    "new_model",
    "parse_freeze",
    "read_prompt_collection",
    "run_training",
    "save_final_model",
    "segmentation_loss",
    "train_from_scratch",
]
