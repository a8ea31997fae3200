"""maskface.sample: exact competition layout, determinism, labels that match the drawn
people, and a user's file in the folder never deleted."""
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from maskface.cli import UserError, run_cli
from maskface.labels import (
    GENDER_NAMES,
    MASK_BY_STEM,
    MASK_NAMES,
    NUM_CLASSES,
    PHOTO_STEMS,
    age_group,
    decode_class,
)
from maskface.sample import (
    RACES,
    eval_image_id,
    generate_sample,
    get_args_parser,
    main as sample_main,
    sample_person,
)

N_TRAIN, N_EVAL = 6, 2


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    return generate_sample(tmp_path_factory.mktemp("a") / "sample", N_TRAIN, N_EVAL, seed=3)


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_train_layout_and_csv(sample):
    folders = sorted(p for p in (sample / "train" / "images").iterdir())
    assert len(folders) == N_TRAIN
    csv = pd.read_csv(sample / "train" / "train.csv", dtype={"id": str})
    assert list(csv.columns) == ["id", "gender", "race", "age", "path"]
    assert list(csv.path) == [f.name for f in folders]
    for row, folder in zip(csv.itertuples(), folders):
        person_id, gender, race, age = folder.name.split("_")
        assert (row.id, row.gender, row.race, row.age) == (person_id, gender, race, int(age))
        assert len(person_id) == 6 and person_id.isdigit()
        assert gender in GENDER_NAMES and race in RACES and 18 <= int(age) <= 60
        assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s}.jpg" for s in PHOTO_STEMS)
    photo = cv2.imread(str(folders[0] / "mask1.jpg"))
    assert photo.shape == (512, 384, 3)
    assert photo.std() > 10  # a drawn portrait, not a blank frame


def test_eval_layout_and_answers(sample):
    info = pd.read_csv(sample / "eval" / "info.csv")
    answers = pd.read_csv(sample / "eval" / "answers.csv")
    assert list(info.columns) == list(answers.columns) == ["ImageID", "ans"]
    assert list(info.ImageID) == list(answers.ImageID)
    assert (info.ans == 0).all()
    assert len(answers) == N_EVAL * len(PHOTO_STEMS) == answers.ImageID.nunique()
    assert sorted(p.name for p in (sample / "eval" / "images").iterdir()) == sorted(answers.ImageID)
    for image_id in answers.ImageID:
        stem, ext = image_id.split(".")
        assert ext == "jpg" and len(stem) == 40 and int(stem, 16) >= 0
    assert cv2.imread(str(sample / "eval" / "images" / answers.ImageID[0])).shape == (512, 384, 3)
    assert answers.ans.between(0, NUM_CLASSES - 1).all()


def test_eval_answers_match_each_person(sample):
    answers = dict(pd.read_csv(sample / "eval" / "answers.csv").itertuples(index=False))
    # rows are shuffled, so the photos of one person must be spread out rather than in stem order
    assert list(answers)[:len(PHOTO_STEMS)] != [eval_image_id(3, 0, s) for s in PHOTO_STEMS]
    for person in range(N_EVAL):
        labels = {stem: answers[eval_image_id(3, person, stem)] for stem in PHOTO_STEMS}
        masks, genders, ages = zip(*(decode_class(label) for label in labels.values()))
        assert [MASK_NAMES[m] for m in masks] == ["wear"] * 5 + ["incorrect", "not_wear"]
        assert [m for m in masks] == [MASK_BY_STEM[s] for s in labels]
        assert len(set(genders)) == 1 and len(set(ages)) == 1  # one person, one gender and age group


def test_train_people_differ_from_eval_people(sample):
    train_photo = sorted((sample / "train" / "images").iterdir())[0] / "normal.jpg"
    eval_photos = {p.read_bytes() for p in (sample / "eval" / "images").iterdir()}
    assert train_photo.read_bytes() not in eval_photos


def test_deterministic_and_seed_dependent(sample, tmp_path):
    again = generate_sample(tmp_path / "again", N_TRAIN, N_EVAL, seed=3)
    assert _all_files(again) == _all_files(sample)
    other = generate_sample(tmp_path / "other", N_TRAIN, N_EVAL, seed=4)
    photos = {data for name, data in _all_files(sample).items() if name.endswith(".jpg")}
    assert not photos & {data for name, data in _all_files(other).items() if name.endswith(".jpg")}
    assert (pd.read_csv(sample / "eval" / "answers.csv").ImageID
            != pd.read_csv(other / "eval" / "answers.csv").ImageID).all()


def test_reuse_regenerate_and_refuse(tmp_path):
    out = generate_sample(tmp_path / "s", 2, 1, seed=0)
    (out / "train" / "train.csv").write_text("touched")  # reuse must not rewrite a complete sample
    assert generate_sample(out, 2, 1, seed=0) == out
    assert (out / "train" / "train.csv").read_text() == "touched"
    generate_sample(out, 3, 1, seed=0)  # other parameters replace the old sample
    assert len(list((out / "train" / "images").iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary directories left behind
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a generated sample"):
        generate_sample(foreign, 2, 1)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="n_train_people=0"):
        generate_sample(tmp_path / "bad", 0, 1)


def test_people_follow_competition_imbalances():
    people = [sample_person(np.random.default_rng([7, i])) for i in range(2000)]
    ages = np.array([p.age for p in people])
    groups = np.bincount(age_group(ages), minlength=3) / len(ages)
    assert abs(groups[0] - 0.45) < 0.03 and abs(groups[1] - 0.45) < 0.03 and abs(groups[2] - 0.10) < 0.02
    assert ages.min() == 18 and ages.max() == 60 and {57, 58, 59} <= set(ages)
    female = np.mean([GENDER_NAMES[p.gender] == "female" for p in people])
    assert abs(female - 0.6) < 0.03
    for p in people[:50]:  # face height 30-55% of the photo, centred in the upper-middle
        assert 0.30 * 512 <= 2 * p.scale <= 0.55 * 512 and 0.3 * 512 < p.centre[1] < 0.5 * 512


def test_the_sample_generator_never_deletes_a_users_file(tmp_path):
    out = generate_sample(tmp_path / "s", n_train_people=2, n_eval_people=1, seed=0)
    notes = out / "train" / "notes.txt"
    notes.write_text("mine")
    # before: the whole folder was replaced, notes.txt with it
    with pytest.raises(UserError, match=r"holds 1 file\(s\) the sample generator did not write "
                                        r"\(first: train/notes\.txt\)"):
        generate_sample(out, n_train_people=3, n_eval_people=1, seed=0)
    assert notes.read_text() == "mine"
    notes.unlink()
    generate_sample(out, n_train_people=3, n_eval_people=1, seed=0)  # only its own files
    assert len([p for p in (out / "train" / "images").iterdir()]) == 3


def test_the_sample_command_refuses_in_one_line(tmp_path, capsys):
    out = generate_sample(tmp_path / "s", n_train_people=2, n_eval_people=1, seed=0)
    (out / "mine.csv").write_text("a,b\n")
    code = run_cli(sample_main, get_args_parser().parse_args,
                   ["--out", str(out), "--n_train_people", "3", "--n_eval_people", "1"])
    assert code == 2 and "mine.csv" in capsys.readouterr().err
    assert (out / "mine.csv").is_file()
