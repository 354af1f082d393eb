"""Scores and statistics of the quality bench: token F1 against a reference, per-prompt pairwise win rates with a Wilson
score interval and a paired bootstrap interval."""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_tokens(text: str) -> list[str]:
    """SQuAD-style normalisation: lower case, punctuation → space, articles dropped, split on whitespace."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split()


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (bag of normalised tokens, SQuAD's definition); 0 for an empty side."""
    p, r = normalize_tokens(prediction), normalize_tokens(reference)
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a proportion (successes may be fractional: ties counted as half a win)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class PairwiseResult:
    """Per-prompt comparison of model A against model B on one score (higher is better).

    ``win_rate`` counts a tie as half a win; ``strict_win_rate`` counts only wins (ties as not-wins). The goals of the
    issue ("beats on ≥ X % of prompts") are read against ``strict_win_rate`` — the stricter of the two — and both are
    reported with their Wilson 95 % intervals; ``boot_low``/``boot_high`` is a paired percentile bootstrap of
    ``win_rate`` over prompts.
    """

    a: str
    b: str
    metric: str
    wins: int
    ties: int
    losses: int
    n: int
    win_rate: float
    ci_low: float
    ci_high: float
    strict_win_rate: float
    strict_ci_low: float
    strict_ci_high: float
    boot_low: float
    boot_high: float
    mean_diff: float  # mean of (A − B) over prompts


def pairwise(
    a_scores: Sequence[float],
    b_scores: Sequence[float],
    a: str = "A",
    b: str = "B",
    metric: str = "",
    tie_tolerance: float = 1e-9,
    bootstrap: int = 10_000,
    seed: int = 0,
) -> PairwiseResult:
    """Compare two models prompt by prompt: |A − B| ≤ ``tie_tolerance`` is a tie."""
    if len(a_scores) != len(b_scores):
        raise ValueError("score lists differ in length")
    n = len(a_scores)
    outcome = []  # 1 win, 0.5 tie, 0 loss
    for x, y in zip(a_scores, b_scores, strict=True):
        d = x - y
        outcome.append(0.5 if abs(d) <= tie_tolerance else (1.0 if d > 0 else 0.0))
    wins = sum(1 for o in outcome if o == 1.0)
    ties = sum(1 for o in outcome if o == 0.5)
    losses = n - wins - ties
    rate = (wins + 0.5 * ties) / n if n else 0.0
    lo, hi = wilson_interval(wins + 0.5 * ties, n)
    slo, shi = wilson_interval(wins, n)
    rng = random.Random(seed)
    boots = []
    if n:
        for _ in range(bootstrap):
            boots.append(sum(outcome[rng.randrange(n)] for _ in range(n)) / n)
        boots.sort()
    blo = boots[int(0.025 * (len(boots) - 1))] if boots else 0.0
    bhi = boots[int(math.ceil(0.975 * (len(boots) - 1)))] if boots else 1.0
    return PairwiseResult(
        a=a,
        b=b,
        metric=metric,
        wins=wins,
        ties=ties,
        losses=losses,
        n=n,
        win_rate=rate,
        ci_low=lo,
        ci_high=hi,
        strict_win_rate=wins / n if n else 0.0,
        strict_ci_low=slo,
        strict_ci_high=shi,
        boot_low=blo,
        boot_high=bhi,
        mean_diff=sum(x - y for x, y in zip(a_scores, b_scores, strict=True)) / n if n else 0.0,
    )
