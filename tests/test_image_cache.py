"""maskface.image_cache: decode-once cache files, their reuse and rebuild, corrupt, tiny, torn
and replaced photos, full disks, permissions, centre boxes and interpolation in the key; the cache
folder listed and pruned (oldest first, never an entry a job reads, a cut-short prune rebuilt)."""
import errno
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_dataset import ALL, _layout  # a train folder of chosen people and photos

from maskface import dataset, image_cache
from maskface.cli import UserError, run_cli


# ---------------------------------------------------------------------------- 4. full disks, kills
def mount_small_tmpfs(folder: Path, size: str = "1m") -> bool:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True)
    return done.returncode == 0


def test_a_full_disk_under_the_image_cache_is_one_line_and_leaves_nothing(tiny_train_dir, tmp_path,
                                                                          capsys):
    full = tmp_path / "small"
    if not mount_small_tmpfs(full):
        pytest.skip("cannot mount a tmpfs here (not root, or no mount namespace)")
    try:
        paths = [str(p) for p in sorted(tiny_train_dir.glob("*/*.jpg"))]

        def build(_):
            image_cache.build_cache(paths, image_cache.Preprocess(resize=(128, 96)), full / "cache",
                                    progress=False)
        assert run_cli(build, lambda argv: None, []) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "No space left on device (writing the image cache)" in err
        assert err.startswith(f"error: {full / 'cache'}/images-")
        assert list((full / "cache").iterdir()) == []  # the temp file went with the error
    finally:
        subprocess.run(["umount", str(full)], check=False)


def test_a_full_disk_is_the_same_line_where_mounts_are_not_allowed(tiny_train_dir, tmp_path,
                                                                    monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    paths = [str(p) for p in sorted(tiny_train_dir.glob("*/*.jpg"))[:5]]
    with pytest.raises(OSError, match="No space left on device") as error:
        image_cache.build_cache(paths, image_cache.Preprocess(resize=(32, 24)), tmp_path / "c",
                                progress=False)
    assert error.value.filename.startswith(str(tmp_path / "c" / "images-"))
    assert list((tmp_path / "c").iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_a_torn_cache_file_is_rebuilt(tiny_train_dir, tmp_path, damage, capsys):
    paths = [str(p) for p in sorted(tiny_train_dir.glob("*/*.jpg"))[:6]]
    preprocess = image_cache.Preprocess(resize=(32, 24))
    first = np.array(image_cache.build_cache(paths, preprocess, tmp_path, progress=False))
    cache_file = next(tmp_path.glob("images-*.npy"))
    data = cache_file.read_bytes()
    cache_file.write_bytes({"truncate": data[: len(data) // 2], "empty": b"",
                            "garbage": b"not an array" * 10}[damage])
    again = image_cache.build_cache(paths, preprocess, tmp_path, progress=False)
    assert np.array_equal(again, first)
    assert "torn image cache" in capsys.readouterr().out


def test_cache_files_get_the_umasks_permissions(tiny_train_dir, tmp_path):
    old = os.umask(0o027)
    try:
        image_cache.build_cache([str(sorted(tiny_train_dir.glob("*/*.jpg"))[0])],
                                image_cache.Preprocess(resize=(32, 24)), tmp_path, progress=False)
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {oct(0o640)}


# ---------------------------------------------------------------------------- 7. stale pixels
def test_the_cache_never_serves_a_replaced_photo(own_train_dir, tmp_path,
        replace_keeping_size_and_date):
    paths = [str(p) for p in sorted(own_train_dir.glob("*/*.jpg"))[:4]]
    preprocess = image_cache.Preprocess(resize=(32, 24))
    before = np.array(image_cache.build_cache(paths, preprocess, tmp_path / "cache", progress=False))
    replace_keeping_size_and_date(Path(paths[1]))  # same path, size and mtime: a stat key is fooled
    after = np.array(image_cache.build_cache(paths, preprocess, tmp_path / "cache", progress=False))
    assert np.array_equal(after[0], before[0]) and not np.array_equal(after[1], before[1])
    expected = image_cache.preprocess_image(image_cache.decode_image(paths[1]), preprocess)
    assert np.array_equal(after[1], expected)


def test_corrupt_image_reported_by_cache_and_nothing_written(tmp_path, tiny_train_dir):
    source = next(tiny_train_dir.glob("*/normal.jpg"))
    root = _layout(tmp_path, source, {"000001_female_Asian_45": ALL})
    broken = root / "000001_female_Asian_45" / "mask3.jpg"
    broken.write_bytes(source.read_bytes()[:200])  # a JPEG header, then nothing
    frame = dataset.parse_train_dir(root)
    cache_dir = tmp_path / "cache"
    with pytest.raises(UserError, match="mask3.jpg: corrupt or unreadable image"):
        image_cache.build_cache(frame["path"].tolist(), image_cache.Preprocess(resize=(32, 24)), cache_dir,
                                progress=False)
    assert not list(cache_dir.glob("*.npy"))


def test_tiny_image_is_named_not_a_crash(tmp_path):
    import cv2
    tiny = tmp_path / "mask1.jpg"
    cv2.imwrite(str(tiny), np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(UserError, match=r"mask1.jpg: image is 1x1 pixels; expected a photo of at least 16x16"):
        image_cache.build_cache([str(tiny)], image_cache.Preprocess(resize=(32, 24)), tmp_path / "cache",
                                progress=False)


# ---------------------------------------------------------------------------- cache
def test_cache_reused_then_rebuilt_after_image_change(tiny_train_dir, tmp_path):
    frame = dataset.parse_train_dir(tiny_train_dir)
    photos = tmp_path / "photos"
    shutil.copytree(tiny_train_dir, photos)
    paths = [str(photos / Path(p).parent.name / Path(p).name) for p in frame["path"][:14]]
    pre = image_cache.Preprocess(resize=(40, 30))
    cache_dir = tmp_path / "cache"
    first = image_cache.build_cache(paths, pre, cache_dir, progress=False)
    assert first.dtype == np.uint8 and first.shape == (14, 40, 30, 3)
    stamp = {p: p.stat().st_mtime_ns for p in cache_dir.glob("*.npy")}
    again = image_cache.build_cache(paths, pre, cache_dir, progress=False)
    assert {p: p.stat().st_mtime_ns for p in cache_dir.glob("*.npy")} == stamp  # nothing rebuilt
    assert np.array_equal(first, again)
    # the same pixels as decoding the photo directly
    direct = image_cache.preprocess_image(image_cache.decode_image(paths[3]), pre)
    assert np.array_equal(first[3], direct)
    shutil.copy(paths[0], paths[3])  # change one image
    changed = image_cache.build_cache(paths, pre, cache_dir, progress=False)
    assert len(list(cache_dir.glob("*.npy"))) == 2
    assert np.array_equal(changed[3], first[0]) and not np.array_equal(changed[3], first[3])
    # another preprocessing is another cache
    image_cache.build_cache(paths, image_cache.Preprocess(resize=(40, 30), canny=True), cache_dir,
                            progress=False)
    assert len(list(cache_dir.glob("*.npy"))) == 3


def test_center_box_inside_image_with_aspect():
    assert image_cache.center_box(384, 512, 320 / 256) == (64, 96, 320, 416)  # the baseline's crop
    for width, height, aspect in [(384, 512, 128 / 96), (384, 512, 1.0), (1000, 500, 2.0)]:
        x0, y0, x1, y1 = image_cache.center_box(width, height, aspect)
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert abs((y1 - y0) / (x1 - x0) - aspect) < 0.05


def test_interpolation_is_preprocessing_and_its_default_keeps_old_cache_names(tiny_train_dir):
    import hashlib
    import json
    from dataclasses import replace

    from PIL import Image

    path = str(sorted(tiny_train_dir.glob("*/normal.*"))[0])
    default = image_cache.Preprocess(resize=(32, 24))
    # caches and checkpoints written before the field existed keep their names and meaning
    old = {"resize": [32, 24], "crop": "center", "canny": False, "face_margin": 0.4}
    assert default.to_dict() == old and image_cache.Preprocess.from_dict(old) == default
    files = [[str(Path(path).resolve()), image_cache.photo_digests([path])[0]]]  # path and content
    signature = json.dumps([image_cache.CACHE_VERSION, old, files])
    assert image_cache.cache_key([path], default) == hashlib.sha1(signature.encode()).hexdigest()[:16]
    bicubic = replace(default, interpolation="bicubic")
    assert image_cache.Preprocess.from_dict(bicubic.to_dict()) == bicubic
    assert image_cache.cache_key([path], bicubic) != image_cache.cache_key([path], default)
    # bicubic is Pillow's (antialiased, as timm's transforms) on the same crop
    image = image_cache.decode_image(path)
    x0, y0, x1, y1 = image_cache.center_box(image.shape[1], image.shape[0], 32 / 24)
    expected = np.asarray(Image.fromarray(image[y0:y1, x0:x1]).resize((24, 32), Image.BICUBIC))
    np.testing.assert_array_equal(image_cache.preprocess_image(image, bicubic), expected)
    assert not np.array_equal(image_cache.preprocess_image(image, default), expected)


# ---------------------------------------------------------------------------- issue 24: --crop_size
SEED_MEAN, SEED_STD = (0.548, 0.504, 0.479), (0.237, 0.247, 0.246)


def test_crop_size_then_resize_is_torchvisions_center_crop_then_resize(tiny_train_dir):
    """The seed team's notebook: CenterCrop(320, 256) -> Resize(224, 224) on a 512x384 photo."""
    from PIL import Image
    from torchvision import transforms

    path = str(sorted(tiny_train_dir.glob("*/mask1.*"))[0])
    seed = image_cache.Preprocess(resize=(224, 224), crop="center", interpolation="bilinear",
                                  crop_size=(320, 256))
    image = image_cache.decode_image(path)
    assert image.shape[:2] == (512, 384)
    theirs = transforms.Compose([transforms.CenterCrop((320, 256)), transforms.Resize((224, 224))])
    expected = np.asarray(theirs(Image.open(path).convert("RGB")))
    ours = image_cache.preprocess_image(image, seed)
    assert ours.shape == expected.shape == (224, 224, 3)
    # the same box and filter: only the JPEG decoders (OpenCV's, Pillow's) may differ by a level
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 2
    # the baseline's box (made to --resize's aspect) is another crop: the test can tell them apart
    other = image_cache.preprocess_image(image, image_cache.Preprocess(
        resize=(224, 224), interpolation="bilinear"))
    assert np.abs(other.astype(int) - expected.astype(int)).mean() > 5


def test_crop_size_is_in_the_cache_key_and_round_trips(tiny_train_dir):
    path = str(sorted(tiny_train_dir.glob("*/normal.*"))[0])
    plain = image_cache.Preprocess(resize=(32, 24))
    sized = image_cache.Preprocess(resize=(32, 24), crop_size=(320, 256))
    assert "crop_size" not in plain.to_dict()  # old cache names and checkpoints hold
    assert sized.to_dict()["crop_size"] == [320, 256]
    assert image_cache.Preprocess.from_dict(sized.to_dict()) == sized
    assert image_cache.cache_key([path], sized) != image_cache.cache_key([path], plain)


def test_a_photo_smaller_than_crop_size_is_named_and_nothing_written(tiny_train_dir, tmp_path):
    paths = [str(p) for p in sorted(tiny_train_dir.glob("*/normal.*"))[:2]]
    too_big = image_cache.Preprocess(resize=(32, 24), crop_size=(600, 256))
    with pytest.raises(UserError) as caught:
        image_cache.build_cache(paths, too_big, tmp_path / "cache", progress=False)
    assert str(caught.value).count("photo is 384x512 (WxH) pixels, smaller than --crop_size "
                                   "600 256") == 2
    assert paths[0] in str(caught.value)
    assert not list((tmp_path / "cache").glob("*.npy"))


# ---------------------------------------------------------------------------- listing and pruning
def cache_cli(capsys, cache_dir, *argv) -> tuple[int, str, str]:
    code = run_cli(image_cache.cache_main, image_cache.get_args_parser().parse_args,
                   ["--cache_dir", str(cache_dir), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def copy_entry(cache_dir: Path, source: Path, name: str, age_s: float) -> None:
    """Another entry like ``source`` (its .npy and .json), last used ``age_s`` ago; no job holds it."""
    for suffix in (".npy", ".json"):
        target = cache_dir / f"{name}{suffix}"
        shutil.copy(source.with_suffix(suffix), target)
        stamp = target.stat().st_mtime - age_s
        os.utime(target, (stamp, stamp))


def test_prune_deletes_oldest_first_and_never_an_entry_a_job_reads(tiny_train_dir, tmp_path,
                                                                   capsys):
    paths = [str(p) for p in sorted(tiny_train_dir.glob("*/*.jpg"))[:6]]
    cache = tmp_path / "cache"
    held = image_cache.build_cache(paths, image_cache.Preprocess(resize=(32, 24)), cache,
                                   progress=False)  # this process reads it: held until it exits
    mine = next(cache.glob("images-*.npy"))
    for name, days in (("images-old", 9), ("images-older", 20), ("images-new", 1)):
        copy_entry(cache, mine, name, days * 86400)
    code, out, _ = cache_cli(capsys, cache, "list")
    lines = out.splitlines()
    assert code == 0 and [line.split()[0] for line in lines[:4]] == [
        "images-older", "images-old", "images-new", mine.stem]  # oldest use first
    assert "32x24 center area, 6 photos" in lines[0] and lines[3].endswith("in use")
    assert lines[4].startswith("4 cache entries")
    size = mine.stat().st_size + mine.with_suffix(".json").stat().st_size
    code, out, _ = cache_cli(capsys, cache, "prune", "--max_size", str(size * 2 + 10))
    assert code == 0 and "deleted images-older" in out and "deleted images-old " in out
    assert {p.stem for p in cache.glob("images-*.npy")} == {"images-new", mine.stem}
    code, out, _ = cache_cli(capsys, cache, "prune", "--max_size", "0")
    assert "deleted images-new" in out and f"skipped {mine.stem}: in use by a running job" in out
    assert "the rest is in use" in out
    assert [p.name for p in cache.iterdir()] and {p.stem for p in cache.iterdir()} == {mine.stem}
    assert np.array_equal(held, image_cache.build_cache(paths, image_cache.Preprocess(
        resize=(32, 24)), cache, progress=False))


def test_prune_older_than_and_dry_run(tiny_train_dir, tmp_path, capsys):
    paths = [str(p) for p in sorted(tiny_train_dir.glob("*/*.jpg"))[:3]]
    cache = tmp_path / "cache"
    image_cache.build_cache(paths, image_cache.Preprocess(resize=(32, 24)), cache, progress=False)
    mine = next(cache.glob("images-*.npy"))
    copy_entry(cache, mine, "images-stale", 40 * 86400)
    code, out, _ = cache_cli(capsys, cache, "prune", "--older_than", "30d", "--dry_run")
    assert code == 0 and "would delete images-stale" in out and (cache / "images-stale.npy").exists()
    code, out, _ = cache_cli(capsys, cache, "prune", "--older_than", "30")
    assert "deleted images-stale" in out and not (cache / "images-stale.json").exists()
    assert mine.exists()


def test_a_prune_cut_short_leaves_an_entry_a_later_run_rebuilds(tiny_train_dir, tmp_path, capsys,
                                                                monkeypatch):
    import subprocess
    import sys
    paths = [str(p) for p in sorted(tiny_train_dir.glob("*/*.jpg"))[:4]]
    pre = image_cache.Preprocess(resize=(32, 24))
    cache = tmp_path / "cache"
    # built by another process (which has exited): no lock of this one on it
    subprocess.run([sys.executable, "-c", "import sys; from maskface import image_cache; "
                    "image_cache.build_cache(sys.argv[1:], image_cache.Preprocess(resize=(32, 24)),"
                    f" {str(cache)!r}, progress=False)", *paths], check=True, timeout=120,
                   cwd=Path(__file__).resolve().parents[1])
    entry = next(cache.glob("images-*.npy"))
    real_unlink = Path.unlink

    def killed_after_the_first_file(self, missing_ok=False):
        real_unlink(self, missing_ok=missing_ok)
        raise KeyboardInterrupt  # the kill, between the entry's two files

    monkeypatch.setattr(Path, "unlink", killed_after_the_first_file)
    with pytest.raises(KeyboardInterrupt):
        image_cache.prune_cache(cache, max_size=0)
    monkeypatch.undo()
    assert not entry.exists() and entry.with_suffix(".json").exists()  # half deleted
    assert "incomplete (no .npy)" in cache_cli(capsys, cache, "list")[1]
    images = image_cache.build_cache(paths, pre, cache, progress=False)  # rebuilt, not read
    direct = image_cache.preprocess_image(image_cache.decode_image(paths[2]), pre)
    assert entry.exists() and np.array_equal(images[2], direct)


@pytest.mark.parametrize("argv, message", [
    (["prune"], "prune: give --max_size SIZE, --older_than AGE or both"),
    (["prune", "--max_size", "2X"], "--max_size 2X: expected a size such as 2G, 500M or 0"),
    (["prune", "--older_than", "soon"], "--older_than soon: expected an age such as 30d"),
])
def test_bad_prune_flags_are_one_line_and_delete_nothing(tmp_path, capsys, argv, message):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "images-x.npy").write_bytes(b"x")
    code, out, err = cache_cli(capsys, cache, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert (cache / "images-x.npy").exists()
    code, _, err = cache_cli(capsys, tmp_path / "nothing", "list")
    assert code == 2 and "--cache_dir" in err and "no such folder" in err


def test_sizes_and_ages_read_as_people_write_them():
    assert image_cache.parse_size("2G") == 2 * 1024 ** 3
    assert image_cache.parse_size("1.5 GiB") == int(1.5 * 1024 ** 3)
    assert image_cache.parse_size("500m") == 500 * 1024 ** 2 and image_cache.parse_size("0") == 0
    assert image_cache.parse_age("12h") == 12 * 3600 and image_cache.parse_age("7") == 7 * 86400


@pytest.mark.slow
def test_an_entry_another_running_process_reads_is_kept_until_it_exits(tiny_train_dir, tmp_path,
                                                                       capsys):
    import sys
    paths = [str(p) for p in sorted(tiny_train_dir.glob("*/*.jpg"))[:3]]
    cache = tmp_path / "cache"
    job = subprocess.Popen(
        [sys.executable, "-c", "import sys; from maskface import image_cache; "
         "image_cache.build_cache(sys.argv[1:], image_cache.Preprocess(resize=(32, 24)), "
         f"{str(cache)!r}, progress=False); print('ready', flush=True); sys.stdin.read()", *paths],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1])
    try:
        assert job.stdout.readline().strip() == "ready"
        code, out, _ = cache_cli(capsys, cache, "prune", "--max_size", "0")
        assert code == 0 and "in use by a running job" in out and any(cache.glob("images-*.npy"))
    finally:
        job.communicate("", timeout=60)  # the job ends: its lock goes with it
    code, out, _ = cache_cli(capsys, cache, "prune", "--max_size", "0")
    assert "deleted images-" in out and not any(cache.glob("images-*"))
