"""`convcli example DIR` writes the files the help examples use, and never loses a file."""

import json
import re

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from convcli.cli import app
from convcli.errors import OutputExistsError
from convcli.examples import EXAMPLE_FILES, write_examples
from tests.conftest import ROOT

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_it_writes_what_sample_data_holds(tmp_path):
    written = write_examples(tmp_path / "new" / "folder")  # missing folders are made
    assert [p.name for p in written] == list(EXAMPLE_FILES)
    folder = tmp_path / "new" / "folder"
    with (
        np.load(folder / "conv_example.npz") as made,
        np.load(ROOT / "sample_data" / "conv_example.npz") as shipped,
    ):
        assert sorted(made.files) == sorted(shipped.files)
        for key in shipped.files:
            np.testing.assert_array_equal(made[key], shipped[key])
            assert made[key].dtype == shipped[key].dtype
    with (
        h5py.File(folder / "conv_example.h5") as made,
        h5py.File(ROOT / "sample_data" / "conv_example.h5") as shipped,
    ):
        assert sorted(made) == sorted(shipped)
        for key in shipped:
            np.testing.assert_array_equal(made[key][()], shipped[key][()])
        assert dict(made.attrs) == dict(shipped.attrs)
    assert (folder / "sweep.toml").read_bytes() == (
        ROOT / "sample_data" / "sweep.toml"
    ).read_bytes()


def test_every_help_example_that_names_sample_data_runs_on_the_written_files(tmp_path, monkeypatch):
    import typer.main

    result = invoke("example", tmp_path / "sample_data")
    assert result.exit_code == 0, result.stderr
    monkeypatch.chdir(tmp_path)
    ran = 0
    for name in typer.main.get_command(app).commands:
        text = invoke(name, "--help").stdout
        example = re.search(r"Example: (convcli [^\n]*)", text).group(1)
        if "sample_data/" not in example:
            continue
        assert "convcli example sample_data" in " ".join(text.split()), name
        args = example.split()[1:]
        if name == "sweep":
            args += ["--jobs", "1"] if "--jobs" not in args else []
        result = runner.invoke(app, [a.strip("'") for a in args])
        assert result.exit_code == 0, (example, result.stderr)
        ran += 1
    assert ran >= 4


def test_forward_reads_the_written_npz(tmp_path):
    assert invoke("example", tmp_path).exit_code == 0
    result = invoke("forward", tmp_path / "conv_example.npz", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["tensors"]["z"]["shape"] == [10, 4, 4, 8]  # pad 2, stride 2 from the file


def test_existing_files_are_kept_unless_force(tmp_path):
    (tmp_path / "sweep.toml").write_text("mine")
    result = invoke("example", tmp_path)
    assert result.exit_code == 73
    assert result.stderr.count("\n") == 1
    assert "sweep.toml" in result.stderr
    assert "--force" in result.stderr
    assert (tmp_path / "sweep.toml").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.toml"]  # nothing written
    with pytest.raises(OutputExistsError):
        write_examples(tmp_path)
    result = invoke("example", tmp_path, "--force", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["command"] == "example"
    assert [f.rsplit("/", 1)[-1] for f in document["files"]] == list(EXAMPLE_FILES)
    assert (tmp_path / "sweep.toml").read_text() != "mine"


def test_a_file_where_the_folder_should_be_is_refused(tmp_path):
    (tmp_path / "taken").write_text("a file")
    result = invoke("example", tmp_path / "taken")
    assert result.exit_code == 73
    assert (tmp_path / "taken").read_text() == "a file"


def test_an_empty_folder_name_is_refused_not_taken_for_the_current_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["example", ""])
    assert result.exit_code == 2
    assert "DIR is empty" in result.stderr
    assert list(tmp_path.iterdir()) == []
