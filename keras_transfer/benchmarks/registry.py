"""The registry of benchmark suites: name -> `suite(quick) -> {figure name: Figure}`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from keras_transfer.benchmarks import (
    caching,
    export,
    overhead,
    pipeline,
    scale,
    techniques,
    time_to_accuracy,
    utilisation,
)
from keras_transfer.benchmarks.figures import Figure
from keras_transfer.data.splits import suggest

# Runs every registered suite.
ALL = "all"

Suite = Callable[[bool], dict[str, Figure]]
SUITES: dict[str, Suite] = {}


def register_suite(name: str, suite: Suite) -> Suite:
    """Adds a suite to `SUITES`, the registry `run_benchmarks` reads.

    Args:
        name: the suite's name (an identifier, not `"all"`), the start of
            its figures' keys in `results.json` (`"<name>.<figure>"`).
        suite: `suite(quick: bool) -> {figure name: Figure}`; `quick=True`
            shrinks it to a smoke run of a few seconds.

    Returns:
        The suite.

    Raises:
        ValueError: a bad name, or a suite of that name is already registered.

    Example:

    >>> from keras_transfer.benchmarks import Figure
    >>> _ = register_suite("doc_constant", lambda quick: {"answer": Figure(42, "")})
    >>> "doc_constant" in SUITES
    True
    >>> del SUITES["doc_constant"]
    """
    if not isinstance(name, str) or not name.isidentifier() or name == ALL:
        raise ValueError(
            f"`name` must be an identifier other than {ALL!r}, e.g. 'overhead'. "
            f"Received: name={name!r}"
        )
    if not callable(suite):
        raise TypeError(f"`suite` must be callable. Received: {type(suite).__name__}")
    if name in SUITES:
        raise ValueError(f"A benchmark suite named {name!r} is already registered.")
    SUITES[name] = suite
    return suite


def resolve_suites(names: str | Sequence[str]) -> tuple[str, ...]:
    """The suites a `--suite` value asks for, checked, in order, without repeats.

    Args:
        names: a comma-separated string or a list of suite names; `"all"`
            stands for every registered suite.

    Returns:
        A tuple of registered names.

    Raises:
        ValueError: an unknown or empty name, naming it and the allowed names.

    Example:

    >>> resolve_suites("export,overhead,export")
    ('export', 'overhead')
    >>> resolve_suites("overhed")
    Traceback (most recent call last):
    ...
    ValueError: `suite` must be names of ('overhead', 'export', 'caching', 'time_to_accuracy', 'pipeline', 'scale', 'utilisation', 'techniques') or 'all', separated by commas. Did you mean 'overhead'? Received: suite='overhed'
    """
    if isinstance(names, str):
        names = names.split(",")
    if isinstance(names, (bytes, bytearray)) or not isinstance(names, Sequence):
        raise TypeError(
            f"`names` must be a string or a list of strings. Received: {type(names).__name__}"
        )
    allowed = tuple(SUITES)
    chosen: list[str] = []
    for name in names:
        name = name.strip() if isinstance(name, str) else name
        if name == ALL:
            chosen.extend(allowed)
        elif name in SUITES:
            chosen.append(name)
        else:
            hint = suggest(name, allowed) if isinstance(name, str) else ""
            raise ValueError(
                f"`suite` must be names of {allowed} or {ALL!r}, separated by commas.{hint} "
                f"Received: suite={name!r}"
            )
    if not chosen:
        raise ValueError(
            f"`suite` must name at least one of {allowed} or {ALL!r}. Received: suite={names!r}"
        )
    return tuple(dict.fromkeys(chosen))


for _name, _suite in (
    ("overhead", overhead.run),
    ("export", export.run),
    ("caching", caching.run),
    ("time_to_accuracy", time_to_accuracy.run),
    ("pipeline", pipeline.run),
    ("scale", scale.run),
    ("utilisation", utilisation.run),
    ("techniques", techniques.run),
):
    register_suite(_name, _suite)
