"""Timing on a noisy machine: interleaved repeats, min and median, ratios.

A shared machine's speed drifts by tens of percent within a minute (other
jobs, thermal limits, the page cache). Timing A for a minute and then B for a
minute measures the drift as much as A and B. `interleave` runs the sides in
turn, A, B, A, B, ..., in one process, so each side sees the same conditions;
suites report the min (the least disturbed run) and the median (the typical
one) of each side, and the ratios of medians and of mins, never a bare time
compared across runs.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping

import keras

from keras_transfer.benchmarks.figures import Figure

# The fewest repeats of each side: with 3 the median is not one outlier.
MIN_REPEATS = 3


@dataclasses.dataclass(frozen=True)
class Samples:
    """Repeated measurements of one quantity.

    Args:
        values: the measurements, in the order they were taken.

    Example:

    >>> s = Samples((3.0, 1.0, 2.0))
    >>> s.min, s.median
    (1.0, 2.0)
    """

    values: tuple[float, ...]

    def __post_init__(self):
        if not self.values:
            raise ValueError("`values` must hold at least one measurement. Received: values=()")

    @property
    def min(self) -> float:
        """The smallest value."""
        return min(self.values)

    @property
    def median(self) -> float:
        """The median value."""
        return float(statistics.median(self.values))


def interleave(
    runs: Mapping[str, Callable[[], Mapping[str, float]]], repeats: int = MIN_REPEATS
) -> dict[str, dict[str, Samples]]:
    """Runs each side in turn (A, B, A, B, ...) and collects what each returns.

    Args:
        runs: `{side: run}`; each call of `run()` does one repeat of that
            side and returns its measurements by name (seconds, accuracy...),
            leaving out its own set-up (building, compiling, tracing).
        repeats: how many times each side runs, >= `MIN_REPEATS`.

    Returns:
        `{side: {measurement: Samples}}`.

    Example:

    >>> counter = iter(range(100))
    >>> result = interleave({"a": lambda: {"t": next(counter)},
    ...                      "b": lambda: {"t": next(counter)}})
    >>> result["a"]["t"].values, result["b"]["t"].values
    ((0, 2, 4), (1, 3, 5))
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < MIN_REPEATS:
        raise ValueError(
            f"`repeats` must be an integer >= {MIN_REPEATS}. Received: repeats={repeats!r}"
        )
    if not runs:
        raise ValueError("`runs` must name at least one side. Received: runs={}")
    collected: dict[str, dict[str, list[float]]] = {side: {} for side in runs}
    for _ in range(repeats):
        for side, run in runs.items():
            for name, value in run().items():
                collected[side].setdefault(name, []).append(value)
    return {
        side: {name: Samples(tuple(values)) for name, values in measured.items()}
        for side, measured in collected.items()
    }


def seconds_per_call(function: Callable[[], object], calls: int) -> float:
    """The mean wall time of `calls` back-to-back calls of `function`.

    Args:
        function: what to time (warmed up by the caller).
        calls: how many calls, >= 1.

    Returns:
        Seconds per call.

    Example:

    >>> seconds_per_call(lambda: None, 10) < 1.0
    True
    """
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


def spread_figures(
    name: str, samples: Samples, unit: str, notes: str = "", scale: float = 1.0
) -> dict[str, Figure]:
    """The min and median of `samples` as two figures, `<name>_min` and `<name>_median`.

    Args:
        name: the figure name's start.
        samples: the measurements.
        unit: the figures' unit.
        notes: how they were measured.
        scale: multiplies the values (e.g. 1000 for seconds to ms).

    Returns:
        `{f"{name}_min": Figure, f"{name}_median": Figure}`.

    Example:

    >>> figures = spread_figures("step_ms", Samples((0.002, 0.001, 0.003)), "ms", scale=1000)
    >>> figures["step_ms_median"].value
    2.0
    """
    count = f"{len(samples.values)} interleaved runs"
    return {
        f"{name}_min": Figure(_round(samples.min * scale), unit, notes=f"{notes} Min of {count}."),
        f"{name}_median": Figure(
            _round(samples.median * scale), unit, notes=f"{notes} Median of {count}."
        ),
    }


def ratio_figures(
    name: str,
    numerator: Samples,
    denominator: Samples,
    *,
    target: str | None = None,
    notes: str = "",
) -> dict[str, Figure]:
    """`numerator / denominator` of medians (`<name>`) and of mins (`<name>_of_mins`).

    Args:
        name: the figure name of the ratio of medians.
        numerator: measurements of one side.
        denominator: the same measurement of the other side, interleaved.
        target: the target of the ratio of medians (the ratio of mins is
            reported without one: it shows how far noise moves the ratio).
        notes: what the ratio means.

    Returns:
        `{name: Figure, f"{name}_of_mins": Figure}`, unit `"x"`.

    Example:

    >>> figures = ratio_figures("speedup", Samples((4.0, 6.0, 5.0)), Samples((1.0, 1.0, 2.0)))
    >>> figures["speedup"].value, figures["speedup_of_mins"].value
    (5.0, 4.0)
    """
    return {
        name: Figure(
            _round(numerator.median / denominator.median),
            "x",
            target,
            f"{notes} Ratio of the medians of interleaved runs.",
        ),
        f"{name}_of_mins": Figure(
            _round(numerator.min / denominator.min),
            "x",
            notes=f"{notes} Ratio of the mins of interleaved runs.",
        ),
    }


def _round(value: float) -> float:
    """Four significant digits: more than the noise of any timing here."""
    return float(f"{value:.4g}")


class EpochTimes(keras.callbacks.Callback):
    """Records the wall time of every epoch of a `fit`.

    `seconds` is reset in `on_train_begin`, so one instance can time several
    `fit` calls in turn (it holds the last one's epochs).

    Example:

    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.compile(loss="mse")
    >>> timer = EpochTimes()
    >>> _ = model.fit(np.zeros((4, 2)), np.zeros((4, 1)), epochs=3, verbose=0,
    ...               callbacks=[timer])
    >>> len(timer.seconds)
    3
    """

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self._start = None

    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
