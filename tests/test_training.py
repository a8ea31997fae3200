"""maskface.training: whole runs and their files, k-fold with out-of-fold predictions, model and
loss variants, early stopping, exact resume after SIGKILL (also EMA, timm schedules, k-fold,
torchrun), refused resumes (another fold's seed, folds.csv edited, a one-fold folds file;
config.json left as it was, its "epochs" kept by a shortened resume), a one-image last batch,
progress lines in a log and the bar on a terminal."""
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score

import train
from maskface import (
    augmentation,
    config,
    dataset,
    image_cache,
    labels,
    model as models,
    predict,
    run_folder,
)
from maskface.cli import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def kfold_args(run_flags):
    def flags(train_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
        return run_flags(train_dir, tmp_path, "--early_stopping_patience", "0", *extra)
    return flags


@pytest.mark.slow
def test_kfold_writes_folds_and_out_of_fold_predictions(tiny_train_dir, tmp_path, kfold_args):
    result = train.main(config.parse_args(kfold_args(tiny_train_dir, tmp_path, "--kfold", "3",
                                                    "--epochs", "1", "--name", "cv")))
    run_dir = result["run_dir"]
    folds = pd.read_csv(run_dir / "folds.csv")
    assert sorted(folds["fold"].unique()) == [0, 1, 2]
    assert folds["profile"].is_unique  # each person in exactly one val fold
    for fold in range(3):
        for name in ("best.pth", "last.pth", "summary.csv", "done.json"):
            assert (run_dir / f"fold{fold}" / name).is_file()
    oof = pd.read_csv(run_dir / "oof.csv")
    n_photos = sum(1 for _ in tiny_train_dir.glob("*/*.jpg"))
    assert len(oof) == n_photos and oof["path"].is_unique
    probs = oof[[f"p{c}" for c in range(18)]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    # every photo was scored by the fold whose model never trained on its person
    assert (oof["fold"].to_numpy() == oof["profile"].map(folds.set_index("profile")["fold"])).all()
    assert result["oof"]["f1"] == pytest.approx(f1_score(oof["label"], probs.argmax(1), average="macro"))
    # the run's own reports, from oof.csv, and done.json saying the whole run finished
    per_class = pd.read_csv(run_dir / "per_class.csv")
    assert per_class["f1"].mean() == pytest.approx(result["oof"]["f1"], abs=1e-3)
    assert (run_dir / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "mistakes.png").read_bytes()[:4] == b"\x89PNG"
    mistakes = pd.read_csv(run_dir / "mistakes.csv")
    assert list(mistakes.columns) == ["rank", "path", "true", "predicted", "confidence", "fold"]
    scored = oof.assign(path=[str(Path(p).relative_to(tiny_train_dir)) for p in oof["path"]],
                        predicted=probs.argmax(1)).set_index("path")
    assert 0 < len(mistakes) <= 16 and all((tiny_train_dir / p).is_file() for p in mistakes["path"])
    for row in mistakes.itertuples():  # each one wrong, as oof.csv says, by the fold that scored it
        assert labels.class_names("multi")[scored.loc[row.path, "predicted"]] == row.predicted
        assert row.true != row.predicted and scored.loc[row.path, "fold"] == row.fold
    done = json.loads((run_dir / "done.json").read_text())
    assert done["oof_f1"] == pytest.approx(result["oof"]["f1"]) and done["epochs_done"] == 3
    # the OOF probabilities of fold 1's photos are fold 1's model's own predictions
    checkpoint = torch.load(run_dir / "fold1" / "best.pth", weights_only=False)
    assert checkpoint["fold"] == 1
    net = models.restore_model(checkpoint)
    in_fold = oof[oof["fold"] == 1]
    preprocess = image_cache.Preprocess.from_dict(checkpoint["preprocess"])
    images = image_cache.build_cache(in_fold["path"].tolist(), preprocess, tmp_path / "check-cache")
    augment = augmentation.build_augmentation(checkpoint["augmentation"],
                                              checkpoint["normalize"]["mean"],
                                              checkpoint["normalize"]["std"])
    batches = dataset.CachedBatches(images, np.zeros(len(images), dtype=int),
                                    np.arange(len(images)), 64)
    expected, _ = predict.predict_probabilities(net, batches, augment, category="multi")
    np.testing.assert_allclose(in_fold[[f"p{c}" for c in range(18)]].to_numpy(), expected,
                               atol=1e-6)
    other = models.restore_model(torch.load(run_dir / "fold0" / "best.pth", weights_only=False))
    not_fold1, _ = predict.predict_probabilities(other, batches, augment, category="multi")
    assert not np.allclose(not_fold1, expected, atol=1e-6)  # the check can tell models apart

    # folds.csv reused by another run gives identical folds (even with another seed)
    again = train.main(config.parse_args(kfold_args(
        tiny_train_dir, tmp_path, "--folds", str(run_dir / "folds.csv"), "--epochs", "1",
        "--seed", "7", "--name", "cv-reuse")))
    assert pd.read_csv(again["run_dir"] / "folds.csv").equals(folds)


def test_folds_file_must_cover_the_data(tiny_train_dir, tmp_path, kfold_args):
    bad = tmp_path / "folds.csv"
    pd.DataFrame({"profile": ["nobody"], "fold": [0]}).to_csv(bad, index=False)
    with pytest.raises(UserError, match="have no fold"):
        train.main(config.parse_args(kfold_args(tiny_train_dir, tmp_path, "--folds", str(bad))))


@pytest.mark.slow
def test_single_fold_then_resume_completes_the_run(tiny_train_dir, tmp_path, kfold_args):
    args = kfold_args(tiny_train_dir, tmp_path, "--kfold", "2", "--epochs", "1", "--name", "spread")
    first = train.main(config.parse_args(args + ["--fold", "1"]))
    run_dir = first["run_dir"]
    assert (run_dir / "fold1" / "done.json").is_file() and not (run_dir / "fold0").exists()
    assert not (run_dir / "oof.csv").exists() and not (run_dir / "done.json").exists()
    finished = train.main(config.parse_args(args + ["--fold", "0"]))
    assert finished["run_dir"] == run_dir and (run_dir / "oof.csv").is_file()
    assert json.loads((run_dir / "done.json").read_text())["n_folds"] == 2
    # a fold's done.json gone (to retrain it): the run is no longer finished
    (run_dir / "fold0" / "done.json").unlink()
    shutil.rmtree(run_dir / "fold0")
    again = train.main(config.parse_args(args + ["--fold", "1"]))
    assert again["run_dir"] == run_dir and not (run_dir / "done.json").exists()


@pytest.mark.slow
def test_killed_kfold_resumes_without_retraining_finished_folds(tiny_train_dir, tmp_path, kfold_args):
    command = [sys.executable, "train.py", *kfold_args(tiny_train_dir, tmp_path, "--kfold", "3",
                                                        "--epochs", "3", "--name", "killed")]
    victim = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "runs" / "killed"
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "fold1" / "summary.csv").is_file():
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert (run_dir / "fold0" / "done.json").is_file()
    assert not (run_dir / "fold2" / "done.json").exists(), "finished before it could be killed"
    fold0_weights = (run_dir / "fold0" / "best.pth").stat().st_mtime_ns
    resumed = subprocess.run([sys.executable, "train.py", "--resume", str(run_dir)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "fold 0: finished earlier, skipped" in resumed.stdout
    assert (run_dir / "fold0" / "best.pth").stat().st_mtime_ns == fold0_weights
    assert (run_dir / "oof.csv").is_file()
    assert "out-of-fold: macro F1" in resumed.stdout


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_torchrun_two_processes_gloo(tiny_train_dir, tmp_path, kfold_args):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        torchrun + ["train.py", *kfold_args(tiny_train_dir, tmp_path, "--epochs", "2",
                                             "--name", "ddp", "--device", "cpu", "--sync_bn",  # ignored on CPU, said once
                                             "--log_interval", "1")],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["ddp"]  # exactly one set of files: only rank 0 writes
    run_dir = tmp_path / "runs" / "ddp"
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert result.stdout.count("epoch 2/2:") == 1  # one process reports
    assert result.stdout.count("epoch 2/2 step 1/") == 1  # and shows its progress
    assert result.stdout.count("SyncBatchNorm runs on CUDA only") == 1
    checkpoint = torch.load(run_dir / "best.pth", weights_only=False)
    assert not any(k.startswith("module.") for k in checkpoint["model"])
    plain = models.restore_model(checkpoint)  # loads into a plain, non-DDP model
    assert isinstance(plain, torch.nn.Module)
    rows = pd.read_csv(run_dir / "summary.csv")
    assert len(rows) == 2 and rows["val_f1"].between(0, 1).all()


# ---------------------------------------------------------------------------- 1. resume
@pytest.mark.slow
def test_a_resume_that_would_change_a_setting_is_refused(tiny_train_dir, tmp_path, run_flags):
    run_dir = train.main(config.parse_args(run_flags(tiny_train_dir, tmp_path, "--epochs", "1")))["run_dir"]
    config_before = (run_dir / "config.json").read_text()
    with pytest.raises(UserError, match=r"--resume .*: --lr 0\.1 differs from the run's 0\.001 "
                                        r"\(.*config\.json\); a resumed run keeps its settings except "
                                        r"--epochs"):
        config.parse_args(["--resume", str(run_dir), "--lr", "0.1", "--epochs", "2"])
    assert (run_dir / "config.json").read_text() == config_before
    resumed = train.main(config.parse_args(["--resume", str(run_dir), "--epochs", "2"]))
    assert len(resumed["summary"]) == 2
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 2


@pytest.mark.slow
def test_a_kfold_resume_keeps_its_own_folds_and_names_new_people(own_train_dir, tmp_path,
                                                                 run_flags):
    flags = run_flags(own_train_dir, tmp_path, "--kfold", "2", "--epochs", "1", "--name", "cv",
                      "--early_stopping_patience", "0")
    run_dir = train.main(config.parse_args(flags + ["--fold", "0"]))["run_dir"]
    folds_before = (run_dir / "folds.csv").read_text()
    newcomer = own_train_dir / "999999_female_Asian_70"
    shutil.copytree(sorted(own_train_dir.iterdir())[0], newcomer)
    # before the fix the resume re-split the people, newcomer included, so fold 1's model could
    # train on people whose oof.csv rows fold 0's model scored (and the other way round)
    with pytest.raises(UserError, match=r"7 photo\(s\) added \(first: 999999_female_Asian_70/"):
        train.main(config.parse_args(["--resume", str(run_dir)]))
    result = train.main(config.parse_args(["--resume", str(run_dir), "--accept_data_change"]))
    assert (run_dir / "folds.csv").read_text() == folds_before
    oof = pd.read_csv(run_dir / "oof.csv")
    assert not oof["profile"].eq(newcomer.name).any()
    folds = pd.read_csv(run_dir / "folds.csv").set_index("profile")["fold"]
    assert (oof["fold"] == oof["profile"].map(folds)).all()
    assert np.isfinite(result["best_f1"])


@pytest.mark.slow
def test_a_resume_of_a_torn_summary_rewrites_it_from_the_checkpoint(tiny_train_dir, tmp_path,
                                                                     run_flags):
    run_dir = train.main(config.parse_args(run_flags(tiny_train_dir, tmp_path, "--epochs", "2")))["run_dir"]
    lines = (run_dir / "summary.csv").read_text().splitlines()
    (run_dir / "summary.csv").write_text("\n".join(lines[:2]) + "\n")  # killed before epoch 2's row
    train.main(config.parse_args(["--resume", str(run_dir)]))  # nothing left to train
    assert (run_dir / "summary.csv").read_text().splitlines() == lines


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_a_torchrun_resume_is_exact_on_every_process(tiny_train_dir, tmp_path, run_flags):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                "2", "train.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = run_flags(tiny_train_dir, tmp_path, "--early_stopping_patience", "0", "--mixup")

    def launch(*extra: str, command=torchrun) -> None:
        done = subprocess.run(command + [*extra], cwd=ROOT, capture_output=True, text=True,
                              timeout=400, env=env)
        assert done.returncode == 0, done.stderr[-3000:]

    launch(*flags, "--epochs", "2", "--name", "whole")
    launch(*flags, "--epochs", "1", "--name", "halves")
    halves = tmp_path / "runs" / "halves"
    refused = subprocess.run([sys.executable, "train.py", "--resume", str(halves), "--epochs", "2"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "trained on 2 process(es), this is 1" in refused.stderr
    launch("--resume", str(halves), "--epochs", "2")
    whole = torch.load(tmp_path / "runs" / "whole" / "last.pth", weights_only=True)
    resumed = torch.load(halves / "last.pth", weights_only=True)
    assert resumed["epoch"] == whole["epoch"] == 2
    for key, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key


def summary_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------- runs
@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_weights_file_loads_into_another_head_size(tiny_train_dir, tmp_path, capsys, run):
    donor = models.build_model("BaseModel", 3)
    weights = tmp_path / "donor.pth"
    torch.save(donor.state_dict(), weights)
    result = run(tiny_train_dir, tmp_path, "--epochs", "1", "--weights", str(weights))
    out = capsys.readouterr().out
    assert "weights: loaded" in out and "not loaded" in out
    assert (result["run_dir"] / "best.pth").is_file()


@pytest.mark.slow
def test_resume_of_a_torn_checkpoint_leaves_the_run_folder_alone(tiny_train_dir, tmp_path, run):
    run_dir = run(tiny_train_dir, tmp_path, "--epochs", "1")["run_dir"]
    last = run_dir / "last.pth"
    last.write_bytes(last.read_bytes()[:3000])  # a copy cut short
    config_before = (run_dir / "config.json").read_text()
    with pytest.raises(UserError, match=f"{re.escape(str(last))}: not a readable checkpoint"):
        train.main(config.parse_args(["--resume", str(run_dir), "--epochs", "2",
                                     "--cache_dir", str(tmp_path / "elsewhere")]))
    assert (run_dir / "config.json").read_text() == config_before


@pytest.mark.slow
def test_early_stopping_stops(tiny_train_dir, tmp_path, capsys, run):
    # lr 0: nothing improves after the first epoch, so patience 2 stops at epoch 3
    result = run(tiny_train_dir, tmp_path, "--epochs", "6", "--lr", "0", "--early_stopping_patience", "2")
    assert len(summary_rows(result["run_dir"])) == 3
    assert "--early_stopping_patience 0" in capsys.readouterr().out


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_clear_message(tiny_train_dir, tmp_path, run):
    with pytest.raises(UserError, match=r"loss is (nan|inf).*batch \d+ \(lr"):
        run(tiny_train_dir, tmp_path, "--epochs", "2", "--lr", "1e30", "--optimizer", "sgd")
    assert not any((tmp_path / "runs").iterdir())  # no checkpoint yet: no run folder left


def test_pretrained_offline_names_weights_flag(tiny_train_dir, tmp_path, run):
    with pytest.raises(UserError, match="--weights"):
        run(tiny_train_dir, tmp_path, "--model", "resnet18", "--pretrained")
    assert not (tmp_path / "runs").exists()  # refused with the settings, before any work


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_with_model_ema_of_a_run_without_it_refuses_before_touching_it(tiny_train_dir,
                                                                              tmp_path, run):
    run_dir = run(tiny_train_dir, tmp_path, "--epochs", "1")["run_dir"]
    config_before = (run_dir / "config.json").read_text()
    # the resume refuses any setting that changes what the run computes (config.check_resumed_settings)
    with pytest.raises(UserError, match=r"^--resume .*: --model_ema true differs from the run's false"):
        train.main(config.parse_args(["--resume", str(run_dir), "--epochs", "2", "--model_ema"]))
    assert (run_dir / "config.json").read_text() == config_before


@pytest.mark.slow
def test_another_fold_with_another_seed_is_refused_and_folds_kept(tiny_train_dir, tmp_path,
                                                                   run_flags):
    flags = run_flags(tiny_train_dir, tmp_path, "--kfold", "2", "--epochs", "1", "--name", "cv",
                      "--early_stopping_patience", "0")
    run_dir = train.main(config.parse_args(flags + ["--fold", "0", "--seed", "1"]))["run_dir"]
    folds = (run_dir / "folds.csv").read_text()
    # before: fold 1 re-split with seed 2 and overwrote folds.csv, so fold 0's model scored in
    # oof.csv people it had trained on
    with pytest.raises(UserError, match=r"--seed 2 differs from the run's 1"):
        train.main(config.parse_args(flags + ["--fold", "1", "--seed", "2"]))
    assert (run_dir / "folds.csv").read_text() == folds
    # folds.csv rotated by hand after fold 0 finished: photos.csv still holds the roles
    table = pd.read_csv(run_dir / "folds.csv")
    table["fold"] = 1 - table["fold"]
    table.to_csv(run_dir / "folds.csv", index=False)
    with pytest.raises(UserError, match=r"folds\.csv: photo .* is in fold \d but .*photos\.csv "
                                        r"recorded \d"):
        train.main(config.parse_args(["--resume", str(run_dir)]))
    assert not (run_dir / "oof.csv").exists() and not (run_dir / "fold1").exists()


def test_a_folds_file_with_a_single_fold_is_refused(tiny_train_dir, tmp_path, run_flags):
    profiles = sorted(p.name for p in tiny_train_dir.iterdir() if p.is_dir())
    folds = tmp_path / "folds.csv"
    pd.DataFrame({"profile": profiles, "fold": 0}).to_csv(folds, index=False)
    with pytest.raises(UserError, match=r"folds\.csv: 1 fold\(s\); expected 2 or more"):
        train.main(config.parse_args(run_flags(tiny_train_dir, tmp_path, "--folds", str(folds))))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_training_with_a_one_image_last_batch_finishes(tiny_train_dir, tmp_path, run_flags):
    n_photos = sum(1 for _ in tiny_train_dir.glob("*/*.jpg"))
    # before: "Expected more than 1 value per channel when training" after the epoch's work
    result = train.main(config.parse_args(run_flags(
        tiny_train_dir, tmp_path, "--val_ratio", "0", "--batch_size", str(n_photos - 1),
        "--epochs", "1")))
    assert (result["run_dir"] / "done.json").is_file()


def test_a_refused_resume_leaves_config_json_as_it_was(run_copy, tiny_train_dir, tmp_path):
    data = Path(shutil.copytree(tiny_train_dir, tmp_path / "data" / "images"))
    photo = sorted(data.glob("*/mask2.jpg"))[0]
    photo.write_bytes(sorted(data.glob("*/mask3.jpg"))[5].read_bytes())
    (run_copy / "photos.csv").unlink()  # a run without its photo record: last.pth still knows
    before = (run_copy / "config.json").read_text()
    with pytest.raises(UserError, match=r"the training data's fingerprint .* differs"):
        train.main(config.parse_args(["--resume", str(run_copy), "--epochs", "3",
                                      "--data_dir", str(data)]))
    assert (run_copy / "config.json").read_text() == before
    assert not (run_copy / "photos.csv").exists()


def test_a_shortened_resume_keeps_the_recorded_epochs(run_copy):
    train.main(config.parse_args(["--resume", str(run_copy), "--epochs", "1"]))
    assert json.loads((run_copy / "config.json").read_text())["epochs"] == 2  # trained 2 of 2


# ---------------------------------------------------------------------------- progress output
PROGRESS_LINE = re.compile(
    r"^(?:fold (\d+)/(\d+) )?epoch (\d+)/(\d+) step (\d+)/(\d+): loss (\S+), lr (\S+), "
    r"(\d+) img/s, epoch ETA (\?|[\d:]+), run ETA (\?|[\d:]+)$")


def eta_seconds(text: str) -> int | None:
    return None if text == "?" else sum(int(p) * 60 ** i
                                        for i, p in enumerate(reversed(text.split(":"))))


@pytest.mark.slow
def test_a_kfold_run_in_a_log_prints_a_line_per_step_with_fold_rate_loss_and_etas(
        tiny_train_dir, tmp_path, kfold_args, capsys):
    train.main(config.parse_args(kfold_args(tiny_train_dir, tmp_path, "--kfold", "2",
                                            "--epochs", "2", "--log_interval", "1",
                                            "--name", "cvlog")))
    out, err = capsys.readouterr()  # captured: not a terminal, so plain lines
    found = [m for m in map(PROGRESS_LINE.match, out.splitlines()) if m]
    seen = {}
    for m in found:
        fold, n_folds, epoch, epochs, step, steps = (int(g) for g in m.groups()[:6])
        assert (n_folds, epochs) == (2, 2)
        seen.setdefault((fold, epoch), []).append((step, steps))
        assert np.isfinite(float(m.group(7))) and float(m.group(8)) == pytest.approx(1e-3)
        assert int(m.group(9)) > 0
        epoch_eta, run_eta = eta_seconds(m.group(10)), eta_seconds(m.group(11))
        assert (epoch_eta is None) == (run_eta is None)
        if run_eta is not None:
            assert run_eta >= epoch_eta
        if (fold, epoch) != (0, 1) or step > 2:  # only the first epoch's first steps lack one
            assert run_eta is not None, m.group(0)
    assert sorted(seen) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for lines in seen.values():  # --log_interval 1: every step once
        assert [step for step, _ in lines] == list(range(1, lines[0][1] + 1))
    assert "%|" not in err  # no bar beside the lines


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.slow
def test_on_a_terminal_the_bar_names_the_fold_and_no_line_is_printed(tiny_train_dir, tmp_path,
                                                                      kfold_args, monkeypatch):
    out, err = Terminal(), Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    train.main(config.parse_args(kfold_args(tiny_train_dir, tmp_path, "--kfold", "2", "--fold",
                                            "1", "--epochs", "1", "--log_interval", "1")))
    assert "fold 1/2 epoch 1/1" in err.getvalue()
    assert re.search(r"run ETA (\?|\d+:\d\d)", err.getvalue())
    assert "epoch 1/1:" in out.getvalue()  # the epoch's line, as ever
    assert not any(map(PROGRESS_LINE.match, out.getvalue().splitlines()))


@pytest.mark.slow
def test_a_resume_after_the_code_changed_goes_on_and_says_so(run_copy, capsys):
    path = run_copy / "config.json"
    record = json.loads(path.read_text())
    record["tracking"]["commit"] = "0" * 40  # the run started at another commit
    path.write_text(json.dumps(record))
    result = train.main(config.parse_args(["--resume", str(run_copy), "--epochs", "3"]))
    out = capsys.readouterr().out
    now = config.git_state()["commit"]
    if now:
        assert f"note: this run started at commit 0000000, the code is now at {now[:7]}" in out
    assert len(result["summary"]) == 3
    tracking = json.loads(path.read_text())["tracking"]
    assert tracking["commit"] == "0" * 40 and len(tracking["resumes"]) == 1
