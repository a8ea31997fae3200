"""Other codes' defaults, for users who come from them: `--defaults seed` (the seed team's
train.py, whose flags this toolkit shares) and `--defaults baseline` (the competition's official
baseline train.py), their saved config.json read as a replay, and the one-line warnings for flags
typed without `--defaults seed` that the seed code would have read differently.

Standard library only: config.py applies the presets while the flags parse, before --help or any
check needs torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

# Each preset replaces the toolkit's defaults of the flags it names; flags typed still win.
# seed: the argparse block of the seed team's train.py and its optims.py (create_optimizer,
# create_scheduler), the two files a run of theirs is made of.
SEED = {
    "epochs": 30,                        # train.py --epochs
    "resize": [256, 192],                # train.py --resize
    "batch_size": 64,                    # train.py --batch_size
    "valid_batch_size": 1000,            # train.py --valid_batch_size
    "val_ratio": 0.2,                    # train.py --val_ratio
    "dataset": "MaskSplitByProfileDataset",   # train.py --dataset
    "augmentation": "CustomAugmentation",     # train.py --augmentation
    "model": "BaseModel",                # train.py --model
    "criterion": "cross_entropy",        # train.py --criterion
    "lr": 1e-3,                          # train.py --lr
    # train.py --optimizer sgd; optims.py builds SGD(momentum=--momentum) for it: our 'momentum'
    "optimizer": "momentum",
    "momentum": 0.9,                     # train.py --momentum
    "weight_decay": 0.01,                # train.py --weight_decay
    "scheduler": "steplr",               # train.py --scheduler
    "lr_decay_step": 5,                  # train.py --lr_decay_step (StepLR step_size)
    "gamma": 0.5,                        # train.py --gamma (StepLR gamma)
    "tmax": 5,                           # train.py --tmax (CyclicLR step_size_up, CosineAnnealingLR T_max)
    "maxlr": 0.1,                        # train.py --maxlr (CyclicLR max_lr)
    "mode": None,                        # train.py --mode triangular: CyclicLR's; resolved per scheduler
    "factor": 0.5,                       # train.py --factor (ReduceLROnPlateau)
    "patience": 4,                       # train.py --patience (ReduceLROnPlateau)
    "threshold": 1e-4,                   # train.py --threshold (ReduceLROnPlateau)
    "early_stopping_patience": 5,        # train.py --early_stopping_patience
    "log_interval": 20,                  # train.py --log_interval
    "seed": 42,                          # train.py --seed
}
# baseline: the competition's official baseline train.py (its argparse block, and the optimizer
# and schedule it builds inline)
BASELINE = {
    "epochs": 1,                         # --epochs
    "dataset": "MaskBaseDataset",        # --dataset (splits images, not people)
    "augmentation": "BaseAugmentation",  # --augmentation
    "resize": [128, 96],                 # --resize
    "batch_size": 64,                    # --batch_size
    "valid_batch_size": 1000,            # --valid_batch_size
    "model": "BaseModel",                # --model
    "optimizer": "sgd",                  # --optimizer SGD, built without momentum
    "lr": 1e-3,                          # --lr
    "weight_decay": 5e-4,                # SGD(..., weight_decay=5e-4), not a flag there
    "scheduler": "steplr",               # StepLR(optimizer, lr_decay_step, gamma=0.5)
    "lr_decay_step": 20,                 # --lr_decay_step
    "gamma": 0.5,                        # StepLR's gamma=0.5, not a flag there
    "val_ratio": 0.2,                    # --val_ratio
    "criterion": "cross_entropy",        # --criterion
    "normalize": "dataset",              # BaseAugmentation(mean=dataset.mean, std=dataset.std)
    "early_stopping_patience": 0,        # it trains every epoch: no early stopping
    "log_interval": 20,                  # --log_interval
    "seed": 42,                          # --seed
}
PRESETS = {"toolkit": {}, "seed": SEED, "baseline": BASELINE}
SEED_COSINE_FLOOR = 0.01  # optims.py: CosineAnnealingLR(eta_min=lr * 0.01)

# The seed's config.json is vars(args) plus these keys its train() adds or this toolkit lacks
SEED_ONLY_KEYS = ("arcface", "num_classes")
CYCLIC_MODES = ("triangular", "triangular2", "exp_range")  # torch's CyclicLR
PLATEAU_MODES = ("min", "max")  # ReduceLROnPlateau: val loss or val F1


def is_seed_config(saved: dict) -> bool:
    """A config.json the seed code wrote (it holds keys this toolkit never writes)."""
    return any(key in saved for key in SEED_ONLY_KEYS)


def import_seed_config(saved: dict, known: set[str], source: str) -> tuple[dict, str]:
    """The seed team's saved config.json as this toolkit's settings, and one line saying what was
    mapped and what was ignored. Values the seed read differently are translated (its 'sgd' had
    momentum; its --mode belonged to CyclicLR only; arcface was a switch); paths that do not
    exist here and keys that mean nothing here are dropped, by name."""
    record, mapped, ignored = {}, [], []
    for key, value in saved.items():
        if key == "arcface":
            if value is True:
                record["criterion"] = "arcface"
                mapped.append("arcface true -> criterion arcface")
            continue
        if key == "num_classes":
            ignored.append(f"num_classes {value} (from --category)")
            continue
        if key in ("data_dir", "model_dir") and isinstance(value, str) \
                and not Path(value).is_dir():
            ignored.append(f"{key} {value} (not a folder here)")
            continue
        if key not in known:
            ignored.append(f"{key} (no such setting)")
            continue
        record.setdefault(key, value)
    if saved.get("arcface") is True and saved.get("criterion") not in (None, "arcface"):
        mapped.append(f"criterion {saved['criterion']} -> arcface (arcface replaces it)")
        record["criterion"] = "arcface"
    if record.get("optimizer") == "sgd":
        record["optimizer"] = "momentum"
        mapped.append("optimizer sgd -> momentum (the seed's sgd is SGD with --momentum)")
    if record.get("kfold", 0) is None:
        record["kfold"] = 0
        mapped.append("kfold null -> 0")
    mode = record.get("mode")
    if mode is not None and not (record.get("scheduler") == "cycliclr" and mode in CYCLIC_MODES):
        del record["mode"]  # the seed read --mode in CyclicLR only; its plateau watched 'max'
        ignored.append(f"mode {mode} (used by cycliclr only)")
    record["defaults"] = "seed"
    line = (f"{source}: the seed code's config.json, read with --defaults seed; "
            f"{len(record) - 1} settings taken")
    if mapped:
        line += "; mapped " + ", ".join(mapped)
    if ignored:
        line += "; ignored " + ", ".join(ignored)
    return record, line


def seed_warnings(values: dict, typed: list[str]) -> list[str]:
    """One line per typed flag (``typed``, in the order given) whose run depends on a value the
    seed code would have given differently: a value it read otherwise (--optimizer sgd), or a
    setting the flag works through that was left to its default and whose seed default differs
    (--scheduler cycliclr with --maxlr/--tmax not given). ``values``: the run's flags, with --tmax,
    --maxlr and --mode as they resolve. Empty for a run without seed flags."""
    lines = []
    for flag in typed:
        said = []
        if flag == "optimizer" and values["optimizer"] == "sgd":
            said.append("sgd has momentum (here plain SGD; --optimizer momentum has it)")
        if flag == "scheduler" and values["scheduler"] == "cosineannealinglr":
            said.append(f"the lr floor is --lr x {SEED_COSINE_FLOOR} (here 0)")
        depends = DEPENDS.get(flag)
        for other in (depends(values) if depends else ()):
            if other in typed or other not in SEED:
                continue
            theirs, (ours, how) = SEED[other], effective(values, other)
            if theirs is not None and theirs != ours:
                said.append(f"--{other} is {show(theirs)} (here {how or show(ours)})")
        if said:
            lines.append(f"--{flag} {show(values[flag])}: as the seed code reads it, "
                         + ", ".join(said) + "; --defaults seed reads the flags as it does")
    return lines


def show(value) -> str:
    """A flag's value as it is typed."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def effective(values: dict, flag: str) -> tuple:
    """(the value a flag takes in this run, how it came about when derived, else '')."""
    if flag == "maxlr" and values["maxlr"] is None:
        return 10 * values["lr"], f"{10 * values['lr']:g} = 10 x --lr"
    if flag == "tmax" and values["tmax"] is None:
        if values["scheduler"] == "cycliclr":
            return None, "not set: one epoch per half-cycle, stepped per batch"
        return values["epochs"], f"{values['epochs']} = --epochs"
    return values[flag], ""

# typed flag -> the settings whose defaults its effect runs through (given the run's values)
DEPENDS: dict[str, Callable[[dict], tuple[str, ...]]] = {
    "optimizer": lambda v: ("weight_decay",),
    "momentum": lambda v: ("optimizer",),
    "weight_decay": lambda v: ("optimizer",),
    "scheduler": lambda v: {
        "steplr": ("lr_decay_step",),
        "cycliclr": ("maxlr", "tmax"),
        "cosineannealinglr": ("tmax",),
        "reducelronplateau": ("patience",),
    }.get(v["scheduler"], ()),
}
