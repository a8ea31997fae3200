import os
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
from maskface import augmentation, config, dataset, image_cache, model as models, predict
from maskface.cli import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def kfold_args(run_flags):
    def flags(train_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
        return run_flags(train_dir, tmp_path, "--early_stopping_patience", "0", *extra)
    return flags


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


def test_single_fold_then_resume_completes_the_run(tiny_train_dir, tmp_path, kfold_args):
    args = kfold_args(tiny_train_dir, tmp_path, "--kfold", "2", "--epochs", "1", "--name", "spread")
    first = train.main(config.parse_args(args + ["--fold", "1"]))
    run_dir = first["run_dir"]
    assert (run_dir / "fold1" / "done.json").is_file() and not (run_dir / "fold0").exists()
    assert not (run_dir / "oof.csv").exists()
    finished = train.main(config.parse_args(args + ["--fold", "0"]))
    assert finished["run_dir"] == run_dir and (run_dir / "oof.csv").is_file()


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


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_torchrun_two_processes_gloo(tiny_train_dir, tmp_path, kfold_args):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        torchrun + ["train.py", *kfold_args(tiny_train_dir, tmp_path, "--epochs", "2",
                                             "--name", "ddp", "--device", "cpu", "--sync_bn")],  # ignored on CPU, said once
        cwd=ROOT, capture_output=True, text=True, timeout=400,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["ddp"]  # exactly one set of files: only rank 0 writes
    run_dir = tmp_path / "runs" / "ddp"
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert result.stdout.count("epoch 2/2:") == 1  # one process reports
    assert result.stdout.count("SyncBatchNorm runs on CUDA only") == 1
    checkpoint = torch.load(run_dir / "best.pth", weights_only=False)
    assert not any(k.startswith("module.") for k in checkpoint["model"])
    plain = models.restore_model(checkpoint)  # loads into a plain, non-DDP model
    assert isinstance(plain, torch.nn.Module)
    rows = pd.read_csv(run_dir / "summary.csv")
    assert len(rows) == 2 and rows["val_f1"].between(0, 1).all()
