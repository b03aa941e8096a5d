"""Found by a hostile review of issue 14's features (safetensors, --layer, inspect, --impl with
same_lower); each test failed before its fix."""

from __future__ import annotations

from typer.testing import CliRunner

from convcli import ConvSpec
from convcli.check.adapters import ADAPTERS, callable_adapter
from convcli.check.userimpl import impl_config
from convcli.cli import app

runner = CliRunner()


def test_same_lower_reaches_a_callable_resolved_not_as_a_word_it_never_agreed_to():
    """A callable takes padding "same" and "valid" (README); "same_lower" is resolved for the
    given layer into (before, after) pairs, here asymmetric: the extra pixel first."""
    adapter = callable_adapter("nhwc", ("stride", "padding"))
    config = impl_config((1, 8, 8, 3), (3,), 2, ConvSpec(stride=2, padding="same_lower"), adapter)
    assert config.pad == ((1, 0), (1, 0))
    symmetric = impl_config((1, 7, 7, 3), (3,), 2, ConvSpec(stride=2, padding="same_lower"), adapter)
    assert symmetric.pad == 1


def test_same_on_a_given_layer_reaches_classic_as_the_integer_it_resolves_to():
    """Classic takes one integer pad; 'same' that comes out symmetric on the given layer is
    that integer, not a refusal."""
    config = impl_config((1, 7, 7, 3), (3,), 2, ConvSpec(padding="same"), ADAPTERS["classic"])
    assert config.pad == 1

