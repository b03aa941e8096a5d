"""--slice expressions: parsed with ast, never evaluated."""

import numpy as np
import pytest

from convcli import UsageError
from convcli.cli.slices import parse_slice, take

TENSORS = {"z": np.arange(2 * 3 * 4).reshape(2, 3, 4), "dw": np.arange(6).reshape(1, 2, 3)}


@pytest.mark.parametrize(
    ("expr", "label", "expected"),
    [
        ("z[1,2,3]", "z[1,2,3]", TENSORS["z"][1, 2, 3]),
        ("1, 2", "z[1,2]", TENSORS["z"][1, 2]),
        ("dw[:, :, 0]", "dw[:,:,0]", TENSORS["dw"][:, :, 0]),
        ("z[..., -1]", "z[...,-1]", TENSORS["z"][..., -1]),
        ("z[::2, 1:3]", "z[::2,1:3]", TENSORS["z"][::2, 1:3]),
        ("dw", "dw[...]", TENSORS["dw"]),
    ],
)
def test_slices(expr, label, expected):
    parsed = parse_slice(expr)
    assert parsed.label("z") == label
    np.testing.assert_array_equal(take(parsed, TENSORS, "z"), expected)


@pytest.mark.parametrize(
    "expr",
    ["z[__import__('os')]", "z[1.5]", "z[", "", "z[x]", "z[[1,2]]", "z[1+1]"],
)
def test_bad_expressions_are_usage_errors(expr):
    with pytest.raises(UsageError, match="--slice"):
        parse_slice(expr)


def test_unknown_tensor_and_out_of_range():
    with pytest.raises(UsageError, match="no tensor 'q'; available: z, dw"):
        take(parse_slice("q[0]"), TENSORS, "z")
    with pytest.raises(UsageError, match=r"shape of z is \(2, 3, 4\)"):
        take(parse_slice("z[5]"), TENSORS, "z")


@pytest.mark.parametrize("expr", ["z[0][1]", "z[0]+z[1]", "z[99999999999999999999999]"])
def test_chained_or_computed_expressions_are_refused(expr):
    with pytest.raises(UsageError, match="--slice"):
        take(parse_slice(expr), TENSORS, "z")


def test_zero_step_is_a_usage_error():
    with pytest.raises(UsageError, match="slice step cannot be zero"):
        take(parse_slice("z[::0]"), TENSORS, "z")
