"""The project's shape: modules import downwards only, scripts never import scripts, the CSV voter
starts without torch, and every script's flags read the same way (one spelling listed, hyphens
accepted, each default shown once)."""
import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import benchmark
import config
import ensemble_csv
import experiments
import face
import inference
import make_sample

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train", "inference", "benchmark", "ensemble_csv", "experiments"}


def project_imports() -> dict[str, set[str]]:
    modules = {path.stem for path in ROOT.glob("*.py")}
    graph = {}
    for path in ROOT.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
        graph[path.stem] = (imported & modules) - {path.stem}
    return graph


def test_scripts_import_modules_never_each_other_and_there_is_no_cycle():
    graph = project_imports()
    assert {"checked_io", "dataset", "engine", "train", "inference"} <= set(graph)
    for module, imported in graph.items():
        assert not imported & SCRIPTS, f"{module} imports the script(s) {imported & SCRIPTS}"
    assert graph["ensemble_csv"] == {"checked_io"}

    def reaches(start: str, target: str, seen: set) -> bool:
        return any(dep == target or (dep not in seen and not seen.add(dep)
                                     and reaches(dep, target, seen)) for dep in graph[start])
    cycles = [module for module in graph if reaches(module, module, set())]
    assert not cycles, f"import cycle through {cycles}"


def test_the_csv_voter_starts_without_torch_opencv_or_sklearn():
    probe = ("import sys, ensemble_csv; "
             "print(sorted(m for m in ('torch', 'cv2', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]"


def subcommand_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


PARSERS = {"train": config.get_args_parser, "inference": inference.get_args_parser,
           "benchmark": benchmark.get_args_parser, "ensemble_csv": ensemble_csv.get_args_parser,
           "face": face.get_args_parser, "make_sample": make_sample.get_args_parser,
           "experiments": experiments.get_args_parser,
           "experiments table": lambda: subcommand_parser(experiments.get_args_parser(), "table"),
           "experiments select": lambda: subcommand_parser(experiments.get_args_parser(),
                                                           "select")}


@pytest.mark.parametrize("script", list(PARSERS))
def test_help_lists_each_flag_once_with_one_default(script):
    text = PARSERS[script]().format_help()
    flags = [token.strip(",[]") for token in text.split() if token.startswith("--")]
    hyphenated = [f for f in flags if "-" in f[2:] and f.replace("-", "_")[2:] != f[2:]]
    assert not hyphenated, f"{script} --help lists hyphenated spellings {hyphenated}"
    assert "(default: None)" not in text and "(default: False)" not in text
    for line in text.replace("\n                        ", " ").splitlines():
        assert line.count("default") <= 1, f"{script}: default shown twice: {line.strip()}"


def test_train_help_has_argument_groups():
    text = config.get_args_parser().format_help()
    for group in ("run:", "data:", "images and augmentation:", "model:", "loss:", "optimisation:",
                  "speed:", "distributed:"):
        assert f"\n{group}\n" in text, group


@pytest.mark.parametrize("argv, dest, value", [
    (["--batch-size", "8"], "batch_size", 8),
    (["--batch-size=8"], "batch_size", 8),
    (["--batch_size=8"], "batch_size", 8),
    (["--early-stopping-patience", "0"], "early_stopping_patience", 0),
    (["--age_lable_num", "6"], "age_label_num", 6),
    (["--age-lable-num", "6"], "age_label_num", 6),
])
def test_every_spelling_of_a_flag_parses(argv, dest, value):
    assert getattr(config.parse_args(argv), dest) == value


def test_hyphens_work_in_every_script():
    args = inference.parse_args(["--model-dir", "a", "b", "--name-csv", "x.csv", "--no-calibrate"])
    assert args.model_dir == ["a", "b"] and args.name_csv == "x.csv" and args.no_calibrate
    assert ensemble_csv.parse_args(["a.csv", "b.csv", "--probs-output", "p.csv"]).probs_output == "p.csv"
    assert benchmark.parse_args(["--side-by-side", "2"]).side_by_side == [2]
    assert make_sample.get_args_parser().parse_args(["--n-train-people", "5"]).n_train_people == 5
    args = experiments.parse_args(["select", "run", "--split-repeats", "2", "--no-calibrate"])
    assert args.split_repeats == 2 and args.no_calibrate and args.runs == ["run"]
    assert ensemble_csv.parse_args(["a", "b", "--soft", "--weights-file", "s.json"]).weights_file \
        == "s.json"


MAX_FILE_LINES = 700
MAX_FUNCTION_LINES = 80  # argument parsers excepted: one flag per statement reads fine long


def test_no_file_or_function_outgrows_one_concern():
    too_long = []
    for path in sorted(ROOT.glob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    node.name != "get_args_parser" and \
                    node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                too_long.append(f"{path.name}: {node.name}() "
                                f"{node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long


def test_the_readme_file_table_names_every_file():
    table = (ROOT / "README.md").read_text().split("## Quick start")[0]
    missing = [path.name for path in ROOT.glob("*.py") if f"`{path.name}`" not in table]
    assert not missing, f"README's file table lacks {missing}"
