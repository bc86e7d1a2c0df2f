"""The interceptor: which layer calls `loss_fn` makes, and their perturbations.

`Interceptor` is a `flax.linen` method interceptor (`nnx_capture.py` routes
flax.nnx layer calls to it the same way). For every call of a registered
layer kind (`kinds/`) it records a `Call`: the block the call implies, its
input and output shapes. With perturbations, a call in `loss_fn`'s own trace
records its input and adds its zero perturbation to its output; a call under
a JAX transformation inside `loss_fn` (remat, scan, vmap) reads its
perturbation and input slot from its module's variables and goes through
`_tap`, whose backward pass hands out both the output cotangent and the input.

Once the trace is done, `with_stacks` gives each transformed call the stack
of its module's parameters, `layers_from_calls` groups the calls into the
blocks of a `Layers`, and `per_call` reads every call's input and output
cotangent from the backward pass. `Curvature` (`capture.py`) drives it.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.core import tracers

from optax_ekfac._src import compat, kinds
from optax_ekfac._src.blocks import Block, Layers, block_name, leaves_by_path


@dataclasses.dataclass(frozen=True)
class Call:
    """One call of a block seen while tracing `loss_fn`.

    `transformed`: made under a JAX transformation inside `loss_fn`, its
    perturbation and input slot come in as the module's variables, the
    `index`-th of its module; `stack`: the leading axes its module's
    parameters have beyond what the call sees (`(L,)` under `nn.scan`),
    filled in from the params once the trace is done. `inputs` and
    `outputs` are what one element of the stack sees.
    """

    name: str
    module_path: tuple[str, ...]
    kind: str
    method: str
    shape: kinds.CallShape
    inputs: jax.ShapeDtypeStruct
    outputs: jax.ShapeDtypeStruct
    transformed: bool = False
    index: int = 0
    stack: tuple[int, ...] = ()

    @property
    def entry_names(self) -> tuple[str, str]:
        """The module variables of a transformed call: perturbation, slot."""
        return (
            f"{ENTRY_PREFIX}output_{self.index}",
            f"{ENTRY_PREFIX}input_{self.index}",
        )

    def entries(self) -> tuple[jax.Array, jax.Array]:
        """Zero perturbation and input slot, stacked: `stack + shape`.

        The slot is floating point (token ids come back as floats, exact up
        to 2**24). Both are sharded as the layer's output and input are
        (the example axis, under an explicit mesh): a cotangent takes its
        primal's type.
        """
        outputs, inputs = self.outputs, self.inputs
        slot_dtype = (
            inputs.dtype
            if jnp.issubdtype(inputs.dtype, jnp.floating)
            else jnp.promote_types(outputs.dtype, jnp.float32)
        )

        def zeros(like, dtype):
            sharding = like.sharding
            spec = (tuple(sharding.spec) + (None,) * like.ndim)[: like.ndim]
            stacked = jax.sharding.NamedSharding(
                sharding.mesh,
                jax.sharding.PartitionSpec(*(None,) * len(self.stack), *spec),
            )
            return jnp.zeros(self.stack + like.shape, dtype, out_sharding=stacked)

        return zeros(outputs, outputs.dtype), zeros(inputs, slot_dtype)


# Module path -> variable name -> a transformed call's perturbation or slot.
Entries = dict[tuple[str, ...], dict[str, jax.Array]]

# Names of the module variables that carry a transformed call's perturbation
# and input slot; no layer has parameters of these names.
ENTRY_PREFIX = "optax_ekfac_"


@jax.custom_vjp
def _tap(outputs, perturbation, inputs, input_slot):
    """`outputs + perturbation`; the backward pass gives the perturbation the
    output cotangent and the input slot the layer input itself."""
    del inputs, input_slot
    return outputs + perturbation


def _tap_forward(outputs, perturbation, inputs, input_slot):
    return _tap(outputs, perturbation, inputs, input_slot), (inputs, input_slot)


def _tap_backward(residuals, cotangent):
    inputs, input_slot = residuals
    # The input's own gradient flows through the layer; the tap adds none.
    # The slot's "cotangent" is the input: not linear in `cotangent`, but the
    # capture reads it once, from the backward pass of the loss.
    return cotangent, cotangent, None, inputs.astype(input_slot.dtype)


_tap.defvjp(_tap_forward, _tap_backward)


def _in_discarded_trace(loss_trace: Any) -> bool:
    """Whether this runs within `nn.scan`'s extra trace of its body (a partial
    evaluation that checks the broadcast variables, whose jaxpr is dropped)
    inside `loss_fn`: calls there are not calls of the model."""
    return compat.in_partial_eval_since(loss_trace)


class Interceptor:
    """Records block calls; adds perturbations to their outputs.

    With `perturbations=None` it only describes the calls (the shape pass).
    Otherwise the i-th call in `loss_fn`'s own trace gets `perturbations[i]`
    and records its input; a call under a transformation inside `loss_fn`
    reads its perturbation and input slot from its module's variables
    (`Call.entry_names`) and goes through `_tap`.

    It is a `flax.linen` method interceptor; the flax.nnx capture (`nnx_capture.py`)
    calls it the same way, with a context that also carries `module_path`
    (nnx modules do not know their path), `parameters` and `entry`.
    """

    def __init__(self, perturbations: tuple[jax.Array, ...] | None = None):
        self.perturbations = perturbations
        self.calls: list[Call] = []
        self.inputs: list[jax.Array] = []
        # The JAX trace loss_fn runs in; calls under another one are
        # `transformed`.
        self.loss_trace = None
        # The same trace as an object, where the search for a partial
        # evaluation inside loss_fn stops (`_in_discarded_trace`).
        self.loss_trace_object = None
        # The sum of the loss terms' weights, None for unweighted losses.
        self.weights_sum: jax.Array | None = None
        # Transformed calls' perturbations and input slots, by module path
        # and variable name (`Call.entries`), for the capture to hand to the
        # modules; empty in the shape pass.
        self.entries: Entries = {}
        self._num_direct = 0
        self._num_transformed: dict[tuple[str, ...], int] = {}

    def __call__(self, next_fun, args, kwargs, context):
        kind = kinds.kind_of(context.module, context.method_name)
        if kind is None or _in_discarded_trace(self.loss_trace_object):
            return next_fun(*args, **kwargs)
        module_path = _module_path(context)
        name = block_name(module_path)
        transformed = tracers.current_trace() != self.loss_trace
        if transformed:
            _check_sliced(name, kind.name, context)
        # The input is the first argument; the kind may read the others.
        if args:
            inputs, other_args, other_kwargs = args[0], tuple(args[1:]), dict(kwargs)
        else:
            first = next(iter(kwargs))
            inputs, other_args = kwargs[first], ()
            other_kwargs = {key: kwargs[key] for key in kwargs if key != first}
        outputs = next_fun(*args, **kwargs)
        shape = jax.ShapeDtypeStruct
        call = Call(
            name=name,
            module_path=module_path,
            kind=kind.name,
            method=context.method_name,
            shape=kind.describe(
                kinds.CallSite(
                    name,
                    kinds.LinenNames(context.module),
                    shape(inputs.shape, inputs.dtype),
                    shape(outputs.shape, outputs.dtype),
                    other_args,
                    other_kwargs,
                )
            ),
            inputs=shape(
                inputs.shape, inputs.dtype, sharding=jax.typeof(inputs).sharding
            ),
            outputs=shape(
                outputs.shape, outputs.dtype, sharding=jax.typeof(outputs).sharding
            ),
            transformed=transformed,
            index=self._num_transformed.get(module_path, 0) if transformed else 0,
        )
        if transformed:
            self._num_transformed[module_path] = call.index + 1
        else:
            self._num_direct += 1
        if self.perturbations is not None:
            if transformed:
                outputs = self._tapped(call, context, outputs, inputs)
            else:
                outputs = outputs + self._perturbation(call)
        self.calls.append(call)
        if not transformed:
            self.inputs.append(inputs)
        return outputs

    def _perturbation(self, call: Call) -> jax.Array:
        assert self.perturbations is not None
        index = self._num_direct - 1
        if index >= len(self.perturbations) or (
            call.outputs.shape != self.perturbations[index].shape
        ):
            raise _changed_calls_error(call.name)
        return self.perturbations[index]

    def _tapped(self, call, context, outputs, inputs) -> jax.Array:
        perturbation, input_slot = (
            _read_entry(context, name) for name in call.entry_names
        )
        if perturbation is None or input_slot is None:
            raise ValueError(
                f"{call.name}: this {call.kind} layer runs inside a JAX "
                "transformation within loss_fn, and its module does not hold "
                "the capture's variables: loss_fn must apply the model with "
                "the params it is given, unchanged in structure, as its "
                "'params' collection (model.apply({'params': params}, x))."
            )
        if perturbation.shape != outputs.shape or input_slot.shape != inputs.shape:
            raise _changed_calls_error(call.name)
        return _tap(outputs, perturbation, inputs, input_slot)


def _changed_calls_error(name: str) -> RuntimeError:
    return RuntimeError(
        f"{name}: loss_fn called its layers differently in two traces with the "
        "same inputs; the capture needs a loss_fn whose layer calls depend "
        "only on shapes."
    )


def _read_entry(context, name: str) -> jax.Array | None:
    """A capture variable of the called module, or None if it has none."""
    if hasattr(context, "entry"):  # the nnx capture's context
        return context.entry(name)
    module = context.module
    if not module.has_variable("params", name):
        return None
    return module.get_variable("params", name)


def _check_sliced(name: str, kind: str, context) -> None:
    """Raises unless a transformed call's parameters are its own: arguments of
    the transformation (sliced by a scan or vmap, passed through by remat),
    where its perturbation and input slot will be too."""
    parameters = getattr(context, "parameters", None)
    if parameters is None:
        parameters = context.module.variables.get("params", {})
    leaves = jax.tree.leaves(parameters)
    if all(compat.is_tracer_of_current_trace(leaf) for leaf in leaves):
        return
    raise ValueError(
        f"{name}: this {kind} layer runs inside a JAX transformation within "
        "loss_fn that does not pass it its parameters (nn.scan with "
        "variable_broadcast='params' (weight tying), nn.vmap with "
        "variable_axes={'params': None} (a vmap over the examples), "
        "jax.checkpoint, jax.vmap or an nnx transform over a function that "
        "closes over the parameters or the module), so the capture cannot "
        "tell its calls apart. Supported: nn.remat / nn.checkpoint / "
        "nnx.remat, nn.scan / nn.vmap with variable_axes={'params': 0}, "
        "nnx.scan / nnx.vmap over a module stacked on axis 0, and "
        "jax.checkpoint of a function that takes the params (or the nnx "
        "module) as an argument. Otherwise apply the transformation to "
        "modules without captured layers, or leave it out when training "
        f"with EKFAC ({kinds.supported()})."
    )


def _module_path(context) -> tuple[str, ...]:
    """The called module's path: a linen module knows it; an nnx capture's
    context carries it."""
    path = getattr(context, "module_path", None)
    return tuple(context.module.path if path is None else path)


def with_entries(params: Any, entries: Entries) -> Any:
    """`params` with the transformed calls' variables added to their modules'
    dicts (new dicts along the way; `params` itself is not changed)."""
    if not entries:
        return params
    params = dict(params)
    for module_path, variables in entries.items():
        node = params
        for key in module_path:
            node[key] = dict(node.get(key, {}))
            node = node[key]
        node.update(variables)
    return params


def per_call(
    calls: list[Call], direct_inputs: tuple, cotangents: tuple
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Every call's input and output cotangent, in call order, from the
    recorded inputs of direct calls and the cotangents `(direct, entries)`:
    a transformed call's input is its slot's cotangent (`_tap`)."""
    direct_outputs, entry_cotangents = cotangents
    direct_input_iter, direct_output_iter = iter(direct_inputs), iter(direct_outputs)
    inputs, outputs = [], []
    for call in calls:
        if call.transformed:
            variables = entry_cotangents[call.module_path]
            output_name, input_name = call.entry_names
            inputs.append(variables[input_name].astype(call.inputs.dtype))
            outputs.append(variables[output_name])
        else:
            inputs.append(next(direct_input_iter))
            outputs.append(next(direct_output_iter))
    return tuple(inputs), tuple(outputs)


def with_stacks(calls: list[Call], params: optax.Params) -> list[Call]:
    """The calls, each transformed one with the leading axes its module's
    parameters have beyond the call's (`(L,)` for a scanned layer)."""
    leaves = leaves_by_path(params)
    stacked = []
    for call in calls:
        param_name, shape = call.shape.params[0]
        leaf = leaves.get(call.module_path + (param_name,))
        if call.transformed and leaf is not None:
            held = tuple(leaf.shape)
            num_stacked = len(held) - len(shape)
            if num_stacked > 0 and held[num_stacked:] == tuple(shape):
                call = dataclasses.replace(call, stack=held[:num_stacked])
        stacked.append(call)
    return stacked


def layers_from_calls(calls: list[Call], params: optax.Params) -> Layers:
    """Groups calls into blocks and matches them to the params tree."""
    leaves = leaves_by_path(params)
    calls_by_name: dict[str, list[Call]] = {}
    for call in calls:
        calls_by_name.setdefault(call.name, []).append(call)
    blocks = []
    for name, block_calls in calls_by_name.items():
        first = block_calls[0].shape
        for call in block_calls[1:]:
            if call.shape != first:
                raise ValueError(
                    f"{name}: its calls imply different blocks ({first} and "
                    f"{call.shape}); a module called several times must see "
                    "inputs of the same feature shape."
                )
        stack = block_calls[0].stack
        if any(call.stack != stack for call in block_calls):
            raise ValueError(
                f"{name}: this module is called both inside and outside a "
                "transformation that stacks its parameters; call it one way."
            )
        module_path = block_calls[0].module_path
        param_paths = tuple(module_path + (p,) for p, _ in first.params)
        for path, (_, shape) in zip(param_paths, first.params):
            _check_param(name, path, stack + tuple(shape), leaves)
        blocks.append(
            Block(
                name=name,
                kind=block_calls[0].kind,
                param_paths=param_paths,
                input_dim=first.input_dim,
                output_dim=first.output_dim,
                num_calls=len(block_calls),
                num_groups=first.num_groups,
                config=first.config,
                call_methods=tuple(call.method for call in block_calls),
                stack=stack,
                diagonal_input=kinds.get(block_calls[0].kind).diagonal_input,
            )
        )
    owned = {path for block in blocks for path in block.param_paths}
    fallback = tuple(path for path in leaves if path not in owned)
    return Layers(blocks=tuple(blocks), fallback=fallback)


def _check_param(name: str, path, shape, leaves) -> None:
    """Raises unless `params` holds the parameter a call needs, as it needs it."""
    if path not in leaves:
        raise ValueError(
            f"{name}: its parameter {'/'.join(path)} is not in params. loss_fn "
            "must apply the model with the params it is given as its 'params' "
            "collection, e.g. model.apply({'params': params}, x)."
        )
    held = leaves[path].shape
    if len(held) > len(shape):
        raise ValueError(
            f"{name}: params hold {'/'.join(path)} of shape {held}, the layer's "
            f"calls need {tuple(shape)}: its parameters are stacked on an axis "
            "other than the first (nn.vmap or nn.scan with variable_axes="
            "{'params': k}, k > 0), which the capture does not support; stack "
            "them on axis 0 (variable_axes={'params': 0})."
        )
    if held != tuple(shape):
        raise ValueError(
            f"{name}: params hold {'/'.join(path)} of shape {held}, the layer's "
            f"calls need {tuple(shape)}; are these the params loss_fn applies?"
        )
