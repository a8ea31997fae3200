"""maskface.dataset: the train and eval layouts parsed and checked, splits and folds grouped by
person, balancing, relabeling and folds files checked cell by cell, cached batches (a one-image
last batch merged)."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import train
from maskface import config, dataset, labels
from maskface.cli import UserError


# ---------------------------------------------------------------------------- parsing
def test_parser_reads_layout(tiny_train_dir):
    frame = dataset.parse_train_dir(tiny_train_dir)
    assert len(frame) == 24 * 7
    assert frame["path"].is_monotonic_increasing
    per_person = frame.groupby("profile")["mask"].apply(sorted)
    assert all(masks == [0, 0, 0, 0, 0, 1, 2] for masks in per_person)
    labelled = dataset.add_labels(frame)
    assert labelled["label"].between(0, 17).all()


def _layout(tmp_path: Path, source: Path, folders: dict[str, list[str]]) -> Path:
    """Build a layout under tmp_path/images from one real photo copied under many names."""
    root = tmp_path / "images"
    for folder, names in folders.items():
        (root / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(source, root / folder / name)
    return root


ALL = [f"{stem}.jpg" for stem in labels.PHOTO_STEMS]


@pytest.mark.parametrize("folders, expected", [
    ({"000001_female_Asian": ALL}, "000001_female_Asian: folder name does not parse"),
    ({"000001_female_Asian_old": ALL}, "age 'old' is not a number"),
    ({"000001_woman_Asian_45": ALL}, "gender 'woman' is not male/female"),
    ({"000001_female_Asian_45": ALL + ["mask1.png"]}, "mask1.png: duplicate photo"),
])
def test_parser_rejects_bad_layout(tmp_path, tiny_train_dir, folders, expected):
    source = next(tiny_train_dir.glob("*/normal.jpg"))
    root = _layout(tmp_path, source, {"000002_male_Black_33": ALL, **folders})
    with pytest.raises(UserError, match=expected):
        dataset.parse_train_dir(root)


def test_parser_reports_all_problems_at_once_and_names_paths(tmp_path, tiny_train_dir):
    source = next(tiny_train_dir.glob("*/normal.jpg"))
    root = _layout(tmp_path, source, {"a_b": ALL, "1_x_y_2": ALL, "3_male_z_q": ALL})
    (root / "000009_male_Asian_20").mkdir()
    (root / "000009_male_Asian_20" / "normal.jpg").write_bytes(b"not an image at all")
    with pytest.raises(UserError) as caught:
        dataset.parse_train_dir(root)
    text = str(caught.value)
    assert "4 problem(s)" in text
    for name in ("a_b", "1_x_y_2", "3_male_z_q", "000009_male_Asian_20/normal.jpg"):
        assert name in text


def test_missing_photos_warn_hidden_files_ignored(tmp_path, tiny_train_dir):
    source = next(tiny_train_dir.glob("*/normal.jpg"))
    root = _layout(tmp_path, source, {"000001_female_Asian_45": ALL[:5]})
    (root / ".DS_Store").write_text("x")
    (root / "000001_female_Asian_45" / "._mask1.jpg").write_text("x")
    said = []
    frame = dataset.parse_train_dir(root, warn=said.append)
    assert len(frame) == 5
    assert len(said) == 1 and "missing photo(s) incorrect_mask, normal" in said[0]


def test_eval_parsing(tiny_sample, tmp_path):
    info = dataset.parse_eval_dir(tiny_sample / "eval")
    assert len(info) == 4 * 7 and all(Path(p).is_file() for p in info["path"])
    broken = tmp_path / "eval"
    shutil.copytree(tiny_sample / "eval", broken)
    first = info["ImageID"].iloc[0]
    (broken / "images" / first).unlink()
    with pytest.raises(UserError, match=f"no image for ImageID {first}"):
        dataset.parse_eval_dir(broken)
    pd.DataFrame({"id": [1]}).to_csv(broken / "info.csv", index=False)
    with pytest.raises(UserError, match="missing column.*ImageID"):
        dataset.parse_eval_dir(broken)
    (broken / "info.csv").write_text("ImageID,ans\n")
    with pytest.raises(UserError, match="info.csv: no rows"):
        dataset.parse_eval_dir(broken)
    (broken / "info.csv").write_text(f"ImageID,ans\n{first},0\n,0\n")
    with pytest.raises(UserError, match="info.csv: row 3 has no ImageID"):
        dataset.parse_eval_dir(broken)
    second = info["ImageID"].iloc[1]
    (broken / "info.csv").write_text(f"ImageID,ans\n{second},0\n")
    said = []
    assert list(dataset.parse_eval_dir(broken, warn=said.append)["ImageID"]) == [second]
    assert len(said) == 1 and f"{4 * 7 - 2} image(s)" in said[0] and "no prediction" in said[0]


# ---------------------------------------------------------------------------- splits
def _people_frame(n_people=50, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_people):
        gender, age = int(rng.integers(2)), int(rng.choice([20, 25, 35, 45, 55, 60]))
        for stem, mask in labels.MASK_BY_STEM.items():
            rows.append({"path": f"/d/{i:06d}_x_y_{age}/{stem}.jpg", "profile": f"{i:06d}_x_y_{age}",
                         "id": f"{i:06d}", "gender": gender, "race": "y", "age": age,
                         "mask": mask, "stem": stem})
    return dataset.add_labels(pd.DataFrame(rows).sort_values("path", ignore_index=True))


def test_profile_split_no_leak_exact_count_order_independent():
    frame = _people_frame(50)
    train, val = dataset.split_by_profile(frame, 0.2, seed=3)
    train_people, val_people = set(frame.profile[train]), set(frame.profile[val])
    assert not train_people & val_people
    assert len(val_people) == round(50 * 0.2)
    assert len(train) + len(val) == len(frame)
    shuffled = frame.sample(frac=1, random_state=1).reset_index(drop=True)
    _, val2 = dataset.split_by_profile(shuffled, 0.2, seed=3)
    assert set(shuffled.profile[val2]) == val_people
    _, val3 = dataset.split_by_profile(frame, 0.2, seed=4)
    assert set(frame.profile[val3]) != val_people


def test_image_split_is_the_leaky_one():
    frame = _people_frame(30)
    train, val = dataset.split_by_image(frame, 0.2, seed=0)
    assert len(val) == round(len(frame) * 0.2)
    assert set(frame.profile[train]) & set(frame.profile[val])  # documented leak
    assert dataset.SPLITS["MaskBaseDataset"] is dataset.split_by_image


def test_kfold_each_person_in_one_val_fold():
    frame = _people_frame(40)
    folds = dataset.kfold_assignments(frame, 5, seed=0)
    assert sorted(folds.index) == sorted(frame.profile.unique())
    assert sorted(folds.unique()) == [0, 1, 2, 3, 4]
    shuffled = frame.sample(frac=1, random_state=2).reset_index(drop=True)
    assert dataset.kfold_assignments(shuffled, 5, seed=0).equals(folds)


def test_kfold_says_in_one_line_when_a_class_is_rarer_than_the_folds(recwarn):
    frame = _people_frame(12)
    said = []
    dataset.kfold_assignments(frame, 5, seed=0, warn=said.append)
    assert len(said) == 1 and "fewer people than the 5 folds" in said[0]
    assert not [w for w in recwarn if "least populated" in str(w.message)]


@pytest.mark.parametrize("mode", ["10s", "gene"])
def test_balancing_repeats_only_train_people(mode):
    frame = _people_frame(60)
    train, val = dataset.split_by_profile(frame, 0.25, seed=0)
    balanced = dataset.balance_people(frame, train, mode, seed=0)
    assert set(balanced) == set(train)  # only train rows, all of them
    assert not set(balanced) & set(val)
    assert len(balanced) > len(train)
    counts = pd.Series(balanced).value_counts()
    # a person's photos are repeated together
    per_person = frame.loc[counts.index].assign(n=counts.values).groupby("profile")["n"].nunique()
    assert (per_person == 1).all()
    assert np.array_equal(dataset.balance_people(frame, train, mode, seed=0), balanced)
    assert np.array_equal(dataset.balance_people(frame, train, "imbalance", 0), train)


def test_training_targets_categories_and_old_age():
    frame = _people_frame(20)
    for category, n in labels.CATEGORY_CLASSES.items():
        targets = dataset.training_targets(frame, category)
        assert targets.min() >= 0 and targets.max() < n
    frame58 = dataset.add_labels(frame, old_age=50)
    assert (frame58.loc[frame58.age == 55, "train_age"] == 2).all()
    assert (frame58.loc[frame58.age == 55, "age_group"] == 1).all()  # scored with the true 60
    six = dataset.training_targets(frame, "multi", age_label_num=6)
    assert six.max() < 36
    assert np.array_equal(six // 12, frame["mask"].to_numpy())


# ---------------------------------------------------------------------------- relabel
def test_relabel_changes_exactly_named_labels(tiny_train_dir, tmp_path):
    frame = dataset.parse_train_dir(tiny_train_dir)
    first, second = sorted(frame["id"].unique())[:2]
    relabel = tmp_path / "relabel.csv"
    old_gender = frame.loc[frame.id == first, "gender"].iloc[0]
    relabel.write_text(f"id,gender,age,swap_mask\n{first},{labels.GENDER_NAMES[1 - old_gender]},,\n"
                       f"{second},,61,true\n")
    said = []
    fixed = dataset.parse_train_dir(tiny_train_dir, relabel=relabel, warn=said.append)
    assert "2 people changed" in said[-1]
    assert (fixed.loc[fixed.id == first, "gender"] == 1 - old_gender).all()
    assert (fixed.loc[fixed.id == second, "age"] == 61).all()
    before = frame.set_index("path")["mask"]
    after = fixed.set_index("path")["mask"]
    changed = before[before != after].index
    assert sorted(Path(p).stem for p in changed) == ["incorrect_mask", "normal"]
    others = fixed[~fixed.id.isin([first, second])]
    assert others.equals(frame[~frame.id.isin([first, second])])


@pytest.mark.parametrize("content, expected", [
    ("id,gender\nnobody,male\n", "id 'nobody' is not a profile"),
    ("id,gender\n{id},robot\n", "gender 'robot' is not male/female"),
    ("id,age\n{id},old\n", "age 'old' is not a number"),
    ("id,swap_mask\n{id},maybe\n", "swap_mask 'maybe' is not true/false"),
    ("name,gender\n{id},male\n", "expected 'id'"),
])
def test_relabel_bad_rows_fail_clearly(tiny_train_dir, tmp_path, content, expected):
    some_id = dataset.parse_train_dir(tiny_train_dir)["id"].iloc[0]
    relabel = tmp_path / "relabel.csv"
    relabel.write_text(content.format(id=some_id))
    with pytest.raises(UserError, match=expected):
        dataset.parse_train_dir(tiny_train_dir, relabel=relabel)


def test_cached_batches_cover_rows_in_order_and_shuffled():
    images = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    rows = np.array([7, 3, 3, 9, 0])
    targets = np.array([70, 30, 30, 90, 0])
    ordered = list(dataset.CachedBatches(images, targets, rows, 2, preload=False))
    assert [b[2].tolist() for b in ordered] == [[7, 3], [3, 9], [0]]
    for batch_images, batch_targets, batch_rows in ordered:
        assert np.array_equal(batch_images.numpy(), images[batch_rows])
        assert batch_targets.tolist() == [r * 10 for r in batch_rows]
    torch.manual_seed(0)
    resident = list(dataset.CachedBatches(images, targets, rows, 2, shuffle=True, preload=True))
    torch.manual_seed(0)
    streamed = list(dataset.CachedBatches(images, targets, rows, 2, shuffle=True, preload=False))
    for a, b in zip(resident, streamed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert sorted(np.concatenate([b[2] for b in resident]).tolist()) == sorted(rows.tolist())


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


@pytest.mark.slow
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


def test_a_one_image_last_batch_is_merged_and_other_tails_unchanged():
    def sizes(n: int, batch: int) -> list[int]:
        images = np.zeros((n, 4, 4, 3), dtype=np.uint8)
        batches = dataset.CachedBatches(images, np.zeros(n, dtype=int), np.arange(n), batch,
                                        shuffle=True)
        picks = batches.batch_picks()
        assert len(picks) == len(batches)
        return [len(p) for p in picks]
    assert sizes(33, 32) == [33]
    assert sizes(49, 16) == [16, 16, 17]
    assert sizes(34, 32) == [32, 2] and sizes(64, 32) == [32, 32] and sizes(1, 32) == [1]
    # batch sizes without a one-image tail draw exactly the batches they always drew
    images = np.zeros((50, 4, 4, 3), dtype=np.uint8)
    batches = dataset.CachedBatches(images, np.zeros(50, dtype=int), np.arange(50), 16,
                                    shuffle=True)
    torch.manual_seed(3)
    drawn = batches.batch_picks()
    torch.manual_seed(3)
    order = torch.randperm(50)
    assert all(torch.equal(a, b) for a, b in zip(drawn, order.split(16)))
