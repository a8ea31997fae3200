"""maskface.labels: the 18-class formula, age groups, the heads and their marginals, class
names."""

import numpy as np

from maskface import labels


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


def test_class_names_follow_the_class_formula():
    names = labels.class_names("multi")
    assert len(names) == 18 and names[9] == "09 incorrect-female-<30"
    for m, mask in enumerate(labels.MASK_NAMES):
        for g, gender in enumerate(labels.GENDER_NAMES):
            for a, age in enumerate(labels.AGE_NAMES):
                label = labels.encode_class(m, g, a)
                assert names[label] == f"{label:02d} {mask}-{gender}-{age}"
    assert labels.class_names("gender") == ["0 male", "1 female"]
    assert labels.class_names("age", 6)[-1] == "5 60+"
    assert len(labels.class_names("multi", 6)) == 36
