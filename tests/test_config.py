"""maskface.config: train.py's flags (every choice, old spellings, number limits) and
config.json replay, hand-edited values checked like flags (null where the flag has a default),
--resume with --config refused, a blank --name refused."""
import json
import re

import pytest

import train
from maskface import (
    augmentation,
    config,
    dataset,
    engine,
    image_cache,
    labels,
    loss as losses,
    mixed_precision,
)
from maskface.cli import UserError


# ---------------------------------------------------------------------------- 6. hand-edited files
@pytest.mark.parametrize("setting, expected", [
    ({"epochs": 2.0, "resize": [32.0, 24.0]}, None),  # whole numbers written as floats: fine
    ({"epochs": 2.5}, "setting 'epochs' is 2.5; expected an integer"),
    ({"batch_size": 1e12}, "--batch_size 1000000000000: expected 1 to 65,536"),
    ({"lr": float("nan")}, "--lr nan: expected a learning rate of 0 or more"),
    ({"resize": [100000, 24]}, "--resize 100000 24: expected H W of 16 to 4096 pixels"),
])
def test_hand_edited_config_numbers(tmp_path, setting, expected):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"data_dir": str(tmp_path / "nowhere"), **setting}))
    if expected is None:
        args = config.parse_args(["--config", str(config_file)])
        assert args.epochs == 2 and isinstance(args.epochs, int) and args.resize == [32, 24]
        return
    with pytest.raises(UserError, match=expected.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        train.main(config.parse_args(["--config", str(config_file)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


# ---------------------------------------------------------------------------- flags
@pytest.mark.parametrize("flag, values", [
    ("--optimizer", engine.OPTIMIZERS), ("--scheduler", engine.SCHEDULERS),
    ("--criterion", list(losses.LOSSES)), ("--augmentation", list(augmentation.AUGMENTATIONS)),
    ("--dataset", list(dataset.SPLITS)), ("--category", list(labels.CATEGORY_CLASSES)),
    ("--data_balancing", dataset.BALANCING), ("--amp", mixed_precision.AMP_MODES), ("--crop", image_cache.CROPS),
])
def test_every_choice_parses_and_a_typo_lists_the_choices(flag, values, capsys):
    for value in values:
        assert getattr(config.parse_args([flag, value]), flag[2:]) == value
    with pytest.raises(SystemExit):
        config.parse_args([flag, str(values[0]) + "x"])
    err = capsys.readouterr().err
    assert "invalid choice" in err and str(values[-1]) in err


def test_old_spellings_and_defaults():
    args = config.parse_args(["--age_lable_num", "6"])
    assert args.age_label_num == 6
    hyphenated = config.parse_args(["--batch-size", "8", "--early-stopping-patience", "0"])
    assert hyphenated.batch_size == 8 and hyphenated.early_stopping_patience == 0
    defaults = config.parse_args([])
    assert (defaults.seed, defaults.epochs, defaults.batch_size, defaults.valid_batch_size,
            defaults.val_ratio, defaults.lr, defaults.early_stopping_patience) == (42, 1, 64, 1000, 0.2, 1e-3, 5)
    assert defaults.dataset == "MaskSplitByProfileDataset" and defaults.model == "BaseModel"
    assert defaults.augmentation == "CustomAugmentation" and defaults.name == "exp"


@pytest.mark.parametrize("flag, value", [
    ("--epochs", "0"), ("--batch_size", "0"), ("--valid_batch_size", "-5"), ("--lr", "-1"),
    ("--weight_decay", "-1"), ("--momentum", "-1"), ("--num_workers", "-1"), ("--seed", "-1"),
    ("--lr_decay_step", "0"), ("--mixup_alpha", "-1"), ("--cutmix_alpha", "0"),
    ("--log_interval", "0"), ("--gamma", "-1"), ("--old_age", "20"), ("--warmup_epochs", "-1"),
    ("--patience", "-1"), ("--face_margin", "-1"), ("--smoothing", "1.5"),
    ("--model_ema_decay", "1"), ("--model_ema_decay", "0"), ("--grad_accum_steps", "0"),
    ("--clip_grad", "0"), ("--class_weights_beta", "1"), ("--head_lr_mult", "-1"),
    ("--layer_decay", "0"), ("--min_lr", "-1"), ("--log_seconds", "-1"),
])
def test_bad_numbers_rejected_before_any_work(flag, value, tmp_path):
    args = config.parse_args([flag, value, "--data_dir", str(tmp_path / "nowhere"),
                             "--model_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "c")])
    with pytest.raises(UserError, match=f"^{flag} {value}.*expected"):
        train.main(args)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("setting, expected", [
    ({"resize": 32}, "setting 'resize' is 32; expected a list of 2 values"),
    ({"epochs": "3"}, "setting 'epochs' is \"3\"; expected an integer"),
    ({"amp": "bogus"}, "setting 'amp' is \"bogus\"; expected one of auto, bf16, fp16, off"),
    ({"channels_last": 1}, "setting 'channels_last' is 1; expected true or false"),
])
def test_hand_edited_config_is_checked_like_flags(setting, expected, tmp_path):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"lr": 0.01, "crop": None, **setting}))
    with pytest.raises(UserError, match=re.escape(f"{config_file}: {expected}")):
        config.parse_args(["--config", str(config_file)])


def test_resume_with_config_is_refused_and_the_run_untouched(run_copy, tmp_path):
    other = tmp_path / "other.json"
    record = json.loads((run_copy / "config.json").read_text())
    other.write_text(json.dumps({**record, "lr": 0.5, "seed": 7, "optimizer": "sgd"}))
    before = (run_copy / "config.json").read_text()
    # before: the other file was replayed over the run (folds of one run at different lr/seed)
    with pytest.raises(UserError, match=r"--resume .* and --config .*other\.json: give one"):
        config.parse_args(["--resume", str(run_copy), "--config", str(other)])
    assert (run_copy / "config.json").read_text() == before


@pytest.mark.parametrize("key", ["scheduler", "amp", "normalize", "model", "criterion",
                                 "cache_dir", "device"])
def test_null_in_config_json_is_refused_where_the_flag_has_a_default(tmp_path, key):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({key: None}))
    with pytest.raises(UserError, match=rf"config\.json: setting '{key}' is null; expected"):
        config.parse_args(["--config", str(path)])


def test_null_stays_allowed_where_the_default_is_none(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"crop": None, "tmax": None, "rrc_scale": None}))
    args = config.parse_args(["--config", str(path)])
    assert args.crop is None and args.tmax is None and args.rrc_scale is None


def test_a_blank_run_name_is_refused():
    for name in (" ", "  exp", "exp "):
        with pytest.raises(UserError, match=r"--name '.*': expected a plain folder name"):
            config.check_flags(config.parse_args(["--name", name]))


# ------------------------------------------------------------------- --mode and ignored flags
def parse_saying(*argv: str) -> tuple:
    said = []
    return config.parse_args(list(argv), say=said.append), said


@pytest.mark.parametrize("argv, mode", [
    ([], "max"),
    (["--scheduler", "reducelronplateau"], "max"),
    (["--scheduler", "reducelronplateau", "--mode", "min"], "min"),
    (["--scheduler", "cycliclr"], "triangular"),
    (["--scheduler", "cycliclr", "--mode", "triangular2"], "triangular2"),
    (["--scheduler", "cycliclr", "--mode", "exp_range"], "exp_range"),
])
def test_mode_resolves_for_the_scheduler_in_use(argv, mode):
    assert config.parse_args(argv).mode == mode


@pytest.mark.parametrize("argv, expected", [
    (["--scheduler", "reducelronplateau", "--mode", "triangular"],
     "--mode triangular: --scheduler reducelronplateau takes min, max; triangular, triangular2, "
     "exp_range belong to cycliclr"),
    (["--scheduler", "cycliclr", "--mode", "min"],
     "--mode min: --scheduler cycliclr takes triangular, triangular2, exp_range; min, max belong "
     "to reducelronplateau"),
])
def test_a_mode_the_scheduler_does_not_have_is_one_line(argv, expected):
    with pytest.raises(UserError) as error:
        config.parse_args(argv)
    assert str(error.value) == expected


def test_a_replayed_mode_of_another_scheduler_gives_way(tmp_path):
    record = {k: v for k, v in vars(config.parse_args([])).items() if k not in config.NOT_SAVED}
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(record))  # "mode": "max", steplr
    assert config.parse_args(["--config", str(saved), "--scheduler", "cycliclr"]).mode == \
        "triangular"


@pytest.mark.parametrize("argv, flag, why", [
    (["--dataset", "MaskBaseDataset", "--kfold", "3"], "--dataset MaskBaseDataset",
     "k-fold (--kfold, --folds) always splits by person, whatever --dataset says"),
    (["--val_ratio", "0.3", "--kfold", "3"], "--val_ratio 0.3", "k-fold"),
    (["--maxlr", "0.1"], "--maxlr 0.1", "only --scheduler cycliclr uses it"),
    (["--mode", "triangular"], "--mode triangular", "only --scheduler cycliclr and"),
    (["--patience", "4"], "--patience 4", "only --scheduler reducelronplateau uses it"),
    (["--factor", "0.3"], "--factor 0.3", "reducelronplateau"),
    (["--tmax", "5"], "--tmax 5", "cosineannealinglr"),
    (["--lr_decay_step", "5", "--scheduler", "exponentiallr"], "--lr_decay_step 5", "steplr"),
    (["--gamma", "0.9", "--scheduler", "cycliclr"], "--gamma 0.9", "exp_range"),
    (["--min_lr", "0.0001"], "--min_lr 0.0001", "timm's schedules"),
    (["--momentum", "0.8", "--optimizer", "adam"], "--momentum 0.8", "momentum: SGD with it"),
    (["--mixup_alpha", "0.4"], "--mixup_alpha 0.4", "only --mixup uses it"),
    (["--cutmix_alpha", "0.4"], "--cutmix_alpha 0.4", "only --cutmix uses it"),
    (["--smoothing", "0.2"], "--smoothing 0.2", "label_smoothing"),
    (["--focal_gamma", "1.0"], "--focal_gamma 1.0", "focal"),
    (["--arc_margin", "0.3"], "--arc_margin 0.3", "arcface"),
    (["--class_weights_beta", "0.9"], "--class_weights_beta 0.9", "effective"),
    (["--valid_batch_size", "10", "--val_ratio", "0"], "--valid_batch_size 10", "no validation"),
    (["--model_ema_decay", "0.99"], "--model_ema_decay 0.99", "--model_ema"),
    (["--clip_mode", "value"], "--clip_mode value", "--clip_grad"),
    (["--rrc_ratio", "1", "1"], "--rrc_ratio 1.0 1.0", "--rrc_scale"),
    (["--face_margin", "0.2", "--crop", "center"], "--face_margin 0.2", "--crop face"),
])
def test_every_typed_flag_the_run_ignores_is_named(argv, flag, why):
    _, said = parse_saying(*argv)
    ignored = [line for line in said if " is ignored: " in line]
    assert len(ignored) == 1 and ignored[0].startswith(f"{flag} is ignored: ") \
        and why in ignored[0], said


@pytest.mark.parametrize("argv", [
    [],
    ["--dataset", "MaskBaseDataset"],
    ["--kfold", "3"],
    ["--maxlr", "0.1", "--scheduler", "cycliclr", "--tmax", "5"],
    ["--patience", "4", "--scheduler", "reducelronplateau"],
    ["--mixup_alpha", "0.4", "--mixup"],
    ["--gamma", "0.9", "--scheduler", "cycliclr", "--mode", "exp_range", "--maxlr", "0.1",
     "--tmax", "5"],
    ["--tmax", "5", "--scheduler", "cosine"],
    ["--momentum", "0.8", "--optimizer", "momentum", "--weight_decay", "0"],
    ["--face_margin", "0.2", "--crop", "face"],
])
def test_nothing_is_said_when_every_typed_flag_counts(argv):
    assert parse_saying(*argv)[1] == []


def test_ignored_values_of_a_replayed_record_are_not_named(tmp_path):
    record = {k: v for k, v in vars(config.parse_args([])).items() if k not in config.NOT_SAVED}
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({**record, "maxlr": 0.5, "patience": 9}))
    assert parse_saying("--config", str(saved))[1] == []


def test_the_seed_codes_arcface_switch_is_criterion_arcface():
    assert config.parse_args(["--arcface"]).criterion == "arcface"
    assert "--arcface" not in config.get_args_parser().format_help()


# ---------------------------------------------------------------------------- issue 24
@pytest.mark.parametrize("extra, expected", [
    (["--mean", "123.7", "116.3", "103.5"], "--mean 123.7 116.3 103.5: expected three numbers "
                                            "from 0 to 1 (R G B on the 0-1 scale"),
    (["--std", "0.2", "0", "0.2"], "--std 0.2 0 0.2: expected three numbers above 0, at most 1"),
    (["--std", "nan", "0.2", "0.2"], "--std nan 0.2 0.2: expected three numbers above 0"),
    (["--crop_size", "8", "256"], "--crop_size 8 256: expected H W of 16 to 8192 photo pixels"),
    (["--crop_size", "320", "256", "--crop", "face"], "--crop_size 320 256 is a centre crop; "
                                                      "--crop face crops otherwise"),
])
def test_bad_normalisation_and_crop_size_rejected_before_any_work(extra, expected, tmp_path):
    args = config.parse_args([*extra, "--data_dir", str(tmp_path / "nowhere"),
                              "--model_dir", str(tmp_path / "runs"),
                              "--cache_dir", str(tmp_path / "c")])
    with pytest.raises(UserError, match="^" + re.escape(expected)):
        train.main(args)
    assert not any(tmp_path.iterdir())


def test_mean_std_and_crop_size_take_three_and_two_numbers(capsys):
    for argv in (["--mean", "0.5", "0.5"], ["--crop_size", "320"]):
        with pytest.raises(SystemExit):
            config.parse_args(argv)
    assert "expected 3 arguments" in capsys.readouterr().err
    args = config.parse_args(["--mean", "0.548", "0.504", "0.479", "--std", "0.237", "0.247",
                              "0.246", "--crop_size", "320", "256"])
    assert (args.mean, args.std, args.crop_size) == ([0.548, 0.504, 0.479],
                                                      [0.237, 0.247, 0.246], [320, 256])


# ---------------------------------------------------------------------------- tracking
def test_a_run_records_its_commit_command_start_and_the_crop_it_used(finished_run):
    record = json.loads((finished_run / "config.json").read_text())
    tracking = record["tracking"]
    assert record["crop"] == "center"  # the augmentation's crop, no longer null
    assert tracking["preprocess"]["crop"] == "center"
    assert tracking["preprocess"]["resize"] == [32, 24] == tracking["preprocess"]["cached_size"]
    assert tracking["command"].startswith("python ")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", tracking["started"])
    state = config.git_state()
    assert tracking["commit"] == state["commit"]  # None where the project is no git checkout
    if state["commit"] is not None:
        assert re.fullmatch(r"[0-9a-f]{40}", tracking["commit"])
        assert isinstance(tracking["dirty"], bool)


def test_a_copy_without_git_records_null_and_no_error(tmp_path):
    assert config.git_state(tmp_path) == {"commit": None, "dirty": None}
    tracking = config.tracking_record({"crop": "face"}, root=tmp_path, argv=["train.py", "--x y"])
    assert tracking["commit"] is None and tracking["dirty"] is None
    assert tracking["command"] == "python train.py '--x y'"
    assert tracking["preprocess"] == {"crop": "face"}


def test_git_state_reads_the_commit_and_the_dirt_of_a_checkout(tmp_path):
    import subprocess
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    try:
        subprocess.run([*git, "init", "-q"], check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("no git on this machine")
    (tmp_path / "a.txt").write_text("a")
    subprocess.run([*git, "add", "a.txt"], check=True, timeout=30)
    subprocess.run([*git, "commit", "-q", "-m", "a"], check=True, timeout=30)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()
    assert config.git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "a.txt").write_text("b")
    assert config.git_state(tmp_path) == {"commit": head, "dirty": True}
    (tmp_path / "inner").mkdir()  # a folder inside a checkout is not a checkout of its own
    assert config.git_state(tmp_path / "inner")["commit"] is None


def test_a_replay_ignores_the_tracking_block(finished_run, tmp_path):
    record = json.loads((finished_run / "config.json").read_text())
    record["tracking"] = {"commit": "0" * 40, "anything": ["at", "all"]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(record))
    args = config.parse_args(["--config", str(path)])
    assert not hasattr(args, "tracking") and args.crop == "center"


def test_a_resume_keeps_the_runs_tracking_and_notes_a_changed_commit():
    first = {"commit": "a" * 40, "dirty": False, "command": "python train.py",
             "started": "2026-12-01T00:00:00+00:00", "host": "h", "preprocess": {"crop": "face"}}
    again = config.tracking_record({"crop": "center"}, previous=first, argv=["train.py"])
    assert {k: again[k] for k in first} == first and len(again["resumes"]) == 1
    now = {**again["resumes"][0], "commit": "b" * 40, "dirty": True}
    assert config.commit_change(first, now) == ("note: this run started at commit aaaaaaa, the "
                                                "code is now at bbbbbbb (with uncommitted changes)")
    assert config.commit_change(first, {**now, "commit": "a" * 40}) is None
    assert config.commit_change(None, now) is None
