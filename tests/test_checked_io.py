import pytest

from maskface.cli import UserError, run_cli
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


def test_os_errors_become_one_line(tmp_path, capsys):
    def main(_):
        open(tmp_path)  # a folder: IsADirectoryError
    assert run_cli(main, lambda argv: None, []) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path}: Is a directory"
