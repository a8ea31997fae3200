"""timm's own train.py as the peer of an end-to-end job (benchmark.py --end_to_end --peer_timm
PATH): the user's copy of the script runs unchanged in its own process on an ImageFolder view of
the same training people (split by person as train.py splits them), then the eval photos are
predicted through timm's public API (the model and eval transform its checkpoint describes) and
scored. Nothing of timm's script lives here; it is only started.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from maskface.cli import UserError
from maskface.labels import NUM_CLASSES

SPLITS = ("train", "validation")  # timm train.py's --train-split / --val-split defaults


def check_peer_script(path: str) -> Path:
    """The --peer_timm file: an existing Python file, checked before any work."""
    script = Path(path)
    if not script.is_file():
        raise UserError(f"--peer_timm {path}: no such file; expected timm's train.py "
                        "(pytorch-image-models)")
    if script.suffix != ".py":
        raise UserError(f"--peer_timm {path}: expected a Python file (timm's train.py)")
    return script


def children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children and theirs (timm's loader workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def build_image_folder(root: Path, paths: list[str], labels: np.ndarray,
                       rows: dict[str, np.ndarray]) -> Path:
    """root/<split>/<class>/<photo> as symlinks to the photos (class folders 00..17, every one
    made, even empty), and root/class_map.txt fixing class k at index k: timm numbers only the
    classes it finds files for, so a class missing from a split would shift the others."""
    names = [f"{k:02d}" for k in range(NUM_CLASSES)]
    for split, split_rows in rows.items():
        for name in names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for row in split_rows:
            photo = Path(paths[row]).resolve()
            # the person's folder keeps names unique: every person has mask1.jpg ... normal.jpg
            link = root / split / names[labels[row]] / f"{photo.parent.name}_{photo.name}"
            link.symlink_to(photo)
    class_map = root / "class_map.txt"
    class_map.write_text("\n".join(names) + "\n")
    return class_map


def peer_flags(job: dict, data_root: Path, class_map: Path, out_dir: Path) -> list[str]:
    """timm train.py's flags for the job; everything else stays at timm's defaults."""
    height, width = job["resize"]
    flags = ["--data-dir", str(data_root), "--train-split", SPLITS[0], "--val-split", SPLITS[1],
             "--class-map", str(class_map), "--model", job["model"],
             "--num-classes", str(NUM_CLASSES), "--input-size", "3", str(height), str(width),
             "--epochs", str(job["epochs"]), "--opt", job["optimizer"], "--lr", str(job["lr"]),
             "-b", str(job["batch_size"]), "--workers", str(job["peer_workers"]),
             "--output", str(out_dir), "--experiment", "peer"]
    if job["device"] in ("cpu", "auto") and not _cuda():
        flags += ["--device", "cpu"]
    return flags


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def run_peer_training(script: Path, flags: list[str], out_dir: Path) -> dict:
    """timm's train.py in its own process: wall and CPU seconds, and its best checkpoint."""
    cpu0, started = children_cpu_seconds(), time.perf_counter()
    done = subprocess.run([sys.executable, str(script), *flags], cwd=out_dir.parent,
                          capture_output=True, text=True)
    wall, cpu = time.perf_counter() - started, children_cpu_seconds() - cpu0
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"--peer_timm {script}: exited with {done.returncode} ({last})")
    best = out_dir / "peer" / "model_best.pth.tar"
    if not best.is_file():
        raise UserError(f"--peer_timm {script}: finished without writing {best}")
    return {"wall_s": wall, "cpu_s": cpu, "checkpoint": best}


def load_peer_checkpoint(path: Path) -> dict:
    """timm's checkpoint read with weights_only=True: its training flags are an
    argparse.Namespace, the one class allowed beyond tensors and plain values."""
    import torch
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as why:  # noqa: BLE001 (any unreadable checkpoint is one line)
        first = (str(why).strip().splitlines() or [type(why).__name__])[0]
        raise UserError(f"{path}: not a timm train.py checkpoint readable with weights_only "
                        f"({first})") from None


class Photos:
    """The eval photos through a transform, for a DataLoader (module level: its worker processes
    receive it pickled)."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB"))


def predict_peer(checkpoint: str, paths: list[str], workers: int, batch_size: int) -> np.ndarray:
    """The class of every photo by the checkpoint's model, through timm's eval transform
    (resolve_data_config of the checkpoint's own flags + create_transform), as timm validates;
    run in a process of its own (see time_peer_predict)."""
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config

    saved = load_peer_checkpoint(Path(checkpoint))
    flags = vars(saved.get("args") or argparse.Namespace())
    net = timm.create_model(saved["arch"], num_classes=NUM_CLASSES)
    net.load_state_dict(saved["state_dict"])
    net.eval()
    transform = create_transform(**resolve_data_config(flags, model=net))

    loader = torch.utils.data.DataLoader(Photos(paths, transform), batch_size=batch_size,
                                         num_workers=workers)
    with torch.no_grad():
        return np.concatenate([net(batch).argmax(1).numpy() for batch in loader])


def time_peer_predict(checkpoint: Path, paths: list[str], workers: int, batch_size: int) -> dict:
    """predict_peer in a fresh process (imports included, as for a script): wall, CPU, classes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    cpu0, started = children_cpu_seconds(), time.perf_counter()
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            predictions = pool.submit(predict_peer, str(checkpoint), paths, workers,
                                      batch_size).result()
    except BrokenProcessPool:
        raise UserError("--peer_timm: the prediction process died before it finished") from None
    return {"wall_s": time.perf_counter() - started, "cpu_s": children_cpu_seconds() - cpu0,
            "predictions": predictions}


def time_peer_job(script: Path, job: dict, paths: list[str], labels: np.ndarray,
                  rows: dict[str, np.ndarray], test_paths: list[str], work: Path) -> dict:
    """The whole peer job: the ImageFolder view, timm's training, then its predictions."""
    data_root = work / "peer_data"
    class_map = build_image_folder(data_root, paths, labels, rows)
    out_dir = work / "peer_out"
    out_dir.mkdir(parents=True, exist_ok=True)
    train = run_peer_training(script, peer_flags(job, data_root, class_map, out_dir), out_dir)
    predicted = time_peer_predict(train["checkpoint"], test_paths, job["peer_workers"],
                                  job["batch_size"])
    return {"train": train, "predict": predicted,
            "wall_s": train["wall_s"] + predicted["wall_s"],
            "cpu_s": train["cpu_s"] + predicted["cpu_s"],
            "predictions": predicted["predictions"], "cpus": os.cpu_count()}
