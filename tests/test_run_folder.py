"""maskface.run_folder: run folder numbering, no folder left by a failure before the first
checkpoint, the photo record a --resume checks."""
import shutil

import pandas as pd
import pytest

import train
from maskface import (
    config,
    engine,
    run_folder,
)
from maskface.cli import UserError


@pytest.mark.slow
def test_a_resume_on_changed_photos_is_refused_unless_accepted(own_train_dir, tmp_path, run_flags,
        replace_keeping_size_and_date):
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


def test_run_folder_numbering_with_dotted_names(tmp_path):
    names = [run_folder.new_run_dir(tmp_path, "lr1e-3.v2").name for _ in range(3)]
    assert names == ["lr1e-3.v2", "lr1e-3.v22", "lr1e-3.v23"]
    assert [run_folder.new_run_dir(tmp_path, "exp").name for _ in range(2)] == ["exp", "exp2"]


def test_any_failure_before_the_first_checkpoint_leaves_no_folder(tiny_train_dir, tmp_path, run,
                                                                  monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(engine, "train_one_epoch", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(tiny_train_dir, tmp_path, "--epochs", "1", "--name", "oom")
    assert not (tmp_path / "runs" / "oom").exists()
