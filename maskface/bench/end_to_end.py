"""Whole jobs timed end to end, back to back on one machine: the toolkit's train.py + inference.py
(each its own process, from a cold cache) against the usual pipeline (usual_pipeline.run_job in
its own process: PIL + torchvision per image in a DataLoader, a plain fp32 loop) or, given
--peer_timm, timm's own train.py (timm_peer), on the same split, the same epochs and the same eval
photos. The toolkit's scripts write their phase profiles (maskface.phases), so the report says
where the wall and CPU seconds went. benchmark.py --end_to_end prints the result.
"""
from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pandas as pd
from sklearn.metrics import f1_score

from maskface import augmentation, config, dataset, phases
from maskface.bench import timm_peer, usual_pipeline
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


def time_toolkit_job(train_flags: list[str], infer_flags: list[str],
                     phases_dir: Path | None = None) -> dict:
    """train.py then inference.py as subprocesses; their whole wall and CPU time and what they
    printed: the best val F1, the eval F1 (when answers were given) and the precision of the run
    line; with ``phases_dir``, each script's phase profile too (maskface.phases)."""
    env = dict(os.environ)
    if phases_dir is not None:
        phases_dir.mkdir(parents=True, exist_ok=True)
        env[phases.ENV] = str(phases_dir)
    started, outputs, scripts = time.perf_counter(), [], []
    for script, flags in (("train.py", train_flags), ("inference.py", infer_flags)):
        wall0, cpu0 = time.perf_counter(), timm_peer.children_cpu_seconds()
        done = subprocess.run([sys.executable, script, *flags], cwd=ROOT, capture_output=True,
                              text=True, env=env)
        if done.returncode:
            raise UserError(f"--end_to_end: {script} failed ({_last_line(done.stderr)})")
        scripts.append({"script": script, "wall_s": time.perf_counter() - wall0,
                        "cpu_s": timm_peer.children_cpu_seconds() - cpu0})
        outputs.append(done.stdout)
    seconds = time.perf_counter() - started
    run_line = next(line for line in outputs[0].splitlines() if line.startswith("run: "))
    best = re.search(r"^best: epoch \d+, val F1 ([\d.]+)", outputs[0], re.M)
    scored = re.search(r"^answers: macro F1 ([\d.]+)", outputs[1], re.M)
    return {"seconds": seconds, "best_f1": float(best.group(1)) if best else float("nan"),
            "eval_f1": float(scored.group(1)) if scored else float("nan"),
            "precision": run_line.rsplit("| ", 1)[-1], "scripts": scripts,
            "cpu_s": sum(s["cpu_s"] for s in scripts),
            "profiles": phases.read_profiles(phases_dir) if phases_dir is not None else []}


def toolkit_flags(job: dict, data_dir: Path, eval_dir: Path, work: Path) -> tuple[list, list]:
    """train.py's and inference.py's flags for ``job`` (the benchmark's settings)."""
    train = ["--data_dir", str(data_dir), "--model", job["model"],
             "--resize", *map(str, job["resize"]), "--epochs", str(job["epochs"]),
             "--batch_size", str(job["batch_size"]), "--device", job["device"],
             "--amp", job["amp"], "--channels_last", job["channels_last"],
             "--augmentation", job["augmentation"], "--optimizer", job["optimizer"],
             "--model_dir", str(work / "runs"), "--name", "e2e",
             "--cache_dir", str(work / "cache"), "--early_stopping_patience", "0"]
    if job.get("lr") is not None:
        train += ["--lr", str(job["lr"])]
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
    answers = eval_dir / "answers.csv"
    truth = None
    if answers.is_file():
        truth = pd.read_csv(answers, dtype={"ImageID": str}).set_index("ImageID")["ans"]
        truth = truth.loc[info["ImageID"]].to_numpy()
    toolkit = time_toolkit_job(*toolkit_flags(job, data_dir, eval_dir, work),
                               phases_dir=work / "phases")
    paths, labels = frame["path"].to_numpy(), frame["label"].to_numpy()
    sizes = {"data_dir": str(data_dir), "eval_dir": str(eval_dir), "n_train": len(train_rows),
             "n_val": len(val_rows), "n_eval": len(info)}
    if job.get("peer_timm"):
        peer = timm_peer.time_peer_job(
            Path(job["peer_timm"]), {**job, "lr": job.get("lr") or defaults.lr},
            paths.tolist(), labels, {"train": train_rows, "validation": val_rows},
            info["path"].tolist(), work)
        peer["eval_f1"] = float("nan") if truth is None else f1_score(
            truth, peer["predictions"], average="macro")
        return {"toolkit": toolkit, "peer": peer,
                "ratio": peer["wall_s"] / toolkit["seconds"], **sizes}
    usual = time_usual_job({
        "train": (paths[train_rows].tolist(), labels[train_rows]),
        "val": (paths[val_rows].tolist(), labels[val_rows]),
        "test_paths": info["path"].tolist(), "model": job["model"], "resize": job["resize"],
        "epochs": job["epochs"], "batch_size": job["batch_size"],
        "valid_batch_size": defaults.valid_batch_size, "lr": defaults.lr,
        "workers": job["workers"], "seed": defaults.seed, "out_dir": str(work),
        "center_crop": augmentation.AUGMENTATIONS[job["augmentation"]].crop == "center"})
    usual["eval_f1"] = float("nan")
    if truth is not None:
        usual["eval_f1"] = f1_score(truth, usual["predictions"], average="macro")
    return {"toolkit": toolkit, "usual": usual, "ratio": usual["seconds"] / toolkit["seconds"],
            **sizes}


# how a phase of maskface.phases is shown in the report
PHASE_NAMES = {"startup": "startup (imports, flags, settings)", "records": "photo records",
               "cache": "cache build (decode, crop, resize)", "train": "training epochs",
               "validate": "validation", "report": "per-epoch TensorBoard figures",
               "save": "checkpoints", "load models": "checkpoint load",
               "predict": "prediction", "other": "other", "exit": "exit"}


def phase_rows(profiles: list[dict]) -> list[dict]:
    """Each script's phases summed by name (epochs counted), in order of first appearance."""
    rows: dict[tuple, dict] = {}
    for profile in profiles:
        for record in profile["phases"]:
            key = (profile["script"], record["phase"])
            row = rows.setdefault(key, {"script": profile["script"], "phase": record["phase"],
                                        "count": 0, "wall_s": 0.0, "cpu_s": 0.0})
            row["count"] += 1
            row["wall_s"] += record["wall_s"]
            row["cpu_s"] += record["cpu_s"]
    return list(rows.values())


def format_phases(profiles: list[dict], peer: dict | None = None) -> list[str]:
    """Markdown rows: wall s, CPU s and busy cores of each phase of each process."""
    lines = ["| phase | wall s | CPU s | cores used |", "|---|---:|---:|---:|"]
    for row in phase_rows(profiles):
        if row["wall_s"] < 0.05:
            continue
        times = f" (x{row['count']})" if row["count"] > 1 else ""
        lines.append(f"| toolkit {row['script']}: {PHASE_NAMES.get(row['phase'], row['phase'])}"
                     f"{times} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | "
                     f"{phases.cores(row['wall_s'], row['cpu_s']):.2f} |")
    if peer is not None:
        for name, part in (("timm train.py: whole process (train + validate each epoch)",
                            peer["train"]),
                           ("timm predict: its checkpoint + eval transform, DataLoader",
                            peer["predict"])):
            lines.append(f"| {name} | {part['wall_s']:.1f} | {part['cpu_s']:.1f} | "
                         f"{phases.cores(part['wall_s'], part['cpu_s']):.2f} |")
    return lines


def format_peer_report(results: dict, job: dict, machine: dict) -> str:
    """Markdown: the toolkit's job against timm's train.py, then the phases."""
    t, p = results["toolkit"], results["peer"]
    train_s, infer_s = (s["wall_s"] for s in t["scripts"])
    return "\n".join([
        *_heading("End to end against timm's train.py", results, job, machine),
        "| job | macro F1 | wall s (train + predict) | CPU s | cores used | ratio |",
        "|---|---:|---:|---:|---:|---:|",
        f"| toolkit: train.py + inference.py, cold cache, {t['precision']} | "
        f"{t['eval_f1']:.3f} | {t['seconds']:.0f} ({train_s:.0f} + {infer_s:.0f}) | "
        f"{t['cpu_s']:.0f} | {phases.cores(t['seconds'], t['cpu_s']):.2f} | "
        f"{results['ratio']:.2f}x |",
        f"| timm train.py (its defaults, {job['peer_workers']} loader workers) + its eval "
        f"transform | {p['eval_f1']:.3f} | {p['wall_s']:.0f} ({p['train']['wall_s']:.0f} + "
        f"{p['predict']['wall_s']:.0f}) | {p['cpu_s']:.0f} | "
        f"{phases.cores(p['wall_s'], p['cpu_s']):.2f} | 1.00x |",
        "",
        *format_phases(t["profiles"], p),
    ]) + "\n"


def _heading(title: str, results: dict, job: dict, machine: dict) -> list[str]:
    """A report's title (the job), machine and data lines, then a blank line."""
    height, width = job["resize"]
    return [f"## {title}: {job['model']} {height}x{width}, {job['epochs']} epochs + inference, "
            f"batch {job['batch_size']}, {machine['device']}",
            "",
            f"machine: {machine['cpus']} CPUs, torch {machine['torch']}, load average "
            f"{machine['load_average']} at start, {machine['load_average_end']} at end",
            f"data: {results['n_train']} train + {results['n_val']} val photos in "
            f"{results['data_dir']}, {results['n_eval']} eval photos in {results['eval_dir']}",
            ""]


def format_report(results: dict, job: dict, machine: dict) -> str:
    """Markdown: what ran where, then one row per whole job."""
    t, u = results["toolkit"], results["usual"]
    return "\n".join([
        *_heading("End to end", results, job, machine),
        "| whole job | seconds | best val F1 | eval F1 | ratio |",
        "|---|---:|---:|---:|---:|",
        f"| usual pipeline: PIL + torchvision per image, DataLoader {job['workers']} workers, "
        f"fp32 plain loop | {u['seconds']:.1f} s | {u['best_f1']:.4f} | {u['eval_f1']:.4f} "
        f"| 1.00x |",
        f"| toolkit: train.py + inference.py, cold cache, {t['precision']} "
        f"| {t['seconds']:.1f} s | {t['best_f1']:.4f} | {t['eval_f1']:.4f} "
        f"| {results['ratio']:.2f}x |",
        "",
        *format_phases(t["profiles"]),
    ]) + "\n"
