"""Offline data for the benchmarks: sklearn's digits and Python's own source.

The digits split and the order of the mini-batches are the examples' own
(`examples/_shared.py`), so a benchmark and an example of the same model see
the same examples in the same order.
"""

import importlib
import inspect

import numpy as np

from examples._shared import batch_indices, digits, standardized  # noqa: F401

# Pure-Python standard-library modules whose source is the language model's text.
TEXT_MODULES = (
    "argparse",
    "textwrap",
    "functools",
    "dataclasses",
    "string",
    "difflib",
    "calendar",
    "fractions",
    "statistics",
    "shlex",
    "pprint",
    "heapq",
    "bisect",
    "enum",
    "inspect",
    "typing",
)


def python_source(num_chars: int) -> str:
    """The first `num_chars` characters of the source of `TEXT_MODULES`."""
    pieces, total = [], 0
    for name in TEXT_MODULES:
        source = inspect.getsource(importlib.import_module(name))
        pieces.append(source)
        total += len(source)
        if total >= num_chars:
            break
    return "".join(pieces)[:num_chars]


def character_sequences(
    text: str, sequence_length: int, test_fraction: float = 0.1
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Non-overlapping windows of `sequence_length + 1` character ids.

    The last `test_fraction` of the text is held out (no window crosses the
    split). Characters of the held-out text unseen in training map to id 0.

    Returns:
        `(train, test, vocabulary)`, windows `[num_windows, sequence_length + 1]`
        int32 (inputs are `[:, :-1]`, targets `[:, 1:]`).
    """
    split = int(len(text) * (1 - test_fraction))
    vocabulary = sorted(set(text[:split]))
    ids = {char: i for i, char in enumerate(vocabulary)}
    encoded = np.array([ids.get(char, 0) for char in text], np.int32)
    window = sequence_length + 1

    def windows(tokens):
        count = len(tokens) // window
        return tokens[: count * window].reshape(count, window)

    return windows(encoded[:split]), windows(encoded[split:]), vocabulary
