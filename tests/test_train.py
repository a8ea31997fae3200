import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import benchmark
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
    model as models,
    run_folder,
)
from maskface.bench import speed
from maskface.cli import UserError
from maskface.settings import model_defaults, model_normalization, resolve_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def run(run_flags):
    def train_tiny(train_dir, tmp_path, *extra):
        return train.main(config.parse_args(run_flags(train_dir, tmp_path, *extra)))
    return train_tiny


def summary_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


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


def test_model_typo_rejected_before_data_loads(tmp_path):
    args = config.parse_args(["--model", "resnet1888", "--data_dir", str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match="resnet18"):
        train.main(args)
    result = subprocess.run([sys.executable, "train.py", "--model", "efficentnet_b0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "efficientnet_b0" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--data_dir", str(tmp_path / "none")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and "none" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flag, value", [
    ("--epochs", "0"), ("--batch_size", "0"), ("--valid_batch_size", "-5"), ("--lr", "-1"),
    ("--weight_decay", "-1"), ("--momentum", "-1"), ("--num_workers", "-1"), ("--seed", "-1"),
    ("--lr_decay_step", "0"), ("--mixup_alpha", "-1"), ("--cutmix_alpha", "0"),
    ("--log_interval", "0"), ("--gamma", "-1"), ("--old_age", "20"), ("--warmup_epochs", "-1"),
    ("--patience", "-1"), ("--face_margin", "-1"), ("--smoothing", "1.5"),
    ("--model_ema_decay", "1"), ("--model_ema_decay", "0"), ("--grad_accum_steps", "0"),
    ("--clip_grad", "0"), ("--class_weights_beta", "1"), ("--head_lr_mult", "-1"),
    ("--layer_decay", "0"), ("--min_lr", "-1"),
])
def test_bad_numbers_rejected_before_any_work(flag, value, tmp_path):
    args = config.parse_args([flag, value, "--data_dir", str(tmp_path / "nowhere"),
                             "--model_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "c")])
    with pytest.raises(UserError, match=f"^{flag} {value}.*expected"):
        train.main(args)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("extra, expected", [
    (["--name", "a/b"], "--name 'a/b': expected a plain folder name"),
    (["--name", ".."], "--name '..'"),
    (["--drop_ages", "59-57"], "expected LO <= HI"),
    (["--model_dir", "{file}"], "is a file; expected a folder"),
    (["--cache_dir", "{file}/cache"], "is a file, not a folder"),
    (["--layer_decay", "0.7"], "--layer_decay 0.7: needs a timm model"),
    (["--normalize", "model"], "--normalize model: BaseModel has no timm pretrained_cfg"),
])
def test_bad_names_and_paths_rejected_before_any_work(extra, expected, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    extra = [e.replace("{file}", str(a_file)) for e in extra]
    args = config.parse_args(["--data_dir", str(tmp_path / "nowhere"), "--model_dir",
                             str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "c"), *extra])
    with pytest.raises(UserError, match=re.escape(expected)):
        train.main(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("extra, expected", [
    (["--val_ratio", "0.99"], "leaves no training person"),
    (["--drop_ages", "0-200"], "--drop_ages 0-200 leaves no training photo"),
    (["--kfold", "500"], "--kfold 500: only"),
    (["--kfold", "2", "--fold", "5"], "--fold 5: expected 0..1"),
    (["--kfold", "2", "--drop_ages", "0-200"], "leaves no training photo"),
])
def test_split_problems_found_before_decoding_or_run_folders(tiny_train_dir, tmp_path, extra, expected):
    args = config.parse_args(["--data_dir", str(tiny_train_dir), "--model_dir", str(tmp_path / "runs"),
                             "--cache_dir", str(tmp_path / "cache"), *extra])
    with pytest.raises(UserError, match=re.escape(expected)):
        train.main(args)
    assert not any(tmp_path.iterdir())  # no cache decoded, no run folder made


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


def test_unreadable_weights_named_before_data_loads(tmp_path):
    weights = tmp_path / "notes.pth"
    weights.write_text("these are not weights")
    args = config.parse_args(["--weights", str(weights), "--data_dir", str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match=f"weights file {re.escape(str(weights))}: unreadable.*"
                                        "expected a state dict"):
        train.main(args)


def test_run_folder_numbering_with_dotted_names(tmp_path):
    names = [run_folder.new_run_dir(tmp_path, "lr1e-3.v2").name for _ in range(3)]
    assert names == ["lr1e-3.v2", "lr1e-3.v22", "lr1e-3.v23"]
    assert [run_folder.new_run_dir(tmp_path, "exp").name for _ in range(2)] == ["exp", "exp2"]


# ---------------------------------------------------------------------------- runs
def test_run_writes_every_file_and_config_replays(tiny_train_dir, tmp_path, run):
    result = run(tiny_train_dir, tmp_path, "--epochs", "2", "--name", "first")
    run_dir = result["run_dir"]
    for name in ("config.json", "best.pth", "last.pth", "summary.csv"):
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("events.out.tfevents.*"))
    rows = summary_rows(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(run_folder.SUMMARY_FIELDS) <= set(rows[0])
    best = torch.load(run_dir / "best.pth", weights_only=False)
    assert best["preprocess"]["resize"] == [32, 24]
    rebuilt = models.restore_model(best)
    assert isinstance(rebuilt, torch.nn.Module) and not rebuilt.training
    assert np.isclose(float(max(r["val_f1"] for r in rows)), best["metrics"]["f1"])
    # TensorBoard holds the scalars and figures
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir)).Reload()
    assert {"Loss/train", "Loss/val", "F1/val", "Acc/val", "LR", "F1/mask"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"]
    # --config replays: same flags, a new run folder, same result
    replay = train.main(config.parse_args(["--config", str(run_dir / "config.json"), "--name", "again"]))
    assert replay["run_dir"].name == "again"
    assert replay["best_f1"] == pytest.approx(result["best_f1"])
    saved = json.loads((replay["run_dir"] / "config.json").read_text())
    assert saved["epochs"] == 2 and saved["resize"] == [32, 24]


def test_resume_after_sigkill_matches_uninterrupted(tiny_train_dir, tmp_path, run_flags,
                                                    run_killed_after_first_epoch):
    common = [sys.executable, "train.py", *run_flags(tiny_train_dir, tmp_path, "--epochs", "3",
                                                      "--early_stopping_patience", "0")]
    subprocess.run(common + ["--name", "whole"], cwd=ROOT, check=True, capture_output=True,
                   timeout=300)
    killed_dir = tmp_path / "runs" / "killed"
    run_killed_after_first_epoch(common + ["--name", "killed"], killed_dir)
    rows = summary_rows(killed_dir)
    assert len(rows) < 3, "the run finished before it could be killed"
    subprocess.run([sys.executable, "train.py", "--resume", str(killed_dir)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    whole = torch.load(tmp_path / "runs" / "whole" / "last.pth", weights_only=False)
    resumed = torch.load(killed_dir / "last.pth", weights_only=False)
    assert resumed["epoch"] == whole["epoch"] == 3
    for key, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key
    assert len(summary_rows(killed_dir)) == 3


@pytest.mark.parametrize("extra", [
    ["--multi_head", "--criterion", "focal"],
    ["--canny", "--mixup", "--cutmix", "--criterion", "label_smoothing"],
    ["--category", "age", "--age_label_num", "6", "--criterion", "f1", "--weightsampler"],
    ["--criterion", "arcface", "--optimizer", "momentum", "--scheduler", "cycliclr"],
    ["--criterion", "bce", "--data_balancing", "gene", "--dataset", "MaskBaseDataset",
     "--scheduler", "reducelronplateau", "--warmup_epochs", "1", "--drop_ages", "57-59",
     "--old_age", "58", "--normalize", "dataset", "--channels_last", "--augmentation", "StrongAugmentation"],
])
def test_model_and_loss_variants_train(tiny_train_dir, tmp_path, extra, run):
    result = run(tiny_train_dir, tmp_path, "--epochs", "2", *extra)
    rows = summary_rows(result["run_dir"])
    assert len(rows) == 2 and all(np.isfinite(float(r["train_loss"])) for r in rows)
    assert 0 <= result["best_f1"] <= 1


def test_weights_file_loads_into_another_head_size(tiny_train_dir, tmp_path, capsys, run):
    donor = models.build_model("BaseModel", 3)
    weights = tmp_path / "donor.pth"
    torch.save(donor.state_dict(), weights)
    result = run(tiny_train_dir, tmp_path, "--epochs", "1", "--weights", str(weights))
    out = capsys.readouterr().out
    assert "weights: loaded" in out and "not loaded" in out
    assert (result["run_dir"] / "best.pth").is_file()


def test_resume_of_a_torn_checkpoint_leaves_the_run_folder_alone(tiny_train_dir, tmp_path, run):
    run_dir = run(tiny_train_dir, tmp_path, "--epochs", "1")["run_dir"]
    last = run_dir / "last.pth"
    last.write_bytes(last.read_bytes()[:3000])  # a copy cut short
    config_before = (run_dir / "config.json").read_text()
    with pytest.raises(UserError, match=f"{re.escape(str(last))}: not a readable checkpoint"):
        train.main(config.parse_args(["--resume", str(run_dir), "--epochs", "2",
                                     "--cache_dir", str(tmp_path / "elsewhere")]))
    assert (run_dir / "config.json").read_text() == config_before


def test_early_stopping_stops(tiny_train_dir, tmp_path, capsys, run):
    # lr 0: nothing improves after the first epoch, so patience 2 stops at epoch 3
    result = run(tiny_train_dir, tmp_path, "--epochs", "6", "--lr", "0", "--early_stopping_patience", "2")
    assert len(summary_rows(result["run_dir"])) == 3
    assert "--early_stopping_patience 0" in capsys.readouterr().out


def test_non_finite_loss_stops_with_a_clear_message(tiny_train_dir, tmp_path, run):
    with pytest.raises(UserError, match=r"loss is (nan|inf).*batch \d+ \(lr"):
        run(tiny_train_dir, tmp_path, "--epochs", "2", "--lr", "1e30", "--optimizer", "sgd")
    assert not any((tmp_path / "runs").iterdir())  # no checkpoint yet: no run folder left


def test_pretrained_offline_names_weights_flag(tiny_train_dir, tmp_path, run):
    with pytest.raises(UserError, match="--weights"):
        run(tiny_train_dir, tmp_path, "--model", "resnet18", "--pretrained")
    assert not any((tmp_path / "runs").iterdir())


def test_any_failure_before_the_first_checkpoint_leaves_no_folder(tiny_train_dir, tmp_path, run,
                                                                  monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(engine, "train_one_epoch", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(tiny_train_dir, tmp_path, "--epochs", "1", "--name", "oom")
    assert not (tmp_path / "runs" / "oom").exists()


def test_a_model_of_fixed_input_size_names_it_before_data_loads(tmp_path):
    args = config.parse_args(["--model", "vit_tiny_patch16_224", "--resize", "128", "96",
                             "--data_dir", str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match=r"^--resize 128 96: vit_tiny_patch16_224 takes only "
                                        r"224x224 inputs; pass --resize 224 224$"):
        train.main(args)
    assert not any(tmp_path.iterdir())


def test_benchmark_and_train_build_the_same_trainer(tiny_train_dir):
    # benchmark.py times the trainer train.py trains: the same flags give the same model (same
    # weights from the same seed), optimizer, loss, augmentation and precision
    flags = ["--model", "resnet18", "--resize", "64", "48", "--batch_size", "8",
             "--optimizer", "sgd", "--amp", "off", "--device", "cpu"]
    benchmark_settings = speed.train_settings(benchmark.parse_args(
        [*flags, "--data_dir", str(tiny_train_dir)]), torch.device("cpu"))
    train_settings = resolve_settings(config.parse_args(flags), say=lambda _: None)
    trainers = []
    for settings in (benchmark_settings, train_settings):
        torch.manual_seed(0)
        trainers.append(engine.build_trainer(settings, 18, torch.device("cpu"), steps_per_epoch=2))
    timed, trained = trainers
    assert timed.net.model_config == trained.net.model_config
    timed_weights, trained_weights = timed.net.state_dict(), trained.net.state_dict()
    assert all(torch.equal(timed_weights[k], trained_weights[k]) for k in trained_weights)
    assert type(timed.optimizer) is type(trained.optimizer) is torch.optim.SGD
    assert timed.optimizer.defaults == trained.optimizer.defaults
    assert type(timed.criterion) is type(trained.criterion)
    assert type(timed.augment) is type(trained.augment)
    assert (timed.autocast_dtype, timed.channels_last) == (trained.autocast_dtype,
                                                           trained.channels_last)


# ---------------------------------------------------------------------------- issue 15
def test_class_weights_with_a_class_missing_from_training_say_so_before_decoding(tiny_train_dir,
                                                                                 tmp_path):
    # the tiny sample has no man of 60 or more
    flags = ["--data_dir", str(tiny_train_dir), "--model_dir", str(tmp_path / "runs"),
             "--cache_dir", str(tmp_path / "cache"), "--class_weights", "balanced"]
    with pytest.raises(UserError, match=r"^--class_weights balanced: class\(es\) 02 wear-male-60\+, "
                                        r"08 incorrect-male-60\+, 14 not_wear-male-60\+ have no "
                                        r"training photo"):
        train.main(config.parse_args(flags))
    with pytest.raises(UserError, match=r"^fold 0: --class_weights effective: class\(es\) 2 60\+"):
        train.main(config.parse_args(flags + ["--class_weights", "effective", "--category", "age",
                                             "--kfold", "2", "--old_age", "95"]))
    assert not any(tmp_path.iterdir())  # no cache decoded, no run folder made


def test_timm_model_brings_its_own_preprocessing_unless_overridden(tmp_path):
    weights = str(tmp_path / "w.pth")  # model_defaults only reads the flags

    def resolved(*flags):
        return model_defaults(config.parse_args(list(flags)))
    toolkit = {"resize": [128, 96], "normalize": "imagenet", "interpolation": "area"}
    assert resolved() == toolkit
    assert resolved("--model", "test_resnet") == toolkit  # no pretrained weights: nothing to match
    assert resolved("--model", "resnet18", "--weights", weights) == toolkit  # torchvision's
    # test_resnet's pretrained_cfg: 160x160, mean = std = 0.5, bilinear
    assert resolved("--model", "test_resnet", "--weights", weights) == {
        "resize": [160, 160], "normalize": "model", "interpolation": "bilinear"}
    assert resolved("--model", "timm/resnet18", "--pretrained")["interpolation"] == "bicubic"
    # a ViT takes one size: it gets it even without weights
    assert resolved("--model", "test_vit")["resize"] == [160, 160]
    assert resolved("--model", "test_vit", "--pretrained", "--resize", "160", "160",
                    "--normalize", "imagenet", "--interpolation", "area") == {
        "resize": [160, 160], "normalize": "imagenet", "interpolation": "area"}
    assert model_normalization("test_vit") == ([0.5] * 3, [0.5] * 3)


def test_ema_accumulation_and_timm_schedule_resume_exactly_after_sigkill(
        tiny_train_dir, tmp_path, run_flags, run_killed_after_first_epoch):
    extra = ["--epochs", "3", "--early_stopping_patience", "0", "--multi_head", "--model_ema",
             "--model_ema_decay", "0.6", "--grad_accum_steps", "2", "--clip_grad", "1.0",
             "--optimizer", "lamb", "--scheduler", "cosine", "--warmup_epochs", "1",
             "--class_weights", "effective", "--head_lr_mult", "3"]
    common = [sys.executable, "train.py", *run_flags(tiny_train_dir, tmp_path, *extra)]
    subprocess.run(common + ["--name", "whole"], cwd=ROOT, check=True, capture_output=True,
                   timeout=300)
    killed_dir = tmp_path / "runs" / "killed"
    run_killed_after_first_epoch(common + ["--name", "killed"], killed_dir)
    assert len(summary_rows(killed_dir)) < 3, "the run finished before it could be killed"
    subprocess.run([sys.executable, "train.py", "--resume", str(killed_dir)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    whole_dir = tmp_path / "runs" / "whole"
    whole = torch.load(whole_dir / "last.pth", weights_only=False)
    resumed = torch.load(killed_dir / "last.pth", weights_only=False)
    assert resumed["epoch"] == whole["epoch"] == 3 and resumed["updates"] == whole["updates"] == 9
    for part in ("model", "ema"):
        for key, tensor in whole[part].items():
            assert torch.equal(tensor, resumed[part][key]), (part, key)
    assert whole["scheduler"] == resumed["scheduler"]
    assert any(not torch.equal(whole["ema"][k], whole["model"][k]) for k in whole["model"])
    # what the run folder shows: the EMA's F1 per epoch, best.pth's weights named, per class
    rows = summary_rows(whole_dir)
    assert all(r["val_f1_ema"] != "" for r in rows)
    best = torch.load(whole_dir / "best.pth", weights_only=False)
    assert best["weights"] in ("model", "ema")
    if best["epoch"] == 3:  # then best.pth holds the last epoch's weights of the kind it names
        source = whole["ema"] if best["weights"] == "ema" else whole["model"]
        assert all(torch.equal(best["model"][k], source[k]) for k in source)
    per_class = list(csv.DictReader(open(whole_dir / "per_class.csv")))
    assert [r["class"] for r in per_class] == labels.class_names("multi")
    assert float(per_class[0]["f1"]) == pytest.approx(best["metrics"]["per_class"][per_class[0]["class"]]["f1"], abs=1e-4)
    assert (whole_dir / "confusion.png").read_bytes().startswith(b"\x89PNG")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(whole_dir)).Reload().Tags()["scalars"]
    assert {"F1/val_ema", "F1_class/09 incorrect-female-<30"} <= set(tags)
    assert json.loads((whole_dir / "config.json").read_text())["class_weights"] == "effective"


def test_resume_with_model_ema_of_a_run_without_it_refuses_before_touching_it(tiny_train_dir,
                                                                              tmp_path, run):
    run_dir = run(tiny_train_dir, tmp_path, "--epochs", "1")["run_dir"]
    config_before = (run_dir / "config.json").read_text()
    # the resume refuses any setting that changes what the run computes (config.check_resumed_settings)
    with pytest.raises(UserError, match=r"^--resume .*: --model_ema true differs from the run's false"):
        train.main(config.parse_args(["--resume", str(run_dir), "--epochs", "2", "--model_ema"]))
    assert (run_dir / "config.json").read_text() == config_before
