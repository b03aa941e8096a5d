"""Every `--json` document and every sweep record says which schema it follows; sweep records
also say what produced them (provenance)."""

import json
import socket
from datetime import datetime

import numpy as np
import pytest
from typer.testing import CliRunner

from convcli import __version__
from convcli.cli import app
from convcli.versioning import SCHEMA_VERSION
from tests.conftest import SAMPLE_H5, SAMPLE_NPZ

runner = CliRunner()

SWEEP = """
actions = ["forward", "backward", "gradcheck"]
[gradcheck]
mode = "sample"
samples = 4
[[configs]]
shape = [1, 4, 4, 2]
kernel = 2
cout = 2
"""


@pytest.fixture
def layer(tmp_path):
    """A layer in an npz, and a copy of its dz gradient: what compare needs."""
    rng = np.random.default_rng(3)
    np.savez(
        tmp_path / "layer.npz",
        x=rng.standard_normal((2, 4, 4, 2)),
        w=rng.standard_normal((2, 2, 2, 3)),
        b=rng.standard_normal(3),
    )
    return tmp_path / "layer.npz"


def commands(tmp_path, layer):
    (tmp_path / "sweep.toml").write_text(SWEEP)
    expected = tmp_path / "expected.npz"
    result = runner.invoke(app, ["forward", str(layer), "--out", str(expected)])
    assert result.exit_code == 0, result.stderr
    return {
        "forward": ["forward", SAMPLE_H5],
        "backward": ["backward", SAMPLE_NPZ],
        "gradcheck": ["gradcheck", SAMPLE_H5, "--mode", "sample", "--samples", "4"],
        "compare": ["compare", layer, "--expect", expected],
        "generate": [
            "generate",
            tmp_path / "g.npz",
            "--shape",
            "1,4,4,2",
            "--kernel",
            "2",
            "--cout",
            "2",
        ],
        "inspect": ["inspect", SAMPLE_H5],
        "example": ["example", tmp_path / "examples"],
        "sweep": ["sweep", tmp_path / "sweep.toml", "--out", tmp_path / "r.jsonl"],
    }


@pytest.mark.parametrize(
    "command",
    ["forward", "backward", "gradcheck", "compare", "generate", "inspect", "sweep", "example"],
)
def test_every_json_document_carries_the_schema_version(tmp_path, layer, command):
    args = commands(tmp_path, layer)[command]
    result = runner.invoke(app, [*map(str, args), "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["schema_version"] == SCHEMA_VERSION == 1
    assert next(iter(document)) == "schema_version"  # first, so a reader sees it first
    assert document["command"] == command


def test_sweep_records_carry_schema_version_and_provenance(tmp_path):
    (tmp_path / "sweep.toml").write_text(SWEEP)
    out = tmp_path / "r.jsonl"
    result = runner.invoke(app, ["sweep", str(tmp_path / "sweep.toml"), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    (line,) = out.read_text().splitlines()
    assert line.startswith('{"key": "')  # how a torn record is still recognised
    record = json.loads(line)
    assert record["schema_version"] == SCHEMA_VERSION
    provenance = record["provenance"]
    assert set(provenance) == {"convcli", "numpy", "blas", "host", "started", "ended"}
    assert provenance["convcli"] == __version__
    assert provenance["numpy"] == np.__version__
    assert provenance["host"] == socket.gethostname()
    for blas in provenance["blas"]:
        assert set(blas) == {"internal_api", "version", "threading_layer", "num_threads"}
    started = datetime.fromisoformat(provenance["started"].replace("Z", "+00:00"))
    ended = datetime.fromisoformat(provenance["ended"].replace("Z", "+00:00"))
    assert provenance["started"].endswith("Z")
    assert started.utcoffset().total_seconds() == 0
    assert started <= ended


def test_records_of_a_worker_that_died_carry_provenance_too(tmp_path):
    from concurrent.futures import Future

    from convcli.sweep import runner as sweep_runner
    from convcli.sweep.schema import load_sweep

    (tmp_path / "sweep.toml").write_text(SWEEP)
    sweep = load_sweep(tmp_path / "sweep.toml")
    future = Future()
    future.set_exception(RuntimeError("gone"))
    key, config = sweep.key(sweep.configs[0]), sweep.configs[0]
    record = sweep_runner._result(future, key, config, sweep)
    assert record["status"] == "errored"
    assert record["provenance"]["host"] == socket.gethostname()
