"""The public API: what ``convcli.__all__`` lists is importable, documented and typed."""

import importlib.resources

import pytest

import convcli


@pytest.mark.parametrize("name", sorted(set(convcli.__all__) - {"__version__"}))
def test_every_public_name_resolves_and_has_a_docstring(name):
    value = getattr(convcli, name)
    if not isinstance(value, int):  # DEFAULT_WORKSPACE
        assert (value.__doc__ or "").strip(), f"convcli.{name} has no docstring"


def test_the_api_covers_engines_checking_files_and_errors():
    expected = {
        "ConvSpec",
        "conv_forward",
        "conv_backward",
        "conv_forward_reference",
        "conv_backward_reference",
        "gradcheck",
        "Tolerance",
        "read_tensor",
        "write_tensors",
        "ConvcliError",
    }
    assert expected <= set(convcli.__all__)
    assert set(dir(convcli)) == set(convcli.__all__)


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = convcli.nope


def test_the_package_ships_its_type_information():
    assert (importlib.resources.files("convcli") / "py.typed").is_file()


def test_a_library_error_names_its_parameter_and_pickles_whole():
    import pickle

    with pytest.raises(convcli.UsageError) as caught:
        convcli.gradcheck(*_tiny(), mode="psychic")
    error = caught.value
    assert error.param == "mode"
    assert str(error).startswith("mode 'psychic'")
    assert error.describe("--mode").startswith("--mode 'psychic'")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.param, str(copy)) == (type(error), error.param, str(error))


def _tiny():
    import numpy as np

    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((1, 3, 3, 1)),
        rng.standard_normal((2, 2, 1, 1)),
        None,
        convcli.ConvSpec(),
    )
