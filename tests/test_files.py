"""maskface.files: output paths checked, atomic writes on a full disk, outputs written together
(a submission and its probabilities), temp files of killed runs cleaned up, a read-only output
folder found before the work (inference.py, experiments.py select)."""
import errno
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import experiments
import inference
from maskface import files, image_cache, sample
from maskface.cli import UserError, run_cli
from maskface.files import check_output_path, read_csv_checked

# a folder no user can write, root included (sysfs refuses new files): a read-only output
UNWRITABLE = Path("/sys") if os.geteuid() == 0 else None


def test_output_paths_checked(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert check_output_path(tmp_path / "new" / "out.csv", "-o") == tmp_path / "new" / "out.csv"
    with pytest.raises(UserError, match="^-o .*a_file/out.csv: .*a_file is a file, not a folder"):
        check_output_path(a_file / "out.csv", "-o")
    with pytest.raises(UserError, match="is a folder; expected a file name"):
        check_output_path(tmp_path, "-o")
    with pytest.raises(UserError, match="is a file; expected a folder"):
        check_output_path(a_file, "--model_dir", folder=True)
    with pytest.raises(UserError, match="is a folder; expected a CSV file"):
        read_csv_checked(tmp_path, ["ImageID"])


def test_an_atomic_write_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as error:
        files.atomic_write_text(tmp_path / "summary.csv", "epoch\n1\n")
    assert error.value.filename == str(tmp_path / "summary.csv")
    assert list(tmp_path.iterdir()) == []


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


# ---------------------------------------------------------------------------- 5. written together
def test_a_submission_and_its_probabilities_change_together(tmp_path, monkeypatch):
    submission, probs = tmp_path / "output.csv", tmp_path / "output_probs.csv"
    files.write_together({submission: b"old submission", probs: b"old probs"})
    real_fsync, real_replace = os.fsync, os.replace
    synced = []

    def full_on_the_second(fd):  # the disk fills up while the second file (the probs) is written
        synced.append(fd)
        if len(synced) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", full_on_the_second)
    with pytest.raises(OSError) as error:
        files.write_together({submission: b"new submission", probs: b"new probs"})
    assert error.value.filename == str(probs)  # the second file's write failed, not the first
    assert (submission.read_bytes(), probs.read_bytes()) == (b"old submission", b"old probs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output.csv", "output_probs.csv"]
    monkeypatch.setattr(os, "fsync", real_fsync)

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


@pytest.mark.skipif(UNWRITABLE is None, reason="needs root for an unwritable folder")
def test_a_read_only_output_folder_is_found_before_the_work(run_copy, own_eval_dir, tmp_path):
    # before: the models loaded, the images decoded and predicted, then the write failed
    with pytest.raises(UserError, match=r"--output_dir /sys: /sys is not writable"):
        inference.main(inference.parse_args([
            "--model_dir", str(run_copy), "--data_dir", str(own_eval_dir), "--output_dir",
            str(UNWRITABLE), "--cache_dir", str(tmp_path / "cache"), "--device", "cpu"]))
    assert not (tmp_path / "cache").exists()


def oof_run(run_dir: Path, seed: int) -> Path:
    """The files of a finished k-fold run that selection reads (config.json, folds.csv, oof.csv),
    for 12 people in 3 folds with random probabilities."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"category": "multi", "kfold": 3}))
    profiles = [f"{k:06d}_male_Asian_20" for k in range(12)]
    pd.DataFrame({"profile": profiles, "fold": [k % 3 for k in range(12)]}).to_csv(
        run_dir / "folds.csv", index=False)
    table = pd.DataFrame({"path": [f"/d/{p}/mask1.jpg" for p in profiles], "profile": profiles,
                          "fold": [k % 3 for k in range(12)], "label": [k % 18 for k in range(12)]})
    probs = pd.DataFrame(rng.dirichlet(np.ones(18), 12), columns=[f"p{c}" for c in range(18)])
    pd.concat([table, probs], axis=1).to_csv(run_dir / "oof.csv", index=False)
    return run_dir


@pytest.mark.skipif(UNWRITABLE is None, reason="needs root for an unwritable folder")
def test_experiments_select_finds_a_read_only_output_before_the_work(tmp_path, capsys):
    runs = [str(oof_run(tmp_path / name, seed)) for seed, name in enumerate(("a", "b"))]
    code = run_cli(experiments.main, experiments.parse_args,
                   ["select", *runs, "-o", str(UNWRITABLE / "sel.json")])
    err = capsys.readouterr().err
    assert code == 2 and "/sys is not writable" in err, err


def test_import_user_module_reads_a_file_or_a_module_and_names_what_fails(tmp_path):
    good = tmp_path / "mine.py"
    good.write_text("VALUE = 7\n")
    module, source = files.import_user_module(str(good), "--x mine.py:f", "test_mod_")
    assert module.VALUE == 7 and source == str(good.resolve())
    assert module.__name__.startswith("test_mod_")
    module, _ = files.import_user_module("json", "--x json:f", "test_mod_")
    assert module.__name__ == "json"
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('bad\\nsecond line')\n")
    for name, expected in ((str(broken), f"--x: {broken} does not import (RuntimeError: bad)"),
                           (str(tmp_path / "gone.py"), f"--x: {tmp_path / 'gone.py'}: file not "
                                                       "found"),
                           ("no_such_module_here", "--x: ModuleNotFoundError: No module named "
                                                   "'no_such_module_here' (give a .py path")):
        with pytest.raises(UserError) as error:
            files.import_user_module(name, "--x", "test_mod_")
        assert str(error.value).startswith(expected) and "\n" not in str(error.value)
