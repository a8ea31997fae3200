"""maskface.files: output paths checked, atomic writes on a full disk, outputs written together
(a submission and its probabilities), temp files of killed runs cleaned up."""
import errno
import os
import time
from pathlib import Path

import pytest

from maskface import files, image_cache, sample
from maskface.cli import UserError
from maskface.files import check_output_path, read_csv_checked


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
