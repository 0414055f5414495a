"""The machine a benchmark ran on: CPU, cores, memory, load, software versions, date."""

from __future__ import annotations

import datetime
import os
import platform

CPUINFO = "/proc/cpuinfo"
MEMINFO = "/proc/meminfo"


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open(CPUINFO) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Processor", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _memory_gib() -> float | None:
    """Total memory in GiB from /proc/meminfo, else from `sysconf`; None if neither."""
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) * 1024 / 2**30, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):
        return None


def load_average() -> float | None:
    """The 1-minute load average (runnable processes), or None where unknown.

    Returns:
        The load, e.g. 2.1 on a 2-core machine running another job.

    Example:

    >>> load = load_average()
    >>> load is None or load >= 0
    True
    """
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_info() -> dict:
    """What a benchmark result depends on besides the code.

    Returns:
        A dict: `cpu`, `cores` (usable by this process), `memory_gib`,
        `gpus`, `load_average` (1 minute, at the call), `platform`,
        `python`, `tensorflow`, `keras`, `keras_transfer`, `date` (UTC, ISO).

    Example:

    >>> info = machine_info()
    >>> sorted(info)[:3], info["cores"] >= 1
    (['cores', 'cpu', 'date'], True)
    """
    import keras
    import tensorflow as tf

    import keras_transfer

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return {
        "cpu": _cpu_model(),
        "cores": cores,
        "memory_gib": _memory_gib(),
        "gpus": [device.name for device in tf.config.list_physical_devices("GPU")],
        "load_average": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_transfer": keras_transfer.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def machine_line(info: dict) -> str:
    """One line describing the machine, for the top of `results.md`.

    Args:
        info: from `machine_info()`.

    Returns:
        The line.

    Example:

    >>> machine_line({"cpu": "Xeon", "cores": 2, "memory_gib": 7.8, "gpus": [],
    ...               "python": "3.11.9", "tensorflow": "2.21.0", "keras": "3.15.1",
    ...               "date": "2026-01-01T00:00:00+00:00"})
    'Machine: Xeon, 2 cores, 7.8 GiB memory, no GPU; Python 3.11.9, TensorFlow 2.21.0, Keras 3.15.1; 2026-01-01T00:00:00+00:00'
    """
    gpus = ", ".join(info.get("gpus") or []) or "no GPU"
    memory = info.get("memory_gib")
    memory = f"{memory} GiB memory" if memory is not None else "memory unknown"
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores, {memory}, {gpus}; "
        f"Python {info['python']}, TensorFlow {info['tensorflow']}, Keras {info['keras']}; "
        f"{info['date']}"
    )
