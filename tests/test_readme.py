"""The README stays true: its quick start, its printed output, and CI's test command."""

import re
import shlex

import pytest
from typer.testing import CliRunner

from convcli.cli import app
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
# Numbers that vary from run to run: timings, and rounding-level errors in scientific notation.
VARYING = re.compile(r"\d+(\.\d+)? m?s\b|\d\.\d+e[-+]\d+")


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def test_quick_start_is_two_commands_and_ci_runs_the_test_command():
    first_section = README.split("\n## ", 2)[1]
    commands = code_blocks(first_section, "sh")[0].strip().splitlines()
    assert len(commands) == 2
    assert "convcli forward sample_data/" in commands[0]
    assert "pytest" in commands[1]
    ci_script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci_script.splitlines()


TRANSCRIPTS = [block for block in code_blocks(README, "text") if block.startswith("$ convcli ")]


def test_readme_has_transcripts():
    assert len(TRANSCRIPTS) >= 2


@pytest.mark.parametrize("block", TRANSCRIPTS, ids=lambda b: b.splitlines()[0])
def test_readme_transcripts_are_real_output(block, monkeypatch):
    for variable in ("COLUMNS", "FORCE_COLOR", "TERM"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(ROOT)
    command, *expected = block.rstrip("\n").splitlines()
    result = CliRunner().invoke(app, shlex.split(command)[2:])
    assert result.exit_code == 0, result.stderr
    assert _normalised(result.stdout.rstrip("\n").splitlines()) == _normalised(expected)


def _normalised(lines: list[str]) -> list[str]:
    """Mask varying numbers, then compare words (column widths follow the numbers)."""
    return [" ".join(VARYING.sub("#", line).split()) for line in lines]


def test_every_command_has_help_with_an_example_and_a_readme_section():
    import typer.main

    commands = typer.main.get_command(app).commands
    assert set(commands) >= {"forward", "backward", "gradcheck"}
    for name in commands:
        result = CliRunner().invoke(app, [name, "--help"])
        assert result.exit_code == 0
        assert "Example: convcli " + name in result.stdout
        assert f"### `convcli {name}`" in README


def test_library_example_runs():
    (example,) = code_blocks(README, "python")
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert scope["z"].shape == (10, 4, 4, 8)
    assert scope["dx"].shape == (10, 4, 4, 3)
    assert scope["db"].shape == (1, 1, 1, 8)
    assert scope["z1"].shape == (4, 6, 50)
