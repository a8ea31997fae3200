"""Shared fixtures: a tiny generated dataset in the competition layout (made once per session),
the train.py flags of a tiny, fast run on it, a finished run (and a copy a test may change), and a
run killed once it has a checkpoint."""
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from maskface.sample import generate_sample


@pytest.fixture(scope="session")
def tiny_sample(tmp_path_factory) -> Path:
    """24 train people and 4 eval people: the root holding train/ and eval/."""
    return generate_sample(tmp_path_factory.mktemp("sample") / "data", n_train_people=24,
                           n_eval_people=4, seed=1)


@pytest.fixture()
def tiny_train_dir(tiny_sample) -> Path:
    return tiny_sample / "train" / "images"


@pytest.fixture(scope="session")
def run_flags():
    """run_flags(train_dir, out_dir, *extra): train.py flags for a tiny CPU run (32x24, batch 32)
    writing run folders under out_dir/runs; the image cache is shared by every test (its key
    holds the files and the preprocessing). Flags in ``extra`` win over these."""
    def flags(train_dir: Path, out_dir: Path, *extra: str) -> list[str]:
        return ["--data_dir", str(train_dir), "--model_dir", str(out_dir / "runs"),
                "--cache_dir", str(out_dir.parent / "shared-cache"), "--resize", "32", "24",
                "--batch_size", "32", "--valid_batch_size", "64", "--device", "cpu", *extra]
    return flags


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def run_killed_after_first_epoch():
    """run_killed_after_first_epoch(command, run_dir): start ``command`` (train.py and its flags)
    and SIGKILL it as soon as ``run_dir``'s summary.csv exists (its first epoch checkpointed)."""
    def run(command: list[str], run_dir: Path, timeout_s: float = 240) -> None:
        victim = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        deadline = time.time() + timeout_s
        while time.time() < deadline and not (run_dir / "summary.csv").is_file():
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    return run


@pytest.fixture(scope="session")
def cpu_and_gpu_warps():
    """cpu_and_gpu_warps(augment, height, width): the same random draw (seed 0) of ``augment``'s
    geometry through its CPU uint8 warp (its forward in train mode on a CPU batch, normalization
    undone) and through its GPU grid_sample path (``augment.geometry``), on 6 smooth gradient
    images, both as float [6, 3, H', W'] in 0..1; then the batch itself."""
    def warps(augment, height: int, width: int):
        yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        smooth = torch.stack([xx * 5, yy * 4, (xx + yy) * 2], -1).clamp(0, 255).to(torch.uint8)
        batch = smooth.expand(6, -1, -1, -1).contiguous()
        torch.manual_seed(0)
        cpu = augment.train()(batch) * augment.std + augment.mean
        torch.manual_seed(0)
        reference = augment.geometry(batch.permute(0, 3, 1, 2).float() / 255)
        return cpu, reference, batch
    return warps


@pytest.fixture()
def own_train_dir(tiny_train_dir, tmp_path) -> Path:
    """A copy of the tiny sample's photos that a test may change."""
    return Path(shutil.copytree(tiny_train_dir, tmp_path / "data" / "images"))


@pytest.fixture(scope="session")
def replace_keeping_size_and_date():
    """replace_keeping_size_and_date(path): swap the photo at ``path`` for another one."""
    def replace_keeping_size_and_date(path: Path) -> None:
        """Another photo of exactly the same byte size, its mtime set back: what `cp -p` or an unzip
        of an edited archive leave."""
        import cv2

        from maskface import image_cache
        before = path.stat()
        image = image_cache.decode_image(str(path))
        for quality in range(95, 5, -1):  # a re-encoding that can be padded to the old size
            ok, data = cv2.imencode(".jpg", cv2.cvtColor(255 - image, cv2.COLOR_RGB2BGR),
                                    [cv2.IMWRITE_JPEG_QUALITY, quality])
            if ok and data.size <= before.st_size:
                break
        payload = data.tobytes()
        path.write_bytes(payload + b"\0" * (before.st_size - len(payload)))  # JPEG ignores the tail
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert path.stat().st_size == before.st_size
    return replace_keeping_size_and_date


@pytest.fixture()
def run(run_flags):
    """run(train_dir, tmp_path, *extra): train.main on the tiny run's flags; its result."""
    import train
    from maskface import config

    def train_tiny(train_dir, tmp_path, *extra):
        return train.main(config.parse_args(run_flags(train_dir, tmp_path, *extra)))
    return train_tiny


@pytest.fixture(scope="session")
def finished_run(tiny_sample, tmp_path_factory, run_flags) -> Path:
    """A finished 2-epoch run on the tiny sample (each test copies it before changing it)."""
    import train
    from maskface import config

    out = tmp_path_factory.mktemp("trust")
    flags = run_flags(tiny_sample / "train" / "images", out, "--epochs", "2", "--name", "base",
                      "--early_stopping_patience", "0")
    return train.main(config.parse_args(flags))["run_dir"]


@pytest.fixture()
def run_copy(finished_run, tmp_path) -> Path:
    """A copy of finished_run that a test may change."""
    return Path(shutil.copytree(finished_run, tmp_path / "runs" / "copy"))


@pytest.fixture()
def own_eval_dir(tiny_sample, tmp_path) -> Path:
    """A copy of the tiny sample's eval folder that a test may change."""
    return Path(shutil.copytree(tiny_sample / "eval", tmp_path / "eval"))
