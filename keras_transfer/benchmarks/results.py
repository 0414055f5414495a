"""The result files of a benchmark run: `results.json` and the `results.md` table.

`results.json` (schema version `SCHEMA_VERSION`):

    {"schema_version": 1, "quick": false, "suites": ["overhead", ...],
     "machine": {...machine_info()...},
     "runs": {"overhead": {"seconds": 95.2, "load_average_after": 1.9}, ...},
     "figures": {"overhead.ratio": {"value": 0.99, "target": ">= 0.98",
                                    "met": true, "unit": "x", "notes": "..."}, ...}}

Both files are written beside their final name and renamed into place, so a
reader (or a crash) never sees half of one.
"""

from __future__ import annotations

import json
import os

from keras_transfer.benchmarks.machine import machine_line
from keras_transfer.staging import write_atomic

SCHEMA_VERSION = 1
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def format_markdown(results: dict) -> str:
    """The results as markdown: the machine line, then a table with a row per figure.

    Args:
        results: a results dict (see the module docstring).

    Returns:
        The markdown text.

    Example:

    >>> results = {"quick": True, "suites": ["toy"], "runs": {"toy": {"seconds": 1.0}},
    ...            "machine": {"cpu": "Xeon", "cores": 2, "memory_gib": 8.0, "gpus": [],
    ...                        "python": "3.11.9", "tensorflow": "2.21.0",
    ...                        "keras": "3.15.1", "date": "2026-01-01T00:00:00+00:00",
    ...                        "load_average": 0.5},
    ...            "figures": {"toy.ratio": {"value": 0.99, "target": ">= 0.98",
    ...                                      "met": True, "unit": "x", "notes": ""}}}
    >>> print(format_markdown(results).splitlines()[-1])
    | toy | ratio | 0.99 x | >= 0.98 | yes |
    """
    machine = results["machine"]
    lines = ["# keras-transfer benchmarks", "", machine_line(machine), ""]
    mode = "quick (smoke run: the figures mean nothing)" if results.get("quick") else "full"
    runs = results.get("runs", {})
    timings = ", ".join(f"{name} {run['seconds']:.0f} s" for name, run in runs.items())
    lines.append(f"Mode: {mode}. Suites: {timings or 'none finished'}.")
    loads = [machine.get("load_average")] + [run.get("load_average_after") for run in runs.values()]
    if any(load is not None for load in loads):
        lines.append(
            "1-minute load average at the start and after each suite: "
            + ", ".join(_cell(load) for load in loads)
            + f" (on {machine['cores']} cores; above the core count, other jobs were running)."
        )
    lines += ["", "| suite | figure | value | target | met |", "|---|---|---|---|---|"]
    for key, figure in results["figures"].items():
        suite, _, name = key.partition(".")
        value = _cell(figure["value"])
        if figure["value"] is not None and figure["unit"]:
            value = f"{value} {figure['unit']}"
        met = {True: "yes", False: "no", None: "-"}[figure["met"]]
        lines.append(f"| {suite} | {name} | {value} | {_cell(figure['target'])} | {met} |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, output_dir: str | os.PathLike) -> tuple[str, str]:
    """Writes `results.json` and `results.md` into an existing folder, each atomically.

    Args:
        results: a results dict (see the module docstring).
        output_dir: the folder.

    Returns:
        The paths `(results.json, results.md)`.

    Example:

    >>> import tempfile
    >>> results = {"quick": True, "suites": [], "runs": {}, "figures": {},
    ...            "machine": {"cpu": "Xeon", "cores": 2, "memory_gib": 8.0, "gpus": [],
    ...                        "python": "3.11.9", "tensorflow": "2.21.0",
    ...                        "keras": "3.15.1", "date": "2026-01-01T00:00:00+00:00"}}
    >>> folder = tempfile.mkdtemp()
    >>> [os.path.basename(p) for p in write_results(results, folder)]
    ['results.json', 'results.md']
    """
    folder = os.fspath(output_dir)
    json_path = os.path.join(folder, RESULTS_JSON)
    md_path = os.path.join(folder, RESULTS_MD)
    write_atomic(json_path, json.dumps(results, indent=2) + "\n")
    write_atomic(md_path, format_markdown(results))
    return json_path, md_path
