"""What the examples share: a timed training run and the loss plot.

Kept apart so each example reads as model, data, loss and optimizers only.
"""

import time

import jax
import matplotlib
import numpy as np
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def train(name, step, params, opt_state, batches):
    """Compiles `step` once, then runs it on every batch with a progress bar.

    Args:
        name: the progress bar's label.
        step: `step(params, opt_state, *batch) -> (params, opt_state, loss)`.
        params: initial parameters.
        opt_state: initial optimizer state.
        batches: a sequence of argument tuples, one per step.

    Returns:
        `(params, losses, seconds, compile_seconds)`: the final parameters, the
        loss and the wall-clock seconds of every step, and the compile time.
    """
    start = time.perf_counter()
    step = jax.jit(step).lower(params, opt_state, *batches[0]).compile()  # once
    compile_seconds = time.perf_counter() - start
    losses, seconds = [], []
    for batch in tqdm(batches, desc=name):
        start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, *batch)
        losses.append(float(loss))  # float() waits for the step to finish
        seconds.append(time.perf_counter() - start)
    return params, losses, seconds, compile_seconds


def plot_losses(curves, ylabel, title, out):
    """Saves loss against step and against seconds, one line per optimizer.

    Args:
        curves: optimizer name -> (losses, per-step seconds).
        ylabel: what the loss is.
        title: the figure's title.
        out: the PNG path.
    """
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name, (losses, seconds) in curves.items():
        by_step.plot(range(1, len(losses) + 1), losses, label=name)
        by_time.plot(np.cumsum(seconds), losses, label=name)
    by_step.set(xlabel="step", ylabel=ylabel, yscale="log")
    by_time.set(xlabel="seconds (compilation excluded)")
    by_step.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"plot saved to {out}")
