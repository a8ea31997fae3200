"""The project's shape: the package's modules import only from lower layers (no cycle), scripts
never import scripts and the package never imports them, the CSV voter starts without torch,
every script answers --help without loading torch, and every script's flags read the same way
(one spelling listed, hyphens accepted, each default shown once)."""
import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import benchmark
import ensemble_csv
import experiments
import inference
from maskface import config, face, image_cache, sample

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train", "inference", "benchmark", "ensemble_csv", "experiments", "tune"}
# the package's modules, lowest first: a module imports only from layers below its own
LAYERS = [
    {"cli"},                                                      # errors, flags
    {"files", "augmentation", "distributed", "face_detector", "presets",
     "progress"},
    {"labels", "image_cache", "phases"},
    {"dataset", "ensemble", "loss", "model", "run_folder", "sample", "scores"},
    {"checkpoint", "data_dirs", "face", "mixed_precision", "pipelines", "reporting", "selection",
     "bench.usual_pipeline", "bench.timm_peer"},
    {"config", "predict", "run_table"},
    {"settings", "submission", "bench.end_to_end"},
    {"engine"},
    {"training", "bench.timing"},
    {"bench.speed", "tuning"},
]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def project_imports() -> dict[str, set[str]]:
    """module -> the project's modules it imports (at the top or inside a function), package
    modules without their 'maskface.' prefix."""
    paths = [*ROOT.glob("*.py"), *(p for p in (ROOT / "maskface").rglob("*.py")
                                   if p.name != "__init__.py")]
    names = {module_name(p) for p in paths}
    graph = {}
    for path in paths:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[module_name(path).removeprefix("maskface.")] = {
            name.removeprefix("maskface.") for name in imported & names} - {
            module_name(path).removeprefix("maskface.")}
    return graph


def test_every_module_imports_only_from_lower_layers():
    graph = project_imports()
    layer = {module: rank for rank, modules in enumerate(LAYERS) for module in modules}
    package = {m for m in graph if m not in SCRIPTS}
    assert package == set(layer), f"modules not placed in LAYERS: {package ^ set(layer)}"
    upward = [f"{m} -> {d}" for m in package for d in graph[m]
              if d in SCRIPTS or layer[d] >= layer[m]]
    assert not upward, f"imports that do not go down a layer: {upward}"


def test_scripts_import_modules_never_each_other():
    graph = project_imports()
    assert SCRIPTS <= set(graph)
    for script in SCRIPTS:
        assert not graph[script] & SCRIPTS, f"{script} imports {graph[script] & SCRIPTS}"


def test_the_csv_voter_starts_without_torch_opencv_or_sklearn():
    probe = ("import sys, ensemble_csv; "
             "print(sorted(m for m in ('torch', 'cv2', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("command", [["train.py"], ["inference.py"], ["benchmark.py"],
                                     ["ensemble_csv.py"], ["experiments.py"], ["tune.py"],
                                     ["-m", "maskface.sample"], ["-m", "maskface.face"],
                                     ["-m", "maskface.image_cache"]])
def test_every_script_answers_help_without_loading_torch(command):
    # torch (and timm) take seconds to import: --help must not wait for them
    probe = ("import runpy, sys\n"
             f"sys.argv = [{command[-1]!r}, '--help']\n"
             f"try:\n    runpy.run_{'module' if command[0] == '-m' else 'path'}("
             f"{command[-1]!r}, run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=True)
    assert "usage:" in done.stdout and done.stderr.strip().splitlines()[-1] == "False"


def subcommand_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


PARSERS = {"train": config.get_args_parser, "inference": inference.get_args_parser,
           "benchmark": benchmark.get_args_parser, "ensemble_csv": ensemble_csv.get_args_parser,
           "face": face.get_args_parser, "make_sample": sample.get_args_parser,
           "experiments": experiments.get_args_parser,
           "experiments table": lambda: subcommand_parser(experiments.get_args_parser(), "table"),
           "experiments select": lambda: subcommand_parser(experiments.get_args_parser(),
                                                           "select"),
           "experiments note": lambda: subcommand_parser(experiments.get_args_parser(), "note"),
           "image_cache": image_cache.get_args_parser,
           "image_cache prune": lambda: subcommand_parser(image_cache.get_args_parser(), "prune")}


@pytest.mark.parametrize("script", list(PARSERS))
def test_help_lists_each_flag_once_with_one_default(script):
    text = PARSERS[script]().format_help()
    flags = [token.strip(",[]") for token in text.split() if token.startswith("--")]
    hyphenated = [f for f in flags if "-" in f[2:] and f.replace("-", "_")[2:] != f[2:]]
    assert not hyphenated, f"{script} --help lists hyphenated spellings {hyphenated}"
    assert "(default: None)" not in text and "(default: False)" not in text
    for line in text.replace("\n                        ", " ").splitlines():
        said = line.replace("--defaults", "")  # train.py's flag of that name is not a default
        assert said.count("default") <= 1, f"{script}: default shown twice: {line.strip()}"


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
    assert sample.get_args_parser().parse_args(["--n-train-people", "5"]).n_train_people == 5
    assert image_cache.get_args_parser().parse_args(
        ["--cache-dir", "c", "prune", "--max-size", "1G", "--dry-run"]).max_size == "1G"
    args = experiments.parse_args(["select", "run", "--split-repeats", "2", "--no-calibrate"])
    assert args.split_repeats == 2 and args.no_calibrate and args.runs == ["run"]
    assert ensemble_csv.parse_args(["a", "b", "--soft", "--weights-file", "s.json"]).weights_file \
        == "s.json"


MAX_FUNCTION_LINES = 80  # argument parsers excepted: one flag per statement reads fine long


def test_no_function_outgrows_one_concern():
    too_long = []
    for path in sorted([*ROOT.glob("*.py"), *(ROOT / "maskface").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    node.name != "get_args_parser" and \
                    node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                too_long.append(f"{module_name(path)}: {node.name}() "
                                f"{node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long


def test_the_readme_map_names_every_script_and_the_layout_doc_every_module():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in ROOT.glob("*.py") if f"`{p.name}`" not in readme]
    assert not missing, f"README's map lacks {missing}"
    layout = (ROOT / "docs" / "layout.md").read_text()
    modules = [module_name(p).removeprefix("maskface.") for p in (ROOT / "maskface").rglob("*.py")
               if p.name != "__init__.py"]
    missing = [m for m in modules if f"`{m}`" not in layout]
    assert not missing, f"docs/layout.md lacks {missing}"
