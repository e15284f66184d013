"""Small statistics shared by the gate and `quantpipe select`: one-sided Student t and normal quantiles, and the
paired difference of two series of block means (the eval records each metric's mean over blocks of 64 tokens of
every window; two rows of one run, or two runs of the same eval tokens, score the same blocks).
"""

from __future__ import annotations

import math

# One-sided Student t quantiles for 1..30 degrees of freedom at the confidences a gate is likely to use;
# beyond 30 the normal quantile. (Standard table values.)
_T = {
    0.95: [6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761, 1.753,
           1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699, 1.697],
    0.99: [31.821, 6.965, 4.541, 3.747, 3.365, 3.143, 2.998, 2.896, 2.821, 2.764, 2.718, 2.681, 2.650, 2.624, 2.602,
           2.583, 2.567, 2.552, 2.539, 2.528, 2.518, 2.508, 2.500, 2.492, 2.485, 2.479, 2.473, 2.467, 2.462, 2.457],
}


def normal_quantile(p: float) -> float:
    """Inverse standard normal CDF (bisection on erf; plenty for a threshold)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def t_quantile(p: float, dof: int) -> float:
    """One-sided Student t quantile: the table above where it has the confidence, else a Cornish-Fisher
    expansion around the normal quantile (accurate to ~1 % from 3 degrees of freedom)."""
    if p in _T and 1 <= dof <= 30:
        return _T[p][dof - 1]
    z = normal_quantile(p)
    if dof > 30:
        return z
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float, int] | None:
    """Mean of b - a over paired blocks, its standard error (stdev / sqrt(n)) and n; None without two pairs."""
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    d = [y - x for x, y in zip(a, b, strict=True)]
    m = sum(d) / len(d)
    return m, math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)), len(d)
