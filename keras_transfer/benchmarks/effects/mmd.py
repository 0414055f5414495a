"""Effect of MMD (Long et al. 2015) on a controlled domain shift: target accuracy over source-only.

The same shift, model, data and training as DANN's effect
(`effects/dann.py`: Fashion-MNIST against its colour-shifted images, a small
CNN, the same batches, optimizer and epochs); the method is
`techniques.mmd(weight=FULL["mmd_weight"])` and source-only is the same call
with `weight=0`.
"""

from __future__ import annotations

from keras_transfer.benchmarks.effects.dann import compare

TARGETS = {"mmd_margin": ">= 0.03"}


def measure(seed: int, quick: bool = False) -> dict[str, float]:
    """MMD against source-only training (`effects.dann.compare(seed, ("mmd",))`).

    Args:
        seed: images, colour fields, initial weights and shuffles.
        quick: a smoke run (a few images, one epoch).

    Returns:
        `mmd_margin` and the accuracies behind it.

    Example:

    >>> set(TARGETS) <= set(measure(seed=0, quick=True))
    True
    """
    return compare(seed, ("mmd",), quick)
