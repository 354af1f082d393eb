"""hash_buckets (vectorised) gives hash_bucket's answer for every unit: ASCII of every length, NUL bytes, non-ASCII
(scalar fallback) and mixed batches; PhasedPlan's ambiguous buckets are exactly those an earlier phase covered with
another answer."""

from __future__ import annotations

import random
import string

from neuroweaver_runtime.assignment import AssignmentPlan, PhasedPlan, hash_bucket, hash_buckets


def test_hash_buckets_equals_hash_bucket():
    rng = random.Random(3)
    units = ["".join(rng.choice(string.printable) for _ in range(rng.randint(1, 60))) for _ in range(5000)]
    units += ["ü-user", "日本語", "a\0b", "0", "x" * 256, "user-00000001", "😀"]
    for seed in ("s", "exp-1", "ünï-seed"):
        assert hash_buckets(seed, units) == [hash_bucket(seed, u) for u in units]
    assert hash_buckets("s", []) == []


def test_ambiguous_buckets():
    phases = [[0.5, 0.5], [0.2, 0.8], [0.6, 0.4]]
    plan = PhasedPlan("seed", phases, 0.7)
    tables = [AssignmentPlan("seed", w, 0.7).table for w in phases]
    for b in range(10_000):
        expected = any(t[b] is not None and t[b] != tables[-1][b] for t in tables[:-1])
        assert plan.ambiguous(b) == expected
    assert not any(PhasedPlan("seed", [[0.5, 0.5]], 0.7).ambiguous(b) for b in range(10_000))
