"""The public signatures spell out the options dataclasses, field by field.

`scale_by_ekfac`, `ekfac` and `ekfac_sgd` take every setting as an explicit
keyword (for users, docs and `optax.inject_hyperparams`, which reads
signatures); their defaults and types come from `_src/options.py`. These
tests make a setting added, renamed or re-defaulted in one place and not the
others fail.
"""

import dataclasses
import inspect

import pytest

import optax_ekfac as oek
from optax_ekfac._src import options

PRECONDITIONER = dataclasses.fields(options.Options)
ADAPTATION = dataclasses.fields(options.Adaptation)
FIXED_RATE = dataclasses.fields(options.FixedRate)
NOT_DAMPING = [field for field in PRECONDITIONER if field.name != "damping"]
FIXED_RATE_ONLY = [field for field in FIXED_RATE if field.name != "damping"]


def _expected(*groups) -> dict:
    """`{name: (default, type)}` of the fields, in order."""
    return {
        field.name: (field.default, field.type) for group in groups for field in group
    }


def _keywords(function, after: int) -> dict:
    """`{name: (default, annotation)}` of the parameters after the first
    `after` (the layers, and the learning rate where there is one)."""
    parameters = list(inspect.signature(function).parameters.values())[after:]
    return {p.name: (p.default, p.annotation) for p in parameters}


def _nesterov_field():
    (field,) = [field for field in FIXED_RATE if field.name == "nesterov"]
    return field


CASES = {
    "scale_by_ekfac": (oek.scale_by_ekfac, 1, _expected(PRECONDITIONER)),
    "ekfac": (
        oek.ekfac,
        2,
        # nesterov only for the deprecated learning_rate, which it refuses
        # without.
        _expected(ADAPTATION[:1], [_nesterov_field()], ADAPTATION[1:], NOT_DAMPING),
    ),
    "ekfac_sgd": (
        oek.ekfac_sgd,
        2,
        _expected(FIXED_RATE[:2], FIXED_RATE[2:3], FIXED_RATE[3:], NOT_DAMPING),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_signature_is_the_options_fields_with_their_defaults_and_types(name):
    function, after, expected = CASES[name]
    assert _keywords(function, after) == expected


@pytest.mark.parametrize("name", CASES)
def test_every_argument_is_documented(name):
    function = CASES[name][0]
    doc = inspect.getdoc(function)
    arguments = doc[doc.index("Args:") : doc.index("Returns:")]
    for parameter in inspect.signature(function).parameters:
        assert parameter in arguments, parameter


def test_the_leading_arguments_are_optax_sgds():
    """`ekfac_sgd(layers, learning_rate, momentum=None, nesterov=False)`, as
    `optax.sgd(learning_rate, momentum=None, nesterov=False)`; the rest are
    keyword-only."""
    parameters = inspect.signature(oek.ekfac_sgd).parameters
    positional = [
        name
        for name, p in parameters.items()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]
    assert positional == ["layers", "learning_rate", "momentum", "nesterov"]
    assert parameters["learning_rate"].default is inspect.Parameter.empty
    for function, leading in ((oek.scale_by_ekfac, 1), (oek.ekfac, 2)):
        parameters = list(inspect.signature(function).parameters.values())
        assert all(
            p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters[leading:]
        )


def test_the_other_entry_points_take_no_options():
    """`accumulated` and the nnx capture take none of the optimizer's
    settings, so there is nothing there to drift."""
    names = {
        field.name
        for group in (PRECONDITIONER, ADAPTATION, FIXED_RATE)
        for field in group
    }
    for function in (oek.accumulated, oek.nnx.Curvature, oek.Curvature):
        assert not names & set(inspect.signature(function).parameters), function
