"""Face boxes for a whole data set: detected once per photo (face_detector.detect_face) and cached,
with fallbacks where detection fails, and crops around the face, the same at train and test time.

Cropping every photo around the face, identically at train and test, was the winners' biggest gain.

Training calls `crop_boxes_for_training` (boxes with the person-level fallback, plus the median box
the run keeps for inference); inference calls `crop_boxes_for_inference` (each photo alone, the
training median for a face not found). Both go through `detect_boxes` and its cache.

CLI: `python -m maskface.face DATA_DIR [--cache FILE] [--limit N] [--grid out.png]` detects on a folder (train
layout <person>/<stem>.jpg, or a flat folder of eval images), prints `detection_report`,
`detector_report` (which step of the chain found the faces, per mask state) and the time per photo,
and can write a PNG grid of the misses per mask state. It reads and extends the same box cache as training
(.cache/face_boxes.csv), so boxes found by either are never detected again.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import cv2
import numpy as np
import pandas as pd

from maskface.cli import FlagParser, UserError, problems_error, run_cli
from maskface.face_detector import DETECTION_STEPS, Box, clip_box, detect_face, detector_signature
from maskface.files import atomic_write_bytes, atomic_write_text, check_output_path
from maskface.image_cache import IMAGE_EXTENSIONS, decode_image, photo_digests
from maskface.labels import MASK_BY_STEM, MASK_NAMES

# The built-in fallback when no box was ever detected and no median was supplied: a square of side
# 0.55 x image width centred at (0.5 W, 0.4 H), i.e. x 86..298, y 99..310 on a 384 x 512 portrait.
DEFAULT_BOX_SIDE_FRACTION = 0.55
DEFAULT_BOX_CENTER_FRACTION = (0.5, 0.4)

# Crop = face box grown by this fraction of its size on every side (see crop_box), then made to the
# aspect of --resize (4:3 portrait: 1.33 x as tall as wide). The box runs from the hairline to the
# chin; at 0.1 and 4:3 the crop reaches 0.3 box heights below the chin, where a mask pulled under the
# chin ends. On the dev set (docs/face_crops.md) 0.4 made 95% of crops the whole photo, leaving the
# face 66 px of a 96 px wide input (a centre crop: 106 px), and a linear probe on frozen ImageNet
# mobilenet_v2 features scored eval macro F1 0.290 (margin 0), 0.317 (0.1), 0.279 (0.2), 0.281
# (0.4) and 0.290 with the centre crop.
DEFAULT_MARGIN = 0.1

# An own box whose side is under this fraction of the median box side is discarded: the photos of a
# set share their framing, and on the dev set 10 of the 22 such boxes were a mask taken for a face
# (IoU < 0.3 with the person's unmasked box) and only 4 were right; right boxes measured 0.68-1.4 x
# the median side. Photos standing alone (inference) got 0.8% wrong boxes without it, 0.1% with.
MIN_SIZE_RATIO_TO_MEDIAN = 0.65
# A photo's own box is replaced by its person's profile box when they overlap less than this.
PROFILE_DISAGREEMENT_IOU = 0.3
PROFILE_STEMS = ("normal", "incorrect_mask")  # where a person's profile box comes from, in order
FALLBACK_KINDS = ("none", "profile", "median")
BOX_COLUMNS = ("x0", "y0", "x1", "y1")
# own_method: the detector step that found the photo's own box; "too_small" when it found one that
# the size rule dropped, "none" when no step found any (the report's per-detector rates)
TABLE_COLUMNS = ("path", *BOX_COLUMNS, "score", "method", "fallback", "detected", "image_w",
                 "image_h", "own_method")
CACHE_COLUMNS = ("path", "size", "mtime_ns", "digest", "detector", "image_w", "image_h", *BOX_COLUMNS, "score",
                 "method")
INT_CACHE_COLUMNS = ("size", "mtime_ns", "image_w", "image_h", *BOX_COLUMNS)


class FaceBoxes(NamedTuple):
    """`detect_boxes` result: the box table and how many images were run through the detector."""
    table: pd.DataFrame
    n_detected: int


def box_iou(box_a: tuple, box_b: tuple) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    inter_w = max(0.0, min(box_a[2], box_b[2]) - max(box_a[0], box_b[0]))
    inter_h = max(0.0, min(box_a[3], box_b[3]) - max(box_a[1], box_b[1]))
    inter = inter_w * inter_h
    union = ((box_a[2] - box_a[0]) * (box_a[3] - box_a[1])
             + (box_b[2] - box_b[0]) * (box_b[3] - box_b[1]) - inter)
    return inter / union if union > 0 else 0.0


def _fit_size(width: float, aspect_hw: float, image_w: int, image_h: int) -> tuple[int, int]:
    """Integer (w, h) with h ~= w * aspect_hw (within half a pixel), shrunk to fit the image."""
    largest_w = min(image_w, int(np.floor(image_h / aspect_hw + 1e-9)))
    crop_w = max(1, min(int(round(width)), largest_w))
    return crop_w, max(1, min(int(round(crop_w * aspect_hw)), image_h))


def crop_box(box: tuple, image_w: int, image_h: int, margin: float = DEFAULT_MARGIN,
             aspect_hw: float = 4 / 3) -> Box:
    """The crop around a face box: grown by `margin`, of aspect H/W `aspect_hw`, inside the image.

    The box grows by margin x its width (height) on the left and right (top and bottom); then the
    shorter side grows until height / width == aspect_hw (so the face and its margin are never cut),
    the crop shrinks about its centre, keeping the aspect, only if it is larger than the image, and
    finally shifts to lie inside it. Pass aspect_hw = resize height / resize width of training so
    the crop is resized without distortion. Its height is width x aspect_hw to within half a pixel.
    """
    if margin < 0 or aspect_hw <= 0 or image_w <= 0 or image_h <= 0:
        raise UserError(f"crop_box: expected margin >= 0, aspect_hw > 0 and a non-empty image, got "
                        f"margin={margin}, aspect_hw={aspect_hw}, image {image_w}x{image_h}")
    x0, y0, x1, y1 = (float(v) for v in box)
    center_x, center_y = (x0 + x1) / 2, (y0 + y1) / 2
    width = max(x1 - x0, 1.0) * (1 + 2 * margin)
    height = max(y1 - y0, 1.0) * (1 + 2 * margin)
    if height / width < aspect_hw:
        height = width * aspect_hw
    else:
        width = height / aspect_hw
    crop_w, crop_h = _fit_size(width, aspect_hw, image_w, image_h)
    left = min(max(int(round(center_x - crop_w / 2)), 0), image_w - crop_w)
    top = min(max(int(round(center_y - crop_h / 2)), 0), image_h - crop_h)
    return left, top, left + crop_w, top + crop_h


def default_box(image_w: int, image_h: int) -> Box:
    """The built-in box of last resort: the portrait's upper middle (see DEFAULT_BOX_*)."""
    side = DEFAULT_BOX_SIDE_FRACTION * image_w
    center_x = DEFAULT_BOX_CENTER_FRACTION[0] * image_w
    center_y = DEFAULT_BOX_CENTER_FRACTION[1] * image_h
    return clip_box((center_x - side / 2, center_y - side / 2, center_x + side / 2,
                      center_y + side / 2), image_w, image_h)


def median_box_stats(table: pd.DataFrame) -> dict[str, tuple[float, float] | None]:
    """Median size (w, h) and centre (x, y), in pixels, of the photos' own detections.

    Save these in a run's config and pass them to `detect_boxes` at inference, so undetected test
    photos get the box that undetected training photos got. None when nothing was detected.
    """
    own = table[table["detected"].astype(bool) & (table["fallback"] == "none")]
    if own.empty:
        return {"median_size": None, "median_center": None}
    width, height = own["x1"] - own["x0"], own["y1"] - own["y0"]
    center_x, center_y = (own["x0"] + own["x1"]) / 2, (own["y0"] + own["y1"]) / 2
    return {"median_size": (float(width.median()), float(height.median())),
            "median_center": (float(center_x.median()), float(center_y.median()))}


def _median_fallback_box(image_w: int, image_h: int, median_size: tuple[float, float] | None,
                         median_center: tuple[float, float] | None) -> tuple[Box, str]:
    if median_size is None:
        return default_box(image_w, image_h), "default"
    center_x, center_y = median_center or (DEFAULT_BOX_CENTER_FRACTION[0] * image_w,
                                           DEFAULT_BOX_CENTER_FRACTION[1] * image_h)
    width, height = median_size
    return clip_box((center_x - width / 2, center_y - height / 2, center_x + width / 2,
                      center_y + height / 2), image_w, image_h), "median"


def _file_key(path: str) -> tuple[str, int, int]:
    try:
        stat = os.stat(path)
    except OSError as error:
        raise UserError(f"{path}: cannot read the image ({error.strerror})") from None
    return os.path.abspath(path), stat.st_size, stat.st_mtime_ns


def _read_cache(cache_file: Path | None, warn: Callable[[str], None]) -> tuple[dict[str, dict], int]:
    """The cache's valid entries by absolute path, and how many malformed rows were dropped (1 for
    an empty file; the cache is then rewritten). A file that is not a face-box cache (not CSV,
    other columns) is an error, not rebuilt: --cache may name a file of the user's. Malformed rows
    of a real one (hand edits, a disk error) are dropped with a warning and detected again."""
    if cache_file is None or not Path(cache_file).exists():
        return {}, 0
    # a write cut short inside the header (only a prefix of ours) is a torn cache, not a user's
    # file: rebuilt, as the image cache rebuilds its torn files (nothing after the header is lost)
    header = ",".join(CACHE_COLUMNS)
    try:
        head = Path(cache_file).read_bytes()[:len(header) + 2].decode()
    except (OSError, UnicodeDecodeError):
        head = None
    if head is not None and head.strip() and len(head.rstrip("\r\n")) < len(header) \
            and header.startswith(head.rstrip("\r\n")):
        warn(f"warning: {cache_file}: face-box cache torn inside its header; it is rebuilt")
        return {}, 1
    try:
        # every field as text: numbers are checked row by row below, and mtime_ns (~1.8e18) must
        # not pass through float64, which cannot hold it exactly
        cached = pd.read_csv(cache_file, keep_default_na=False, dtype=str)
    except pd.errors.EmptyDataError:  # an empty file holds nothing to lose: rebuilt
        warn(f"warning: {cache_file}: empty face-box cache; it is rebuilt")
        return {}, 1
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise UserError(f"{cache_file}: unreadable face-box cache ({error}); delete it to "
                        "rebuild") from None
    if "digest" not in cached.columns and "mtime_ns" in cached.columns:
        warn(f"warning: {cache_file}: a face-box cache of an older version (keyed by date, not "
             "content); its photos are detected again")
        return {}, 1
    missing = [c for c in CACHE_COLUMNS if c not in cached.columns]
    if missing:
        raise UserError(f"{cache_file}: not a face-box cache (missing columns {missing}); delete it "
                        "to rebuild")
    entries, malformed = {}, []
    for line, row in enumerate(cached[list(CACHE_COLUMNS)].to_dict("records"), start=2):
        try:
            entry = _parse_cache_row(row)
        except ValueError as why:
            malformed.append(f"line {line}: {why}")
            continue
        entries[entry["path"]] = entry
    if malformed:
        more = f" (and {len(malformed) - 1} more)" if len(malformed) > 1 else ""
        warn(f"warning: {cache_file}: ignoring {len(malformed)} malformed row(s), {malformed[0]}"
             f"{more}; their photos are detected again")
    return entries, len(malformed)


def _parse_cache_row(row: dict[str, str]) -> dict:
    """One cache row (all text) -> an entry with int/float fields; ValueError says what is wrong."""
    entry: dict = dict(row)
    for column in INT_CACHE_COLUMNS:
        try:
            entry[column] = int(row[column])
        except ValueError:
            raise ValueError(f"{column} {row[column]!r} is not an integer") from None
    try:
        entry["score"] = float(row["score"])
    except ValueError:
        entry["score"] = math.nan
    if not math.isfinite(entry["score"]):
        raise ValueError(f"score {row['score']!r} is not a number")
    if not row["path"] or not row["method"] or not row["digest"]:
        raise ValueError("empty path, digest or method")
    if entry["image_w"] < 1 or entry["image_h"] < 1:
        raise ValueError(f"image size {row['image_w']}x{row['image_h']} is empty")
    x0, y0, x1, y1 = (entry[c] for c in BOX_COLUMNS)
    # detected boxes are clipped to the image (_clip_box); "none" rows carry -1s
    if row["method"] != "none" and not (0 <= x0 < x1 <= entry["image_w"]
                                        and 0 <= y0 < y1 <= entry["image_h"]):
        raise ValueError(f"box {x0},{y0},{x1},{y1} is not inside the "
                         f"{entry['image_w']}x{entry['image_h']} image")
    return entry


def _detect_entry(path: str, key: tuple[str, int, int, str], signature: str) -> dict:
    # decoded exactly as training and inference decode, so all three agree on which photos are
    # corrupt or too small: cv2.imread pads a truncated JPEG with grey, decode_image rejects it
    image = cv2.cvtColor(decode_image(path), cv2.COLOR_RGB2BGR)
    found = detect_face(image)
    box, score, method = found if found is not None else ((-1, -1, -1, -1), 0.0, "none")
    return dict(zip(CACHE_COLUMNS, (key[0], key[1], key[2], key[3], signature, image.shape[1],
                                    image.shape[0], *box, score, method)))


def _detect_or_problem(path: str, key: tuple[str, int, int, str],
                       signature: str) -> tuple[dict | None, str | None]:
    """(the photo's cache entry, None), or (None, why it cannot be read): a worker's answer."""
    try:
        return _detect_entry(path, key, signature), None
    except UserError as why:
        return None, str(why)


# a worker process pays for its start (about 0.3 s of imports); fewer photos stay in this process
DETECT_PER_WORKER = 48


def detection_workers(n_photos: int, workers: int | None = None) -> int:
    """Processes that detect ``n_photos`` faces: ``workers`` as given, else one per core this
    process may use, each with DETECT_PER_WORKER photos or more (1: detect in this process)."""
    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
        workers = min(cores, n_photos // DETECT_PER_WORKER)
    return max(1, min(workers, n_photos))


def _single_threaded() -> None:
    """A detection worker's start: one OpenCV thread, as the workers already fill the cores."""
    cv2.setNumThreads(1)


def _detections(jobs: list[tuple[str, tuple]], signature: str, workers: int):
    """(entry, problem) for each (path, key) of ``jobs``, in their order, as they are found: in
    this process, or in ``workers`` spawned processes (OpenCV's nets are not shared across
    threads), each given a chunk of photos at a time. Closing the generator stops the workers."""
    if workers <= 1:
        for path, key in jobs:
            yield _detect_or_problem(path, key, signature)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_single_threaded)
    try:
        yield from pool.map(_detect_or_problem, [p for p, _ in jobs], [k for _, k in jobs],
                            [signature] * len(jobs),
                            chunksize=max(1, min(16, len(jobs) // (4 * workers))))
    finally:  # also when stopped early (Ctrl-C, an error): no worker outlives the call
        pool.shutdown(wait=True, cancel_futures=True)


def _profile_indices(own_boxes: list[Box | None], paths: list[str],
                     profile_ids: list[str]) -> dict[str, int]:
    """person id -> index of the photo whose own box stands for the person's framing: their
    `normal` photo, else `incorrect_mask`, else (only masked photos found) the found box that
    overlaps the person's other found boxes most. A person's photos share one framing, so any of
    their boxes is a better guess for a missed photo than the set's median box."""
    found_by_person: dict[str, list[int]] = {}
    for index, person in enumerate(profile_ids):
        if own_boxes[index] is not None:
            found_by_person.setdefault(person, []).append(index)
    profiles = {}
    for person, found in found_by_person.items():
        by_stem = {Path(paths[index]).stem: index for index in found}
        chosen = next((by_stem[stem] for stem in PROFILE_STEMS if stem in by_stem), None)
        if chosen is None:  # ties go to the first photo, so the choice does not depend on hashing
            chosen = max(found, key=lambda i: (sum(box_iou(own_boxes[i], own_boxes[j])
                                                   for j in found if j != i), -i))
        profiles[person] = chosen
    return profiles


def detect_boxes(paths: list[str], profile_ids: list[str] | None, cache_file: Path | None,
                 progress: bool = True, median_size: tuple[float, float] | None = None,
                 median_center: tuple[float, float] | None = None,
                 min_size_ratio: float = MIN_SIZE_RATIO_TO_MEDIAN,
                 warn: Callable[[str], None] = print, workers: int | None = None) -> FaceBoxes:
    """The face box of every photo, detected once and cached; returns (table, n_detected).

    table: one row per path, in order: path, x0, y0, x1, y1 (ints), score, method, fallback,
    detected (the photo's own detection gave a box at least min_size_ratio x the median side:
    smaller ones are mostly a mask taken for a face, see MIN_SIZE_RATIO_TO_MEDIAN). The box is
    - fallback "none": the photo's own detection (method = the detector that found it);
    - "profile" (training, with profile_ids): the box of the person's `normal` photo (else their
      `incorrect_mask` photo, else the masked photo's box that agrees best with the person's other
      boxes) when the photo's own failed or overlaps it with IoU < PROFILE_DISAGREEMENT_IOU: a
      person's 7 photos share their framing;
    - "median": the median detected size at the median centre of this set, or median_size /
      median_center when given (inference: the training set's, from `median_box_stats`); with
      no detection at all and none given, the built-in `default_box` (method "default").
    Own detections are cached in `cache_file` (CSV, atomic, saved every SAVE_EVERY_S and when
    stopped) keyed by absolute path, the photo's content digest and `detector_signature()`;
    entries of other paths are kept, malformed rows dropped with a warning. Missing photos are reported all at once before any detection, undecodable
    ones (image_cache.decode_image) all at once after it, with the readable photos' boxes cached.
    Detection runs in ``workers`` processes (default: one per core, for DETECT_PER_WORKER photos
    or more each), the boxes taken in the photos' order: the same boxes and cache file as one
    process finds, byte for byte.
    """
    paths = [str(p) for p in paths]
    if profile_ids is not None and len(profile_ids) != len(paths):
        raise UserError(f"detect_boxes: {len(profile_ids)} profile_ids for {len(paths)} paths; "
                        "expected one person id per path")
    if cache_file is not None:
        check_output_path(cache_file, "face-box cache")
    cached, n_malformed = _read_cache(cache_file, warn)
    keys, problems = [], []
    for path in paths:
        try:
            keys.append(_file_key(path))
        except UserError as why:
            problems.append(str(why))
    if problems:
        raise problems_error(problems, "the images")
    # the photo's bytes decide, not its date: a replaced photo with its mtime restored is new
    keys = [(*key, digest) for key, digest in zip(keys, photo_digests(paths))]
    signature = detector_signature()
    to_detect = [i for i, key in enumerate(keys) if key[0] not in cached
                 or (cached[key[0]]["digest"], cached[key[0]]["detector"]) != (key[3], signature)]
    detected = found = _detections([(paths[i], keys[i]) for i in to_detect], signature,
                                   detection_workers(len(to_detect), workers))
    if progress and to_detect:
        from tqdm import tqdm
        found = tqdm(found, total=len(to_detect), desc="face boxes", unit="img",
                     disable=None)  # None: off in logs
    saved_at = time.monotonic()
    try:
        for index, (entry, problem) in zip(to_detect, found):
            if problem is not None:
                problems.append(problem)
                cached.pop(keys[index][0], None)  # a stale box of an earlier, readable version
            else:
                cached[keys[index][0]] = entry
            if cache_file is not None and time.monotonic() - saved_at >= SAVE_EVERY_S:
                _write_cache(cache_file, cached)  # a kill loses at most SAVE_EVERY_S of work
                saved_at = time.monotonic()
    finally:  # also on Ctrl-C or an error: what was found so far is kept
        if found is not detected:
            found.close()  # the bar
        detected.close()  # the worker processes, when stopped early
        if (to_detect or n_malformed) and cache_file is not None:
            _write_cache(cache_file, cached)
    if problems:
        raise problems_error(problems, "the images")
    entries = [cached[key[0]] for key in keys]
    table = _resolve_fallbacks(entries, paths, profile_ids, median_size, median_center,
                               min_size_ratio)
    return FaceBoxes(table, len(to_detect))


SAVE_EVERY_S = 20.0  # seconds of detection between saves of the box cache


def _write_cache(cache_file: Path, cached: dict[str, dict]) -> None:
    atomic_write_text(cache_file, pd.DataFrame(list(cached.values()),
                                            columns=list(CACHE_COLUMNS)).to_csv(index=False))


def _resolve_fallbacks(entries: list[dict], paths: list[str], profile_ids: list[str] | None,
                       median_size: tuple[float, float] | None,
                       median_center: tuple[float, float] | None,
                       min_size_ratio: float) -> pd.DataFrame:
    own_boxes = [tuple(int(entry[c]) for c in BOX_COLUMNS) if entry["method"] != "none" else None
                 for entry in entries]
    detected_boxes = np.array([box for box in own_boxes if box is not None], dtype=float)
    if len(detected_boxes):
        median_size = median_size or (float(np.median(detected_boxes[:, 2] - detected_boxes[:, 0])),
                                      float(np.median(detected_boxes[:, 3] - detected_boxes[:, 1])))
        median_center = median_center or (float(np.median(detected_boxes[:, [0, 2]].mean(1))),
                                          float(np.median(detected_boxes[:, [1, 3]].mean(1))))
    own_methods = [entry["method"] for entry in entries]
    if median_size is not None and min_size_ratio > 0:
        min_side = min_size_ratio * float(np.sqrt(median_size[0] * median_size[1]))
        too_small = [box is not None and _box_side(box) < min_side for box in own_boxes]
        own_boxes = [None if small else box for box, small in zip(own_boxes, too_small)]
        own_methods = ["too_small" if small else method
                       for method, small in zip(own_methods, too_small)]
    profiles = _profile_indices(own_boxes, paths, profile_ids) if profile_ids is not None else {}
    rows = []
    for index, (entry, path, own_box) in enumerate(zip(entries, paths, own_boxes)):
        image_w, image_h = int(entry["image_w"]), int(entry["image_h"])
        box, score, method, fallback = own_box, float(entry["score"]), entry["method"], "none"
        profile_index = profiles.get(profile_ids[index]) if profile_ids is not None else None
        if profile_index is not None and profile_index != index:
            profile_box = own_boxes[profile_index]
            if own_box is None or box_iou(own_box, profile_box) < PROFILE_DISAGREEMENT_IOU:
                box, fallback = profile_box, "profile"
                score = float(entries[profile_index]["score"])
                method = entries[profile_index]["method"]
        if box is None:
            box, method = _median_fallback_box(image_w, image_h, median_size, median_center)
            score, fallback = 0.0, "median"
        rows.append((path, *box, score, method, fallback, own_box is not None, image_w, image_h,
                     own_methods[index]))
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    return table.astype({c: int for c in BOX_COLUMNS})


def _box_side(box: tuple) -> float:
    return float(np.sqrt((box[2] - box[0]) * (box[3] - box[1])))


FACE_BOX_CACHE = "face_boxes.csv"  # in the image cache folder: shared by train, val, folds, inference


def crop_boxes(table: pd.DataFrame, preprocess) -> np.ndarray:
    """Face-box table -> crop boxes [N, 4] for image_cache.build_cache (the run's margin and
    aspect)."""
    height, width = preprocess.resize
    return np.array([crop_box(tuple(row[c] for c in BOX_COLUMNS), row["image_w"], row["image_h"],
                              preprocess.face_margin, height / width)
                     for row in table.to_dict("records")], dtype=np.int64)


def crop_boxes_for_training(frame: pd.DataFrame, preprocess, cache_dir: str | Path,
                            say=print) -> tuple[np.ndarray, dict]:
    """Crop boxes of every training photo (with the profile fallback) and the face info a run
    keeps for inference: median box size/centre and how many photos fell back."""
    table, n_detected = detect_boxes(frame["path"].tolist(), frame["profile"].tolist(),
                                     Path(cache_dir) / FACE_BOX_CACHE, warn=say)
    say(f"face boxes: {n_detected} photos detected now, {len(table) - n_detected} from the cache")
    say(detection_report(table) + "\n" + detector_report(table))  # one message: callers count them
    stats = median_box_stats(table)
    info = {key: list(value) if value is not None else None for key, value in stats.items()}
    info["fallbacks"] = table["fallback"].value_counts().to_dict()
    return crop_boxes(table, preprocess), info


def crop_boxes_for_inference(paths: list[str], preprocess, cache_dir: str | Path,
                             face_info: dict, say=print) -> np.ndarray:
    """Crop boxes of test photos: each photo stands alone; an undetected face gets the training
    run's median box (face_info from the checkpoint)."""
    median_size, median_center = face_info.get("median_size"), face_info.get("median_center")
    table, _ = detect_boxes(paths, None, Path(cache_dir) / FACE_BOX_CACHE,
                            median_size=tuple(median_size) if median_size else None,
                            median_center=tuple(median_center) if median_center else None,
                            warn=say)
    fell_back = int((table["fallback"] != "none").sum())
    say(f"face boxes: {len(table) - fell_back}/{len(table)} detected, {fell_back} use the "
        "training median box")
    return crop_boxes(table, preprocess)


def _mask_state(path: str) -> str | None:
    mask = MASK_BY_STEM.get(Path(path).stem)
    return None if mask is None else MASK_NAMES[mask]


def detection_report(table: pd.DataFrame) -> str:
    """Own-detection rate and fallbacks per mask state (from the file stem) and over all photos.

    Photos whose stem is not a training stem (eval images) only count in the "all" row.
    """
    states = table["path"].map(_mask_state)
    groups = [(name, table[states == name]) for name in MASK_NAMES if (states == name).any()]
    groups.append(("all", table))
    header = f"{'state':<10}{'photos':>8}{'detected':>10}" + "".join(f"{k:>10}" for k in FALLBACK_KINDS)
    lines = ["face boxes: own detection rate, then the box each photo got (fallback kind)", header]
    for name, group in groups:
        count = len(group)
        rate = group["detected"].astype(bool).mean() if count else 0.0
        kinds = group["fallback"].value_counts()
        lines.append(f"{name:<10}{count:>8}{rate:>10.1%}"
                     + "".join(f"{int(kinds.get(k, 0)):>10}" for k in FALLBACK_KINDS))
    methods = table.loc[table["fallback"] == "none", "method"].value_counts()
    lines.append("own boxes by detector: " + ", ".join(f"{m} {n}" for m, n in methods.items()))
    return "\n".join(lines)


def detector_report(table: pd.DataFrame) -> str:
    """Which detector step found each photo's own box, as a share of each mask state's photos
    (columns in the chain's order; too_small: found but dropped by the size rule; none: no step
    found a face). Photos whose stem is not a training stem only count in the "all" row."""
    states = table["path"].map(_mask_state)
    chain = [step.method for step in DETECTION_STEPS]
    seen = set(table["own_method"])
    columns = [m for m in chain if m in seen] + sorted(seen - {*chain, "too_small", "none"})
    columns += ["too_small", "none"]
    width = max(10, *(len(c) + 2 for c in columns))
    lines = ["own boxes by detector (share of the state's photos)",
             f"{'state':<10}{'photos':>8}" + "".join(f"{c:>{width}}" for c in columns)]
    groups = [(name, table[states == name]) for name in MASK_NAMES if (states == name).any()]
    for name, group in [*groups, ("all", table)]:
        shares = group["own_method"].value_counts() / max(len(group), 1)
        lines.append(f"{name:<10}{len(group):>8}"
                     + "".join(f"{shares.get(c, 0.0):>{width}.1%}" for c in columns))
    return "\n".join(lines)


def _list_photos(data_dir: Path, limit: int | None) -> tuple[list[str], list[str] | None]:
    """Train layout (<person>/<stem>.jpg) -> paths and person ids; a flat folder -> paths only."""
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: not a directory (expected a train or eval images folder)")

    def images_in(folder: Path) -> list[Path]:
        return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                      and f.suffix.lower() in IMAGE_EXTENSIONS)

    people = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if people:
        people = people[:limit] if limit else people
        photos = [(str(f), person.name) for person in people for f in images_in(person)]
        if not photos:
            where = f"the first {len(people)} person folder(s) of {data_dir}" if limit else data_dir
            raise UserError(f"no photos found under {where}; expected <person>/<stem> files of "
                            f"type {'/'.join(IMAGE_EXTENSIONS)}")
        return [p for p, _ in photos], [person for _, person in photos]
    files = [str(f) for f in images_in(data_dir)]
    if not files:
        raise UserError(f"no photos found under {data_dir}; expected person folders or "
                        f"{'/'.join(IMAGE_EXTENSIONS)} images")
    return (files[:limit] if limit else files), None


GRID_MISSES_PER_STATE = 50  # tiles of photos without an own box shown per mask state
GRID_TILE_WIDTH = 96  # pixels; a 384 x 512 portrait becomes a 96 x 128 tile


def write_crop_grid(table: pd.DataFrame, target: Path, margin: float, aspect_hw: float,
                    per_row: int = 10, tile_w: int = GRID_TILE_WIDTH) -> None:
    """A PNG of the misses: one block per mask state (or one for unlabelled photos) showing its
    photos without an own box (up to GRID_MISSES_PER_STATE), then one row of photos with one. Each
    tile is the whole photo with the crop drawn on it, coloured by the box it got (green own box,
    orange the person's box, red median) and labelled with the step that found its own box."""
    colours = {"none": (0, 180, 0), "profile": (0, 140, 255), "median": (0, 0, 255)}
    states = table["path"].map(_mask_state).fillna("all")
    rows, tile_h = [], None
    for state in [*MASK_NAMES, "all"]:
        group = table[states == state]
        if group.empty:
            continue
        detected = group["detected"].astype(bool)
        misses, hits = group[~detected], group[detected]
        shown = pd.concat([misses.head(GRID_MISSES_PER_STATE), hits.head(per_row)])
        tiles = []
        for row in shown.itertuples():
            image = cv2.cvtColor(decode_image(row.path), cv2.COLOR_RGB2BGR)  # as detection read it
            tile_h = tile_h or int(round(image.shape[0] * tile_w / image.shape[1]))  # one height
            scale_x, scale_y = tile_w / image.shape[1], tile_h / image.shape[0]
            tile = cv2.resize(image, (tile_w, tile_h), interpolation=cv2.INTER_AREA)
            x0, y0, x1, y1 = crop_box((row.x0, row.y0, row.x1, row.y1), image.shape[1],
                                      image.shape[0], margin, aspect_hw)
            cv2.rectangle(tile, (int(x0 * scale_x), int(y0 * scale_y)),
                          (int(x1 * scale_x) - 1, int(y1 * scale_y) - 1), colours[row.fallback], 2)
            cv2.putText(tile, str(row.own_method)[:12], (2, tile_h - 4), cv2.FONT_HERSHEY_SIMPLEX,
                        0.3, (255, 255, 255), 1)
            tiles.append(tile)
        tiles += [np.zeros((tile_h, tile_w, 3), np.uint8)] * (-len(tiles) % per_row)
        label = np.full((18, tile_w * per_row, 3), 255, np.uint8)
        cv2.putText(label, f"{state}: {len(misses)} of {len(group)} photos without an own box "
                    f"(first {min(len(misses), GRID_MISSES_PER_STATE)}), then some with one",
                    (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
        rows.append(label)
        rows += [np.hstack(tiles[i:i + per_row]) for i in range(0, len(tiles), per_row)]
    ok, encoded = cv2.imencode(".png", np.vstack(rows))
    if not ok:
        raise UserError(f"{target}: cannot encode the grid image")
    atomic_write_bytes(target, encoded.tobytes())


def get_args_parser() -> FlagParser:
    parser = FlagParser(description="Detect face boxes on a folder and report the rates.")
    parser.add_argument("data_dir", type=Path, help="train images folder (<person>/<stem>.jpg) or a "
                        "flat folder of eval images")
    parser.add_argument("--cache", type=Path, default=Path(".cache") / FACE_BOX_CACHE,
                        help="face-box cache CSV, shared with train.py and inference.py "
                             "(their --cache_dir/" + FACE_BOX_CACHE + ")")
    parser.add_argument("--limit", type=int, default=None, help="only the first N people (train) or "
                        "images (flat folder)")
    parser.add_argument("--grid", type=Path, default=None, help="write a PNG grid of crops here")
    parser.add_argument("--per_row", type=int, default=10, help="grid tiles per row")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="crop = box grown by this fraction per side (train.py --face_margin)")
    parser.add_argument("--aspect", type=float, default=4 / 3, help="crop height / width")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Reject bad flags before the (slow) detection pass, naming the flag."""
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: expected at least 1 (people of a train folder or "
                        "images of a flat folder)")
    if args.per_row < 1:
        raise UserError(f"--per_row {args.per_row}: expected at least 1 (grid tiles per row)")
    if not (math.isfinite(args.margin) and args.margin >= 0):
        raise UserError(f"--margin {args.margin:g}: expected >= 0 (a fraction of the face box)")
    if not (math.isfinite(args.aspect) and args.aspect > 0):
        raise UserError(f"--aspect {args.aspect:g}: expected a crop height / width > 0")
    check_output_path(args.cache, "--cache")
    if args.grid is not None:
        check_output_path(args.grid, "--grid")
        if args.grid.resolve() == args.cache.resolve():
            raise UserError(f"--grid {args.grid}: is the --cache file; expected another file")


def run(args: argparse.Namespace) -> None:
    """The CLI: detect on args.data_dir, print the report, optionally write the crop grid."""
    check_args(args)
    paths, profile_ids = _list_photos(args.data_dir, args.limit)
    cache = args.cache
    started = time.perf_counter()
    table, n_detected = detect_boxes(paths, profile_ids, cache)
    elapsed = time.perf_counter() - started
    print(detection_report(table))
    print(detector_report(table))
    per_image = f", {1000 * elapsed / n_detected:.1f} ms/image" if n_detected else ""
    print(f"{len(paths)} photos, {n_detected} detected now{per_image}; cache {cache}")
    if args.grid is not None:
        write_crop_grid(table, args.grid, args.margin, args.aspect, per_row=args.per_row)
        print(f"grid written to {args.grid}")


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, get_args_parser().parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
