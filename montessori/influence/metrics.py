"""Agreement between two influence estimates of the same candidates (fidelity checks, tests, bench)."""

from __future__ import annotations

import statistics


def ranks(values: list[float]) -> list[float]:
    """Ranks 1..n, ties get their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(a: list[float], b: list[float]) -> float:
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    var = (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5
    return cov / var if var else float("nan")


def spearman(a: list[float], b: list[float]) -> float:
    return pearson(ranks(a), ranks(b))


def sign_agreement(a: list[float], b: list[float]) -> float:
    """Fraction of candidates on the same side of zero: what the `sign` pair rule depends on."""
    return sum((x > 0) == (y > 0) for x, y in zip(a, b)) / len(a)


def median_relative_error(estimate: list[float], truth: list[float]) -> float:
    return statistics.median(abs(e - t) / abs(t) for e, t in zip(estimate, truth) if t != 0)
