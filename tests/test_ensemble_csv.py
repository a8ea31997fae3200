"""ensemble_csv.py, the script: hard and soft votes of submission files, weights and ties, bad
inputs failing in one line before anything is written."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ensemble_csv import main, parse_args
from maskface.cli import UserError, run_cli
from maskface.ensemble import hard_vote
from maskface.labels import NUM_CLASSES, PROB_COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def write_submission(path: Path, ids, answers) -> Path:
    pd.DataFrame({"ImageID": list(ids), "ans": list(answers)}).to_csv(path, index=False)
    return path


def write_probs(path: Path, ids, rows) -> Path:
    table = pd.DataFrame(np.asarray(rows, dtype=float), columns=PROB_COLUMNS)
    table.insert(0, "ImageID", list(ids))
    table.to_csv(path, index=False)
    return path


def series(answers, ids=None) -> pd.Series:
    ids = ids if ids is not None else [f"{i}.jpg" for i in range(len(answers))]
    return pd.Series(answers, index=pd.Index(ids, name="ImageID"))


def run(files, *flags) -> pd.DataFrame:
    return main(parse_args([str(f) for f in files] + [str(f) for f in flags]))


def test_hard_vote_joins_on_image_id(tmp_path):
    rng = np.random.default_rng(1)
    ids = [f"img{i:03d}.jpg" for i in range(60)]
    votes = rng.integers(0, NUM_CLASSES, size=(3, len(ids)))
    paths = []
    for k, file_votes in enumerate(votes):
        order = np.arange(len(ids)) if k == 0 else rng.permutation(len(ids))
        paths.append(write_submission(tmp_path / f"{k}.csv", np.array(ids)[order],
                                      file_votes[order]))
    result = run(paths, "-o", tmp_path / "out.csv")
    aligned, _ = hard_vote([series(v, ids) for v in votes], None)
    assert result["ImageID"].tolist() == ids
    assert result["ans"].tolist() == aligned.tolist()
    positional = pd.read_csv(paths[1])["ans"].to_numpy()
    assert (result["ans"].to_numpy() != positional).any()  # a by-position vote would differ
    assert pd.read_csv(tmp_path / "out.csv", dtype={"ImageID": str}).equals(result)


def test_weights_change_the_result(tmp_path):
    ids = ["a.jpg", "b.jpg"]
    paths = [write_submission(tmp_path / "a.csv", ids, [1, 4]),
             write_submission(tmp_path / "b.csv", ids, [2, 4]),
             write_submission(tmp_path / "c.csv", ids, [2, 4])]
    assert run(paths, "-o", tmp_path / "o.csv")["ans"].tolist() == [2, 4]
    assert run(paths, "-o", tmp_path / "o.csv", "--weights", 3, 1, 1)["ans"].tolist() == [1, 4]
    assert run(paths, "-o", tmp_path / "o.csv", "--weights", 1.4, 1, 0.5)["ans"].tolist() == [2, 4]
    # 1.5 against 1 + 0.5: a tie, which goes to the first file
    assert run(paths, "-o", tmp_path / "o.csv", "--weights", 1.5, 1, 0.5)["ans"].tolist() == [1, 4]


def test_mismatched_ids_fail_and_write_nothing(tmp_path):
    a = write_submission(tmp_path / "a.csv", ["x.jpg", "y.jpg", "z.jpg"], [1, 2, 3])
    b = write_submission(tmp_path / "b.csv", ["x.jpg", "y.jpg", "w.jpg"], [1, 2, 3])
    out = tmp_path / "out" / "result.csv"
    with pytest.raises(UserError, match=r"b\.csv: 1 ImageIDs not in .*a\.csv \(first: w\.jpg\)"):
        run([a, b], "-o", out)
    assert not out.parent.exists()
    out.parent.mkdir()
    out.write_text("old result\n")
    with pytest.raises(UserError, match="b.csv"):
        run([a, b], "-o", out)
    assert out.read_text() == "old result\n"
    assert [p.name for p in out.parent.iterdir()] == ["result.csv"]  # no temp file left behind


def test_missing_ids_in_a_later_file_fail(tmp_path):
    a = write_submission(tmp_path / "a.csv", ["x.jpg", "y.jpg"], [1, 2])
    b = write_submission(tmp_path / "b.csv", ["x.jpg", "y.jpg"], [1, 2])
    c = write_submission(tmp_path / "c.csv", ["x.jpg"], [1])
    with pytest.raises(UserError, match=r"c\.csv: lacks 1 ImageIDs .*\(first: y\.jpg\)"):
        run([a, b, c], "-o", tmp_path / "o.csv")


@pytest.mark.parametrize("content, message", [
    ("ImageID,label\nx.jpg,1\ny.jpg,2\n", "missing column"),
    # one message for every bad label, shared with inference.py (files.check_labels)
    ("ImageID,ans\nx.jpg,1\ny.jpg,18\n", r"not an integer 0\.\.17 .*y\.jpg, ans=18\)"),
    ("ImageID,ans\nx.jpg,-1\ny.jpg,2\n", r"not an integer 0\.\.17 .*x\.jpg, ans=-1\)"),
    ("ImageID,ans\nx.jpg,1.5\ny.jpg,2\n", r"not an integer 0\.\.17 .*x\.jpg, ans=1\.5\)"),
    ("ImageID,ans\nx.jpg,mask\ny.jpg,2\n", r"not an integer 0\.\.17 .*x\.jpg, ans='mask'\)"),
    ("ImageID,ans\nx.jpg,\ny.jpg,2\n", r"not an integer 0\.\.17 .*x\.jpg, ans=empty\)"),
    ("ImageID,ans\nx.jpg,1\nx.jpg,2\n", r"1 duplicated ImageID\(s\) \(first: x\.jpg\)"),
    ("ImageID,ans\n", "no rows"),
])
def test_bad_submission_fails_clearly(tmp_path, content, message):
    good = write_submission(tmp_path / "good.csv", ["x.jpg", "y.jpg"], [1, 2])
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    with pytest.raises(UserError, match=message) as error:
        run([good, bad], "-o", tmp_path / "o.csv")
    assert str(error.value).startswith(str(bad)) and "\n" not in str(error.value)
    assert not (tmp_path / "o.csv").exists()


def test_bad_arguments_fail_clearly(tmp_path):
    a = write_submission(tmp_path / "a.csv", ["x.jpg"], [1])
    b = write_submission(tmp_path / "b.csv", ["x.jpg"], [2])
    out = tmp_path / "o.csv"
    with pytest.raises(UserError, match="at least 2"):
        run([a], "-o", out)
    with pytest.raises(UserError, match="given twice"):
        run([a, b, tmp_path / "." / "a.csv"], "-o", out)
    with pytest.raises(UserError, match="3 weight"):
        run([a, b], "-o", out, "--weights", 1, 2, 3)
    with pytest.raises(UserError, match="positive"):
        run([a, b], "-o", out, "--weights", 1, -1)
    with pytest.raises(UserError, match="both an input and an output"):
        run([a, b], "-o", a)
    with pytest.raises(UserError, match="file not found"):
        run([a, tmp_path / "nope.csv"], "-o", out)
    assert not out.exists()


def probs(label: int, p_label: float, other: int, p_other: float) -> list[float]:
    """A probability row: ``label`` and ``other`` as given, the rest spread evenly."""
    row = np.full(NUM_CLASSES, (1 - p_label - p_other) / (NUM_CLASSES - 2))
    row[label], row[other] = p_label, p_other
    return row.tolist()


def mild(label: int, other: int) -> list[float]:
    return probs(label, 0.55, other, 0.05)


def confident(label: int, other: int) -> list[float]:
    return probs(label, 0.90, other, 0.05)


def test_soft_vote_averages_probabilities(tmp_path):
    ids = ["x.jpg", "y.jpg"]
    # x: one file confidently wrong (5), two mildly right (3); y: one confidently right (8) against
    # two barely wrong (2 by a hair over 8): a hard vote of the argmaxes would say 2
    barely = probs(2, 0.35, 8, 0.30)
    first = write_probs(tmp_path / "a_probs.csv", ids, [confident(5, 3), confident(8, 2)])
    second = write_probs(tmp_path / "b_probs.csv", ids[::-1], [barely, mild(3, 5)])
    third = write_probs(tmp_path / "c_probs.csv", ids, [mild(3, 5), barely])
    probs_out = tmp_path / "mean_probs.csv"
    result = run([first, second, third], "--soft", "-o", tmp_path / "o.csv",
                 "--probs_output", probs_out)
    assert result["ImageID"].tolist() == ids
    assert result["ans"].tolist() == [3, 8]
    written = pd.read_csv(probs_out).set_index("ImageID")
    expected = (np.array([confident(5, 3), confident(8, 2)])
                + 2 * np.array([mild(3, 5), barely])) / 3
    np.testing.assert_allclose(written.loc[ids, PROB_COLUMNS].to_numpy(), expected)
    # enough weight on the confident file turns x its way
    weighted = run([first, second, third], "--soft", "-o", tmp_path / "o.csv", "--weights", 4, 1, 1)
    assert weighted["ans"].tolist() == [5, 8]


@pytest.mark.parametrize("change, message", [
    (lambda t: t.drop(columns="p17"), "missing column.*p17"),
    (lambda t: t.assign(p0=t.p0 + 0.2), "do not sum to 1"),
    (lambda t: t.assign(p0=-0.1, p1=t.p1 + 0.1), r"not a number in \[0, 1\]"),
])
def test_bad_probability_file_fails(tmp_path, change, message):
    ids = ["x.jpg", "y.jpg"]
    good = write_probs(tmp_path / "good_probs.csv", ids, [mild(3, 5)] * 2)
    bad = tmp_path / "bad_probs.csv"
    change(pd.read_csv(good)).to_csv(bad, index=False)
    with pytest.raises(UserError, match=message) as error:
        run([good, bad], "--soft", "-o", tmp_path / "o.csv")
    assert str(error.value).startswith(str(bad))


def test_no_files_uses_the_output_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "output"
    folder.mkdir()
    ids = ["x.jpg", "y.jpg"]
    write_submission(folder / "b.csv", ids, [1, 2])
    write_submission(folder / "a.csv", ids, [1, 3])
    write_submission(folder / "c.csv", ids, [4, 3])
    write_submission(folder / "ensemble.csv", ["other.jpg"], [0])  # an old result: not an input
    write_probs(folder / "a_probs.csv", ids, [mild(5, 3)] * 2)
    result = run([])
    assert "a.csv, b.csv, c.csv" in capsys.readouterr().out
    assert result["ans"].tolist() == [1, 3]
    assert pd.read_csv(folder / "ensemble.csv")["ans"].tolist() == [1, 3]

    write_probs(folder / "b_probs.csv", ids, [mild(3, 5)] * 2)
    run(["--soft", "-o", "output/soft.csv"])
    assert "a_probs.csv, b_probs.csv" in capsys.readouterr().out


def test_cli_bad_file_exits_2_with_one_line(tmp_path):
    good = write_submission(tmp_path / "good.csv", ["x.jpg"], [1])
    bad = write_submission(tmp_path / "bad.csv", ["x.jpg"], [42])
    out = tmp_path / "o.csv"
    done = subprocess.run([sys.executable, "ensemble_csv.py", str(good), str(bad), "-o", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and str(bad) in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.parametrize("soft, output, probs_output, message", [
    (False, "DIR", None, r"--output .*DIR: is a folder; expected a file name"),
    (True, "DIR", None, r"--output .*DIR: is a folder; expected a file name"),
    (False, "afile/r.csv", None, r"--output .*afile/r\.csv: .*afile is a file, not a folder"),
    (True, "r.csv", "DIR", r"--probs_output .*DIR: is a folder; expected a file name"),
    (True, "r.csv", "afile/p.csv", r"--probs_output .*afile/p\.csv: .*afile is a file"),
    (True, "r.csv", "r.csv", r"r\.csv: --output and --probs_output name the same file"),
], ids=["hard_dir", "soft_dir", "under_file", "probs_dir", "probs_under_file", "same_file"])
def test_unwritable_outputs_fail_before_reading_or_writing(tmp_path, capsys, soft, output,
                                                           probs_output, message):
    (tmp_path / "DIR").mkdir()
    (tmp_path / "afile").write_text("a file\n")
    ids = ["x.jpg", "y.jpg"]
    if soft:
        inputs = [write_probs(tmp_path / f"{n}_probs.csv", ids, [mild(3, 5)] * 2) for n in "ab"]
    else:
        inputs = [write_submission(tmp_path / f"{n}.csv", ids, [1, 2]) for n in "ab"]
    inputs[1].write_text("not,a\nvote\n")  # an input error would be reported if read first
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [*map(str, inputs), "-o", str(tmp_path / output)] + (["--soft"] if soft else [])
    argv += ["--probs_output", str(tmp_path / probs_output)] if probs_output else []
    assert run_cli(main, parse_args, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no result, no temp file
    assert not any((tmp_path / "DIR").iterdir())


def test_folder_given_as_input_says_so(tmp_path):
    a = write_submission(tmp_path / "a.csv", ["x.jpg"], [1])
    (tmp_path / "DIR").mkdir()
    with pytest.raises(UserError, match=r"DIR: is a folder; expected a CSV file"):
        run([a, tmp_path / "DIR"], "-o", tmp_path / "r.csv")
    assert not (tmp_path / "r.csv").exists()


# ---------------------------------------------------------------------------- --answers
def test_answers_print_macro_f1_and_the_per_class_table_as_inference_does(tmp_path, capsys):
    from sklearn.metrics import f1_score
    ids = [f"{i}.jpg" for i in range(6)]
    truth = [0, 1, 2, 0, 1, 17]
    a = write_submission(tmp_path / "a.csv", ids, [0, 1, 2, 1, 1, 17])
    b = write_submission(tmp_path / "b.csv", ids, [0, 1, 0, 1, 2, 17])
    answers = write_submission(tmp_path / "answers.csv", ids[::-1], truth[::-1])  # any order
    result = run([a, b], "-o", tmp_path / "v.csv", "--answers", answers)
    out = capsys.readouterr().out
    expected = f1_score(truth, result["ans"], average="macro")
    assert f"answers: macro F1 {expected:.4f}" in out
    assert "per class (macro F1 is the mean of the f1 column" in out
    assert "17 not_wear-female-60+" in out and "confusion matrix" in out


@pytest.mark.parametrize("rows, message", [
    ({"0.jpg": 1}, r"1 ImageID\(s\) of .*a\.csv missing, e\.g\. 1\.jpg"),
    ({"0.jpg": 1, "1.jpg": 2, "x.jpg": 3}, r"1 ImageID\(s\) not in .*a\.csv, e\.g\. x\.jpg"),
    ({"0.jpg": 1, "1.jpg": 18}, r"not an integer 0\.\.17"),
], ids=["missing", "extra", "bad_label"])
def test_bad_answers_are_one_line_and_nothing_is_written(tmp_path, capsys, rows, message):
    a = write_submission(tmp_path / "a.csv", ["0.jpg", "1.jpg"], [0, 1])
    b = write_submission(tmp_path / "b.csv", ["0.jpg", "1.jpg"], [0, 2])
    answers = write_submission(tmp_path / "answers.csv", rows, rows.values())
    out = tmp_path / "v.csv"
    code = run_cli(main, parse_args, [str(a), str(b), "-o", str(out), "--answers", str(answers)])
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err) and str(answers) in err
    assert err.count("\n") == 1 and not out.exists()


def test_answers_that_are_also_the_output_are_refused(tmp_path, capsys):
    a = write_submission(tmp_path / "a.csv", ["0.jpg"], [0])
    b = write_submission(tmp_path / "b.csv", ["0.jpg"], [0])
    code = run_cli(main, parse_args, [str(a), str(b), "-o", str(a.with_name("v.csv")),
                                      "--answers", str(a.with_name("v.csv"))])
    assert code == 2 and "is also an output" in capsys.readouterr().err
