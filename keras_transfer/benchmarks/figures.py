"""A benchmark figure: one measured value, its unit, and the target it should meet."""

from __future__ import annotations

import dataclasses
import math
import operator
import re

# The comparisons a target may use: ">= 0.98", "<= 0.05", "> 1", "< 2".
TARGET_OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_TARGET = re.compile(r"^\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def parse_target(target: str) -> tuple[str, float]:
    """Splits a target such as `">= 0.98"` into its operator and bound.

    Args:
        target: an operator from `TARGET_OPERATORS` followed by a number.

    Returns:
        `(operator, bound)`.

    Raises:
        ValueError: the target is not of that form.

    Example:

    >>> parse_target(">= 0.98")
    ('>=', 0.98)
    """
    match = _TARGET.match(target) if isinstance(target, str) else None
    if match is None:
        raise ValueError(
            f"`target` must be an operator of {tuple(TARGET_OPERATORS)} and a number, "
            f"e.g. '>= 0.98'. Received: target={target!r}"
        )
    return match.group(1), float(match.group(2))


@dataclasses.dataclass(frozen=True)
class Figure:
    """One result of a benchmark suite.

    Whether the target is met is derived from `value` and `target`, so the
    two can never disagree.

    Args:
        value: the measured number, or None when it could not be measured
            (`notes` says why).
        unit: what `value` counts (`"images/s"`, `"ms"`, `"x"` for a ratio,
            `"MiB"`, `""` for a fraction).
        target: the value it should reach, e.g. `">= 0.98"` (see
            `parse_target`), or None for a figure reported without one.
        notes: how it was measured, in one or two sentences.

    Example:

    >>> Figure(0.99, "x", ">= 0.98").met
    True
    >>> Figure(12.5, "ms").to_dict()
    {'value': 12.5, 'target': None, 'met': None, 'unit': 'ms', 'notes': ''}
    """

    value: float | int | None
    unit: str
    target: str | None = None
    notes: str = ""

    def __post_init__(self):
        value = self.value
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(
                f"`value` must be a number or None. Received: value of type {type(value).__name__}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"`value` must be finite or None. Received: value={value!r}")
        if not isinstance(self.unit, str):
            raise TypeError(f"`unit` must be a string. Received: unit={self.unit!r}")
        if self.target is not None:
            parse_target(self.target)
        if not isinstance(self.notes, str):
            raise TypeError(f"`notes` must be a string. Received: notes={self.notes!r}")

    @property
    def met(self) -> bool | None:
        """Whether `value` meets `target`; None without a target or a value."""
        if self.target is None or self.value is None:
            return None
        comparison, bound = parse_target(self.target)
        return bool(TARGET_OPERATORS[comparison](self.value, bound))

    def to_dict(self) -> dict:
        """The figure as `results.json` stores it.

        Returns:
            `{"value", "target", "met", "unit", "notes"}`.
        """
        return {
            "value": self.value,
            "target": self.target,
            "met": self.met,
            "unit": self.unit,
            "notes": self.notes,
        }
