"""What the examples share, so that each reads as data, model, loss and optimizer.

The digits data, the order of the mini-batches and the BLAS thread limit are
also the benchmarks' (`benchmarks/harness/data.py` and `running.py` import
them from here), so an example and a benchmark of the same model train on the
same examples in the same order.
"""

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import optax_ekfac as oek


def limit_blas_threads() -> None:
    """One BLAS thread for the LAPACK calls XLA's CPU backend makes.

    On CPU, `jnp.linalg.eigh` runs in the OpenBLAS that ships with SciPy. Its
    threads compete with XLA's own; on a busy machine one 256 x 256
    eigendecomposition then takes 50 ms to 2 s instead of 5 ms. threadpoolctl
    can only limit libraries already loaded, so SciPy's LAPACK is loaded first.
    """
    import scipy.linalg  # noqa: F401  (loads the OpenBLAS jax's LAPACK uses)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def arguments(
    description: str | None, *, steps: int, batch_size: int, out: str
) -> argparse.ArgumentParser:
    """The options every example has, with its defaults.

    Args:
        description: the example's docstring; its first line is `--help`'s.
        steps: default training steps.
        batch_size: default examples per step.
        out: default path of the plot.
    """
    # The first line of the docstring (none under `python -OO`).
    summary = description.splitlines()[0] if description else None
    parser = argparse.ArgumentParser(description=summary)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--out", default=out, help="plot path")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`(x_train, y_train, x_test, y_test)`: sklearn's 1797 8x8 digits, a
    stratified 80/20 split, pixels scaled to [0, 1] (float32), labels int32."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x / 16.0, y, test_size=0.2, random_state=seed, stratify=y
    )
    return (
        x_train.astype(np.float32),
        y_train.astype(np.int32),
        x_test.astype(np.float32),
        y_test.astype(np.int32),
    )


def standardized(
    x_train: np.ndarray, x_test: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Features standardized with the training set's statistics (constant
    pixels stay 0)."""
    mean, std = x_train.mean(0), x_train.std(0)
    std = np.where(std > 0, std, 1).astype(np.float32)
    return (x_train - mean) / std, (x_test - mean) / std


def batch_indices(
    num_examples: int, batch_size: int, steps: int, seed: int
) -> np.ndarray:
    """`[steps, batch_size]` int32 example indices: shuffled epochs, fixed seed.

    Every optimizer of a comparison gets the same indices, so they all see the
    same mini-batches in the same order.
    """
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch_size // num_examples)
    order = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])
    return order[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def mini_batches(
    args: argparse.Namespace, *arrays: np.ndarray
) -> list[tuple[np.ndarray, ...]]:
    """`args.steps` mini-batches of `args.batch_size` examples of `arrays`
    (shuffled epochs, seed `args.seed`), each a tuple of the arrays' rows."""
    indices = batch_indices(len(arrays[0]), args.batch_size, args.steps, args.seed)
    return [tuple(array[rows] for array in arrays) for rows in indices]


def optax_step(
    loss_fn: Callable[..., jax.Array], tx: optax.GradientTransformation
) -> Callable[..., tuple[optax.Params, optax.OptState, jax.Array]]:
    """The jitted train step of a plain optax optimizer, the examples' baseline.

    Args:
        loss_fn: `loss_fn(params, *batch)` -> per-example losses.
        tx: an `optax.GradientTransformation` that takes no statistics.

    Returns:
        `step(params, opt_state, *batch) -> (params, opt_state, mean loss)`.
    """

    def mean_loss(params, *batch):
        return loss_fn(params, *batch).mean()

    @jax.jit
    def step(params, opt_state, *batch):
        loss, grads = jax.value_and_grad(mean_loss)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


@dataclasses.dataclass(frozen=True)
class TimedRun:
    """One optimizer's training run.

    Attributes:
        state: the final state: `(params, opt_state)` of a functional step, or
            the objects a flax.nnx step updated in place.
        losses: the mini-batch loss of every step.
        first_step_seconds: the first step's wall-clock time, which includes
            compiling it.
        step_seconds: the wall-clock time of every later step.
    """

    state: tuple[Any, ...]
    losses: list[float]
    first_step_seconds: float
    step_seconds: list[float]

    def timing(self) -> str:
        """The run's step times, one line."""
        median_ms = 1e3 * statistics.median(self.step_seconds or [0.0])
        return (
            f"median step {median_ms:.2f} ms, {sum(self.step_seconds):.2f} s after "
            f"the first step (compiled in {self.first_step_seconds:.2f} s)"
        )


def train(
    name: str,
    step: Callable[..., Any],
    state: tuple[Any, ...],
    batches: Sequence[tuple[Any, ...]],
) -> TimedRun:
    """Runs a jitted train step on every batch, with a progress bar.

    Args:
        name: the progress bar's label.
        step: `step(*state, *batch)`, returning `(*state, loss)` (a functional
            step under `jax.jit`) or only the loss (a flax.nnx step under
            `nnx.jit`, which updates the model and optimizer in place).
        state: the initial state, e.g. `(params, opt_state)` or
            `(model, optimizer)`.
        batches: the arguments of each step after the state.

    Returns:
        The final state, every step's loss and wall-clock seconds.
    """
    losses, seconds = [], []
    for batch in tqdm(batches, desc=name):
        start = time.perf_counter()
        outputs = step(*state, *batch)
        if isinstance(outputs, tuple):
            *new_state, loss = outputs
            state = tuple(new_state)
        else:
            loss = outputs
        losses.append(float(loss))  # float() waits for the step to finish
        seconds.append(time.perf_counter() - start)
    return TimedRun(state, losses, seconds[0], seconds[1:])


def train_each(
    params: optax.Params,
    batches: Sequence[tuple[Any, ...]],
    **optimizers: tuple[optax.GradientTransformation, Callable[..., Any]],
) -> dict[str, TimedRun]:
    """Trains each optimizer from the same parameters on the same batches.

    Args:
        params: the initial parameters.
        batches: the arguments of each step after the state.
        **optimizers: name -> `(tx, step)`, the optimizer and its jitted
            functional step (see `train`).

    Returns:
        name -> its run, in the order given.
    """
    return {
        name: train(name, step, (params, tx.init(params)), batches)
        for name, (tx, step) in optimizers.items()
    }


def classifier_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Mean softmax cross-entropy and accuracy of a classifier's logits."""
    return {
        "loss": oek.softmax_cross_entropy(logits, labels).mean(),
        "accuracy": (logits.argmax(-1) == labels).mean(),
    }


def print_results(
    args: argparse.Namespace,
    runs: Mapping[str, TimedRun],
    evaluate: Callable[..., Mapping[str, jax.Array]],
    **splits: tuple[np.ndarray, ...],
) -> None:
    """Prints each run's metrics on each data split, and its step times.

    Args:
        args: the parsed `arguments()`.
        runs: optimizer name -> its run.
        evaluate: `evaluate(model, *arrays)` -> metric name -> value, with
            `model` the first element of a run's state (the parameters, or
            the flax.nnx model).
        **splits: split name -> its arrays, e.g. `train=(x_train, y_train)`.
    """
    print(f"\n{args.steps} steps, batch size {args.batch_size}")
    for name, run in runs.items():
        results = [
            f"{split} "
            + ", ".join(
                f"{metric} {float(value):.4g}"
                for metric, value in evaluate(run.state[0], *arrays).items()
            )
            for split, arrays in splits.items()
        ]
        print(f"{name:<6} " + "; ".join(results) + f"; {run.timing()}")


def plot_losses(
    runs: Mapping[str, TimedRun],
    args: argparse.Namespace,
    title: str,
    ylabel: str = "mini-batch train loss",
) -> None:
    """Saves the loss against step and against seconds, one line per run, to
    `args.out`.

    The seconds start after the first step, which compiles.

    Args:
        runs: optimizer name -> its run.
        args: the parsed `arguments()`.
        title: what was trained on what; the batch size is added.
        ylabel: what the loss is.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name, run in runs.items():
        by_step.plot(range(1, len(run.losses) + 1), run.losses, label=name)
        by_time.plot(np.cumsum(run.step_seconds), run.losses[1:], label=name)
    by_step.set(xlabel="step", ylabel=ylabel, yscale="log")
    by_time.set(xlabel="seconds after the first step (which compiles)")
    by_step.legend()
    fig.suptitle(f"{title}, batch size {args.batch_size}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(f"plot saved to {args.out}")
