"""Offline data for the benchmarks: sklearn's digits and Python's own source."""

import importlib
import inspect

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

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


def digits(
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`(x_train, y_train, x_test, y_test)`: 1797 8x8 digits, a stratified
    80/20 split, pixels scaled to [0, 1] (float32), labels int32."""
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


def standardized(x_train: np.ndarray, x_test: np.ndarray):
    """Features standardized with the training set's statistics (constant
    pixels stay 0)."""
    mean, std = x_train.mean(0), x_train.std(0)
    std = np.where(std > 0, std, 1).astype(np.float32)
    return (x_train - mean) / std, (x_test - mean) / std


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
