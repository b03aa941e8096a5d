"""Hyperparameters from flags and files, merged into a ConvSpec."""

import pytest

from convcli import ConvSpec, HyperparameterError, UsageError
from convcli.hparams import build_spec, from_file_value, parse_flag


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("stride", "2", 2),
        ("stride", "1,2", (1, 2)),
        ("padding", "2", 2),
        ("padding", "1,2", (1, 2)),
        ("padding", "1,2,0,1", (1, 2, 0, 1)),
        ("stride", "1,2,2", (1, 2, 2)),
        ("padding_mode", "Reflect", "reflect"),
        ("layout", "NCHW", "nchw"),
        ("padding", "SAME", "same"),
        ("padding", "valid", "valid"),
        ("dilation", " 2 ", 2),
        ("groups", "3", 3),
    ],
)
def test_flags_parse(name, text, expected):
    assert parse_flag(name, text) == expected


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("stride", "0", "--stride '0': must be >= 1"),
        ("stride", "1.5", "--stride '1.5'"),
        ("stride", "1,2,3,4", "--stride '1,2,3,4'"),
        ("padding_mode", "mirror", "--padding-mode 'mirror'"),
        ("layout", "nwhc", "--layout 'nwhc'"),
        ("padding", "-1", "--pad '-1': must be >= 0"),
        ("padding", "full", "--pad 'full'"),
        ("padding", "1,2,3,4,5", "--pad '1,2,3,4,5'"),
        ("groups", "1,1", "--groups '1,1'"),
        ("dilation", "", "--dilation ''"),
    ],
)
def test_bad_flags_are_usage_errors(name, text, match):
    with pytest.raises(UsageError, match=match):
        parse_flag(name, text)


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("stride", 2, 2),
        ("stride", 2.0, 2),
        ("stride", [1, 2], (1, 2)),
        ("padding", [[1, 2], [0, 1]], ((1, 2), (0, 1))),
        ("padding", [1, 2, 0, 1], (1, 2, 0, 1)),
        ("padding_mode", "circular", "circular"),
        ("padding", "same", "same"),
        ("groups", 4, 4),
    ],
)
def test_file_values(name, raw, expected):
    assert from_file_value(name, raw, "f.npz entry") == expected


@pytest.mark.parametrize(
    ("name", "raw", "match"),
    [
        ("stride", 1.5, r"stride = 1.5 from f.h5 attribute 'stride' on /: must be a whole number"),
        ("stride", "two", "stride = 'two'"),
        ("stride", True, "stride = True"),
        ("stride", 0, "must be >= 1"),
        ("padding", [[1, 2, 3], [0, 1]], "padding = "),
        ("groups", [1, 2], "groups = "),
    ],
)
def test_bad_file_values_name_their_origin(name, raw, match):
    with pytest.raises(HyperparameterError, match=match):
        from_file_value(name, raw, "f.h5 attribute 'stride' on /")


def test_flags_override_file_and_defaults_fill_the_rest():
    spec, origins = build_spec(
        {
            "stride": (2, "a.h5 attribute 'stride' on /"),
            "padding": (2, "a.h5 attribute 'pad' on /"),
        },
        {"stride": None, "padding": "1,0", "dilation": None, "groups": None},
    )
    assert spec == ConvSpec(stride=2, padding=(1, 0))
    assert origins == {
        "stride": "a.h5 attribute 'stride' on /",
        "padding": "flag",
        "dilation": "default",
        "groups": "default",
        "padding_mode": "default",
        "layout": "default",
    }
