"""The package's layering, checked from the source: only ``convcli/cli/`` prints.

``typer`` and ``rich`` are the command line's business; the library below it returns data
and raises typed errors. This parses every module's imports (including imports inside
functions) instead of trusting a convention.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "convcli"
CLI_ONLY = ("typer", "rich", "click")
# the console script and ``python -m convcli`` sit above the command line and start it
ENTRY_POINTS = {"entry.py", "__main__.py"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


LIBRARY = sorted(
    p.relative_to(PACKAGE).as_posix()
    for p in PACKAGE.rglob("*.py")
    if p.relative_to(PACKAGE).parts[0] != "cli"
)


def test_the_library_modules_are_found():
    assert "engine.py" in LIBRARY
    assert not any(name.startswith("cli/") for name in LIBRARY)


@pytest.mark.parametrize("module", LIBRARY)
def test_only_the_cli_imports_typer_and_rich(module):
    imported = _imports(PACKAGE / module)
    offending = sorted(n for n in imported if n.split(".")[0] in CLI_ONLY)
    assert not offending, f"convcli/{module} imports {offending}; that belongs in convcli/cli/"


@pytest.mark.parametrize("module", sorted(set(LIBRARY) - ENTRY_POINTS))
def test_the_library_never_imports_the_cli(module):
    imported = _imports(PACKAGE / module)
    assert not any(n == "convcli.cli" or n.startswith("convcli.cli.") for n in imported), (
        f"convcli/{module} imports the command line"
    )
