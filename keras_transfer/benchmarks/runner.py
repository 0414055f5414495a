"""`run_benchmarks`: run the chosen suites and write their results."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from keras_transfer.benchmarks.figures import Figure
from keras_transfer.benchmarks.machine import load_average, machine_info
from keras_transfer.benchmarks.registry import SUITES, resolve_suites
from keras_transfer.benchmarks.results import SCHEMA_VERSION, write_results
from keras_transfer.staging import remove_empty, writable_folder


def run_benchmarks(
    suites: str | Sequence[str],
    output_dir: str | os.PathLike,
    *,
    quick: bool = False,
    print_fn: Callable[[str], None] | None = None,
) -> dict:
    """Runs benchmark suites one after another and writes `results.json` and `results.md`.

    Suite names are checked before anything runs or is written. The files are
    rewritten (atomically) after every suite, so a run stopped half-way
    leaves complete files holding the suites that finished; if the first
    suite fails, nothing is left (folders this call made are removed).

    Args:
        suites: suite names (a comma-separated string or a list); `"all"`
            for every suite in `SUITES`.
        output_dir: the folder for the two files (made if missing; other
            files in it are left alone, the two are replaced).
        quick: shrink every suite to a smoke run of seconds (tiny models,
            few images): for tests; its figures mean nothing.
        print_fn: called with a line as each suite starts and ends; None:
            silent.

    Returns:
        The results dict written to `results.json` (see
        `keras_transfer.benchmarks.results`).

    Raises:
        ValueError: an unknown suite name.
        PermissionError: `output_dir` cannot be written.

    Example:

    >>> import tempfile
    >>> results = run_benchmarks("overhead", tempfile.mkdtemp(), quick=True)  # doctest: +SKIP
    >>> results["figures"]["overhead.ratio"]["target"]  # doctest: +SKIP
    '>= 0.98'
    """
    names = resolve_suites(suites)
    if not isinstance(quick, bool):
        raise TypeError(f"`quick` must be True or False. Received: quick={quick!r}")
    folder = os.fspath(output_dir)
    created = writable_folder(folder, "benchmark results")
    say = print_fn or (lambda line: None)
    results = {
        "schema_version": SCHEMA_VERSION,
        "quick": quick,
        "suites": list(names),
        "machine": machine_info(),
        "runs": {},
        "figures": {},
    }
    try:
        for name in names:
            say(f"{name}: running{' (quick)' if quick else ''}...")
            start = time.perf_counter()
            figures = SUITES[name](quick)
            seconds = time.perf_counter() - start
            _check_figures(name, figures)
            results["runs"][name] = {
                "seconds": round(seconds, 1),
                "load_average_after": load_average(),
            }
            results["figures"].update(
                {f"{name}.{key}": figure.to_dict() for key, figure in figures.items()}
            )
            write_results(results, folder)
            say(f"{name}: {len(figures)} figures in {seconds:.0f} s")
    except BaseException:
        if not results["runs"]:
            remove_empty(created)
        raise
    return results


def _check_figures(name, figures):
    if not isinstance(figures, dict) or not all(
        isinstance(key, str) and isinstance(figure, Figure) for key, figure in figures.items()
    ):
        raise TypeError(
            f"Suite {name!r} must return a dict of figure name -> Figure. "
            f"Received: {type(figures).__name__}"
        )
