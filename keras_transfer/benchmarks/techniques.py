"""Suite `techniques`: each technique's effect against the same model trained without it.

Every effect lives in `keras_transfer.benchmarks.effects.<name>`: a module
with `TARGETS` (`{figure: target}` for the margins the technique promises,
such as `"margin": ">= 0.02"`) and `measure(seed, quick=False) -> {figure:
value}`, which trains both sides (with and without the technique) for one
seed and returns the margins and the accuracies behind them. The unit tests
run one seed; this suite runs `SEEDS` and reports the mean and the min of
every margin (a margin met on average but not by every seed shows up here)
and the mean of every other figure.
"""

from __future__ import annotations

import importlib
import statistics
import time

from keras_transfer.benchmarks.figures import Figure

# The effects, in the order they run: modules of keras_transfer.benchmarks.effects.
EFFECTS = (
    "distillation",
    "multitask",
    "ensemble",
    "continual",
    "class_imbalance",
    "dann",
    "mmd",
    "pruning",
    "quantization",
)
# Three seeds for the full suite, one for the smoke run.
SEEDS = (0, 1, 2)
QUICK_SEEDS = (0,)


def effect_module(name: str):
    """The module of one effect, checked to have `TARGETS` and `measure`.

    Args:
        name: an entry of `EFFECTS`.

    Returns:
        The imported module.

    Raises:
        ValueError: `name` is not in `EFFECTS`.
        TypeError: the module lacks `TARGETS` or `measure`.

    Example:

    >>> effect_module("no_such_effect")
    Traceback (most recent call last):
    ...
    ValueError: `name` must be one of ('distillation', 'multitask', 'ensemble', 'continual', 'class_imbalance', 'dann', 'mmd', 'pruning', 'quantization'). Received: name='no_such_effect'
    """
    if name not in EFFECTS:
        raise ValueError(f"`name` must be one of {EFFECTS}. Received: name={name!r}")
    module = importlib.import_module(f"keras_transfer.benchmarks.effects.{name}")
    if not isinstance(getattr(module, "TARGETS", None), dict) or not callable(
        getattr(module, "measure", None)
    ):
        raise TypeError(
            f"Effect module {module.__name__} must define `TARGETS` (a dict) and `measure`."
        )
    return module


def summarise(name: str, per_seed: list[dict[str, float]], targets: dict[str, str]) -> dict:
    """Mean (and, for margins, min) over seeds of every figure of one effect.

    Args:
        name: the effect's name, the start of each figure's key.
        per_seed: what `measure` returned for each seed.
        targets: the effect's `TARGETS`.

    Returns:
        `{"<name>.<figure>.mean": Figure, "<name>.<margin>.min": Figure, ...}`;
        each margin's target applies to both its mean and its min.

    Raises:
        ValueError: a target names a figure `measure` did not return.

    Example:

    >>> figures = summarise("demo", [{"margin": 0.05, "accuracy": 0.8},
    ...                              {"margin": 0.01, "accuracy": 0.7}], {"margin": ">= 0.02"})
    >>> figures["demo.margin.mean"].value, figures["demo.margin.min"].met
    (0.03, False)
    """
    names = list(dict.fromkeys(key for values in per_seed for key in values))
    missing = sorted(set(targets) - set(names))
    if missing:
        raise ValueError(f"Effect {name!r} did not return its target figures {missing}.")
    seeds = len(per_seed)
    figures = {}
    for figure in names:
        values = [values[figure] for values in per_seed if figure in values]
        target = targets.get(figure)
        notes = f"{name}: {figure} over {seeds} seed(s): " + ", ".join(
            f"{value:.4f}" for value in values
        )
        figures[f"{name}.{figure}.mean"] = Figure(
            round(statistics.fmean(values), 4), "", target, notes
        )
        if target is not None:
            figures[f"{name}.{figure}.min"] = Figure(round(min(values), 4), "", target, notes)
    return figures


def run(quick: bool = False) -> dict[str, Figure]:
    """Measures the `techniques` suite: every effect of `EFFECTS` over `SEEDS`.

    Args:
        quick: one seed of each effect's smoke run (seconds; for tests:
            the effects need not show).

    Returns:
        Figures `<effect>.<figure>.mean` (and `.min` for the margins, with
        their targets), and `<effect>.seconds`, the time of all its seeds.

    Example:

    >>> from keras_transfer.benchmarks import SUITES
    >>> SUITES["techniques"] is run  # `keras-transfer benchmark --suite=techniques`
    True
    """
    seeds = QUICK_SEEDS if quick else SEEDS
    figures: dict[str, Figure] = {}
    for name in EFFECTS:
        module = effect_module(name)
        start = time.perf_counter()
        per_seed = [module.measure(seed, quick=quick) for seed in seeds]
        seconds = time.perf_counter() - start
        figures.update(summarise(name, per_seed, module.TARGETS))
        figures[f"{name}.seconds"] = Figure(
            round(seconds, 1), "s", notes=f"{name}: wall time of {len(seeds)} seed(s), both sides."
        )
    return figures
