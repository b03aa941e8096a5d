"""The hyperparameter table: flags and files read through it, merged into a ConvSpec; one
meaning of ``padding`` in the library."""

import numpy as np
import pytest

from convcli import ConvSpec, HyperparameterError, UsageError, conv_forward
from convcli.hparams import (
    BY_NAME,
    FILE_KEYS,
    HPARAMS,
    build_spec,
    format_hparams,
    spec_from,
)
from convcli.sweep import CONFIG_KEYS, DEFAULTS


def parse_flag(name, text):
    return BY_NAME[name].from_text(text)


def from_file_value(name, raw, origin):
    return BY_NAME[name].from_value(raw, origin)


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
        ("padding", "same_upper", "same_upper"),
        ("padding", "SAME_LOWER", "same_lower"),
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
        ("stride", "0", "stride '0': must be >= 1"),
        ("stride", "1.5", "stride '1.5'"),
        ("stride", "1,2,3,4", "stride '1,2,3,4'"),
        ("padding_mode", "mirror", "padding_mode 'mirror'"),
        ("layout", "nwhc", "layout 'nwhc'"),
        ("padding", "-1", "padding '-1': must be >= 0"),
        ("padding", "full", "padding 'full'"),
        ("padding", "1,2,3,4,5", "padding '1,2,3,4,5'"),
        ("groups", "1,1", "groups '1,1'"),
        ("dilation", "", "dilation ''"),
    ],
)
def test_bad_texts_are_usage_errors_naming_the_parameter(name, text, match):
    """The library names the parameter; the CLI turns ``param`` into its flag."""
    with pytest.raises(UsageError, match=match) as caught:
        parse_flag(name, text)
    assert caught.value.param == name
    assert "--" not in str(caught.value)


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
    resolved = build_spec(
        {
            "stride": (2, "a.h5 attribute 'stride' on /"),
            "padding": (2, "a.h5 attribute 'pad' on /"),
        },
        {"stride": None, "padding": "1,0", "dilation": None, "groups": None},
        rank=2,
    )
    spec, origins = resolved.spec, resolved.origins
    assert spec == ConvSpec(stride=2, padding=(1, 0))
    assert origins == {
        "stride": "a.h5 attribute 'stride' on /",
        "padding": "flag",
        "dilation": "default",
        "groups": "default",
        "padding_mode": "default",
        "layout": "default",
        "transposed": "default",
        "output_padding": "default",
    }


# --- padding has one meaning in the library ----------------------------------------------------


def test_conv_spec_padding_pairs_are_nested_never_flat():
    """(1, 2) is one value per axis; before/after is ((1, 2),): never a flat list."""
    assert ConvSpec(padding=(1, 2)).explicit_padding(2) == ((1, 1), (2, 2))
    assert ConvSpec(padding=((1, 2),)).explicit_padding(1) == ((1, 2),)
    with pytest.raises(HyperparameterError, match="padding must be an int, one int per axis"):
        ConvSpec(padding=(1, 2, 0, 1))
    x, w = np.ones((1, 5, 1)), np.ones((3, 1, 1))
    with pytest.raises(HyperparameterError, match="padding has 2 values but x has 1 spatial axis"):
        conv_forward(x, w, None, ConvSpec(padding=(1, 2)))


@pytest.mark.parametrize(
    ("spelling", "rank", "expected"),
    [
        ((1, 2), 1, ((1, 2),)),  # 1-D: before, after
        ((1, 2), 2, (1, 2)),  # 2-D: one per axis
        ((1, 2, 0, 1), 2, ((1, 2), (0, 1))),
        ((1, 2, 3), 3, (1, 2, 3)),
        ((1, 2, 3, 4, 5, 6), 3, ((1, 2), (3, 4), (5, 6))),
        (2, 3, 2),
        ("same", 2, "same"),
    ],
)
def test_flat_spellings_are_read_with_the_rank(spelling, rank, expected):
    assert spec_from({"padding": spelling}, rank).padding == ConvSpec(padding=expected).padding


def test_a_flat_spelling_that_fits_no_reading_is_refused():
    with pytest.raises(HyperparameterError, match="padding has 4 values; x has 3 spatial axes"):
        spec_from({"padding": (1, 2, 0, 1)}, 3)


def test_the_table_drives_files_sweeps_and_rendering():
    assert [h.name for h in HPARAMS] == list(ConvSpec.__dataclass_fields__)
    assert FILE_KEYS["pad"] == FILE_KEYS["padding"] == "padding"
    for h in HPARAMS:
        assert h.key in CONFIG_KEYS
        assert DEFAULTS[h.key] == h.default
        assert getattr(ConvSpec(), h.name) == getattr(ConvSpec(**{h.name: h.default}), h.name)
    shown = {"stride": [2, 2], "padding": [[1, 1], [0, 0]], "dilation": [1, 1], "groups": 1}
    assert format_hparams(shown) == "stride=2 padding=1,0 dilation=1 groups=1"
    assert format_hparams({**shown, "layout": "nchw"}).endswith(" layout=nchw")
