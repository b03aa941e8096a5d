"""The package's structure, checked from the source rather than trusted to convention.

- Layers point one way: ``cli → {run, compare, sweep, generate, inspection, examples,
  plan} → {check, io, engine} → {spec, hparams, memory, stats, units, versioning} →
  errors``. A module may import its own layer and the layers below, never above, and the
  module graph (imports inside functions included) has no cycle.
- ``typer`` and ``rich`` are the command line's business (ruff's TID251 says the same at lint
  time); no string in the library names a command-line flag: library errors name parameters
  and the CLI maps them to flags.
"""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "convcli"
CLI_ONLY = ("typer", "rich", "click")
# the console script and ``python -m convcli`` sit above the command line and start it
ENTRY_POINTS = {"entry.py", "__main__.py"}

# Lowest layer first. A module's layer is that of its first path part (file or subpackage).
LAYERS = (
    ("errors",),
    ("spec", "hparams", "memory", "stats", "units", "versioning"),
    ("check", "io", "engine"),
    ("run", "compare", "sweep", "generate", "inspection", "examples", "plan"),
    ("cli",),
    ("entry", "__main__"),
)
LAYER_OF = {part: depth for depth, parts in enumerate(LAYERS) for part in parts}
# the package's own __init__ only names the public API (imported lazily, by string)
PUBLIC_API = "convcli"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code, as full dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # ``from convcli.io import loading`` imports a module
                submodule = f"{node.module}.{alias.name}"
                names.add(submodule if submodule in MODULES else node.module)
    return names


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "convcli" or module == PUBLIC_API:
        return None
    return LAYER_OF.get(parts[1])


LIBRARY = sorted(
    name
    for name in MODULES
    if name != PUBLIC_API and _layer(name) is not None and _layer(name) < LAYER_OF["cli"]
)


def test_every_module_has_a_layer():
    unplaced = [name for name in MODULES if name != PUBLIC_API and _layer(name) is None]
    assert not unplaced, f"add these modules to a layer in LAYERS: {unplaced}"
    assert "convcli.engine.fast" in LIBRARY
    assert "convcli.run" in LIBRARY


@pytest.mark.parametrize("module", sorted(set(MODULES) - {PUBLIC_API}))
def test_imports_point_down(module):
    own = _layer(module)
    upward = sorted(
        name
        for name in _imports(MODULES[module])
        if _layer(name) is not None and _layer(name) > own
    )
    assert not upward, f"{module} (layer {LAYERS[own]}) imports a layer above it: {upward}"


def test_no_import_cycles():
    graph = {
        name: sorted(n for n in _imports(path) if n in MODULES and n != PUBLIC_API)
        for name, path in MODULES.items()
    }
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name, path):
        state[name] = 1
        for target in graph[name]:
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target] if target in path else [name, target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("module", LIBRARY)
def test_only_the_cli_imports_typer_and_rich(module):
    imported = _imports(MODULES[module])
    offending = sorted(n for n in imported if n.split(".")[0] in CLI_ONLY)
    assert not offending, f"{module} imports {offending}; that belongs in convcli/cli/"


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


@pytest.mark.parametrize("module", LIBRARY)
def test_no_library_string_names_a_flag(module):
    """Docstrings included: the library speaks of parameters (``max_memory``), not flags."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = sorted(
        {
            f"line {node.lineno}: {match}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            for match in FLAG.findall(node.value)
        }
    )
    assert not found, f"{module} names command-line flags: {found}"
