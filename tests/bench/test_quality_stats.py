"""bench/quality/stats.py: token F1 (SQuAD's definition), the Wilson interval and the per-prompt pairwise win rate
(wins / ties / losses, ties as half or as not-wins, Wilson and bootstrap intervals)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "quality"))

from stats import normalize_tokens, pairwise, token_f1, wilson_interval  # noqa: E402


def test_token_f1() -> None:
    assert normalize_tokens("The APR, not the rate!") == ["apr", "not", "rate"]
    # "owner's" → "owner s" ≠ "owners": precision 2/4, recall 2/3 → F1 4/7
    assert token_f1("Check the owner's manual.", "check the owners manual") == pytest.approx(4 / 7)
    assert token_f1("rotate the tires", "Rotate the tires.") == 1.0
    assert token_f1("", "anything") == 0.0 and token_f1("unrelated words", "brake fluid") == 0.0
    # precision 2/4, recall 2/2 → F1 = 2·0.5·1/(1.5)
    assert token_f1("brake fluid brake pads", "brake fluid") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    # bag of tokens: a repeated token counts once per occurrence in both
    assert token_f1("oil oil oil", "oil") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))


def test_wilson_interval_matches_the_closed_form() -> None:
    lo, hi = wilson_interval(26, 40)
    # p = 0.65, n = 40, z = 1.96: centre (0.65 + z²/80)/(1 + z²/40) = 0.63686, half-width
    # z·sqrt(p(1−p)/40 + z²/6400)/(1 + z²/40) = 0.14180 → 0.4951–0.7787 (worked by hand)
    assert lo == pytest.approx(0.4951, abs=2e-4) and hi == pytest.approx(0.7787, abs=2e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_pairwise_counts_ties_both_ways_and_brackets_the_rate() -> None:
    a = [0.9, 0.5, 0.3, 0.7, 0.2]
    b = [0.1, 0.5, 0.4, 0.6, 0.2 + 1e-12]
    r = pairwise(a, b, "sft", "base", "token_f1", tie_tolerance=1e-9, bootstrap=2000)
    assert (r.wins, r.ties, r.losses, r.n) == (2, 2, 1, 5)
    assert r.win_rate == pytest.approx(3 / 5) and r.strict_win_rate == pytest.approx(2 / 5)
    assert r.ci_low < r.win_rate < r.ci_high and r.strict_ci_low < r.strict_win_rate < r.strict_ci_high
    assert 0.0 <= r.boot_low <= r.win_rate <= r.boot_high <= 1.0
    assert r.mean_diff == pytest.approx(sum(x - y for x, y in zip(a, b, strict=True)) / 5)


def test_pairwise_bootstrap_is_seeded_and_narrows_with_more_prompts() -> None:
    a, b = [1.0, 0.0] * 10, [0.5] * 20
    r1, r2 = pairwise(a, b, seed=3), pairwise(a, b, seed=3)
    assert (r1.boot_low, r1.boot_high) == (r2.boot_low, r2.boot_high)
    wide = pairwise(a, b)
    narrow = pairwise(a * 10, b * 10)
    assert narrow.boot_high - narrow.boot_low < wide.boot_high - wide.boot_low
    assert math.isclose(narrow.win_rate, 0.5)


def test_pairwise_refuses_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        pairwise([1.0], [1.0, 2.0])
