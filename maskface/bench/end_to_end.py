"""Whole jobs timed end to end, back to back on one machine: the toolkit's train.py + inference.py
(each its own process, from a cold cache) against the usual pipeline (usual_pipeline.run_job in
its own process: PIL + torchvision per image in a DataLoader, a plain fp32 loop), on the same
split, the same epochs and the same eval photos. benchmark.py --end_to_end prints the result.
"""
from __future__ import annotations

import multiprocessing
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pandas as pd
from sklearn.metrics import f1_score

from maskface import augmentation, config, dataset
from maskface.bench import usual_pipeline
from maskface.cli import UserError
from maskface.data_dirs import resolve_eval_dir, resolve_train_dir

ROOT = Path(__file__).resolve().parents[2]  # the project, where the scripts are


def time_usual_job(job: dict) -> dict:
    """usual_pipeline.run_job(**job) in a fresh spawned process, as a user would start it; timed
    from the process start (imports included, as for the toolkit's scripts) to its result."""
    started = time.perf_counter()
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            result = pool.submit(usual_pipeline.run_job, **job).result()
    except BrokenProcessPool:  # killed (out of memory) without a result
        raise UserError("--end_to_end: the usual pipeline's process died before it finished") \
            from None
    return {**result, "seconds": time.perf_counter() - started}


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["no message"])[-1]


def time_toolkit_job(train_flags: list[str], infer_flags: list[str]) -> dict:
    """train.py then inference.py as subprocesses; their whole wall time and what they printed:
    the best val F1, the eval F1 (when answers were given) and the precision of the run line."""
    started = time.perf_counter()
    outputs = []
    for script, flags in (("train.py", train_flags), ("inference.py", infer_flags)):
        done = subprocess.run([sys.executable, script, *flags], cwd=ROOT, capture_output=True,
                              text=True)
        if done.returncode:
            raise UserError(f"--end_to_end: {script} failed ({_last_line(done.stderr)})")
        outputs.append(done.stdout)
    seconds = time.perf_counter() - started
    run_line = next(line for line in outputs[0].splitlines() if line.startswith("run: "))
    best = re.search(r"^best: epoch \d+, val F1 ([\d.]+)", outputs[0], re.M)
    scored = re.search(r"^answers: macro F1 ([\d.]+)", outputs[1], re.M)
    return {"seconds": seconds, "best_f1": float(best.group(1)) if best else float("nan"),
            "eval_f1": float(scored.group(1)) if scored else float("nan"),
            "precision": run_line.rsplit("| ", 1)[-1]}


def toolkit_flags(job: dict, data_dir: Path, eval_dir: Path, work: Path) -> tuple[list, list]:
    """train.py's and inference.py's flags for ``job`` (the benchmark's settings)."""
    train = ["--data_dir", str(data_dir), "--model", job["model"],
             "--resize", *map(str, job["resize"]), "--epochs", str(job["epochs"]),
             "--batch_size", str(job["batch_size"]), "--device", job["device"],
             "--amp", job["amp"], "--channels_last", job["channels_last"],
             "--augmentation", job["augmentation"], "--optimizer", job["optimizer"],
             "--model_dir", str(work / "runs"), "--name", "e2e",
             "--cache_dir", str(work / "cache"), "--early_stopping_patience", "0"]
    answers = eval_dir / "answers.csv"
    infer = ["--model_dir", str(work / "runs" / "e2e"), "--data_dir", str(eval_dir),
             "--output_dir", str(work / "out"), "--cache_dir", str(work / "cache"),
             "--device", job["device"]] + (["--answers", str(answers)] if answers.is_file() else [])
    return train, infer


def measure(job: dict, work: Path) -> dict:
    """Both whole jobs of ``job`` (model, resize, epochs, batch_size, device, amp, channels_last,
    augmentation, optimizer, workers, data_dir, eval_dir), the toolkit's first. Every photo is
    read once before either starts, so neither pays for a cold disk the other did not."""
    data_dir, eval_dir = resolve_train_dir(job["data_dir"]), resolve_eval_dir(job["eval_dir"])
    frame = dataset.add_labels(dataset.parse_train_dir(data_dir))
    info = dataset.parse_eval_dir(eval_dir)
    defaults = config.get_args_parser().parse_args([])  # train.py's split, lr and val batch
    train_rows, val_rows = dataset.SPLITS[defaults.dataset](frame, defaults.val_ratio,
                                                            defaults.seed)
    for path in [*frame["path"], *info["path"]]:
        Path(path).read_bytes()
    toolkit = time_toolkit_job(*toolkit_flags(job, data_dir, eval_dir, work))
    paths, labels = frame["path"].to_numpy(), frame["label"].to_numpy()
    usual = time_usual_job({
        "train": (paths[train_rows].tolist(), labels[train_rows]),
        "val": (paths[val_rows].tolist(), labels[val_rows]),
        "test_paths": info["path"].tolist(), "model": job["model"], "resize": job["resize"],
        "epochs": job["epochs"], "batch_size": job["batch_size"],
        "valid_batch_size": defaults.valid_batch_size, "lr": defaults.lr,
        "workers": job["workers"], "seed": defaults.seed, "out_dir": str(work),
        "center_crop": augmentation.AUGMENTATIONS[job["augmentation"]].crop == "center"})
    usual["eval_f1"] = float("nan")
    answers = eval_dir / "answers.csv"
    if answers.is_file():
        truth = pd.read_csv(answers, dtype={"ImageID": str}).set_index("ImageID")["ans"]
        usual["eval_f1"] = f1_score(truth.loc[info["ImageID"]].to_numpy(),
                                    usual["predictions"], average="macro")
    return {"toolkit": toolkit, "usual": usual, "ratio": usual["seconds"] / toolkit["seconds"],
            "data_dir": str(data_dir), "eval_dir": str(eval_dir), "n_train": len(train_rows),
            "n_val": len(val_rows), "n_eval": len(info)}


def format_report(results: dict, job: dict, machine: dict) -> str:
    """Markdown: what ran where, then one row per whole job."""
    t, u, (height, width) = results["toolkit"], results["usual"], job["resize"]
    return "\n".join([
        f"## End to end: {job['model']} {height}x{width}, {job['epochs']} epochs + inference, "
        f"batch {job['batch_size']}, {machine['device']}",
        "",
        f"machine: {machine['cpus']} CPUs, torch {machine['torch']}, load average "
        f"{machine['load_average']} at start, {machine['load_average_end']} at end",
        f"data: {results['n_train']} train + {results['n_val']} val photos in "
        f"{results['data_dir']}, {results['n_eval']} eval photos in {results['eval_dir']}",
        "",
        "| whole job | seconds | best val F1 | eval F1 | ratio |",
        "|---|---:|---:|---:|---:|",
        f"| usual pipeline: PIL + torchvision per image, DataLoader {job['workers']} workers, "
        f"fp32 plain loop | {u['seconds']:.1f} s | {u['best_f1']:.4f} | {u['eval_f1']:.4f} "
        f"| 1.00x |",
        f"| toolkit: train.py + inference.py, cold cache, {t['precision']} "
        f"| {t['seconds']:.1f} s | {t['best_f1']:.4f} | {t['eval_f1']:.4f} "
        f"| {results['ratio']:.2f}x |",
    ]) + "\n"
