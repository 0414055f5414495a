"""PNG figures (matplotlib, Agg backend): LR finder, training curves, confusion."""

from __future__ import annotations

import os


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lr_find(result, path: str) -> str:
    """Plots smoothed loss vs learning rate (log x) and marks the suggestion.

    Args:
        result: an `LRFinderResult` from `kt.lr_find`.
        path: output PNG path (parent folders are created).

    Returns:
        `path`.

    Example:
    >>> from keras_transfer.callbacks import LRFinderResult
    >>> from keras_transfer.plots import plot_lr_find
    >>> import tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "lr.png")
    >>> plot_lr_find(LRFinderResult([1e-4, 1e-3, 1e-2], [1.0, 0.5, 2.0], 1e-3),
    ...              out) == out
    True
    """
    plt = _pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.learning_rates, result.losses, label="smoothed loss")
    ax.axvline(
        result.suggestion,
        color="tab:red",
        linestyle="--",
        label=f"suggested LR {result.suggestion:.2g}",
    )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title("Learning-rate range test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
