"""The decode-once image cache: every photo decoded, cropped (centre, face box or whole photo) and
resized once per preprocessing configuration into a uint8 file on disk, keyed by the photos'
content, that every epoch, fold, inference and benchmark then reads (memory-mapped).

Preprocess is the deterministic part of the image pipeline; it travels in checkpoints so that
inference prepares pixels exactly as training did.

    python -m maskface.image_cache --cache_dir .cache list                # entries, oldest first
    python -m maskface.image_cache --cache_dir .cache prune --max_size 2G # oldest go first

A job holds a shared lock on every cache file it reads (until it exits), and prune deletes only
entries it can lock exclusively: never one a running job reads.
"""
from __future__ import annotations

import argparse
import atexit
import functools
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from maskface.cli import FlagParser, UserError, problems_error, run_cli
from maskface.files import (
    atomic_write_text,
    file_mode,
    hold_shared,
    lock_temp,
    remove_stale_temps,
    try_lock_exclusive,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # the photo files the decoder takes
CROPS = ("center", "face", "none")
# area: OpenCV's area averaging when shrinking (bilinear when enlarging), the toolkit's own;
# bilinear / bicubic: Pillow's antialiased filters, what timm's transforms use for its models
INTERPOLATIONS = ("area", "bilinear", "bicubic")
CACHE_VERSION = 1  # bump when the decoding below changes what lands in a cache


@dataclass(frozen=True)
class Preprocess:
    """The deterministic part of the image pipeline; everything a cache (and inference) needs."""
    resize: tuple[int, int] = (128, 96)  # H, W fed to the model
    crop: str = "center"                  # center | face | none
    canny: bool = False                   # add a Canny-edge 4th channel
    face_margin: float = 0.4              # face box expansion per side, fraction of the box
    interpolation: str = "area"           # area | bilinear | bicubic (INTERPOLATIONS)
    # cached beyond the crop on each side, as a fraction of its height/width: room for random
    # crops in training; evaluation takes the centred --resize box, the crop of margin 0
    crop_margin: float = 0.0
    # --crop_size: the centre crop's H, W in photo pixels (torchvision's CenterCrop), resized to
    # --resize whatever its aspect; None: center_box, the baseline's box made to --resize's aspect
    crop_size: tuple[int, int] | None = None

    @property
    def channels(self) -> int:
        return 4 if self.canny else 3

    @property
    def margin_pixels(self) -> tuple[int, int]:
        """Rows above (and below) and columns left (and right) of the crop in the cache."""
        height, width = self.resize
        return round(self.crop_margin * height), round(self.crop_margin * width)

    @property
    def cached_size(self) -> tuple[int, int]:
        """H, W of a cached image: --resize plus the margin on both sides."""
        (height, width), (pad_h, pad_w) = self.resize, self.margin_pixels
        return height + 2 * pad_h, width + 2 * pad_w

    def to_dict(self) -> dict:
        values = {**asdict(self), "resize": list(self.resize)}
        if self.interpolation == "area":  # the default stays out: old cache names and checkpoints hold
            del values["interpolation"]
        if not self.crop_margin:  # the cache names and checkpoints of margin-0 runs stay as they were
            del values["crop_margin"]
        if self.crop_size is None:  # likewise for runs without --crop_size
            del values["crop_size"]
        else:
            values["crop_size"] = list(self.crop_size)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocess":
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        known["resize"] = tuple(known.get("resize", cls.resize))
        if known.get("crop_size") is not None:
            known["crop_size"] = tuple(known["crop_size"])
        return cls(**known)


def center_box(width: int, height: int, aspect_hw: float) -> tuple[int, int, int, int]:
    """The baseline's centre crop (320 x 256 of a 512 x 384 portrait), made to aspect H/W."""
    crop_h, crop_w = height * 0.625, width * 2 / 3
    if crop_h / crop_w > aspect_hw:
        crop_h = crop_w * aspect_hw
    else:
        crop_w = crop_h / aspect_hw
    x0, y0 = int(round((width - crop_w) / 2)), int(round((height - crop_h) / 2))
    return x0, y0, x0 + int(round(crop_w)), y0 + int(round(crop_h))


def sized_center_box(width: int, height: int,
                     crop_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centred box of ``crop_size`` (H, W) pixels, placed as torchvision's CenterCrop places
    it; UserError when the photo is smaller (CenterCrop would pad it with black)."""
    crop_h, crop_w = crop_size
    if crop_h > height or crop_w > width:
        raise UserError(f"photo is {width}x{height} (WxH) pixels, smaller than --crop_size "
                        f"{crop_h} {crop_w} (H W); expected photos at least that large")
    x0, y0 = int(round((width - crop_w) / 2.0)), int(round((height - crop_h) / 2.0))
    return x0, y0, x0 + crop_w, y0 + crop_h


MIN_IMAGE_SIDE = 16  # pixels; anything smaller is no photo of a person (and cannot be cropped)


def decode_image(path: str) -> np.ndarray:
    """Decode a photo to RGB uint8 [H, W, 3]; UserError naming the file when it is corrupt."""
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise UserError(f"{path}: corrupt or unreadable image")
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        raise UserError(f"{path}: image is {image.shape[1]}x{image.shape[0]} pixels; expected a "
                        f"photo of at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def preprocess_image(image: np.ndarray, preprocess: Preprocess,
                     box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Crop (box, or the preprocess's centre crop) and resize one RGB image -> uint8 [H, W, C]."""
    height, width = preprocess.resize
    if box is None and preprocess.crop == "center":
        box = (sized_center_box(image.shape[1], image.shape[0], preprocess.crop_size)
               if preprocess.crop_size else center_box(image.shape[1], image.shape[0],
                                                       height / width))
    if preprocess.crop_margin:
        image = _crop_with_margin(image, box, preprocess)
        height, width = preprocess.cached_size
    elif box is not None:
        x0, y0, x1, y1 = (int(v) for v in box)
        image = image[max(y0, 0):y1, max(x0, 0):x1]
    if preprocess.interpolation == "area":
        shrinking = image.shape[0] >= height
        resized = cv2.resize(image, (width, height),
                             interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    else:
        from PIL import Image
        method = {"bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC}[preprocess.interpolation]
        resized = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(
            (width, height), method))
    if preprocess.canny:
        edges = cv2.Canny(cv2.cvtColor(resized, cv2.COLOR_RGB2GRAY), 100, 200)
        resized = np.dstack([resized, edges])
    return resized


def _crop_with_margin(image: np.ndarray, box, preprocess: Preprocess) -> np.ndarray:
    """The crop ``box`` (clipped to the photo, as the margin-0 crop is; None: the whole photo)
    grown by the preprocess's margin on each side, so that its centred --resize box covers the
    box itself; what lies beyond the photo is mirrored (as the affine warps' borders are)."""
    photo_h, photo_w = image.shape[:2]
    x0, y0, x1, y1 = (0, 0, photo_w, photo_h) if box is None else (int(v) for v in box)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, photo_w), min(y1, photo_h)
    (height, width), (pad_h, pad_w) = preprocess.resize, preprocess.margin_pixels
    grow_y, grow_x = (y1 - y0) * pad_h / height, (x1 - x0) * pad_w / width
    top, bottom = round(y0 - grow_y), round(y1 + grow_y)
    left, right = round(x0 - grow_x), round(x1 + grow_x)
    border = max(0, -top, -left, bottom - photo_h, right - photo_w)
    if border:
        image = cv2.copyMakeBorder(image, border, border, border, border, cv2.BORDER_REFLECT_101)
    return image[top + border:bottom + border, left + border:right + border]


@functools.lru_cache(maxsize=None)
def _content_digest(path: str, size: int, mtime_ns: int, ctime_ns: int) -> str:
    # keyed by the stat too, so a file rewritten while this process runs is read again
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read(), digest_size=16).hexdigest()


def photo_digests(paths: list[str], threads: int | None = None) -> list[str]:
    """A digest of every photo's bytes (blake2b; hashlib releases the GIL, so threads read and
    hash in parallel). What the image cache, the face-box cache and a run's data fingerprint are
    keyed by: a photo replaced by another of the same size and date is still told apart."""
    def digest(path: str) -> str:
        try:
            stat = os.stat(path)
            return _content_digest(os.path.abspath(path), stat.st_size, stat.st_mtime_ns,
                                   stat.st_ctime_ns)
        except OSError as why:
            return f"error: {path}: cannot read the photo ({why.strerror})"
    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(digest, paths))
    problems = [d[len("error: "):] for d in digests if d.startswith("error: ")]
    if problems:
        raise problems_error(problems, "the images")
    return digests


def cache_key(paths: list[str], preprocess: Preprocess, boxes: np.ndarray | None = None) -> str:
    """Name of the cache for these files (path and content) under this preprocessing."""
    signature = list(zip(map(os.path.abspath, paths), photo_digests(paths)))
    digest = hashlib.sha1(json.dumps([CACHE_VERSION, preprocess.to_dict(), signature]).encode())
    if boxes is not None:
        digest.update(np.ascontiguousarray(boxes, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def build_cache(paths: list[str], preprocess: Preprocess, cache_dir: str | Path,
                boxes: np.ndarray | None = None, progress: bool = True,
                threads: int | None = None) -> np.ndarray:
    """Decode, crop and resize every photo once; return a read-only uint8 memmap [N, H, W, C].

    The cache file is named by cache_key, so a later run (epoch, fold, process) with the same files
    and preprocessing reuses it, and a changed image or setting builds a new one. All corrupt images
    are reported together and nothing is written then.
    """
    return build_caches(paths, [(preprocess, boxes)], cache_dir, progress, threads)[0]


def build_caches(paths: list[str], variants: list[tuple[Preprocess, np.ndarray | None]],
                 cache_dir: str | Path, progress: bool = True,
                 threads: int | None = None) -> list[np.ndarray]:
    """build_cache for several (preprocess, boxes) variants at once, decoding each photo once
    (an ensemble of models at different resolutions or crops). A cache file that is torn (a
    copy cut short, a disk error) is rebuilt; temp files of killed builds are removed."""
    cache_dir = Path(cache_dir)
    remove_stale_temps(cache_dir, ".images-*")  # killed cache builds
    remove_stale_temps(cache_dir, ".*.tmp")  # killed atomic writes (the face-box cache's)
    targets = [cache_dir / f"images-{cache_key(paths, pre, boxes)}.npy" for pre, boxes in variants]
    shapes = [(len(paths), *pre.cached_size, pre.channels) for pre, _ in variants]
    caches = [_open_cache(target, shape) for target, shape in zip(targets, shapes)]
    todo = [i for i, cache in enumerate(caches) if cache is None]
    if todo:
        _fill_caches(paths, [variants[i] for i in todo], [targets[i] for i in todo], progress,
                     threads)
    return [cache if cache is not None else _open_cache(target, shape, rebuilt=True)
            for cache, target, shape in zip(caches, targets, shapes)]


# the cache files this process reads, each with a shared lock held until the process exits (its
# memmaps may live as long), so that prune never deletes them
_HELD: dict[str, object] = {}


@atexit.register
def _release_held() -> None:
    """Close the held handles at exit (the kernel would drop the locks anyway; closing them keeps
    the interpreter from warning about open files)."""
    while _HELD:
        _HELD.popitem()[1].close()


def _hold(target: Path) -> bool:
    """Take (or keep) this process's shared lock on ``target`` and mark it used now (prune goes
    oldest first); False when it vanished meanwhile (pruned: rebuild it)."""
    key = os.path.abspath(target)
    try:
        handle = hold_shared(target)
        same = os.fstat(handle.fileno()).st_ino == os.stat(target).st_ino
    except FileNotFoundError:
        return False
    if not same:  # deleted between open and lock: the name now means nothing, or another file
        handle.close()
        return False
    old = _HELD.pop(key, None)
    if old is not None:
        old.close()
    _HELD[key] = handle
    try:  # the .json's time, not the .npy's: the .npy's stays its build's
        os.utime(target.with_suffix(".json"))
    except OSError:  # another user's cache, or no .json: its age stays the build's
        pass
    return True


def _open_cache(target: Path, shape: tuple, rebuilt: bool = False) -> np.ndarray | None:
    """The cache file as a read-only memmap, None when it is missing or torn (then removed, so
    it is rebuilt: its name says which photos and preprocessing it holds, never its state)."""
    if not target.exists() or not _hold(target):
        return None
    try:
        images = np.load(target, mmap_mode="r")
        if images.shape == shape and images.dtype == np.uint8:
            return images
        why = f"holds {images.dtype} {list(images.shape)}, expected uint8 {list(shape)}"
    except (ValueError, OSError, EOFError) as error:  # truncated, empty, not an .npy
        why = str(error).splitlines()[0] if str(error) else type(error).__name__
    if rebuilt:
        raise UserError(f"{target}: the image cache just written is unreadable ({why}); check "
                        "the disk and delete the file")
    print(f"warning: {target}: torn image cache ({why}); rebuilding it", flush=True)
    target.unlink(missing_ok=True)
    return None


def _fill_caches(paths, variants, targets, progress, threads) -> None:
    targets[0].parent.mkdir(parents=True, exist_ok=True)
    temps, outputs, locks = [], [], []
    problems: list[str] = []
    try:
        for (pre, _), target in zip(variants, targets):
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".npy")
            os.close(fd)
            temps.append(tmp)
            locks.append(lock_temp(tmp))
            height, width = pre.cached_size
            outputs.append(np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.uint8, shape=(len(paths), height, width, pre.channels)))
            _reserve(tmp, target)

        def work(i: int) -> None:
            try:
                image = decode_image(paths[i])
            except UserError as why:
                problems.append(str(why))
                return
            try:
                for out, (pre, boxes) in zip(outputs, variants):
                    out[i] = preprocess_image(image, pre, None if boxes is None else boxes[i])
            except UserError as why:  # a photo smaller than --crop_size
                problems.append(f"{paths[i]}: {why}")

        # OpenCV releases the GIL while decoding, so threads decode in parallel
        with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            jobs = pool.map(work, range(len(paths)))
            if progress:
                from tqdm import tqdm
                jobs = tqdm(jobs, total=len(paths), desc="decoding photos into the cache",
                            leave=False, disable=None)  # None: no bar when not on a terminal
            for _ in jobs:
                pass
        if problems:
            raise problems_error(sorted(problems), "the images")
        for out, tmp, target, (pre, _) in zip(outputs, temps, targets, variants):
            out.flush()
            os.chmod(tmp, file_mode())  # mkstemp makes 0600; a cache is shared like any file
            os.replace(tmp, target)
            atomic_write_text(target.with_suffix(".json"), json.dumps(
                {"preprocess": pre.to_dict(), "n_images": len(paths), "first": paths[:1]}))
    finally:
        outputs.clear()  # the memmaps closed before their files are removed
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
        for lock in locks:
            lock.close()


def _reserve(tmp: str, target: Path) -> None:
    """Allocate every byte of the (sparse) memmap file now: on a full disk this is one OSError
    naming the cache, where writing into unallocated pages later would kill the process with a
    bus error."""
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as why:
        raise OSError(why.errno, f"{why.strerror} (writing the image cache)", str(target)) from None
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# The cache folder: its entries listed and pruned (python -m maskface.image_cache)
# ----------------------------------------------------------------------------------------------
SIZE_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}
AGE_UNITS = {"d": 86400, "h": 3600, "m": 60}


@dataclass
class CacheEntry:
    """One cache: images-<key>.npy (the pixels) and images-<key>.json (what they are)."""
    name: str
    files: list[Path]
    size: int
    last_use: float  # its build, or the latest job that opened it (the .json's mtime)
    holds: str       # resize, crop, interpolation, margin, edges, photos
    complete: bool   # False: the .json alone (a prune cut short); never read, rebuilt when needed


def cache_entries(cache_dir: Path) -> list[CacheEntry]:
    """Every entry of the cache folder, oldest first."""
    entries = []
    for name in sorted({p.stem for p in Path(cache_dir).glob("images-*.npy")}
                       | {p.stem for p in Path(cache_dir).glob("images-*.json")}):
        files = [f for f in (cache_dir / f"{name}.npy", cache_dir / f"{name}.json") if f.exists()]
        try:
            stats = [f.stat() for f in files]
        except FileNotFoundError:  # pruned by another call while listed
            continue
        entries.append(CacheEntry(name, files, sum(st.st_size for st in stats),
                                  max(st.st_mtime for st in stats),
                                  _describe(cache_dir / f"{name}.json"),
                                  files[0].suffix == ".npy"))
    return sorted(entries, key=lambda e: e.last_use)


def _describe(info: Path) -> str:
    try:
        record = json.loads(info.read_text())
        pre = Preprocess.from_dict(record["preprocess"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"
    parts = ["{}x{}".format(*pre.resize), pre.crop, pre.interpolation]
    parts += [f"margin {pre.crop_margin:g}"] * bool(pre.crop_margin) + ["canny"] * pre.canny
    return " ".join(parts) + f", {record.get('n_images', '?')} photos"


def parse_size(text: str) -> int:
    """'2G', '500M', '1.5 GiB', '0' -> bytes (K, M, G, T: powers of 1024)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not found:
        raise UserError(f"--max_size {text}: expected a size such as 2G, 500M or 0")
    return int(float(found.group(1)) * SIZE_UNITS[found.group(2).upper()])


def parse_age(text: str) -> float:
    """'30d', '12h', '90m', '7' (days) -> seconds."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhm]?)\s*", text, re.IGNORECASE)
    if not found:
        raise UserError(f"--older_than {text}: expected an age such as 30d, 12h or 7 (days)")
    return float(found.group(1)) * AGE_UNITS[found.group(2).lower() or "d"]


def shown_size(size: float) -> str:
    unit = next(u for u in ("T", "G", "M", "K", "") if size >= SIZE_UNITS[u] or u == "")
    return f"{size / SIZE_UNITS[unit]:.1f} {unit}B" if unit else f"{int(size)} B"


def _lock_unless_in_use(entry: CacheEntry) -> tuple[bool, object | None]:
    """(whether a running job reads the entry, else an exclusive lock on its .npy held for the
    caller to close): an entry without its .npy (a prune cut short, or gone meanwhile) is read by
    no job and needs no lock."""
    if not entry.complete:
        return False, None
    try:
        handle = try_lock_exclusive(entry.files[0])
    except FileNotFoundError:
        return False, None
    return handle is None, handle


def _in_use(entry: CacheEntry) -> bool:
    in_use, handle = _lock_unless_in_use(entry)
    if handle is not None:
        handle.close()
    return in_use


def list_cache(cache_dir: Path) -> list[CacheEntry]:
    """Print every entry (oldest first): name, what it holds, size, last use, in use or not."""
    entries = cache_entries(cache_dir)
    now = time.time()
    for e in entries:
        state = "in use" if _in_use(e) else "" if e.complete else "incomplete (no .npy): pruned first"
        print(f"{e.name}  {e.holds}  {shown_size(e.size)}  used {_ago(now - e.last_use)}"
              + (f"  {state}" if state else ""))
    faces = cache_dir / "face_boxes.csv"  # face.FACE_BOX_CACHE: the detections, never pruned
    extra = f"; {faces.name} {shown_size(faces.stat().st_size)} (never pruned)" \
        if faces.is_file() else ""
    print(f"{len(entries)} cache entr{'y' if len(entries) == 1 else 'ies'}, "
          f"{shown_size(sum(e.size for e in entries))} in {cache_dir}{extra}")
    return entries


def _ago(seconds: float) -> str:
    for unit, span in AGE_UNITS.items():  # days, hours, minutes
        if seconds >= span:
            return f"{seconds / span:.0f}{unit} ago"
    return "just now"


def _delete(entry: CacheEntry) -> bool:
    """Delete an entry no running job holds (checked under an exclusive lock, kept while
    deleting); the .npy first, at once: a prune cut short leaves at most its .json, which no run
    reads (a run rebuilds a cache whose .npy is missing)."""
    in_use, handle = _lock_unless_in_use(entry)
    if in_use:
        return False
    try:
        for f in entry.files:
            f.unlink(missing_ok=True)
    finally:
        if handle is not None:
            handle.close()
    return True


def prune_cache(cache_dir: Path, max_size: int | None = None, older_than: float | None = None,
                dry_run: bool = False) -> list[CacheEntry]:
    """Delete entries, oldest first, until the rest is at most ``max_size`` bytes, and every
    entry unused for ``older_than`` seconds; an entry a running job reads is skipped and said.
    Returns the entries deleted (with ``dry_run``: that would be)."""
    remove_stale_temps(cache_dir, ".images-*")  # killed builds
    entries = cache_entries(cache_dir)
    total, now, deleted = sum(e.size for e in entries), time.time(), []
    for entry in entries:
        old = older_than is not None and now - entry.last_use > older_than
        if not (old or not entry.complete or max_size is not None and total > max_size):
            continue
        if dry_run and not _in_use(entry) or not dry_run and _delete(entry):
            deleted.append(entry)
            total -= entry.size
            print(f"{'would delete' if dry_run else 'deleted'} {entry.name}  {entry.holds}  "
                  f"{shown_size(entry.size)}  used {_ago(now - entry.last_use)}")
        else:
            print(f"skipped {entry.name}: in use by a running job")
    print(f"{'would free' if dry_run else 'freed'} {shown_size(sum(e.size for e in deleted))}; "
          f"{shown_size(total)} left in {cache_dir}"
          + (f" (above --max_size {shown_size(max_size)}: the rest is in use)"
             if max_size is not None and total > max_size else ""))
    return deleted


def get_args_parser() -> FlagParser:
    parser = FlagParser(description="The image cache folder: list its entries (oldest first) or "
                                    "prune them. An entry a running job reads is never deleted.")
    parser.add_argument("--cache_dir", default=".cache", help="the cache folder (train.py's, "
                        "inference.py's --cache_dir)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,prune}")
    commands.add_parser("list", help="every entry: what it holds, size, last use, in use",
                        description="Every cache entry, oldest use first: its name, what it "
                                    "holds (size, crop, resizing, photos), its size, when a job "
                                    "last opened it, and whether a running job reads it now.")
    prune = commands.add_parser(
        "prune", help="delete the oldest entries (never one in use)",
        description="Delete cache entries, least recently used first, until the rest fits "
                    "--max_size, and every entry unused for --older_than. An entry a running "
                    "job reads is skipped (and said); a later run rebuilds what it needs.")
    prune.add_argument("--max_size", default=None, metavar="SIZE",
                       help="keep at most this much, e.g. 2G, 500M, 0 (K, M, G, T: powers of 1024)")
    prune.add_argument("--older_than", default=None, metavar="AGE",
                       help="delete entries unused for this long, e.g. 30d, 12h, 7 (days)")
    prune.add_argument("--dry_run", action="store_true", help="only say what would be deleted")
    return parser


def cache_main(args: argparse.Namespace) -> list[CacheEntry]:
    """The command line: every flag checked before anything is deleted."""
    cache_dir = Path(args.cache_dir)
    if not cache_dir.is_dir():
        raise UserError(f"--cache_dir {cache_dir}: no such folder; expected an image cache "
                        "folder (train.py's --cache_dir)")
    if args.command == "list":
        return list_cache(cache_dir)
    if args.max_size is None and args.older_than is None:
        raise UserError("prune: give --max_size SIZE, --older_than AGE or both")
    max_size = None if args.max_size is None else parse_size(args.max_size)
    older_than = None if args.older_than is None else parse_age(args.older_than)
    if older_than is not None and not math.isfinite(older_than):
        raise UserError(f"--older_than {args.older_than}: expected a finite age")
    return prune_cache(cache_dir, max_size, older_than, args.dry_run)


if __name__ == "__main__":
    sys.exit(run_cli(cache_main, get_args_parser().parse_args))
