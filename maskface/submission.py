"""The submission: the eval set predicted by trained run folders. Each model is rebuilt from its
checkpoint alone (architecture, preprocessing, normalization, category, precision); the photos are
decoded once per preprocessing; probabilities are averaged over views, folds and runs (or weighted
by a selection file of experiments.py select), calibrated, checked and written together with the
submission. inference.py parses the flags and calls predict_eval.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import f1_score

from maskface import (config, dataset, distributed, image_cache, mixed_precision, phases, predict,
                      run_folder)
from maskface.checkpoint import read_checkpoint
from maskface.cli import UserError
from maskface.data_dirs import resolve_eval_dir
from maskface.ensemble import (
    calibrated_predictions,
    check_categories,
    check_run_weights,
    combine_runs,
    ensemble_probabilities,
    fit_calibration,
    read_calibration,
    read_oof,
    run_vote_shares,
)
from maskface.files import (
    atomic_write_text,
    check_output_path,
    check_outputs_apart,
    read_csv_checked,
    write_together,
)
from maskface.labels import PROB_COLUMNS, check_labels
from maskface.predict import LoadedModel
from maskface.run_table import find_runs, is_run_dir
from maskface.scores import check_answers, print_scores, score_answers
from maskface.selection import Selection, read_selection, selection_probabilities


# ----------------------------------------------------------------------------------------------
# Finding and loading models
# ----------------------------------------------------------------------------------------------
def find_checkpoints(run_dirs: Sequence[str | Path]) -> list[Path]:
    """best.pth of each run folder, or every fold*/best.pth of a k-fold run, in fold order."""
    found: list[Path] = []
    for run_dir in map(Path, run_dirs):
        if run_dir.is_file() and run_dir.suffix == ".pth":
            found.append(run_dir)
            continue
        if not run_dir.is_dir():
            raise UserError(f"--model_dir {run_dir}: no such run folder")
        folds = run_folder.fold_dirs(run_dir)
        if folds:
            unfinished = [d.name for d in folds if not (d / run_folder.BEST).is_file()]
            if unfinished:
                raise UserError(f"--model_dir {run_dir}: {', '.join(unfinished)} has no best.pth "
                                "(an unfinished k-fold run? finish it with train.py --resume)")
            found += [d / run_folder.BEST for d in folds]
        elif (run_dir / run_folder.BEST).is_file():
            found.append(run_dir / run_folder.BEST)
        else:
            raise UserError(f"--model_dir {run_dir}: no best.pth or fold*/best.pth inside; "
                            "expected a run folder of train.py")
    twice = sorted({str(p) for p in found if [q.resolve() for q in found].count(p.resolve()) > 1})
    if twice:
        raise UserError(f"--model_dir: {', '.join(twice)} given more than once")
    return found


def finished_runs(model_dir: Path, say: Callable[[str], None] = print) -> list[Path] | None:
    """The finished runs inside a model dir (a folder holding run folders, as experiments.py
    select reads it): a single run with done.json, a k-fold run with oof.csv; the unfinished ones
    are skipped and named. None when ``model_dir`` is a run folder or holds none."""
    if not model_dir.is_dir() or is_run_dir(model_dir) or not any(
            d.is_dir() and is_run_dir(d) for d in model_dir.iterdir()):
        return None
    runs = [d for _, d in find_runs([str(model_dir)])]
    done = [d for d in runs if (d / run_folder.DONE).is_file() or (d / run_folder.OOF).is_file()]
    skipped = [d.name for d in runs if d not in done]
    if skipped:
        say(f"--model_dir {model_dir}: skipped {len(skipped)} unfinished run(s) (no done.json, "
            f"or a k-fold run without oof.csv): {', '.join(skipped)}")
    if not done:
        raise UserError(f"--model_dir {model_dir}: no finished run inside (a run finishes with "
                        "done.json, a k-fold run with oof.csv); finish one with train.py --resume")
    say(f"--model_dir {model_dir}: {len(done)} finished run(s): "
        + ", ".join(d.name for d in done))
    return done


def expand_model_dirs(paths: Sequence[str | Path], say: Callable[[str], None] = print
                      ) -> list[Path]:
    """--model_dir as given, a model dir replaced by its finished runs (finished_runs)."""
    expanded: list[Path] = []
    for path in map(Path, paths):
        expanded += finished_runs(path, say) or [path]
    return expanded


def _shown(value) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


def load_models(paths: Sequence[Path], *, resize: Sequence[int] | None = None,
                crop: str | None = None, augmentation: str | None = None,
                amp: str = "checkpoint", device: torch.device = torch.device("cpu"),
                say: Callable[[str], None] = print) -> list[LoadedModel]:
    """Restore every checkpoint (eval mode, on the CPU); flags given override the training
    settings, with a warning where they differ. ``amp`` 'checkpoint' runs each model on
    ``device`` in the precision it trained with; another --amp value is decided as train.py does."""
    # every file is read and checked before any network is built: a bad last fold of an
    # ensemble fails before the others are restored
    checkpoints = [read_checkpoint(path) for path in paths]
    loaded = []
    for i, path in enumerate(paths):
        checkpoint, checkpoints[i] = checkpoints[i], None  # freed once its network holds it
        config = checkpoint.get("config") or {}
        name = config.get("model") or checkpoint["model_config"].get("name")
        precision = None if amp == "checkpoint" else \
            mixed_precision.choose_precision(amp, "auto", device, name)
        m = predict.restore(checkpoint, Path(path), device, precision)
        changes = {"resize": tuple(resize) if resize else None, "crop": crop}
        for field, value in changes.items():
            if value is not None and value != getattr(m.preprocess, field):
                say(f"warning: {path}: --{field} {_shown(value)} but the model was trained with "
                    f"{field} {_shown(getattr(m.preprocess, field))}")
                m.preprocess = replace(m.preprocess, **{field: value})
        if augmentation and augmentation != m.augmentation:
            say(f"warning: {path}: --augmentation {augmentation} but the model was trained with "
                f"{m.augmentation}")
            m.augmentation = augmentation
        loaded.append(m)
        say(m.describe())
    return loaded


# ----------------------------------------------------------------------------------------------
# Images and probabilities
# ----------------------------------------------------------------------------------------------
def _variant_key(m: LoadedModel) -> tuple:
    # face boxes depend on the run's face statistics too; other crops only on the preprocess
    face = json.dumps(m.face, sort_keys=True) if m.preprocess.crop == "face" else None
    return m.preprocess, face


def build_image_caches(loaded: Sequence[LoadedModel], paths: list[str],
                       cache_dir: str | Path) -> list[np.ndarray]:
    """One cache per model (shared by models of equal preprocessing); each photo decoded once."""
    owners = {}  # variant -> the first model needing it (its face statistics place the boxes)
    for m in loaded:
        owners.setdefault(_variant_key(m), m)
    keys = list(owners)
    variants = []
    for key, owner in owners.items():
        boxes = None
        if owner.preprocess.crop == "face":
            from maskface import face
            boxes = face.crop_boxes_for_inference(paths, owner.preprocess, cache_dir, owner.face)
        variants.append((owner.preprocess, boxes))
    caches = image_cache.build_caches(paths, variants, cache_dir)
    return [caches[keys.index(_variant_key(m))] for m in loaded]


def predict_model(m: LoadedModel, images: np.ndarray, *, device: torch.device, batch_size: int,
                  tta: str = "none") -> np.ndarray:
    """Scored-space probabilities [N, 18|3|2] of one model in its precision, averaged over its
    TTA views; the model goes back to the CPU after (an ensemble holds one at a time on the
    device)."""
    probs = predict.model_probabilities(m, images, device=device, batch_size=batch_size, tta=tta)
    m.net.cpu()
    return probs


# ----------------------------------------------------------------------------------------------
# Calibration: fitting offsets on a k-fold run, finding them for a prediction
# ----------------------------------------------------------------------------------------------
def calibrate_run(run_dir: Path, say: Callable[[str], None] = print) -> dict:
    """--fit_calibration: fit offsets on RUN_DIR/oof.csv, write RUN_DIR/calibration.json."""
    oof_path = run_dir / run_folder.OOF
    if not oof_path.exists():  # a folder of that name is read_csv_checked's to report
        raise UserError(f"--fit_calibration {run_dir}: no oof.csv (k-fold runs write one: "
                        "train with --kfold K)")
    target = check_output_path(run_dir / run_folder.CALIBRATION, "--fit_calibration")
    probs, labels = read_oof(oof_path)
    offsets = fit_calibration(probs, labels)
    before = f1_score(labels, probs.argmax(1), average="macro")
    after = f1_score(labels, calibrated_predictions(probs, offsets), average="macro")
    result = {"offsets": offsets.tolist(), "f1_before": before, "f1_after": after}
    atomic_write_text(target, json.dumps(result, indent=2))
    say(f"calibration: OOF macro F1 {before:.4f} -> {after:.4f} (optimistic: fitted on the same "
        f"OOF) -> {target}")
    return {**result, "path": target}


def resolve_calibration(args: argparse.Namespace, run_dirs: Sequence[Path],
                        say: Callable[[str], None] = print,
                        chosen: Selection | None = None) -> np.ndarray | None:
    """--no_calibrate, else --calibrate FILE, else a selection's offsets (its run folders'
    calibration.json files were fitted on single runs, not on the mix), else a run folder's."""
    if args.no_calibrate:
        return None
    if args.calibrate:
        return read_calibration(Path(args.calibrate))
    if chosen is not None:
        if chosen.offsets is not None:
            say(f"calibration: the offsets of {chosen.path} (--no_calibrate to turn it off)")
        return chosen.offsets
    found = [d / run_folder.CALIBRATION for d in run_dirs if (d / run_folder.CALIBRATION).is_file()]
    if len(found) > 1:
        raise UserError(f"several {run_folder.CALIBRATION} ({', '.join(map(str, found))}); choose one "
                        "with --calibrate FILE or pass --no_calibrate")
    if found:
        say(f"calibration: using {found[0]} (--no_calibrate to turn it off)")
        return read_calibration(found[0])
    return None


# ----------------------------------------------------------------------------------------------
# Submission checks and scoring
# ----------------------------------------------------------------------------------------------
def validate_submission(info: pd.DataFrame, submission: pd.DataFrame) -> None:
    """One row per info.csv ImageID in info.csv's order, ans an integer 0..17."""
    if list(submission.columns) != ["ImageID", "ans"]:
        raise UserError(f"submission columns {list(submission.columns)}; expected ImageID, ans")
    if len(submission) != len(info) or not (submission["ImageID"].to_numpy()
                                             == info["ImageID"].to_numpy()).all():
        raise UserError("submission ImageIDs differ from info.csv's (count or order)")
    if not pd.api.types.is_integer_dtype(submission["ans"]):
        raise UserError(f"submission ans has dtype {submission['ans'].dtype}; expected integers")
    check_labels(submission["ans"], "submission")


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def output_paths(output_dir: str | Path, name_csv: str) -> tuple[Path, Path]:
    """The submission and probability CSV paths, checked to be writable as files before any
    model loads: neither written means no half-written output."""
    if Path(name_csv).name == name_csv and name_csv and not Path(name_csv).suffix:
        name_csv += ".csv"  # a submission is only ever a .csv: 'effb0' can only mean effb0.csv
    if Path(name_csv).name != name_csv or not name_csv.endswith(".csv"):
        raise UserError(f"--name_csv {name_csv}: expected a file name ending in .csv (or with no "
                        "extension: .csv is added), not a path")
    output_dir = check_output_path(output_dir, "--output_dir", folder=True)
    paths = output_dir / name_csv, output_dir / f"{Path(name_csv).stem}_probs.csv"
    for path in paths:
        check_output_path(path, "--output_dir/--name_csv")
    return paths


def resolve_runs(args: argparse.Namespace) -> tuple[list[Path], list[Path], list[str],
                                                   Selection | None]:
    """(run folders, checkpoints, the run each checkpoint belongs to, the selection if one was
    given): --ensemble FILE's runs, else --model_dir's."""
    if isinstance(args.ensemble, str) and Path(args.ensemble).is_dir():
        raise UserError(f"--ensemble {args.ensemble}: is a folder; --ensemble takes a selection "
                        "JSON of experiments.py select, or nothing (then the runs of --model_dir)")
    if isinstance(args.ensemble, str) and args.model_dir:  # the flags first, then the file
        raise UserError(f"--ensemble {args.ensemble} names its runs; drop --model_dir")
    if isinstance(args.ensemble, str) and getattr(args, "weights", None):
        raise UserError(f"--weights: {args.ensemble} weighs its own members; drop --weights")
    chosen = read_selection(args.ensemble) if isinstance(args.ensemble, str) else None
    if chosen is None:
        run_dirs = expand_model_dirs(args.model_dir
                                     or [os.environ.get("SM_CHANNEL_MODEL", "./model/exp")])
        per_run = [find_checkpoints([run_dir]) for run_dir in run_dirs]
        checkpoints = find_checkpoints([p for paths in per_run for p in paths])
        owners = [str(run_dir) for run_dir, paths in zip(run_dirs, per_run) for _ in paths]
        check_run_weights(getattr(args, "weights", None), len(run_dirs))
        return run_dirs, checkpoints, owners, None
    per_run = {name: find_checkpoints([run_dir]) for name, run_dir in chosen.run_dirs.items()}
    checkpoints = find_checkpoints([p for paths in per_run.values() for p in paths])
    owners = [name for name, paths in per_run.items() for _ in paths]
    print(f"selection {chosen.path}: " + ", ".join(
        f"{'+'.join(names)} {weight:.3f}" for names, weight in chosen.members))
    return list(chosen.run_dirs.values()), checkpoints, owners, chosen


def weighted_by_selection(chosen: Selection, loaded: Sequence[LoadedModel], owners: list[str],
                          model_probs: list[np.ndarray]) -> np.ndarray:
    """A selection's soft vote: each run's folds averaged, then the members weighted."""
    probs_by_run: dict[str, list[np.ndarray]] = {}
    for m, owner, probs in zip(loaded, owners, model_probs):
        if m.category != chosen.categories[owner]:
            raise UserError(f"{m.path}: a {m.category} model, but {chosen.path} selected run "
                            f"{owner} as {chosen.categories[owner]}")
        probs_by_run.setdefault(owner, []).append(probs)
    return selection_probabilities(chosen, {run: ensemble_probabilities(p)
                                            for run, p in probs_by_run.items()})


def weighted_by_run(loaded: Sequence[LoadedModel], owners: list[str],
                    model_probs: list[np.ndarray], weights: Sequence[float] | None,
                    say: Callable[[str], None] = print) -> np.ndarray:
    """The soft vote of --model_dir's runs: each run's checkpoints (a k-fold run's folds)
    averaged first, the runs weighted 1 each or by --weights; each checkpoint's share said once."""
    runs: dict[str, tuple[str, list[np.ndarray], list[LoadedModel]]] = {}
    for m, owner, probs in zip(loaded, owners, model_probs):
        category, probs_list, models = runs.setdefault(owner, (m.category, [], []))
        if m.category != category:
            raise UserError(f"{m.path}: a {m.category} model in run {owner}, whose other "
                            f"checkpoints are {category} models")
        probs_list.append(probs)
        models.append(m)
    entries = list(runs.values())
    if len(loaded) > 1:
        weight = check_run_weights(weights, len(entries))
        shares = run_vote_shares([c for c, _, _ in entries], [len(p) for _, p, _ in entries],
                                 weight)
        lines = [f"  {m.path}  {share:.4f} of {of}" for (_, _, models), (of, share)
                 in zip(entries, shares) for m in models]
        say(f"soft vote of {len(entries)} run(s), each weighing "
            + ("1 (--weights to change)" if weights is None else "its --weights number")
            + "; each checkpoint's share:\n" + "\n".join(lines))
    return combine_runs([(c, p) for c, p, _ in entries], weights, say)


def predict_eval(args: argparse.Namespace) -> dict:
    """Predict as ``args`` (inference.py's flags) say; returns {'predictions', 'probs', 'output_csv', ...}."""
    if args.fit_calibration:
        return calibrate_run(Path(args.fit_calibration))
    # everything the user gave is checked before any model loads or image decodes
    distributed.tune_host_allocator()
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: expected at least 1")
    if args.resize and min(args.resize) < 16:
        raise UserError(f"--resize {args.resize}: expected H W of at least 16 pixels")
    device = distributed.resolve_device(args.device)
    if args.amp != "checkpoint":  # a GPU without bf16 is named before any work
        mixed_precision.choose_precision(args.amp, "auto", device)
    run_dirs, checkpoints, owners, chosen = resolve_runs(args)
    if getattr(args, "weights", None) and not args.ensemble:
        raise UserError("--weights weighs the runs of an ensemble; add --ensemble")
    if len(checkpoints) > 1 and not args.ensemble:
        raise UserError(f"{len(checkpoints)} models found ({', '.join(map(str, checkpoints))}); "
                        "add --ensemble to average them")
    output_csv, probs_csv = output_paths(args.output_dir, args.name_csv)
    check_output_path(args.cache_dir, "--cache_dir", folder=True)
    # the eval layout (info.csv, every image present and JPEG/PNG) before any checkpoint is read;
    # a photo that only fails to decode shows up later, when the caches are built: its
    # preprocessing comes from the checkpoints
    eval_dir = resolve_eval_dir(args.data_dir)
    info = dataset.parse_eval_dir(eval_dir)
    # what this command reads is never what it writes: the truth, the calibration, the selection
    # file, the checkpoints, any file of a run folder or of the eval folder
    inputs = [Path(p) for p in (args.answers, args.calibrate,
                                args.ensemble if isinstance(args.ensemble, str) else None) if p]
    readers = [*run_dirs, *{Path(c).parent for c in checkpoints}, Path(eval_dir)]
    if (Path(args.output_dir) / run_folder.CONFIG).is_file():
        readers.append(Path(args.output_dir))  # a run folder not among this call's inputs
    check_outputs_apart([output_csv, probs_csv], inputs + list(map(Path, checkpoints)), readers,
                        "the submission")
    for run_dir in run_dirs:  # each run's checkpoints are its own (run_folder.check_run_record)
        if (Path(run_dir) / run_folder.CONFIG).is_file():
            config.run_record(Path(run_dir))
    answers = None
    if args.answers:
        answers = read_csv_checked(args.answers, ["ImageID", "ans"])
        check_answers(answers, info["ImageID"].tolist(), args.answers)
    offsets = resolve_calibration(args, run_dirs, chosen=chosen)

    with phases.phase("load models"):
        loaded = load_models(checkpoints, resize=args.resize, crop=args.crop,
                             augmentation=args.augmentation, amp=args.amp, device=device)
    check_categories([m.category for m in loaded])
    with phases.phase("cache"):
        caches = build_image_caches(loaded, info["path"].tolist(), args.cache_dir)
    with phases.phase("predict"):
        model_probs = [predict_model(m, images, device=device, batch_size=args.batch_size,
                                     tta=args.tta)
                       for m, images in zip(loaded, caches)]
    if chosen is not None:
        probs = weighted_by_selection(chosen, loaded, owners, model_probs)
    else:
        probs = weighted_by_run(loaded, owners, model_probs, getattr(args, "weights", None))

    predictions = pd.DataFrame({"ImageID": info["ImageID"].to_numpy(),
                                "ans": calibrated_predictions(probs, offsets).astype(np.int64)})
    validate_submission(info, predictions)
    probs_table = pd.concat([predictions[["ImageID"]],
                             pd.DataFrame(probs, columns=PROB_COLUMNS)], axis=1)
    # both or neither: a submission never sits beside the probabilities of another prediction
    write_together({output_csv: predictions.to_csv(index=False).encode(),
                    probs_csv: probs_table.to_csv(index=False, float_format="%.6f").encode()})
    metrics = None
    if answers is not None:
        metrics = score_answers(predictions, answers)
        print_scores(metrics)
    print(f"wrote {output_csv} and {probs_csv} ({len(predictions)} images, {len(loaded)} "
          f"model(s), tta {args.tta}{', calibrated' if offsets is not None else ''})")
    return {"predictions": predictions, "probs": probs, "output_csv": output_csv,
            "probs_csv": probs_csv, "metrics": metrics, "offsets": offsets,
            "models": [{"path": m.path, "name": m.name, "category": m.category,
                        "preprocess": m.preprocess} for m in loaded],
            "caches": caches}
