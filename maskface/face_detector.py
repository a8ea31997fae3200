"""Finding the face in one portrait offline: a chain of OpenCV Haar cascades (in the
opencv-python-headless 4.x wheel; 5.x dropped them), strongest first, then a face estimated from a
pair of detected eyes, because masks hide the nose and mouth that frontal cascades need. face.py
turns these boxes into crops for a whole data set, with a cache and fallbacks.
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass

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


# Tried in order; the first step with a plausible box wins (its largest box). Cumulative share of the
# dev set's masked photos given a right box (IoU >= 0.5 with the box of the person's unmasked photo)
# after each step: default 49%, alt2 58%, alt 59%, eye pairs at 256 px 74%, at 512 px 81% (the
# last step costs ~45 ms but runs only when all others failed), with 0.8% wrong boxes (IoU < 0.3).
# Incorrectly worn masks: 82% -> 98%; unmasked photos: 99.7%.
DETECTION_STEPS: tuple[CascadeStep | EyePairStep, ...] = (
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


def clip_box(box: tuple[float, float, float, float], image_w: int, image_h: int) -> Box:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, x1 = max(0, min(x0, image_w - 1)), max(1, min(x1, image_w))
    y0, y1 = max(0, min(y0, image_h - 1)), max(1, min(y1, image_h))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def detect_face(image_bgr: np.ndarray) -> tuple[Box, float, str] | None:
    """Find the face in a portrait: (box, score, method), or None when no detector finds one.

    Steps of DETECTION_STEPS run in order and the first one with a plausible box wins; among its
    plausible boxes the largest is the face (a portrait shows one person; smaller hits are masks,
    ears or background). score is the number of merged detection windows (face cascades) or the
    summed neighbour counts of the two eyes (eye pairs): higher is more confident. The box is
    clipped to the image.
    """
    if image_bgr is None or image_bgr.ndim not in (2, 3) or image_bgr.size == 0:
        raise UserError("detect_face: expected an H x W x 3 BGR image, got shape "
                        f"{getattr(image_bgr, 'shape', None)}")
    gray = image_bgr if image_bgr.ndim == 2 else cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY)
    image_h, image_w = gray.shape
    for step in DETECTION_STEPS:
        if isinstance(step, CascadeStep):
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
                     EYE_SEARCH_HEIGHT_FRACTION, cv2.__version__, DECODER))
    return hashlib.sha1(settings.encode()).hexdigest()[:12]
