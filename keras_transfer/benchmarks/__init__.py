"""Benchmarks: suites of measured figures, written to `results.json` and `results.md`.

`keras-transfer benchmark --suite=overhead,export --output=DIR` (or
`run_benchmarks`) runs suites from `SUITES`; each is a function
`suite(quick: bool) -> {figure name: Figure}`, added with `register_suite`.
A `Figure` holds a value, its unit, a target such as `">= 0.98"` and whether
it is met. Timings are ratios of interleaved repeated runs in one process
(see `timing`): absolute times on a shared machine say little.

Suites: `overhead` (keras_transfer's training throughput vs plain Keras),
`export` (LiteRT per quantisation mode, SavedModel and Keras: size,
accuracy, agreement, latency), `caching` (head training on cached features vs
recomputing the backbone).
"""

from keras_transfer.benchmarks.figures import TARGET_OPERATORS, Figure, parse_target
from keras_transfer.benchmarks.machine import machine_info, machine_line
from keras_transfer.benchmarks.registry import ALL, SUITES, register_suite, resolve_suites
from keras_transfer.benchmarks.results import (
    RESULTS_JSON,
    RESULTS_MD,
    SCHEMA_VERSION,
    format_markdown,
    write_results,
)
from keras_transfer.benchmarks.runner import run_benchmarks
from keras_transfer.benchmarks.timing import MIN_REPEATS, EpochTimes, Samples, interleave

__all__ = [
    "ALL",
    "MIN_REPEATS",
    "RESULTS_JSON",
    "RESULTS_MD",
    "SCHEMA_VERSION",
    "SUITES",
    "TARGET_OPERATORS",
    "EpochTimes",
    "Figure",
    "Samples",
    "format_markdown",
    "interleave",
    "machine_info",
    "machine_line",
    "parse_target",
    "register_suite",
    "resolve_suites",
    "run_benchmarks",
    "write_results",
]
