import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from maskface import dataset, image_cache, labels
from maskface.cli import UserError


def test_label_round_trip_all_18_classes():
    seen = set()
    for mask in range(3):
        for gender in range(2):
            for age in range(3):
                label = labels.encode_class(mask, gender, age)
                assert labels.decode_class(label) == (mask, gender, age)
                seen.add(label)
    assert seen == set(range(18))
    classes = np.arange(18)
    assert np.array_equal(labels.encode_class(*labels.decode_class(classes)), classes)
    assert labels.encode_class(2, 1, 2) == 17 and labels.encode_class(1, 0, 1) == 7


def test_age_groups_bins_and_boundary():
    ages = np.array([18, 29, 30, 57, 58, 59, 60, 75])
    assert labels.age_group(ages).tolist() == [0, 0, 1, 1, 1, 1, 2, 2]
    assert labels.age_group(ages, old_age=58).tolist() == [0, 0, 1, 1, 2, 2, 2, 2]
    assert labels.age_bin6(np.array([5, 19, 20, 35, 45, 59, 60])).tolist() == [0, 0, 1, 2, 3, 4, 5]
    # 6 bins fold back to the same 3 groups as the years themselves
    years = np.arange(0, 90)
    assert np.array_equal(labels.age6_to_age3(labels.age_bin6(years)), labels.age_group(years))


def test_heads_product_and_marginals():
    rng = np.random.default_rng(0)
    m, g, a = (rng.dirichlet(np.ones(k), size=4) for k in (3, 2, 3))
    joint = labels.heads_to_class_probs(m, g, a)
    assert joint.shape == (4, 18)
    assert np.allclose(joint.sum(1), 1)
    assert np.isclose(joint[1, labels.encode_class(2, 1, 0)], m[1, 2] * g[1, 1] * a[1, 0])
    for got, want in zip(labels.class_probs_to_heads(joint), (m, g, a)):
        assert np.allclose(got, want)


def test_fold_age6_sums_probabilities():
    probs = np.random.default_rng(1).dirichlet(np.ones(36), size=5)
    folded = labels.fold_age6(probs, "multi")
    assert folded.shape == (5, 18) and np.allclose(folded.sum(1), 1)
    # class (mask 1, gender 0, age group 1) gathers the 30s, 40s, 50s bins
    assert np.isclose(folded[0, labels.encode_class(1, 0, 1)], probs[0, 12 + 2:12 + 5].sum())


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
