"""maskface.submission: the submission's rows checked, every fold's checkpoint found in order."""
import numpy as np
import pandas as pd
import pytest

from maskface import submission
from maskface.cli import UserError


def test_validate_submission_rejects_bad_rows():
    info = pd.DataFrame({"ImageID": ["a.jpg", "b.jpg", "c.jpg"]})
    good = pd.DataFrame({"ImageID": ["a.jpg", "b.jpg", "c.jpg"], "ans": np.array([0, 17, 5])})
    submission.validate_submission(info, good)
    for bad, message in [
        (good.assign(ans=[0, 18, 5]), "not an integer 0..17"),
        (good.assign(ans=[0, -1, 5]), "not an integer 0..17"),
        (good.assign(ans=[0.0, 1.5, 5.0]), "expected integers"),
        (good.iloc[[1, 0, 2]].reset_index(drop=True), "order"),
        (good.iloc[:2], "count"),
    ]:
        with pytest.raises(UserError, match=message):
            submission.validate_submission(info, bad)


def test_find_checkpoints_takes_every_fold_in_order(tmp_path):
    kfold = tmp_path / "kfold"
    for fold in (0, 1, 2, 10):
        (kfold / f"fold{fold}").mkdir(parents=True)
        (kfold / f"fold{fold}" / "best.pth").touch()
    single = tmp_path / "single"
    single.mkdir()
    (single / "best.pth").touch()
    found = submission.find_checkpoints([kfold, single])
    assert [p.parent.name for p in found] == ["fold0", "fold1", "fold2", "fold10", "single"]
    with pytest.raises(UserError, match="more than once"):
        submission.find_checkpoints([single, single / "best.pth"])
    (kfold / "fold2" / "best.pth").unlink()
    with pytest.raises(UserError, match="fold2 has no best.pth"):
        submission.find_checkpoints([kfold])
    with pytest.raises(UserError, match="no best.pth"):
        submission.find_checkpoints([tmp_path / "single" / ".."])
