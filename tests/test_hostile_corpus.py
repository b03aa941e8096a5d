"""The corpus as a whole: every hostile-input test runs convcli through the harness.

:func:`tests.hostile.run` fails any run that exits 70 (convcli's code for its own bugs),
prints a traceback or hangs. This test makes that hold over the whole corpus: no corpus
module starts convcli any other way (or, when it must, e.g. with stdout closed, without
handing the result to :func:`tests.hostile.check`), so no case escapes the check.
"""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CORPUS = sorted([TESTS / "test_security.py", *TESTS.glob("test_hostile_*.py")])
# calls that wait for a process and return its result (Popen, for signals sent while convcli
# runs, is checked by the signal tests' own assertions on the exit code)
RUNS = {"run", "call", "check_call", "check_output"}


def _unchecked_runs(path: Path) -> list[int]:
    """Lines where ``path`` calls ``subprocess.run`` (or ``call``, ``check_output``) itself
    without handing the result to ``hostile.check``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    checked = {
        id(arg)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "check"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "hostile"
        for arg in node.args
    }
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "subprocess"
        and node.func.attr in RUNS
        and id(node) not in checked
    ]


def test_the_corpus_has_every_class_of_issue_12():
    names = {path.stem for path in CORPUS}
    assert {"test_hostile_sweep", "test_hostile_io12", "test_hostile_guard"} <= names
    assert "test_hostile_cli12" in names


def test_every_corpus_run_goes_through_the_harness():
    for path in CORPUS:
        text = path.read_text(encoding="utf-8")
        assert "hostile" in text, f"{path.name} does not use tests/hostile.py"
        unchecked = _unchecked_runs(path)
        assert not unchecked, f"{path.name}: runs not checked by hostile.check: {unchecked}"
