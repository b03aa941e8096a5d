"""Hostile inputs to `convcli compare`: one stderr line, a documented exit code, no traceback."""

import numpy as np
import pytest

from tests import hostile


@pytest.fixture
def layer(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "layer.npz"
    np.savez(path, x=rng.standard_normal((1, 4, 4, 2)), w=rng.standard_normal((3, 3, 2, 2)))
    return path


@pytest.mark.parametrize(
    ("results", "code", "words"),
    [
        ({"z": np.ones((1, 2, 2, 2), np.complex128)}, 65, "--z is complex128"),
        ({"dw": np.array(["a", "b"])}, 65, "--dw is <U1"),
        ({"z": np.ones((1, 2, 2, 2)), "Z": np.ones((1, 2, 2, 2))}, 65, "z"),
        ({"unrelated": np.ones(3)}, 65, "looked for z (z, Z, y, out, output)"),
    ],
)
def test_bad_result_files_are_one_error_line(tmp_path, layer, results, code, words):
    yours = tmp_path / "yours.npz"
    np.savez(yours, **results)
    line = hostile.one_error(hostile.run("compare", layer, "--expect", yours, cwd=tmp_path), code)
    assert words in line


def test_missing_expect_file_and_bad_tolerances(tmp_path, layer):
    hostile.one_error(
        hostile.run("compare", layer, "--expect", tmp_path / "no.npz", cwd=tmp_path), 66
    )
    hostile.one_error(hostile.run("compare", layer, "--expect", tmp_path, cwd=tmp_path), 66)
    line = hostile.one_error(hostile.run("compare", layer, "--rtol", "nan", cwd=tmp_path), 2)
    assert "--rtol" in line


def test_nonfinite_inputs_are_refused_and_nonfinite_results_fail(tmp_path, layer):
    arrays = dict(np.load(layer))
    arrays["x"][0, 0, 0, 0] = np.nan
    bad_x = tmp_path / "bad_x.npz"
    np.savez(bad_x, **arrays, z=np.ones((1, 2, 2, 2)))
    assert "NaN" in hostile.one_error(hostile.run("compare", bad_x, cwd=tmp_path), 65)
    yours = tmp_path / "nan.npz"
    np.savez(yours, z=np.full((1, 2, 2, 2), np.nan))
    result = hostile.run("compare", layer, "--expect", yours, cwd=tmp_path)
    assert result.returncode == 1
    assert "FAIL" in result.stdout
