"""Hyperparameter declarations: what a method accepts, with defaults and valid ranges.

A method lists its hyperparameters once; the study loader checks arm values and search spaces
against the list, and the method resolves a config dict (defaults filled in) from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class HParam:
    name: str
    default: Any
    low: float = -math.inf  # inclusive bounds
    high: float = math.inf
    kind: type = float
    doc: str = ""
    choices: tuple[str, ...] = ()  # str only: the valid values
    multi: bool = False  # str only: a comma-separated list of choices

    def check(self, value: Any) -> str | None:
        """None when `value` is valid, else what is wrong."""
        if self.kind is str:
            if not isinstance(value, str):
                return f"expected a string, got {value!r}"
            parts = [p.strip() for p in value.split(",")] if self.multi else [value]
            bad = [p for p in parts if self.choices and p not in self.choices]
            if bad or not all(parts):
                return f"{(bad or [''])[0]!r} is not one of {', '.join(self.choices)}"
            return None
        if self.kind is list:
            if not isinstance(value, list) or not value or not all(
                    isinstance(v, int) and not isinstance(v, bool) and self.low <= v <= self.high for v in value):
                return f"expected a non-empty list of integers in [{self.low}, {self.high}], got {value!r}"
            return None
        if self.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            return f"expected an integer, got {value!r}"
        if self.kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"expected a number, got {value!r}"
        if not self.low <= value <= self.high:
            return f"{value!r} is outside [{self.low}, {self.high}]"
        return None


def resolve(declared: Mapping[str, HParam], given: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with `given`; unknown names or bad values raise ValueError."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ValueError(f"unknown hyperparameter {unknown[0]!r}; valid: {', '.join(sorted(declared))}")
    out = {name: hp.default for name, hp in declared.items()}
    for name, value in given.items():
        problem = declared[name].check(value)
        if problem:
            raise ValueError(f"hyperparameter {name!r}: {problem}")
        out[name] = declared[name].kind(value)
    return out
