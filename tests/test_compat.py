"""The compatibility module against the installed JAX, optax and flax.

`optax_ekfac/_src/compat.py` holds all the library needs beyond public APIs:
JAX's current trace as an object, whether a partial evaluation (the trace
`nn.scan` drops) runs since a given trace, whether a value is a tracer of the
current trace, and the frames that recognise optax's and flax's wrappers.
Each is checked here on real traces and real wrappers, so that a release
that changes them underneath fails here instead of silently changing what
the capture records or disabling a refusal. No other module of the package
may use JAX's private modules or read the call stack.

Everything here only traces (`jax.eval_shape`, `jax.make_jaxpr`): nothing is
compiled.
"""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax.core import tracers
from flax.training import train_state

import optax_ekfac as oek
from optax_ekfac._src import callers, compat

# --- no private internals outside compat.py --------------------------------------

_PACKAGE = pathlib.Path(oek.__file__).parent
_PRIVATE_USES = re.compile(
    r"jax\._src|jax\.interpreters|trace_ctx|\._trace\b|sys\._getframe"
    r"|inspect\.currentframe|\bf_back\b|\bf_globals\b|\bf_locals\b"
)


def test_only_compat_uses_private_internals_or_the_call_stack():
    offenders = [
        f"{path.relative_to(_PACKAGE)}: {match.group()}"
        for path in sorted(_PACKAGE.rglob("*.py"))
        if path.name != "compat.py"
        for match in _PRIVATE_USES.finditer(path.read_text())
    ]
    assert not offenders


# --- traces ----------------------------------------------------------------------


def test_current_trace_is_one_object_per_trace():
    seen = {}

    def inner(y):
        seen["inner"] = compat.current_trace()
        return y

    def outer(x):
        seen["outer"] = compat.current_trace()
        seen["outer again"] = compat.current_trace()
        seen["outer state"] = tracers.current_trace()
        jax.vmap(inner)(jnp.stack([x, x]))
        seen["outer state after"] = tracers.current_trace()
        return x

    jax.make_jaxpr(outer)(1.0)
    assert seen["outer"] is seen["outer again"]
    assert seen["inner"] is not seen["outer"]
    assert seen["outer"] is not compat.current_trace()
    # The public opaque state that tells the capture's transformed calls apart
    # agrees with the object: equal in the same trace only.
    assert seen["outer state"] == seen["outer state after"]
    assert seen["outer state"] != tracers.current_trace()


@pytest.mark.parametrize(
    "transformation",
    [jax.jit, jax.vmap, jax.checkpoint, jax.grad],
    ids=["jit", "vmap", "checkpoint", "grad"],
)
def test_tracer_of_current_trace_is_an_argument_not_a_closed_over_value(
    transformation,
):
    seen = {}

    def outer(x):
        seen["outer argument"] = compat.is_tracer_of_current_trace(x)

        def inner(y):
            seen["argument"] = compat.is_tracer_of_current_trace(y)
            seen["closed over"] = compat.is_tracer_of_current_trace(x)
            seen["computed here"] = compat.is_tracer_of_current_trace(y * 2)
            return jnp.sum(x * y)

        inner_input = jnp.stack([x, x]) if transformation is jax.vmap else x
        transformation(inner)(inner_input)
        return x

    jax.make_jaxpr(outer)(1.0)
    assert seen == {
        "outer argument": True,
        "argument": True,
        "closed over": False,
        "computed here": True,
    }
    assert not compat.is_tracer_of_current_trace(jnp.ones(()))
    assert not compat.is_tracer_of_current_trace(1.0)


class _Cell(nn.Module):
    @nn.compact
    def __call__(self, carry, _):
        return nn.Dense(carry.shape[-1])(carry), None


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            _Cell,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=2,
        )
        return scan()(x, None)[0]


class _Remat(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.remat(nn.Dense)(3)(x)


def _partial_eval_seen_by_dense_calls(model: nn.Module, transformation=None):
    """For each `nn.Dense` call of `model.apply` (under `transformation`):
    whether a partial evaluation runs since the apply's own trace, and since
    the call's own trace."""
    x = jnp.ones((4, 3))
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    seen = []

    def apply(params, x):
        outer = compat.current_trace()

        def interceptor(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.Dense):
                seen.append(
                    (
                        compat.in_partial_eval_since(outer),
                        compat.in_partial_eval_since(compat.current_trace()),
                    )
                )
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            return jnp.sum(model.apply(params, x))

    jax.eval_shape(transformation(apply) if transformation else apply, params, x)
    return seen


def test_partial_eval_is_nn_scans_discarded_trace_only():
    seen = _partial_eval_seen_by_dense_calls(_Scanned())
    # nn.scan traces its body first under a partial evaluation (dropped),
    # then in lax.scan's trace (the model's calls).
    assert len(seen) >= 2
    assert seen[0] == (True, False)
    assert all(call == (False, False) for call in seen[1:])


@pytest.mark.parametrize(
    "transformation",
    [None, jax.grad, jax.checkpoint, jax.vmap],
    ids=["plain", "grad", "checkpoint", "vmap"],
)
def test_no_partial_eval_outside_nn_scan(transformation):
    if transformation is jax.vmap:
        transformation = lambda f: jax.vmap(f, in_axes=(None, 0))  # noqa: E731
    seen = _partial_eval_seen_by_dense_calls(_Remat(), transformation)
    assert seen
    assert all(call == (False, False) for call in seen)


def test_scan_under_grad_still_shows_its_discarded_trace():
    seen = _partial_eval_seen_by_dense_calls(_Scanned(), jax.grad)
    assert seen[0] == (True, False)
    assert all(call == (False, False) for call in seen[1:])


# --- the wrappers recognised by the call stack -------------------------------------


class _Probed(Exception):
    """Raised by the probe once it has recorded what the callers say."""


def _probe(seen: dict) -> optax.GradientTransformationExtraArgs:
    """A transformation whose update records what `callers` reads from the
    call stack, then stops the wrapper that called it."""

    def update(updates, state, params=None, **extra_args):
        del updates, state, params
        seen["extra args"] = sorted(extra_args)
        seen["under multi steps"] = callers.under_multi_steps()
        seen["cause"] = callers.missing_stats_cause()
        raise _Probed

    return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update)


_PARAMS = {"w": jnp.ones(2)}
_GENERAL_ADVICE = "a wrapper that calls tx.update without extra arguments"


def test_direct_update_is_no_wrapper():
    seen: dict = {}
    with pytest.raises(_Probed):
        _probe(seen).update(_PARAMS, optax.EmptyState(), _PARAMS)
    assert not seen["under multi steps"]
    assert seen["cause"].startswith(_GENERAL_ADVICE)


def test_multi_steps_is_recognised():
    seen: dict = {}
    tx = optax.MultiSteps(_probe(seen), every_k_schedule=2)
    with pytest.raises(_Probed):
        tx.update(_PARAMS, tx.init(_PARAMS), _PARAMS, stats="stats")
    assert seen["under multi steps"]


def test_lookahead_is_recognised():
    seen: dict = {}
    tx = optax.lookahead(_probe(seen), sync_period=2, slow_step_size=0.5)
    params = optax.LookaheadParams.init_synced(_PARAMS)
    with pytest.raises(_Probed):
        tx.update(params, tx.init(params), params)
    assert not seen["under multi steps"]
    assert seen["cause"].startswith("optax.lookahead does not forward")


def test_flax_train_state_given_stats_is_recognised():
    seen: dict = {}
    state = train_state.TrainState.create(
        apply_fn=None, params=_PARAMS, tx=_probe(seen)
    )
    with pytest.raises(_Probed):
        state.apply_gradients(grads=_PARAMS, stats="stats")
    assert seen["extra args"] == []
    assert seen["cause"].startswith(
        "flax.training.train_state.TrainState.apply_gradients"
    )


def test_flax_train_state_without_stats_and_ours_are_not_the_cause():
    seen: dict = {}
    flax_state = train_state.TrainState.create(
        apply_fn=None, params=_PARAMS, tx=_probe(seen)
    )
    with pytest.raises(_Probed):
        flax_state.apply_gradients(grads=_PARAMS)
    assert seen["cause"].startswith(_GENERAL_ADVICE)
    ours = oek.TrainState.create(apply_fn=None, params=_PARAMS, tx=_probe(seen))
    with pytest.raises(_Probed):
        ours.apply_gradients(grads=_PARAMS, stats="stats")
    assert seen["extra args"] == ["stats"]
    assert seen["cause"].startswith(_GENERAL_ADVICE)
