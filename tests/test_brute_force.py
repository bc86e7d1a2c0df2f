"""Every layer kind against a reference built without the library's code.

The references here use no `optax_ekfac._src` helper (`example_rows`,
`block_matrix`, `per_example_block_gradients`, ...) and no eigenbasis the
library computed:

* layer inputs and per-example output gradients come from this file's own
  flax method interceptor (`_Recorder`), which records each call's input and
  adds a zero perturbation to its output; `jax.vmap(jax.grad(...))` of each
  example's summed loss with respect to the perturbations gives the output
  gradients, with respect to the parameters the per-example gradients;
* the losses are written here (`_cross_entropy`, `_half_squared_error`);
* rows are built by NumPy code here: Dense and DenseGeneral inputs reshaped,
  Conv patches by explicit loops with SAME padding worked out here, one-hot
  token rows and a tied embedding's `attend` rows;
* factors, eigenbases (`np.linalg.eigh` in float64), scalings and the update
  (`np.linalg.solve(Q diag(S) Qᵀ + λ I, vec g)` with this file's `Q`) are
  computed in NumPy from those rows and from per-example block gradients
  reshaped by NumPy code here.

Every reference first reproduces the per-example gradients from its own rows
(`test_reference_rows_reproduce_vmap_grad`), so the rows themselves are
checked against `vmap(grad)` before anything is compared with the library.

The conventions pinned (see `optax_ekfac/transform.py`): `N` is the number of
loss terms (`B * T` for token losses; `S * N` with `S` Monte-Carlo label
samples); `A` averages `a aᵀ` over all rows (examples, positions, calls);
`B = (1/N) Σ d dᵀ`; `S = (1/N) Σ_n (U_Aᵀ G_n U_B)²` with `G_n` the gradient of
example `n`'s summed loss; embeddings have a diagonal `A`, `U_A = I` and
per-position scalings, and a tied `attend` call is one more call of the same
block with its sides swapped.

With `max_factor_dim`, a side of `d - 1 > max_factor_dim` coordinates is
block-diagonal: the reference zeroes the off-block entries of its dense
factor (`k = ceil((d - 1) / max_factor_dim)` consecutive blocks of
`ceil(d / k)`, the last one shorter), decomposes each diagonal block with
`np.linalg.eigh`, and solves against the block-diagonal eigenbases, the
scalings again from `vmap(grad)` per-example gradients in those bases.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import optax_ekfac as oek

F64 = dict(param_dtype=jnp.float64)
NUM_EXAMPLES, NUM_POSITIONS = 6, 4
VOCABULARY, WIDTH = 5, 4
DAMPING = 1e-3
NUM_SAMPLES = 3
# Reference eigenvalues must be this far apart (relative to the largest) for
# eigenvectors to be compared one by one.
MIN_RELATIVE_EIGENGAP = 1e-4
# Small enough to block a side of every problem, with sizes it does not divide.
MAX_FACTOR_DIM = 2


# --- models: one per layer kind, with token (per-position) losses -------------


class DenseTokens(nn.Module):
    """Dense on `[B, T, 5]` inputs; `shared` is called twice."""

    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(5, name="shared", **F64)
        hidden = shared(jnp.tanh(shared(x)))
        return nn.Dense(3, name="head", **F64)(jnp.tanh(hidden))


class AttentionTokens(nn.Module):
    """Self-attention: query, key, value and out are DenseGeneral blocks."""

    @nn.compact
    def __call__(self, x):
        x = nn.MultiHeadDotProductAttention(
            num_heads=2, qkv_features=4, out_features=3, name="attention", **F64
        )(x)
        return nn.Dense(3, name="head", **F64)(jnp.tanh(x))


class GroupedConvPixels(nn.Module):
    """A grouped, strided, SAME-padded Conv; one loss term per output pixel."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(
            6,
            (3, 3),
            strides=2,
            padding="SAME",
            feature_group_count=2,
            name="conv",
            **F64,
        )(x)
        return nn.Dense(3, name="head", **F64)(jnp.tanh(x))


class EmbedTokens(nn.Module):
    """An embedding lookup, then a per-token Dense."""

    @nn.compact
    def __call__(self, ids):
        hidden = nn.Embed(VOCABULARY, WIDTH, name="embed", **F64)(ids)
        return nn.Dense(3, name="head", **F64)(jnp.tanh(hidden))


class TiedTokens(nn.Module):
    """A tied embedding: lookups in, `attend` as the output projection."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(VOCABULARY, WIDTH, name="embed", **F64)
        hidden = jnp.tanh(nn.Dense(WIDTH, name="mix", **F64)(embed(ids)))
        return embed.attend(hidden)


def _cross_entropy(logits, labels):
    """Per-term categorical negative log-likelihood, written here."""
    log_probabilities = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probabilities, labels[..., None], -1)[..., 0]


def _half_squared_error(predictions, targets):
    return 0.5 * jnp.sum(jnp.square(predictions - targets), -1)


@dataclasses.dataclass(frozen=True)
class Problem:
    """A model, a batch, and its loss as the library's helper and as ours."""

    model: nn.Module
    x: jax.Array
    y: jax.Array
    library_loss: Callable
    reference_loss: Callable
    kinds: frozenset  # the block kinds the model must have


def _problem(name: str) -> Problem:
    """6 examples of 4 positions (conv: 3 x 3 output pixels) with a loss term
    per position, so that the loss terms `N` are not the examples."""
    key_x, key_y = jax.random.split(jax.random.key(0))
    tokens = (NUM_EXAMPLES, NUM_POSITIONS)
    classify = dict(
        library_loss=oek.softmax_cross_entropy, reference_loss=_cross_entropy
    )
    if name == "dense":
        return Problem(
            DenseTokens(),
            x=jax.random.normal(key_x, tokens + (5,), jnp.float64),
            y=jax.random.normal(key_y, tokens + (3,), jnp.float64),
            library_loss=oek.squared_error,
            reference_loss=_half_squared_error,
            kinds=frozenset({"Dense"}),
        )
    if name == "attention":
        return Problem(
            AttentionTokens(),
            x=jax.random.normal(key_x, tokens + (3,), jnp.float64),
            y=jax.random.randint(key_y, tokens, 0, 3),
            kinds=frozenset({"Dense", "DenseGeneral"}),
            **classify,
        )
    if name == "conv":
        # 5 x 6 pixels, stride 2: SAME pads rows by (1, 1), columns by (0, 1).
        return Problem(
            GroupedConvPixels(),
            x=jax.random.normal(key_x, (NUM_EXAMPLES, 5, 6, 4), jnp.float64),
            y=jax.random.randint(key_y, (NUM_EXAMPLES, 3, 3), 0, 3),
            kinds=frozenset({"Dense", "Conv"}),
            **classify,
        )
    # Few tokens, so that they repeat within and across examples.
    ids = jax.random.randint(key_x, tokens, 0, VOCABULARY)
    if name == "embed":
        return Problem(
            EmbedTokens(),
            x=ids,
            y=jax.random.randint(key_y, tokens, 0, 3),
            kinds=frozenset({"Dense", "Embed"}),
            **classify,
        )
    assert name == "tied", name
    return Problem(
        TiedTokens(),
        x=ids,
        y=jax.random.randint(key_y, tokens, 0, VOCABULARY),
        kinds=frozenset({"Dense", "Embed"}),
        **classify,
    )


def _num_loss_terms(problem: Problem, params) -> int:
    """How many entries the reference loss returns for the batch: `N`."""
    losses = jax.eval_shape(
        lambda params: problem.reference_loss(
            problem.model.apply({"params": params}, problem.x), problem.y
        ),
        params,
    )
    return losses.size


# --- the reference: this file's own interceptor and vmap(grad) ----------------


@dataclasses.dataclass
class _Call:
    """One recorded layer call."""

    path: str
    method: str
    module: nn.Module
    inputs: Any
    output_shape: jax.ShapeDtypeStruct


class _Recorder:
    """A flax method interceptor: for every call of a Dense, DenseGeneral, Conv
    or Embed (lookup or `attend`) it records the input and adds
    `perturbations[key]` to the output, `key` being `"path#i"` for the i-th
    call of the module at `path`."""

    KINDS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed)

    def __init__(self, perturbations=None):
        self.perturbations = perturbations
        self.calls: dict[str, _Call] = {}

    def __call__(self, next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        if not isinstance(module, self.KINDS) or method not in ("__call__", "attend"):
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        key = f"{path}#{sum(call.path == path for call in self.calls.values())}"
        outputs = next_fun(*args, **kwargs)
        if self.perturbations is not None:
            outputs = outputs + self.perturbations[key]
        self.calls[key] = _Call(
            path,
            method,
            module,
            args[0],
            jax.ShapeDtypeStruct(outputs.shape, outputs.dtype),
        )
        return outputs


def _apply(model, params, x, perturbations=None):
    recorder = _Recorder(perturbations)
    with nn.intercept_methods(recorder):
        outputs = model.apply({"params": params}, x)
    return outputs, recorder.calls


def _recorded_calls(model, params, x) -> dict[str, _Call]:
    """The calls of one forward pass, from shapes alone (no inputs kept)."""
    calls = {}

    def forward(params, x):
        outputs, recorded = _apply(model, params, x)
        calls.update(recorded)
        return outputs

    jax.eval_shape(forward, params, x)
    return calls


def _reference_pass(model, loss, params, x, y):
    """Inputs of every call, per-example output and parameter gradients, and
    the gradient of the mean loss, all by plain JAX."""
    _, calls = _apply(model, params, x)
    inputs = {key: call.inputs for key, call in calls.items()}
    zeros = {
        key: jnp.zeros((1,) + call.output_shape.shape[1:], call.output_shape.dtype)
        for key, call in calls.items()
    }

    def example_loss(params, perturbations, x_n, y_n):
        outputs, _ = _apply(model, params, x_n[None], perturbations)
        return loss(outputs, y_n[None]).sum()

    param_grads, output_grads = jax.vmap(
        jax.grad(example_loss, argnums=(0, 1)), in_axes=(None, None, 0, 0)
    )(params, zeros, x, y)
    mean_gradient = jax.grad(
        lambda params: loss(model.apply({"params": params}, x), y).mean()
    )(params)
    output_grads = {key: grads[:, 0] for key, grads in output_grads.items()}
    return dict(
        inputs=inputs,
        output_grads=output_grads,
        per_example=param_grads,
        gradient=mean_gradient,
    )


def _leaf(tree, path):
    for name in path.split("/"):
        tree = tree[name]
    return tree


# --- the reference: NumPy rows and block matrices ------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How this file reads a module's parameters as `G` block matrices."""

    kind: str
    num_groups: int
    kernel_rows: int  # rows of one group's kernel (no bias row)
    columns: int  # output features of one group

    def matrices(self, leaves: dict, lead: int) -> np.ndarray:
        """`[*lead, G, rows, columns]` from `kernel` (and `bias`) or `embedding`
        leaves with `lead` leading axes (e.g. the example axis)."""
        if self.kind == "Embed":
            embedding = np.asarray(leaves["embedding"])
            return embedding[..., None, :, :]
        kernel = np.asarray(leaves["kernel"])
        shape = kernel.shape[:lead]
        # Output features are group-major: feature j * columns + o is group j's.
        kernel = kernel.reshape(shape + (self.kernel_rows, self.num_groups, -1))
        kernel = np.moveaxis(kernel, lead + 1, lead)  # [*lead, G, rows, columns]
        if "bias" not in leaves:
            return kernel
        bias = np.asarray(leaves["bias"]).reshape(shape + (self.num_groups, 1, -1))
        return np.concatenate([kernel, bias], -2)


def _layout(kind: str, module: nn.Module, params: dict) -> _Layout:
    if kind == "Embed":
        return _Layout(kind, 1, module.num_embeddings, module.features)
    kernel = params["kernel"]
    if kind == "Conv":
        groups = module.feature_group_count
        return _Layout(
            kind, groups, math.prod(kernel.shape[:-1]), kernel.shape[-1] // groups
        )
    features = module.features
    num_features = len(features) if isinstance(features, tuple | list) else 1
    return _Layout(
        kind,
        1,
        math.prod(kernel.shape[:-num_features]),
        math.prod(kernel.shape[-num_features:]),
    )


def _kind(module: nn.Module) -> str:
    for kind in (nn.Embed, nn.Conv, nn.Dense, nn.DenseGeneral):
        if type(module) is kind:
            return kind.__name__
    raise TypeError(module)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Output size and leading pad of SAME padding (XLA's: extra pad at the end)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2


def _conv_patches(x: np.ndarray, module: nn.Conv) -> np.ndarray:
    """`[N, out_h, out_w, kh, kw, C]` image patches, by explicit loops."""
    assert module.padding == "SAME" and len(module.kernel_size) == 2
    strides = module.strides
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
    (kh, kw), (sh, sw) = module.kernel_size, strides
    n, height, width, channels = x.shape
    out_h, top = _same_padding(height, kh, sh)
    out_w, left = _same_padding(width, kw, sw)
    patches = np.zeros((n, out_h, out_w, kh, kw, channels))
    for i in range(out_h):
        for j in range(out_w):
            for u in range(kh):
                for v in range(kw):
                    row, column = i * sh + u - top, j * sw + v - left
                    if 0 <= row < height and 0 <= column < width:
                        patches[:, i, j, u, v] = x[:, row, column]
    return patches


def _with_ones(rows: np.ndarray) -> np.ndarray:
    return np.concatenate([rows, np.ones(rows.shape[:-1] + (1,))], -1)


def _group_rows(kind, calls, inputs, output_grads, layout, has_bias):
    """Input and output rows of every group, `[G, N, positions, dim]` each,
    the calls concatenated as more positions (not for embeddings)."""
    all_inputs, all_outputs = [], []
    for key, call in calls:
        x = np.asarray(inputs[key])
        d = np.asarray(output_grads[key])
        n = x.shape[0]
        if kind == "Conv":
            patches = _conv_patches(x, call.module)
            groups, columns = layout.num_groups, layout.columns
            patches = patches.reshape(patches.shape[:-1] + (groups, -1))
            # [N, oh, ow, kh, kw, G, Cg] -> [G, N, oh * ow, kh * kw * Cg]
            patches = np.moveaxis(patches, -2, 0)
            patches = patches.reshape(groups, n, -1, layout.kernel_rows)
            d = d.reshape(n, -1, groups, columns)
            a, d = patches, np.moveaxis(d, 2, 0)
        else:  # Dense, DenseGeneral: the contracted axes are the trailing ones
            axis = getattr(call.module, "axis", -1)
            axis = axis if isinstance(axis, tuple) else (axis,)
            axes = sorted(a % x.ndim for a in axis)
            assert axes == list(range(x.ndim - len(axes), x.ndim)), axes
            a = x.reshape(1, n, -1, layout.kernel_rows)
            d = d.reshape(1, n, -1, layout.columns)
        all_inputs.append(_with_ones(a) if has_bias else a)
        all_outputs.append(d)
    return np.concatenate(all_inputs, 2), np.concatenate(all_outputs, 2)


def _embedding_rows(calls, inputs, output_grads, vocabulary):
    """Vocabulary-side and feature-side rows, `[N, positions, V]` and
    `[N, positions, F]`: one-hot ids with the lookups' output gradients, then
    the `attend` calls' logit output gradients with their queries."""
    vocabulary_side, feature_side = [], []
    for key, call in calls:
        if call.method == "__call__":
            vocabulary_side.append(np.eye(vocabulary)[np.asarray(inputs[key])])
            feature_side.append(np.asarray(output_grads[key]))
        else:
            assert call.method == "attend"
            vocabulary_side.append(np.asarray(output_grads[key]))
            feature_side.append(np.asarray(inputs[key]))
    n = vocabulary_side[0].shape[0]

    def positions(rows):
        return np.concatenate([r.reshape(n, -1, r.shape[-1]) for r in rows], 1)

    return positions(vocabulary_side), positions(feature_side)


@dataclasses.dataclass
class _BlockReference:
    """One block's brute-force quantities, each with a leading group axis."""

    kind: str
    num_groups: int
    layout: _Layout
    rows_gradients: np.ndarray  # Σ_p a dᵀ from this file's rows, [G, N, in, out]
    per_example: np.ndarray  # vmap(grad), [G, N, in, out]
    gradient: np.ndarray  # of the mean loss, [G, in, out]
    input_factor: np.ndarray  # [G, in, in]; embeddings: the diagonal, [G, in]
    output_factor: np.ndarray
    input_eigenvalues: np.ndarray
    output_eigenvalues: np.ndarray
    input_basis: np.ndarray | None  # None for embeddings (the identity)
    output_basis: np.ndarray
    # (start, stop) of each diagonal block of a side (one: dense)
    input_blocks: list | None  # None for embeddings
    output_blocks: list
    scalings: np.ndarray
    kfac_scalings: np.ndarray
    update: np.ndarray  # solve(Q diag(S) Qᵀ + λ I, vec g) as [G, in, out]


def _eigh(matrix):
    return np.linalg.eigh(np.asarray(matrix, np.float64))


def _embedding_reference(
    vocabulary_rows, feature_rows, gradient, num_terms, damping, max_factor_dim
):
    """An embedding block (one group) from its vocabulary-side rows (one-hot
    ids, then attend's logit output gradients) and feature-side rows (lookup
    output gradients, then attend's queries): diagonal `A`, `U_A = I`,
    per-position scalings."""
    n, positions = vocabulary_rows.shape[:2]
    input_factor = np.square(vocabulary_rows).sum((0, 1)) / (n * positions)
    output_blocks = reference.diagonal_blocks(feature_rows.shape[-1], max_factor_dim)
    output_factor = reference.off_blocks_zeroed(
        np.einsum("npi,npj->ij", feature_rows, feature_rows) / num_terms,
        output_blocks,
    )
    output_eigenvalues, output_basis = reference.blockwise_eigh(
        output_factor, output_blocks
    )
    # Each position its own example: Σ_{n,p} a² ⊗ (U_Bᵀ d)².
    scalings = (
        np.einsum(
            "npv,npf->vf",
            np.square(vocabulary_rows),
            np.square(feature_rows @ output_basis),
        )
        / num_terms
    )
    identity = np.eye(len(input_factor))
    return dict(
        rows_gradients=np.einsum("npv,npf->nvf", vocabulary_rows, feature_rows),
        input_factor=input_factor,
        output_factor=output_factor,
        input_eigenvalues=input_factor,
        output_eigenvalues=output_eigenvalues,
        input_basis=None,
        output_basis=output_basis,
        input_blocks=None,
        output_blocks=output_blocks,
        scalings=scalings,
        kfac_scalings=np.outer(input_factor, np.maximum(output_eigenvalues, 0)),
        update=reference.solve_update(
            identity, output_basis, scalings, gradient, damping
        ),
    )


def _kronecker_reference(
    input_rows, output_rows, per_example, gradient, num_terms, damping, max_factor_dim
):
    """A block (one group) from its rows `[N, positions, dim]`, and the exact
    scalings from its `vmap(grad)` per-example gradients `[N, in, out]`; the
    factors' off-block entries zeroed where a side is wider than
    `max_factor_dim`."""
    n, positions = input_rows.shape[:2]
    input_blocks = reference.diagonal_blocks(input_rows.shape[-1], max_factor_dim)
    output_blocks = reference.diagonal_blocks(output_rows.shape[-1], max_factor_dim)
    input_factor = reference.off_blocks_zeroed(
        np.einsum("npi,npj->ij", input_rows, input_rows) / (n * positions),
        input_blocks,
    )
    output_factor = reference.off_blocks_zeroed(
        np.einsum("npi,npj->ij", output_rows, output_rows) / num_terms,
        output_blocks,
    )
    input_eigenvalues, input_basis = reference.blockwise_eigh(
        input_factor, input_blocks
    )
    output_eigenvalues, output_basis = reference.blockwise_eigh(
        output_factor, output_blocks
    )
    projected = np.einsum("ji,njo,op->nip", input_basis, per_example, output_basis)
    scalings = np.square(projected).sum(0) / num_terms
    return dict(
        rows_gradients=np.einsum("npi,npo->nio", input_rows, output_rows),
        input_factor=input_factor,
        output_factor=output_factor,
        input_eigenvalues=input_eigenvalues,
        output_eigenvalues=output_eigenvalues,
        input_basis=input_basis,
        output_basis=output_basis,
        input_blocks=input_blocks,
        output_blocks=output_blocks,
        scalings=scalings,
        kfac_scalings=np.outer(
            np.maximum(input_eigenvalues, 0), np.maximum(output_eigenvalues, 0)
        ),
        update=reference.solve_update(
            input_basis, output_basis, scalings, gradient, damping
        ),
    )


def _block_reference(
    kind, calls, passes, layout, has_bias, num_terms, damping, max_factor_dim
):
    """Factors, eigenbases, scalings and the update of one block.

    `num_terms` is what the output-gradient sums divide by: the loss terms `N`
    (times the label samples for a Monte-Carlo Fisher).
    """
    path = calls[0][1].path
    per_example = layout.matrices(_leaf(passes["per_example"], path), lead=1)
    per_example = np.moveaxis(per_example, 1, 0)  # [G, N, in, out]
    gradient = layout.matrices(_leaf(passes["gradient"], path), lead=0)
    if kind == "Embed":
        rows = _embedding_rows(
            calls, passes["inputs"], passes["output_grads"], layout.kernel_rows
        )
        groups = [
            _embedding_reference(*rows, gradient[0], num_terms, damping, max_factor_dim)
        ]
    else:
        rows = _group_rows(
            kind, calls, passes["inputs"], passes["output_grads"], layout, has_bias
        )
        groups = [
            _kronecker_reference(*group, num_terms, damping, max_factor_dim)
            for group in zip(*rows, per_example, gradient)
        ]
    side_blocks = ("input_blocks", "output_blocks")  # the same for every group
    stacked = {
        name: value
        if value is None or name in side_blocks
        else np.stack([group[name] for group in groups])
        for name, value in groups[0].items()
    }
    return _BlockReference(
        kind=kind,
        num_groups=layout.num_groups,
        layout=layout,
        per_example=per_example,
        gradient=gradient,
        **stacked,
    )


def _references(
    problem, params, passes, num_terms, damping=DAMPING, max_factor_dim=None
):
    """Block path -> `_BlockReference`, for every recorded module."""
    calls = _recorded_calls(problem.model, params, problem.x[:1])
    by_path: dict[str, list] = {}
    for key, call in calls.items():
        by_path.setdefault(call.path, []).append((key, call))
    references = {}
    for path, path_calls in by_path.items():
        module = path_calls[0][1].module
        kind = _kind(module)
        leaves = _leaf(params, path)
        layout = _layout(kind, module, leaves)
        references[path] = _block_reference(
            kind,
            path_calls,
            passes,
            layout,
            "bias" in leaves,
            num_terms,
            damping,
            max_factor_dim,
        )
    return references


# --- the library's side and the fixture ----------------------------------------


def _library_loss_fn(problem):
    def loss_fn(params, x, y):
        return problem.library_loss(problem.model.apply({"params": params}, x), y)

    return loss_fn


def _grouped(array, num_groups):
    """The library's per-block array with a leading group axis (one group: 1)."""
    array = np.asarray(array)
    return array if num_groups > 1 else array[None]


PROBLEMS = ["dense", "attention", "conv", "embed", "tied"]


@functools.cache
def _run(name: str, max_factor_dim: int | None = None) -> dict:
    """The library's statistics, EKFAC and K-FAC states and EKFAC update after
    one step on a fresh state, and this file's reference pass: one compiled
    function per problem (and `max_factor_dim`), run once per session."""
    problem = _problem(name)
    params = problem.model.init(jax.random.key(1), problem.x)["params"]
    curvature = oek.Curvature(_library_loss_fn(problem), fisher_type="empirical")
    layers = curvature.layers(params, problem.x, problem.y)
    settings = dict(damping=DAMPING, max_factor_dim=max_factor_dim)
    ekfac = oek.scale_by_ekfac(layers, **settings)
    kfac = oek.scale_by_ekfac(layers, eigenvalue_correction=False, **settings)

    @jax.jit
    def run(params, x, y):
        _, grads, stats = curvature.value_grad_and_stats(params, x, y)
        fresh_ekfac, fresh_kfac = ekfac.init(params), kfac.init(params)
        update, ekfac_state = ekfac.update(grads, fresh_ekfac, params, stats=stats)
        _, kfac_state = kfac.update(grads, fresh_kfac, params, stats=stats)
        passes = _reference_pass(problem.model, problem.reference_loss, params, x, y)
        return stats, update, ekfac_state, kfac_state, passes

    stats, update, ekfac_state, kfac_state, passes = run(params, problem.x, problem.y)
    num_terms = _num_loss_terms(problem, params)
    return dict(
        name=name,
        problem=problem,
        params=params,
        layers=layers,
        stats=stats,
        update=update,
        ekfac_state=ekfac_state,
        kfac_state=kfac_state,
        passes=passes,
        num_terms=num_terms,
        references=_references(
            problem, params, passes, num_terms, max_factor_dim=max_factor_dim
        ),
    )


@pytest.fixture(params=PROBLEMS)
def problem(request):
    return _run(request.param)


def _assert_eigengaps(eigenvalues, what, blocks=None):
    """Distinct eigenvalues within each diagonal block (those of different
    blocks never mix)."""
    for start, stop in blocks or [(0, len(eigenvalues))]:
        block = np.sort(np.asarray(eigenvalues[start:stop]))
        if len(block) > 1:
            gaps = np.diff(block) / block[-1]
            assert gaps.min() > MIN_RELATIVE_EIGENGAP, (what, block)


def _dense_groups(array, groups, dim):
    """A library factor or eigenbasis, `[G, dim, dim]` (blocks made dense)."""
    return np.stack(
        [reference.as_dense(group, dim) for group in _grouped(array, groups)]
    )


def _assert_same_basis(basis, reference_basis, what):
    """Equal up to the sign of each column: `|Uᵀ U_ref| = I`."""
    overlap = np.abs(np.asarray(basis).T @ reference_basis)
    np.testing.assert_allclose(overlap, np.eye(len(overlap)), atol=1e-7, err_msg=what)


def _check_blocks(layers, ekfac_state, kfac_state, update, references):
    """Factors, eigenbases, EKFAC and K-FAC scalings and the update of every
    block against `references`."""
    assert {block.name for block in layers.blocks} == set(references)
    for path, ref in references.items():
        state = ekfac_state.blocks[path]
        groups = ref.num_groups

        def close(actual, expected, what, path=path):
            # `actual` with a leading group axis, like `expected`
            chex.assert_shape(actual, expected.shape)
            np.testing.assert_allclose(
                actual, expected, rtol=1e-9, atol=1e-12, err_msg=f"{path}: {what}"
            )

        input_dim, output_dim = ref.scalings.shape[-2:]
        close(
            _dense_groups(state.input_factor, groups, input_dim), ref.input_factor, "A"
        )
        close(
            _dense_groups(state.output_factor, groups, output_dim),
            ref.output_factor,
            "B",
        )
        for group in range(groups):
            name = f"{path} group {group}"
            _assert_eigengaps(
                ref.output_eigenvalues[group], f"{name}: eigvals(B)", ref.output_blocks
            )
            _assert_same_basis(
                _dense_groups(state.output_eigenbasis, groups, output_dim)[group],
                ref.output_basis[group],
                f"{name}: U_B",
            )
            if ref.input_basis is None:
                assert state.input_eigenbasis is None, path
            else:
                _assert_eigengaps(
                    ref.input_eigenvalues[group],
                    f"{name}: eigvals(A)",
                    ref.input_blocks,
                )
                _assert_same_basis(
                    _dense_groups(state.input_eigenbasis, groups, input_dim)[group],
                    ref.input_basis[group],
                    f"{name}: U_A",
                )
        close(_grouped(state.scalings, groups), ref.scalings, "EKFAC scalings")
        if kfac_state is not None:
            kfac_scalings = _grouped(kfac_state.blocks[path].scalings, groups)
            close(kfac_scalings, ref.kfac_scalings, "K-FAC scalings")
        np.testing.assert_allclose(
            ref.layout.matrices(_leaf(update, path), lead=0),
            ref.update,
            rtol=1e-7,
            atol=1e-10,
            err_msg=f"{path}: update",
        )


# --- the tests ----------------------------------------------------------------


def test_reference_rows_reproduce_vmap_grad(problem):
    """The reference's own rows (this file's interceptor, patches and one-hot
    rows; no library code) give `vmap(grad)`'s per-example block gradients:
    `Σ_p a dᵀ = G_n` for every block and group."""
    assert problem["problem"].kinds == {
        ref.kind for ref in problem["references"].values()
    }
    assert not problem["layers"].fallback
    for path, ref in problem["references"].items():
        np.testing.assert_allclose(
            ref.rows_gradients, ref.per_example, atol=1e-12, err_msg=path
        )


@pytest.mark.floor
def test_blocks_match_brute_force(problem):
    """A, B, U_A, U_B, the EKFAC and K-FAC scalings and the EKFAC update of
    every block after one step on a fresh state.

    Independent of the library: rows from this file's interceptor and NumPy
    code (patches by loops, one-hot ids, attend rows), `N` counted from the
    reference losses, bases from `np.linalg.eigh`, scalings from `vmap(grad)`
    blocks in those bases, the update from `np.linalg.solve`.
    """
    assert problem["stats"].num_terms == problem["num_terms"] != NUM_EXAMPLES
    _check_blocks(
        problem["layers"],
        problem["ekfac_state"],
        problem["kfac_state"],
        problem["update"],
        problem["references"],
    )


# Dense (both sides), a grouped Conv and a tied Embed's feature side: the
# attention's DenseGeneral blocks share Dense's rows-to-factors code.
@pytest.mark.parametrize("name", ["dense", "conv", "tied"])
def test_blocked_factors_match_brute_force_with_off_block_entries_zeroed(name):
    """With `max_factor_dim` below the dimension of some sides (among them
    sizes it does not divide), each such factor is the dense one with its
    off-block entries zeroed, stored as its diagonal blocks `(k, b, b)`; the
    eigenbases, the EKFAC and K-FAC scalings, the update and the dense views
    (`kfac_block`, `ekfac_block`) are those of the block-diagonal factors.

    Independent of the library as `test_blocks_match_brute_force` is: the
    reference zeroes the off-block entries of its own dense factors,
    decomposes each diagonal block with `np.linalg.eigh`, takes the scalings
    of `vmap(grad)` per-example gradients in the block-diagonal bases and
    solves against `Q diag(S) Qᵀ + λ I`. The padding of a last, shorter
    block stays out of the real coordinates: zero rows and columns of the
    factor, its own unit vectors as the basis's last vectors.
    """
    problem = _run(name, MAX_FACTOR_DIM)
    _check_blocks(
        problem["layers"],
        problem["ekfac_state"],
        problem["kfac_state"],
        problem["update"],
        problem["references"],
    )
    paddings = []
    for path, ref in problem["references"].items():
        state = problem["ekfac_state"].blocks[path]
        groups = ref.num_groups
        sides = [(state.output_factor, state.output_eigenbasis, ref.output_blocks)]
        if ref.input_blocks is not None:
            sides.append((state.input_factor, state.input_eigenbasis, ref.input_blocks))
        for factor, basis, blocks in sides:
            if len(blocks) == 1:
                continue
            size, dim = blocks[0][1], blocks[-1][1]
            padding = len(blocks) * size - dim
            paddings.append(padding)
            real = size - padding  # coordinates of the last block
            for group_factor, group_basis in zip(
                _grouped(factor, groups), _grouped(basis, groups)
            ):
                chex.assert_shape(
                    [group_factor, group_basis], (len(blocks), size, size)
                )
                np.testing.assert_array_equal(group_factor[-1][real:], 0)
                np.testing.assert_array_equal(group_factor[-1][:, real:], 0)
                last = np.abs(group_basis[-1])
                np.testing.assert_allclose(last[real:, real:], np.eye(padding))
                np.testing.assert_allclose(last[:real, real:], 0, atol=1e-12)
                np.testing.assert_allclose(last[real:, :real], 0, atol=1e-12)
        # The dense views: kron of the block-diagonal factors; Q diag(S) Qᵀ.
        kfac, ekfac = [], []
        for group in range(groups):
            input_factor = ref.input_factor[group]
            input_basis = ref.input_basis
            if input_basis is None:  # an embedding: diagonal A, U_A = I
                input_factor = np.diag(input_factor)
                input_basis = np.eye(len(input_factor))
            else:
                input_basis = input_basis[group]
            kfac.append(np.kron(input_factor, ref.output_factor[group]))
            basis = np.kron(input_basis, ref.output_basis[group])
            ekfac.append(basis @ np.diag(ref.scalings[group].ravel()) @ basis.T)
        np.testing.assert_allclose(
            _grouped(oek.kfac_block(state), groups), kfac, rtol=1e-9, atol=1e-12
        )
        np.testing.assert_allclose(
            _grouped(oek.ekfac_block(state), groups), ekfac, rtol=1e-7, atol=1e-10
        )
    assert any(paddings), paddings


def test_tied_diagnostics_match_vmap_grad():
    """`per_example_gradients`, `gradient_variance` and `fisher_block` of a
    tied model (lookups, and `attend` as the output projection) against
    `vmap(grad)` of each example's summed token losses.

    Independent of the library: per-example gradients and the Fisher
    `(1/N) Σ_n vec(G_n) vec(G_n)ᵀ` (row-major over (vocabulary, features) for
    the embedding; kernel rows then bias for the Dense) come from `vmap(grad)`
    reshaped by this file's code, `N` counted from the reference losses.
    """
    problem = _run("tied")
    layers, stats, params = problem["layers"], problem["stats"], problem["params"]
    expected = problem["passes"]["per_example"]
    gradients = oek.per_example_gradients(layers, stats, params)
    chex.assert_trees_all_close(gradients, expected, rtol=1e-9, atol=1e-13)
    variance = oek.gradient_variance(layers, stats, params)
    chex.assert_trees_all_close(
        variance, jax.tree.map(lambda g: np.var(g, 0), expected), rtol=1e-9, atol=1e-15
    )
    for block in layers.blocks:
        per_example = problem["references"][block.name].per_example[0]
        flat = per_example.reshape(len(per_example), -1)
        chex.assert_trees_all_close(
            oek.fisher_block(block, stats),
            flat.T @ flat / problem["num_terms"],
            rtol=1e-9,
            atol=1e-13,
        )


@pytest.mark.parametrize("name", ["dense", "tied"])
def test_monte_carlo_fisher_matches_brute_force_on_the_sampled_labels(name):
    """With `fisher_type="mc"` and `S` samples, every block's factors (`B`
    over the `S * N` sampled loss terms), bases, scalings, the update of the
    data's gradient, and `fisher_block`, against brute force on the labels
    the capture drew.

    Independent of the library but for the labels: they are read back from
    the last layer's sampled output gradients (`reference.
    labels_of_output_grads`), then everything is recomputed by this file's
    interceptor and `vmap(grad)` on the `S`-times tiled batch with those
    labels, `S * N` from their shape.
    """
    problem = _problem(name)
    params = problem.model.init(jax.random.key(1), problem.x)["params"]
    curvature = oek.Curvature(
        _library_loss_fn(problem), fisher_type="mc", num_samples=NUM_SAMPLES
    )
    layers = curvature.layers(params, problem.x, problem.y)
    ekfac = oek.scale_by_ekfac(layers, damping=DAMPING)

    blocks = layers.blocks

    @jax.jit
    def library(params, x, y, key):
        _, grads, stats = curvature.value_grad_and_stats(params, x, y, key=key)
        update, state = ekfac.update(grads, ekfac.init(params), params, stats=stats)
        fishers = {block.name: oek.fisher_block(block, stats) for block in blocks}
        return stats, update, state, fishers

    stats, update, state, fishers = library(
        params, problem.x, problem.y, jax.random.key(2)
    )
    tiled_x = jnp.tile(problem.x, (NUM_SAMPLES,) + (1,) * (problem.x.ndim - 1))
    outputs = problem.model.apply({"params": params}, tiled_x)
    last = "head" if name == "dense" else "embed"
    (sampled_grads,) = [
        call.output_grads
        for call in stats.layers[last]
        if call.output_grads.shape == outputs.shape
    ]
    labels = reference.labels_of_output_grads(
        problem.library_loss, outputs, sampled_grads
    )
    num_sampled_terms = NUM_SAMPLES * _num_loss_terms(problem, params)
    assert stats.num_sampled_terms == num_sampled_terms == math.prod(labels.shape[:2])

    passes = jax.jit(
        functools.partial(_reference_pass, problem.model, problem.reference_loss)
    )(params, tiled_x, labels)
    # The update preconditions the data's gradient, not the samples'.
    passes["gradient"] = jax.grad(
        lambda params: problem.reference_loss(
            problem.model.apply({"params": params}, problem.x), problem.y
        ).mean()
    )(params)
    references = _references(
        dataclasses.replace(problem, x=tiled_x, y=labels),
        params,
        passes,
        num_sampled_terms,
    )
    _check_blocks(layers, state, None, update, references)
    for block in layers.blocks:
        per_example = references[block.name].per_example[0]
        flat = per_example.reshape(len(per_example), -1)
        chex.assert_trees_all_close(
            fishers[block.name], flat.T @ flat / num_sampled_terms, atol=1e-12
        )
    if name == "dense":
        # Sampled squared-error output gradients are standard normal: the last
        # layer's B is about I (S * N rows over S * N terms); dividing by the
        # examples would give about T * I, by N alone S * I.
        trace = np.trace(state.blocks["head"].output_factor) / 3
        assert 0.7 < trace < 1.3, trace
