"""The reliability promises (docs/reliability.md), each fault reproduced: a resume that
would change the experiment, a checkpoint that would run code, a path that climbs out of its
folder, a full disk, a kill at a bad moment, hand-edited files, and a photo replaced behind the
cache's back."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import inference
import train
from maskface import config, dataset, face, files, image_cache, model as models, sample
from maskface.checkpoint import load_checkpoint
from maskface.cli import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def own_train_dir(tiny_train_dir, tmp_path) -> Path:
    """A copy of the tiny sample's photos that a test may change."""
    return Path(shutil.copytree(tiny_train_dir, tmp_path / "data" / "images"))


def replace_keeping_size_and_date(path: Path) -> None:
    """Another photo of exactly the same byte size, its mtime set back: what `cp -p` or an unzip
    of an edited archive leave."""
    before = path.stat()
    image = image_cache.decode_image(str(path))
    for quality in range(95, 5, -1):  # a re-encoding that can be padded to the old size
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(255 - image, cv2.COLOR_RGB2BGR),
                                [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok and data.size <= before.st_size:
            break
    payload = data.tobytes()
    path.write_bytes(payload + b"\0" * (before.st_size - len(payload)))  # JPEG ignores the tail
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size


# ---------------------------------------------------------------------------- 1. resume
def test_a_resume_that_would_change_a_setting_is_refused(tiny_train_dir, tmp_path, run_flags):
    run_dir = train.main(config.parse_args(run_flags(tiny_train_dir, tmp_path, "--epochs", "1")))["run_dir"]
    config_before = (run_dir / "config.json").read_text()
    with pytest.raises(UserError, match=r"--resume .*: --lr 0\.1 differs from the run's 0\.001 "
                                        r"\(.*config\.json\); a resumed run keeps its settings except "
                                        r"--epochs"):
        config.parse_args(["--resume", str(run_dir), "--lr", "0.1", "--epochs", "2"])
    assert (run_dir / "config.json").read_text() == config_before
    resumed = train.main(config.parse_args(["--resume", str(run_dir), "--epochs", "2"]))
    assert len(resumed["summary"]) == 2
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 2


def test_a_resume_on_changed_photos_is_refused_unless_accepted(own_train_dir, tmp_path, run_flags):
    run_dir = train.main(config.parse_args(run_flags(own_train_dir, tmp_path, "--epochs", "1")))["run_dir"]
    photo = sorted(own_train_dir.glob("*/mask3.jpg"))[2]
    replace_keeping_size_and_date(photo)
    relative = photo.relative_to(own_train_dir)
    with pytest.raises(UserError, match=rf"the training data changed since the run started: 1 "
                                        rf"photo\(s\) changed in content or label \(first: "
                                        rf"{relative}\); add --accept_data_change"):
        train.main(config.parse_args(["--resume", str(run_dir), "--epochs", "2"]))
    shutil.copytree(own_train_dir / relative.parent, own_train_dir / "999999_male_Asian_33")
    with pytest.raises(UserError, match=r"7 photo\(s\) added \(first: 999999_male_Asian_33/"):
        train.main(config.parse_args(["--resume", str(run_dir), "--epochs", "2"]))
    resumed = train.main(config.parse_args(["--resume", str(run_dir), "--epochs", "2",
                                           "--accept_data_change"]))
    assert len(resumed["summary"]) == 2
    photos = pd.read_csv(run_dir / "photos.csv")
    assert not photos["profile"].str.startswith("999999").any()  # the new person was left out


def test_a_kfold_resume_keeps_its_own_folds_and_names_new_people(own_train_dir, tmp_path,
                                                                 run_flags):
    flags = run_flags(own_train_dir, tmp_path, "--kfold", "2", "--epochs", "1", "--name", "cv",
                      "--early_stopping_patience", "0")
    run_dir = train.main(config.parse_args(flags + ["--fold", "0"]))["run_dir"]
    folds_before = (run_dir / "folds.csv").read_text()
    newcomer = own_train_dir / "999999_female_Asian_70"
    shutil.copytree(sorted(own_train_dir.iterdir())[0], newcomer)
    # before the fix the resume re-split the people, newcomer included, so fold 1's model could
    # train on people whose oof.csv rows fold 0's model scored (and the other way round)
    with pytest.raises(UserError, match=r"7 photo\(s\) added \(first: 999999_female_Asian_70/"):
        train.main(config.parse_args(["--resume", str(run_dir)]))
    result = train.main(config.parse_args(["--resume", str(run_dir), "--accept_data_change"]))
    assert (run_dir / "folds.csv").read_text() == folds_before
    oof = pd.read_csv(run_dir / "oof.csv")
    assert not oof["profile"].eq(newcomer.name).any()
    folds = pd.read_csv(run_dir / "folds.csv").set_index("profile")["fold"]
    assert (oof["fold"] == oof["profile"].map(folds)).all()
    assert np.isfinite(result["best_f1"])


def test_a_resume_of_a_torn_summary_rewrites_it_from_the_checkpoint(tiny_train_dir, tmp_path,
                                                                     run_flags):
    run_dir = train.main(config.parse_args(run_flags(tiny_train_dir, tmp_path, "--epochs", "2")))["run_dir"]
    lines = (run_dir / "summary.csv").read_text().splitlines()
    (run_dir / "summary.csv").write_text("\n".join(lines[:2]) + "\n")  # killed before epoch 2's row
    train.main(config.parse_args(["--resume", str(run_dir)]))  # nothing left to train
    assert (run_dir / "summary.csv").read_text().splitlines() == lines


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_a_torchrun_resume_is_exact_on_every_process(tiny_train_dir, tmp_path, run_flags):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                "2", "train.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = run_flags(tiny_train_dir, tmp_path, "--early_stopping_patience", "0", "--mixup")

    def launch(*extra: str, command=torchrun) -> None:
        done = subprocess.run(command + [*extra], cwd=ROOT, capture_output=True, text=True,
                              timeout=400, env=env)
        assert done.returncode == 0, done.stderr[-3000:]

    launch(*flags, "--epochs", "2", "--name", "whole")
    launch(*flags, "--epochs", "1", "--name", "halves")
    halves = tmp_path / "runs" / "halves"
    refused = subprocess.run([sys.executable, "train.py", "--resume", str(halves), "--epochs", "2"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "trained on 2 process(es), this is 1" in refused.stderr
    launch("--resume", str(halves), "--epochs", "2")
    whole = torch.load(tmp_path / "runs" / "whole" / "last.pth", weights_only=True)
    resumed = torch.load(halves / "last.pth", weights_only=True)
    assert resumed["epoch"] == whole["epoch"] == 2
    for key, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key


# ---------------------------------------------------------------------------- 2. loading runs no code
class WritesAFile:
    """A pickle payload: unpickling it would call open(...)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, capsys):
    target = tmp_path / "pwned"
    net = models.build_model("BaseModel", 18)
    evil = {"model_config": net.model_config, "model": net.state_dict(), "preprocess": {},
            "normalize": {}, "category": "multi", "payload": WritesAFile(target)}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(evil, run_dir / "best.pth")
    with pytest.raises(UserError, match=r"best\.pth: refused: it holds an object \(.*open.*\) "
                                        r"that loading would have to run code for"):
        load_checkpoint(run_dir / "best.pth")
    code = run_cli(inference.main, inference.parse_args, ["--model_dir", str(run_dir),
                                                         "--output_dir", str(tmp_path / "out")])
    assert code == 2 and not target.exists() and not (tmp_path / "out").exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_checkpoints_hold_only_what_weights_only_loading_takes(tiny_train_dir, tmp_path, run_flags):
    run_dir = train.main(config.parse_args(run_flags(tiny_train_dir, tmp_path, "--epochs", "1")))["run_dir"]
    for name in ("best.pth", "last.pth"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(run_dir / name) == []


# ---------------------------------------------------------------------------- 3. paths stay inside
@pytest.mark.parametrize("image_id", ["../../secret.jpg", "/etc/passwd", "sub/../../x.jpg"])
def test_an_image_id_outside_the_images_folder_is_refused_before_any_work(tiny_sample, tmp_path,
                                                                           image_id):
    eval_dir = Path(shutil.copytree(tiny_sample / "eval", tmp_path / "eval"))
    info = pd.read_csv(eval_dir / "info.csv", dtype=str)
    info.loc[2, "ImageID"] = image_id
    info.to_csv(eval_dir / "info.csv", index=False)
    with pytest.raises(UserError, match=rf"info\.csv:4: ImageID: '{image_id}' is not a file inside "):
        dataset.parse_eval_dir(eval_dir)


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


def test_an_atomic_write_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as error:
        files.atomic_write_text(tmp_path / "summary.csv", "epoch\n1\n")
    assert error.value.filename == str(tmp_path / "summary.csv")
    assert list(tmp_path.iterdir()) == []


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


def test_temp_files_of_killed_runs_are_removed_but_live_ones_kept(tiny_train_dir, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    killed, live = cache / ".images-0123.abc.npy", cache / ".images-4567.def.npy"
    orphan = cache / ".face_boxes.csv.xyz.tmp"
    for temp in (killed, live, orphan):
        temp.write_bytes(b"x" * 100)
        os.utime(temp, (time.time() - 3600, time.time() - 3600))
    holder = files.lock_temp(live)  # a run still writing it
    try:
        image_cache.build_cache([str(sorted(tiny_train_dir.glob("*/*.jpg"))[0])],
                                image_cache.Preprocess(resize=(32, 24)), cache, progress=False)
        assert not killed.exists() and not orphan.exists() and live.exists()
    finally:
        holder.close()
    sample_tmp = tmp_path / ".sample.tmp-abcd"
    (sample_tmp / "train").mkdir(parents=True)
    (sample_tmp / ".lock").touch()
    os.utime(sample_tmp, (time.time() - 3600, time.time() - 3600))
    sample.generate_sample(tmp_path / "sample", n_train_people=1, n_eval_people=1)
    assert not sample_tmp.exists()


def test_cache_files_get_the_umasks_permissions(tiny_train_dir, tmp_path):
    old = os.umask(0o027)
    try:
        image_cache.build_cache([str(sorted(tiny_train_dir.glob("*/*.jpg"))[0])],
                                image_cache.Preprocess(resize=(32, 24)), tmp_path, progress=False)
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {oct(0o640)}


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


# ---------------------------------------------------------------------------- 5. written together
def test_a_submission_and_its_probabilities_change_together(tmp_path, monkeypatch):
    submission, probs = tmp_path / "output.csv", tmp_path / "output_probs.csv"
    files.write_together({submission: b"old submission", probs: b"old probs"})
    real_write, real_replace = files._write_temp, os.replace

    def full_on_the_second(path, data):
        if path == probs:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, data)
    monkeypatch.setattr(files, "_write_temp", full_on_the_second)
    with pytest.raises(OSError):
        files.write_together({submission: b"new submission", probs: b"new probs"})
    assert (submission.read_bytes(), probs.read_bytes()) == (b"old submission", b"old probs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output.csv", "output_probs.csv"]
    monkeypatch.setattr(files, "_write_temp", real_write)

    renamed = []

    def killed_after_one_rename(source, target):
        if Path(target) in (submission, probs):
            if renamed:
                raise KeyboardInterrupt  # stands for a kill between the two renames
            renamed.append(target)
        real_replace(source, target)
    monkeypatch.setattr(os, "replace", killed_after_one_rename)
    with pytest.raises(KeyboardInterrupt):
        files.write_together({submission: b"new submission", probs: b"new probs"})
    monkeypatch.setattr(os, "replace", real_replace)
    assert submission.read_bytes() == b"new submission" and probs.read_bytes() == b"old probs"
    files.write_together({tmp_path / "other.csv": b"x", tmp_path / "other_probs.csv": b"y"})
    assert probs.read_bytes() == b"old probs"  # another pair's write leaves this one's journal
    files.finish_pending_writes(submission)  # what the next inference run does first
    assert (submission.read_bytes(), probs.read_bytes()) == (b"new submission", b"new probs")
    assert not list(tmp_path.glob(".*"))


# ---------------------------------------------------------------------------- 6. hand-edited files
@pytest.mark.parametrize("setting, expected", [
    ({"epochs": 2.0, "resize": [32.0, 24.0]}, None),  # whole numbers written as floats: fine
    ({"epochs": 2.5}, "setting 'epochs' is 2.5; expected an integer"),
    ({"batch_size": 1e12}, "--batch_size 1000000000000: expected 1 to 65,536"),
    ({"lr": float("nan")}, "--lr nan: expected a learning rate of 0 or more"),
    ({"resize": [100000, 24]}, "--resize 100000 24: expected H W of 16 to 4096 pixels"),
])
def test_hand_edited_config_numbers(tmp_path, setting, expected):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"data_dir": str(tmp_path / "nowhere"), **setting}))
    if expected is None:
        args = config.parse_args(["--config", str(config_file)])
        assert args.epochs == 2 and isinstance(args.epochs, int) and args.resize == [32, 24]
        return
    with pytest.raises(UserError, match=expected.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        train.main(config.parse_args(["--config", str(config_file)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


@pytest.mark.parametrize("content, expected", [
    ("", "empty; expected a header line id,gender,age,swap_mask"),
    ("id,age\n000001,²\n", r":2: age '²' is not a number of years 0\.\.150"),
    ("id,age\n000001,٤٥\n", r":2: age '٤٥' is not a number of years"),
    ("id,age\n000001,99999999999999999999999\n", ":2: age '99999999999999999999999' is not"),
    ("id,gender\n000001,male\n000002,female\n000001,female\n",
     r":4: id '000001' is relabelled differently on line 2"),
])
def test_bad_relabel_files_are_one_line(tiny_train_dir, tmp_path, content, expected):
    relabel = tmp_path / "relabel.csv"
    relabel.write_text(content, encoding="utf-8")
    frame = dataset.parse_train_dir(tiny_train_dir, warn=lambda _: None)
    with pytest.raises(UserError, match=expected) as error:
        dataset.apply_relabel(frame, relabel, warn=lambda _: None)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("cell", ["", "one", "1.5", "-1"])
def test_a_folds_file_with_a_bad_cell_names_the_line(tiny_train_dir, tmp_path, run_flags, cell):
    profiles = sorted(p.name for p in tiny_train_dir.iterdir())
    lines = ["profile,fold"] + [f"{p},{k % 2}" for k, p in enumerate(profiles)]
    lines[3] = f"{profiles[2]},{cell}"
    folds = tmp_path / "folds.csv"
    folds.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"folds\.csv:4: fold .* for {profiles[2]}; expected a "
                                        r"fold number"):
        train.main(config.parse_args(run_flags(tiny_train_dir, tmp_path, "--folds", str(folds))))
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- 7. stale pixels
def test_the_cache_never_serves_a_replaced_photo(own_train_dir, tmp_path):
    paths = [str(p) for p in sorted(own_train_dir.glob("*/*.jpg"))[:4]]
    preprocess = image_cache.Preprocess(resize=(32, 24))
    before = np.array(image_cache.build_cache(paths, preprocess, tmp_path / "cache", progress=False))
    replace_keeping_size_and_date(Path(paths[1]))  # same path, size and mtime: a stat key is fooled
    after = np.array(image_cache.build_cache(paths, preprocess, tmp_path / "cache", progress=False))
    assert np.array_equal(after[0], before[0]) and not np.array_equal(after[1], before[1])
    expected = image_cache.preprocess_image(image_cache.decode_image(paths[1]), preprocess)
    assert np.array_equal(after[1], expected)
