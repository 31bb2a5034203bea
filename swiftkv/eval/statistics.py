"""Confidence intervals by bootstrap over examples, paired for differences (same examples, two models)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

Aggregate = Callable[[np.ndarray], float]


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high]}


def bootstrap(values: Sequence[float] | np.ndarray, aggregate: Aggregate = np.mean, resamples: int = 1000,
              seed: int = 0) -> Estimate:
    """Point estimate and 95% percentile interval of `aggregate` over resampled examples."""
    values = np.asarray(values, dtype=float)
    indices = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    samples = np.array([aggregate(values[row]) for row in indices])
    return Estimate(float(aggregate(values)), *map(float, np.percentile(samples, [2.5, 97.5])))


def paired_difference(model_values: Sequence[float], baseline_values: Sequence[float],
                      aggregate: Aggregate = np.mean, resamples: int = 1000, seed: int = 0) -> Estimate:
    """aggregate(model) - aggregate(baseline), resampling the same examples for both."""
    model_values, baseline_values = np.asarray(model_values, float), np.asarray(baseline_values, float)
    if model_values.shape != baseline_values.shape:
        raise ValueError("paired difference needs per-example values for the same examples")
    indices = np.random.default_rng(seed).integers(0, len(model_values), size=(resamples, len(model_values)))
    samples = np.array([aggregate(model_values[row]) - aggregate(baseline_values[row]) for row in indices])
    point = aggregate(model_values) - aggregate(baseline_values)
    return Estimate(float(point), *map(float, np.percentile(samples, [2.5, 97.5])))
