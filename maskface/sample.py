"""Deterministic synthetic face-mask dataset in exactly the competition's layout.

The real data cannot ship with the project, so tests and smoke runs use cartoon portraits drawn with
OpenCV. Every label is visible in the pixels but none is trivial: mask state from a mask over the
nose / below it / absent, gender from hair length, face width and brow weight (overlapping between
people), age from grey hair, wrinkles and skin tone that change continuously with age, so the age
groups blur at the 30 and 60 boundaries as they do in the real data.

    python -m maskface.sample --out sample_data --n_train_people 180 --n_eval_people 40 --seed 0
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from maskface.cli import FlagParser, UserError, run_cli
from maskface.files import lock_temp, remove_stale_temps
from maskface.labels import (
    GENDER_NAMES,
    MASK_BY_STEM,
    MASK_NAMES,
    PHOTO_STEMS,
    age_group,
    encode_class,
)

WIDTH, HEIGHT = 384, 512
JPEG_QUALITY = 90
FORMAT_VERSION = 1  # bump whenever the drawing changes, so stale samples on disk get regenerated
MARKER = ".complete"
TRAIN_SPLIT, EVAL_SPLIT, SHUFFLE_STREAM = 0, 1, 2  # separate RNG streams: eval people never repeat train people
SHIFT = 4  # OpenCV fixed-point bits: sub-pixel coordinates keep small faces smooth
AA = cv2.LINE_AA

# Colours are BGR because OpenCV encodes BGR arrays; the JPEGs come out as ordinary RGB images.
RACES = ("Asian", "Black", "White", "Others")
RACE_PROBS = (0.55, 0.15, 0.20, 0.10)
SKIN = {"Asian": (150, 185, 225), "Black": (60, 85, 125), "White": (170, 195, 235), "Others": (105, 145, 190)}
HAIR = np.array([(25, 25, 30), (30, 45, 70), (45, 70, 110), (110, 170, 210), (40, 70, 150)], np.float64)
HAIR_PROBS = {"Asian": (0.7, 0.25, 0.05, 0, 0), "Black": (0.85, 0.15, 0, 0, 0),
              "White": (0.15, 0.3, 0.3, 0.18, 0.07), "Others": (0.5, 0.35, 0.15, 0, 0)}
GREY_HAIR = np.array((200, 200, 205), np.float64)
MASK_COLOURS = np.array([(245, 245, 245), (225, 190, 140), (30, 30, 30), (190, 160, 240), (90, 40, 20),
                         (140, 140, 140), (170, 200, 215), (80, 140, 60), (60, 60, 200), (200, 120, 60),
                         (120, 200, 230), (150, 90, 150)], np.float64)
NUM_MASK_STYLES = 5  # surgical, kf94, cloth, patterned, cup; mask1..mask5 each get a different one

@dataclass(frozen=True)
class Person:
    """Identity shared by a person's 7 photos; face geometry is in units of the head half-height."""
    gender: int  # index into GENDER_NAMES
    race: str
    age: int
    skin: np.ndarray
    hair: np.ndarray
    clothes: np.ndarray
    hair_length: float  # how far long hair falls below the chin; <= 0.15 means short hair
    hairline: float
    face_width: float
    eye_spacing: float
    brow: float
    wrinkles: float  # 0..1
    grey: float  # 0..1, fraction of the way to white hair
    centre: tuple[float, float]
    scale: float  # head half-height in pixels
    mask_styles: tuple[tuple[int, int], ...]  # (style, colour index) for mask1..mask5, incorrect_mask
    incorrect_top: float  # where the incorrectly worn mask starts: under the nose or on the chin


def sample_person(rng: np.random.Generator) -> Person:
    """Draw one identity with the competition's imbalances: ~3:2 female:male, few people 60+."""
    gender = GENDER_NAMES.index("female") if rng.random() < 0.6 else GENDER_NAMES.index("male")
    male = GENDER_NAMES[gender] == "male"
    group = rng.choice(3, p=(0.45, 0.45, 0.10))
    # 60 is the largest age recorded, as in the real data where "60+" is nearly always exactly 60
    age = int((rng.integers(18, 30), rng.integers(30, 60), 60)[group])
    race = RACES[rng.choice(len(RACES), p=RACE_PROBS)]
    ageing = (age - 18) / 42  # 0 at 18, 1 at 60: every age cue follows it continuously, plus noise
    grey = float(np.clip(1.2 * ageing - 0.25 + rng.normal(0, 0.12), 0, 1))
    hair = HAIR[rng.choice(len(HAIR), p=HAIR_PROBS[race])] * rng.uniform(0.85, 1.15)
    face_height = rng.uniform(0.30, 0.55) * HEIGHT  # real portraits crop faces at varying sizes
    styles = rng.permutation(NUM_MASK_STYLES).tolist() + [int(rng.integers(NUM_MASK_STYLES))]
    colours = rng.choice(len(MASK_COLOURS), size=len(PHOTO_STEMS) - 1, replace=False).tolist()
    return Person(
        gender=gender, race=race, age=age,
        skin=np.array(SKIN[race]) * rng.uniform(0.88, 1.1) * (1 - 0.1 * ageing),
        hair=(1 - grey) * hair + grey * GREY_HAIR,
        clothes=rng.uniform(20, 235, 3),
        hair_length=float(np.clip(rng.normal(-0.1, 0.3) if male else rng.normal(0.8, 0.45), -0.3, 1.6)),
        hairline=float(rng.normal(-0.47, 0.05) - (0.2 * ageing if male else 0)),  # men's hair recedes
        face_width=float(rng.normal(0.80 if male else 0.73, 0.035)),
        eye_spacing=float(rng.normal(0.33, 0.025)),
        brow=float(max(rng.normal(0.05 if male else 0.035, 0.01), 0.015)),
        wrinkles=float(np.clip(1.1 * ageing - 0.15 + rng.normal(0, 0.12), 0, 1)),
        grey=grey,
        centre=(WIDTH / 2 + rng.normal(0, 18), rng.uniform(0.36, 0.48) * HEIGHT),
        scale=face_height / 2,
        mask_styles=tuple(zip(styles, colours)),
        # incorrectly worn: mostly just under the nose, sometimes down on the chin
        incorrect_top=float(rng.choice((0.32, 0.6), p=(0.7, 0.3)) + rng.normal(0, 0.02)),
    )


class FaceFrame:
    """Maps face coordinates (u right, v down, head half-heights, origin mid-face) to pixels."""

    def __init__(self, cx: float, cy: float, scale: float, angle_deg: float) -> None:
        self.cx, self.cy, self.scale, self.angle = cx, cy, scale, angle_deg
        rad = np.deg2rad(angle_deg)
        self.rot = np.array([[np.cos(rad), -np.sin(rad)], [np.sin(rad), np.cos(rad)]])

    def px(self, uv) -> np.ndarray:
        xy = np.asarray(uv, np.float64).reshape(-1, 2) @ self.rot.T * self.scale + (self.cx, self.cy)
        return np.round(xy * (1 << SHIFT)).astype(np.int32)

    def length(self, value: float) -> int:
        return max(1, round(value * self.scale))

    def poly(self, img, uv, colour, closed: bool = True, thickness: int = -1) -> None:
        if thickness < 0:
            cv2.fillPoly(img, [self.px(uv)], colour, AA, SHIFT)
        else:
            cv2.polylines(img, [self.px(uv)], closed, colour, thickness, AA, SHIFT)

    def ellipse(self, img, centre, axes, colour, start=0, end=360, thickness: int = -1) -> None:
        axes_px = tuple(int(a * self.scale * (1 << SHIFT)) for a in axes)
        cv2.ellipse(img, tuple(self.px(centre)[0]), axes_px, self.angle, start, end, colour, thickness, AA, SHIFT)


def _cap(width: float, top: float, squareness: float = 1.0, n: int = 24) -> np.ndarray:
    """Lower part of the jaw ellipse below the line v=top: the outline of a mask on the face."""
    centre_v, half_w, half_h = 0.05, width * 1.06, 1.02
    edge = np.arccos(np.clip((top - centre_v) / half_h, -1, 1))
    phi = np.linspace(-edge, edge, n)
    sin = np.sign(np.sin(phi)) * np.abs(np.sin(phi)) ** squareness  # <1 squares off the corners
    return np.stack([half_w * sin, centre_v + half_h * np.cos(phi)], 1)


def draw_mask(img, frame: FaceFrame, p: Person, style: int, colour: np.ndarray, top: float) -> None:
    col, dark = colour.tolist(), (colour * 0.7).tolist()
    w = p.face_width
    outline = _cap(w, top, squareness=0.6 if style in (0, 3) else 1.0)
    if style == 1:  # kf94: folded to a point under the chin, with a centre seam
        outline = np.vstack([outline[:1], (-w * 0.9, 0.75), (0, 1.15), (w * 0.9, 0.75), outline[-1:]])
    if top < 0.2:  # worn properly the top edge rises over the nose bridge
        outline = np.vstack([outline, (0, top - 0.07)])
    for side in (-1, 1):  # ear loops
        frame.poly(img, [(side * w * 0.95, top + 0.02), (side * w, 0.05), (side * w * 0.9, min(top + 0.5, 0.9))],
                   dark, closed=False, thickness=frame.length(0.012))
    if style == 4:  # cup respirator with a valve
        mid = (top + 1.08) / 2
        frame.ellipse(img, (0, mid), (w * 0.82, (1.08 - top) / 2 + 0.03), col)
        frame.ellipse(img, (w * 0.3, mid + 0.1), (0.09, 0.09), dark)
        return
    frame.poly(img, outline, col)
    frame.poly(img, outline, dark, thickness=frame.length(0.015))
    if style == 0:  # surgical pleats, kept inside the outline
        for v in np.linspace(top + 0.12, min(top + 0.45, 0.95), 3):
            half = w * np.sqrt(max(1 - ((v - 0.05) / 1.02) ** 2, 0)) * 0.9
            frame.poly(img, [(-half, v), (half, v)], dark, closed=False, thickness=frame.length(0.012))
    elif style == 1:
        frame.poly(img, [(0, top - 0.07), (0, 1.15)], dark, closed=False, thickness=frame.length(0.012))
    elif style == 3:  # patterned fabric
        accent = (255 - colour).tolist()
        for u in np.arange(-w, w, 0.14):
            for v in np.arange(top + 0.08, 1.0, 0.14):
                if (u / (w * 1.06)) ** 2 + ((v - 0.05) / 1.02) ** 2 < 0.8:
                    frame.ellipse(img, (u, v), (0.025, 0.025), accent)


def draw_photo(p: Person, stem: str, rng: np.random.Generator) -> np.ndarray:
    """One 512x384 BGR photo of ``p``: identity fixed, pose, light, noise and background per photo."""
    # background: a wall with soft brightness blotches and a vertical gradient. Built at 6x4 and
    # upscaled bilinearly: the blotches come out smooth, the gradient stays linear, and it is cheap.
    wall = rng.uniform(60, 230) + rng.normal(0, 25, 3) + rng.normal(0, 15, (6, 4, 1)) + rng.normal(0, 5, (6, 4, 3))
    wall += np.linspace(-1, 1, 6)[:, None, None] * rng.normal(0, 20)
    img = cv2.resize(np.clip(wall, 0, 255).astype(np.uint8), (WIDTH, HEIGHT))
    cx, cy = p.centre
    frame = FaceFrame(cx + rng.normal(0, 5), cy + rng.normal(0, 5), p.scale * rng.uniform(0.97, 1.03),
                      angle_deg=rng.normal(0, 4))
    w, skin = p.face_width, p.skin
    skin_c, shade = skin.tolist(), (skin * 0.8).tolist()
    hair_c = p.hair.tolist()

    # shoulders: a rounded top continued down past the bottom edge of the photo
    frame.ellipse(img, (0, 2.6), (2.4, 1.2), p.clothes.tolist(), 180, 360)
    frame.poly(img, [(-2.4, 2.6), (2.4, 2.6), (2.4, 12), (-2.4, 12)], p.clothes.tolist())
    frame.poly(img, [(-0.3, 0.6), (0.3, 0.6), (0.33, 1.6), (-0.33, 1.6)], shade)  # neck
    long_hair = p.hair_length > 0.15
    frame.ellipse(img, (0, -0.05), (w + (0.16 if long_hair else 0.05), 1.02), hair_c)
    if long_hair:
        bottom = 1 + p.hair_length
        frame.poly(img, [(-w - 0.16, -0.05), (w + 0.16, -0.05), (w + 0.3, 0.7), (w + 0.26, bottom),
                         (0, bottom + 0.08), (-w - 0.26, bottom), (-w - 0.3, 0.7)], hair_c)
    for side in (-1, 1):
        frame.ellipse(img, (side * w, 0.05), (0.1, 0.17), shade)
    frame.ellipse(img, (0, 0.05), (w, 0.95), skin_c)
    # fringe: the top half of an ellipse from the hairline up to the crown
    frame.ellipse(img, (0, p.hairline), (w * 1.03, 1.05 + p.hairline), hair_c, 180, 360)
    n_strands = int(p.grey * 40)
    if n_strands:  # grey strands show ageing even through dark dye-like base colours
        angle = rng.uniform(np.pi * 1.1, np.pi * 1.9, n_strands)
        radius = rng.uniform(0.4, 0.95, n_strands)
        roots = np.stack([w * radius * np.cos(angle), p.hairline + (1.05 + p.hairline) * radius * np.sin(angle)], 1)
        strands = np.stack([roots, roots + (0.0, 0.12)], 1)
        cv2.polylines(img, [frame.px(s) for s in strands], False, GREY_HAIR.tolist(), frame.length(0.01), AA, SHIFT)

    es = p.eye_spacing
    for side in (-1, 1):
        frame.poly(img, [(side * (es - 0.12), -0.2), (side * (es + 0.1), -0.22)], hair_c, False, frame.length(p.brow))
        frame.ellipse(img, (side * es, -0.08), (0.09, 0.045), (235, 235, 235))
        frame.ellipse(img, (side * es, -0.08), (0.038, 0.038), (40, 30, 20))
        if p.wrinkles > 0.3:  # crow's feet and eye bags
            tone = (skin * (1 - 0.35 * p.wrinkles)).tolist()
            for dv in (-0.03, 0.0, 0.03):
                crease = [(side * (es + 0.11), -0.08 + dv), (side * (es + 0.18), -0.08 + 2 * dv)]
                frame.poly(img, crease, tone, False, 1)
            frame.ellipse(img, (side * es, -0.04), (0.08, 0.04), tone, 20, 160, 1)
    if p.wrinkles > 0.1:  # forehead lines, darker and more numerous with age
        tone = (skin * (1 - 0.3 * p.wrinkles)).tolist()
        for v in np.linspace(-0.33, p.hairline + 0.06, 1 + int(3 * p.wrinkles)):
            frame.ellipse(img, (0, v + 0.15), (w * 0.55, 0.15), tone, 235, 305, frame.length(0.012))
    frame.poly(img, [(0, -0.05), (-0.07, 0.22), (0.06, 0.25)], shade, False, frame.length(0.015))
    frame.ellipse(img, (0, 0.5), (0.18, 0.055), (skin * (0.45, 0.45, 0.85)).tolist())
    frame.poly(img, [(-0.17, 0.5), (0.17, 0.5)], (skin * 0.3).tolist(), False, frame.length(0.012))
    if p.wrinkles > 0.5:  # nasolabial folds
        for side in (-1, 1):
            frame.poly(img, [(side * 0.1, 0.26), (side * 0.2, 0.5)], shade, False, frame.length(0.01))

    mask_state = MASK_BY_STEM[stem]
    if mask_state != MASK_NAMES.index("not_wear"):
        style, colour = p.mask_styles[PHOTO_STEMS.index(stem)]
        top = rng.normal(-0.02, 0.03) if mask_state == MASK_NAMES.index("wear") else p.incorrect_top
        draw_mask(img, frame, p, style, MASK_COLOURS[colour] * rng.uniform(0.9, 1.05), top)

    # camera: lighting gradient, exposure, colour cast and sensor noise. The gain is a plane, so it is
    # computed at the centres of an 8x6 grid and upscaled bilinearly: exact but for a thin border strip.
    rows, cols = ((np.arange(n) + 0.5) / n * 2 - 1 for n in (8, 6))
    plane = 1 + rng.normal(0, 0.15) * cols[None, :] + rng.normal(0, 0.1) * rows[:, None]
    gain = plane[..., None] * rng.uniform(0.8, 1.15) * (1 + rng.normal(0, 0.04, 3))
    out = cv2.multiply(img, cv2.resize(gain.astype(np.float32), (WIDTH, HEIGHT)), dtype=cv2.CV_32F)
    # noise drawn at half resolution: 4x cheaper, and real sensor noise is blurred by demosaicing anyway
    noise = rng.standard_normal((HEIGHT // 2, WIDTH // 2, 3), dtype=np.float32) * np.float32(rng.uniform(2, 7))
    out += cv2.resize(noise, (WIDTH, HEIGHT))
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


def eval_image_id(seed: int, person_index: int, stem: str) -> str:
    """Eval file name: a sha1 like the competition's, reproducible from (seed, person, photo)."""
    return hashlib.sha1(f"maskface-sample:{seed}:{person_index}:{stem}".encode()).hexdigest() + ".jpg"


def _write_jpeg(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    path.write_bytes(buf.tobytes())


def _person_photos(seed: int, split: int, index: int):
    """(person, [(stem, image), ...]); each photo has its own RNG stream so runs are byte-identical."""
    person = sample_person(np.random.default_rng([seed, split, index, 0]))
    return person, [(stem, draw_photo(person, stem, np.random.default_rng([seed, split, index, k + 1])))
                    for k, stem in enumerate(PHOTO_STEMS)]


def _build(root: Path, n_train_people: int, n_eval_people: int, seed: int) -> None:
    rows = []
    for i in range(n_train_people):
        person, photos = _person_photos(seed, TRAIN_SPLIT, i)
        person_id, gender = f"{i + 1:06d}", GENDER_NAMES[person.gender]
        folder = f"{person_id}_{gender}_{person.race}_{person.age}"
        (root / "train" / "images" / folder).mkdir(parents=True)
        for stem, img in photos:
            _write_jpeg(root / "train" / "images" / folder / f"{stem}.jpg", img)
        rows.append((person_id, gender, person.race, person.age, folder))
    train_csv = pd.DataFrame(rows, columns=["id", "gender", "race", "age", "path"])
    train_csv.to_csv(root / "train" / "train.csv", index=False)

    (root / "eval" / "images").mkdir(parents=True)
    answers = []
    for i in range(n_eval_people):
        person, photos = _person_photos(seed, EVAL_SPLIT, i)
        for stem, img in photos:
            image_id = eval_image_id(seed, i, stem)
            _write_jpeg(root / "eval" / "images" / image_id, img)
            label = encode_class(MASK_BY_STEM[stem], person.gender, age_group(person.age))
            answers.append((image_id, int(label)))
    order = np.random.default_rng([seed, SHUFFLE_STREAM]).permutation(len(answers))
    answers_df = pd.DataFrame([answers[k] for k in order], columns=["ImageID", "ans"])
    answers_df.to_csv(root / "eval" / "answers.csv", index=False)
    answers_df.assign(ans=0).to_csv(root / "eval" / "info.csv", index=False)  # the competition ships ans=0


def read_marker(out_dir: Path) -> dict | None:
    try:
        marker = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def files_of(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative, sorted), its marker and lock left out."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")
                  if p.is_file() and p.name not in (MARKER, ".lock"))


def generated_here(relative: str, marker: dict) -> bool:
    """Whether the sample of ``marker`` wrote ``relative``: the list it records, or (a marker of an
    earlier version, without one) the names the generator writes."""
    listed = marker.get("files")
    if isinstance(listed, list):
        return relative in listed
    parts = Path(relative).parts
    return (parts in (("eval", "info.csv"), ("eval", "answers.csv"))
            or (parts[:2] in (("train", "images"), ("eval", "images"))
                and Path(relative).suffix in (".jpg", ".jpeg", ".png")))


def generate_sample(out_dir: str | Path, n_train_people: int = 180, n_eval_people: int = 40, seed: int = 0) -> Path:
    """Write the sample to ``out_dir`` (reused as is when already generated with the same parameters).

    The whole tree is built in a temporary sibling directory and renamed into place, so an
    interrupted run never leaves a half-written dataset at ``out_dir``; that one rename is what
    makes the writes atomic, so the files inside need no temp file + os.replace of their own.
    """
    out_dir = Path(out_dir)
    if not (1 <= n_train_people <= 999_999 and n_eval_people >= 1 and seed >= 0):
        raise UserError(f"n_train_people={n_train_people}, n_eval_people={n_eval_people}, seed={seed}: "
                        "expected 1..999999 train people, at least 1 eval person and a seed >= 0")
    params = {"format": FORMAT_VERSION, "n_train_people": n_train_people, "n_eval_people": n_eval_people, "seed": seed}
    marker = read_marker(out_dir)
    if marker is not None and {k: v for k, v in marker.items() if k != "files"} == params:
        return out_dir
    if out_dir.exists() and (not out_dir.is_dir() or (marker is None and any(out_dir.iterdir()))):
        raise UserError(f"{out_dir} exists and is not a generated sample (no {MARKER}); "
                        "remove it or pick another --out")
    if marker is not None:  # an older sample is replaced whole: only when it holds nothing else
        foreign = [p for p in files_of(out_dir) if not generated_here(p, marker)]
        if foreign:
            raise UserError(f"{out_dir}: holds {len(foreign)} file(s) the sample generator did "
                            f"not write (first: {foreign[0]}); a new sample would replace the "
                            "folder: move them out, or pick another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir.parent, f".{out_dir.name}.tmp-*")  # a killed generation's
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only, which the published dataset should not be
    (tmp / ".lock").touch()
    lock = lock_temp(tmp / ".lock")  # held while building: the folder is not a stale one
    try:
        _build(tmp, n_train_people, n_eval_people, seed)
        # the files written, so that a later sample replaces only these (never a user's file)
        (tmp / MARKER).write_text(json.dumps({**params, "files": files_of(tmp)}))
        (tmp / ".lock").unlink()  # not part of the sample; the open handle keeps the lock
        if out_dir.exists():  # an older sample (other parameters) or an empty dir: move it aside first
            os.replace(out_dir, tmp.with_name(tmp.name + "-old"))
        try:
            os.replace(tmp, out_dir)
        except OSError:  # a concurrent run finished first; its result is as good as ours if params match
            if {k: v for k, v in (read_marker(out_dir) or {}).items() if k != "files"} != params:
                raise
    finally:
        lock.close()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp.with_name(tmp.name + "-old"), ignore_errors=True)
    return out_dir


# ----------------------------------------------------------------------------------------------
# Where the data is: a flag, the SageMaker-style variable, else this bundled sample
# ----------------------------------------------------------------------------------------------


def get_args_parser() -> FlagParser:
    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="sample_data", help="output directory")
    parser.add_argument("--n_train_people", type=int, default=180, help="people in train/")
    parser.add_argument("--n_eval_people", type=int, default=40, help="people in eval/")
    parser.add_argument("--seed", type=int, default=0, help="the same seed draws the same people")
    return parser


def main(args: argparse.Namespace) -> Path:
    start = time.perf_counter()
    out = generate_sample(args.out, args.n_train_people, args.n_eval_people, args.seed)
    print(f"sample ready at {out} ({time.perf_counter() - start:.1f} s)")
    return out


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args))
