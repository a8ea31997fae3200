"""maskface.presets: --defaults seed and --defaults baseline give those codes' defaults exactly
(typed flags still win, recorded and replayed), the seed team's own config.json imports key by key,
and a flag the seed code reads otherwise gets one warning line, none without such flags."""
import json

import pytest

from maskface import config, presets

# the seed team's train.py argparse block, as written there (not read from maskface.presets)
SEED_ARGPARSE = {
    "seed": 42, "epochs": 30, "dataset": "MaskSplitByProfileDataset",
    "augmentation": "CustomAugmentation", "resize": [256, 192], "batch_size": 64,
    "valid_batch_size": 1000, "val_ratio": 0.2, "mixup": False, "kfold": None,
    "weightsampler": False, "cutmix": False, "model": "BaseModel", "category": "multi",
    "early_stopping_patience": 5, "arcface": False, "lr": 1e-3, "lr_decay_step": 5,
    "optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.01, "scheduler": "steplr",
    "gamma": 0.5, "tmax": 5, "maxlr": 0.1, "mode": "triangular", "factor": 0.5, "patience": 4,
    "threshold": 1e-4, "criterion": "cross_entropy", "log_interval": 20, "name": "exp",
    "data_dir": "/opt/ml/input/data/train/images", "model_dir": "./model",
}


def parse(*argv: str) -> tuple:
    said = []
    return config.parse_args(list(argv), say=said.append), said


def test_defaults_seed_trains_with_the_seed_codes_defaults():
    args, said = parse("--defaults", "seed")
    for key, value in SEED_ARGPARSE.items():
        if key in ("arcface", "kfold", "mode", "optimizer", "name", "data_dir", "model_dir"):
            continue
        assert getattr(args, key) == value, key
    # its sgd is SGD with momentum: ours is 'momentum'; no kfold; --mode was CyclicLR's only
    assert (args.optimizer, args.kfold, args.criterion, args.mode) == \
        ("momentum", 0, "cross_entropy", "max")
    assert said == []
    # typed flags win; its --mode triangular is cycliclr's; its --optimizer sgd read as it did
    args, said = parse("--defaults", "seed", "--epochs", "3", "--scheduler", "cycliclr",
                       "--optimizer", "sgd")
    assert (args.epochs, args.mode, args.optimizer, args.tmax, args.maxlr) == \
        (3, "triangular", "momentum", 5, 0.1)
    assert said == ["--optimizer sgd: read as the seed code reads it, SGD with --momentum 0.9 "
                    "(recorded as --optimizer momentum)"]


def test_defaults_baseline_is_the_competitions_baseline():
    args, _ = parse("--defaults", "baseline")
    assert (args.epochs, args.dataset, args.augmentation, args.resize, args.batch_size,
            args.valid_batch_size, args.model, args.optimizer, args.lr, args.weight_decay,
            args.scheduler, args.lr_decay_step, args.gamma, args.val_ratio, args.criterion,
            args.normalize, args.early_stopping_patience, args.log_interval) == \
        (1, "MaskBaseDataset", "BaseAugmentation", [128, 96], 64, 1000, "BaseModel", "sgd", 1e-3,
         5e-4, "steplr", 20, 0.5, 0.2, "cross_entropy", "dataset", 0, 20)
    # the toolkit's own defaults are untouched without the flag
    args, _ = parse()
    assert (args.defaults, args.optimizer, args.weight_decay, args.epochs) == \
        ("toolkit", "adam", 0.0, 1)


def test_the_preset_is_recorded_and_replayed(tmp_path):
    args, _ = parse("--defaults", "seed", "--epochs", "2")
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({k: v for k, v in vars(args).items()
                                 if k not in config.NOT_SAVED}))
    replayed, said = parse("--config", str(saved))
    assert replayed.defaults == "seed" and said == []
    assert {k: v for k, v in vars(replayed).items() if k != "config"} == \
        {k: v for k, v in vars(args).items() if k != "config"}
    # a record of an older version, before --defaults: the toolkit's
    old = {k: v for k, v in vars(parse()[0]).items() if k not in config.NOT_SAVED}
    del old["defaults"]
    saved.write_text(json.dumps(old))
    assert parse("--config", str(saved))[0].defaults == "toolkit"


def test_the_seed_teams_config_json_is_imported_key_by_key(tmp_path):
    seed_config = {**SEED_ARGPARSE, "arcface": True, "kfold": None, "num_classes": 18,
                   "lr_lambda": 0.9}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(seed_config, ensure_ascii=False, indent=4))
    args, said = parse("--config", str(path), "--model_dir", str(tmp_path / "runs"))
    assert (args.criterion, args.optimizer, args.kfold, args.defaults, args.mode) == \
        ("arcface", "momentum", 0, "seed", "max")
    assert (args.lr_decay_step, args.weight_decay, args.tmax, args.maxlr, args.patience,
            args.epochs, args.resize, args.data_dir) == (5, 0.01, 5, 0.1, 4, 30, [256, 192], None)
    assert len(said) == 1
    line = said[0]
    assert line.startswith(f"{path}: the seed code's config.json, read with --defaults seed")
    for part in ("arcface true -> criterion arcface", "optimizer sgd -> momentum",
                 "kfold null -> 0", "num_classes 18 (from --category)",
                 "data_dir /opt/ml/input/data/train/images (not a folder here)",
                 "mode triangular (used by cycliclr only)", "lr_lambda (no such setting)"):
        assert part in line, part
    # its cycliclr keeps its mode
    path.write_text(json.dumps({**seed_config, "scheduler": "cycliclr", "mode": "triangular2"}))
    args, _ = parse("--config", str(path))
    assert (args.scheduler, args.mode, args.tmax, args.maxlr) == ("cycliclr", "triangular2", 5, 0.1)


@pytest.mark.parametrize("argv, expected", [
    ([], []),
    (["--epochs", "3", "--lr", "0.01", "--model", "resnet18"], []),
    (["--scheduler", "cycliclr"],
     ["--scheduler cycliclr: as the seed code reads it, --maxlr is 0.1 (here 0.01 = 10 x --lr), "
      "--tmax is 5 (here not set: one epoch per half-cycle, stepped per batch); "
      "--defaults seed reads the flags as it does"]),
    (["--scheduler", "cycliclr", "--maxlr", "0.1", "--tmax", "5"], []),
    (["--optimizer", "sgd"],
     ["--optimizer sgd: as the seed code reads it, sgd has momentum (here plain SGD; "
      "--optimizer momentum has it), --weight_decay is 0.01 (here 0.0); --defaults seed reads "
      "the flags as it does"]),
    (["--weight_decay", "0.01"],
     ["--weight_decay 0.01: as the seed code reads it, --optimizer is momentum (here adam); "
      "--defaults seed reads the flags as it does"]),
    (["--scheduler", "cosineannealinglr", "--epochs", "5"],
     ["--scheduler cosineannealinglr: as the seed code reads it, the lr floor is --lr x 0.01 "
      "(here 0); --defaults seed reads the flags as it does"]),
    (["--scheduler", "reducelronplateau", "--patience", "4"], []),
    (["--defaults", "seed", "--scheduler", "cycliclr", "--weight_decay", "0"], []),
])
def test_a_flag_the_seed_reads_otherwise_gets_one_line(argv, expected):
    assert parse(*argv)[1] == expected


def test_every_seed_value_is_a_flag_of_this_toolkit():
    known = {a.dest for a in config.get_args_parser()._actions}
    for name, table in presets.PRESETS.items():
        assert set(table) <= known, name
