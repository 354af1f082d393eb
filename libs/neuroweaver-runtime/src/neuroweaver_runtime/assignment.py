"""Deterministic, GrowthBook-compatible variant assignment.

A unit (user, session, conversation) is hashed with the experiment's seed into one of 10,000 buckets
using GrowthBook's hashing version 2::

    n = fnv1a32(str(fnv1a32(seed + unit_id)))
    bucket = n % 10000            # 0..9999; GrowthBook's hash value is bucket / 10000

`fnv1a32` is 32-bit FNV-1a over the string's UTF-16 code units (for ASCII strings: its bytes), exactly as
the GrowthBook JS and Python (4.x) SDKs compute it. Buckets map to variants through GrowthBook's bucket
ranges: variant *i* owns ``[c_i, c_i + coverage * w_i)`` where ``c_i`` is the cumulative weight of the
variants before it; a bucket in no range is outside the coverage (the caller serves the control and logs no
exposure). Range bounds are computed with the same float arithmetic as the SDK, so every unit gets the
same variant as `GrowthBook.run(Experiment(key, variations, weights, coverage, hashVersion=2, seed=seed))`
for valid weights.

One deliberate difference: the SDK silently replaces weights that do not sum to 1 (within 0.01) with equal
weights; here invalid weights are rejected with `InvalidArgument` (sum must be 1 within 1e-6).

Everything is pure; `AssignmentPlan` precomputes the seed's hash state and a 10,000-entry bucket → variant
table so the hot path is two short FNV loops and a list index.

What the sample-ratio test may expect (`BucketClasses`). Each weight change starts a new epoch with its own
plan. A unit's first exposure is the first time it is assigned while its bucket is inside the coverage of the
plan of that moment (the assignment is stored then and sticky afterwards; outside the coverage nothing is
stored). With coverage 1 every unit is stored on its first visit, so the units first exposed in epoch e are
new units with uniform buckets and split as epoch e's buckets do. With coverage < 1 they are not: a unit seen
in epoch 0 outside its coverage and coming back in epoch 1 has a bucket outside epoch 0's coverage, and the
part of epoch 1's ranges that lies there can be far from epoch 1's weights (coverage 0.5, weights 0.5/0.5 →
0.2/0.8: every such unit lands in the treatment). Which units come back is not recorded, but it does not need
to be: group the buckets covered in epoch e by the set of earlier epochs that also covered them (their class).
Whether a unit's first exposure falls in epoch e depends on its visits (independent of its hash) and on its
bucket only through that set, so, given that it does and that its bucket is in class K, the bucket is uniform
over K, and the units first exposed in (e, K) split over the variants exactly as epoch e's plan splits K's
buckets. Each first exposure is therefore counted per (epoch, class key, variant), the key being the class's
smallest bucket, and the test takes each (epoch, class) as a stratum with those shares
(`experiment.srm_strata`, `statistics.srm_test_strata`). Memory is bounded by the classes (at most
2 · variants · epochs + 1 per epoch), not by units. Not covered: for up to the assignment snapshot's TTL after a
weight change, a replica still on the old plan may expose a unit another replica already saw under the new one.

Local evaluation (`PhasedPlan`): the experiments service and the SDK (`neuroweaver_sdk.experiments`) share this
module, so an SDK evaluating in-process gives AssignVariant's answer from the same code. A unit without a sticky
assignment gets the current phase's answer unless its bucket is *ambiguous*: an earlier phase covered it and gave
another answer (another variant, or the current phase leaves it outside the coverage). Only there can a stored
assignment from an earlier phase differ from the current plan, so only there must an evaluator ask the store.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from neuroweaver_runtime.errors import InvalidArgument

__all__ = [
    "BUCKETS",
    "WEIGHT_SUM_TOLERANCE",
    "Assignment",
    "AssignmentPlan",
    "BucketClasses",
    "PhasedPlan",
    "assign",
    "bucket_ranges",
    "choose_variant",
    "fnv1a32",
    "hash_bucket",
    "hash_buckets",
    "hash_value",
    "resolve_sticky",
    "validate_coverage",
    "validate_variants",
    "validate_weights",
    "variant_runs",
]

BUCKETS = 10_000
WEIGHT_SUM_TOLERANCE = 1e-6

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193
_MASK32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------- hashing


def _fnv_update(hval: int, s: str) -> int:
    """Continue an FNV-1a 32 state over the UTF-16 code units of `s`."""
    if s.isascii():
        for b in s.encode():
            hval = ((hval ^ b) * _FNV_PRIME) & _MASK32
        return hval
    data = s.encode("utf-16-le", "surrogatepass")
    for i in range(0, len(data), 2):
        hval = ((hval ^ (data[i] | (data[i + 1] << 8))) * _FNV_PRIME) & _MASK32
    return hval


def fnv1a32(s: str) -> int:
    """32-bit FNV-1a over UTF-16 code units (GrowthBook's `fnv1a32`)."""
    return _fnv_update(_FNV_OFFSET, s)


def _bucket_from_state(seed_state: int, unit_id: str) -> int:
    return _fnv_update(_FNV_OFFSET, str(_fnv_update(seed_state, unit_id))) % BUCKETS


def hash_bucket(seed: str, unit_id: str) -> int:
    """GrowthBook hash v2 as an integer bucket 0..9999."""
    return _bucket_from_state(fnv1a32(seed), unit_id)


def hash_buckets(seed: str, unit_ids: Sequence[str]) -> list[int]:
    """`hash_bucket` of many units at once: with numpy (when installed) the two FNV passes run column by column over
    all ASCII ids together (about 50x faster for thousands of ids; IngestEvents checks each exposure's bucket);
    non-ASCII ids, and everything without numpy, take the scalar path. Same results as `hash_bucket`."""
    state = fnv1a32(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is there wherever the experiments service runs
        return [_bucket_from_state(state, u) for u in unit_ids]
    out = [0] * len(unit_ids)
    ascii_rows = [i for i, u in enumerate(unit_ids) if u.isascii()]
    for i in range(len(unit_ids)):
        if not unit_ids[i].isascii():
            out[i] = _bucket_from_state(state, unit_ids[i])
    if not ascii_rows:
        return out
    encoded = [unit_ids[i].encode() for i in ascii_rows]
    width = max(len(e) for e in encoded) or 1
    data = np.frombuffer(b"".join(e.ljust(width, b"\0") for e in encoded), dtype=np.uint8).reshape(len(encoded), width)
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    prime, mask = np.uint64(_FNV_PRIME), np.uint64(_MASK32)
    h = np.full(len(encoded), state, dtype=np.uint64)
    for j in range(width):  # first pass: fnv over the seed's state, then the unit id's bytes
        step = ((h ^ data[:, j]) * prime) & mask
        h = np.where(lengths > j, step, h)
    # second pass: fnv over the decimal digits of the first hash (str(h)), most significant first
    digits = np.ones(len(encoded), dtype=np.int64)
    for k in range(1, 10):
        digits += h >= np.uint64(10**k)
    g = np.full(len(encoded), _FNV_OFFSET, dtype=np.uint64)
    for k in range(10):
        power = np.power(np.uint64(10), np.maximum(digits - 1 - k, 0).astype(np.uint64))
        char = (h // power) % np.uint64(10) + np.uint64(48)
        step = ((g ^ char) * prime) & mask
        g = np.where(digits > k, step, g)
    for row, bucket in zip(ascii_rows, (g % np.uint64(BUCKETS)).tolist(), strict=True):
        out[row] = bucket
    return out


def hash_value(seed: str, unit_id: str) -> float:
    """GrowthBook hash v2 as the SDK returns it (`gbhash(seed, unit_id, 2)`): bucket / 10000 in [0, 1)."""
    return hash_bucket(seed, unit_id) / BUCKETS


# ------------------------------------------------------------------------------------------ validation


def validate_weights(weights: Sequence[float], *, field: str = "variants") -> tuple[float, ...]:
    """Check traffic weights: at least 2, each finite and >= 0, summing to 1 within 1e-6.

    Raises `InvalidArgument` naming the offending field (`{field}` or `{field}[i].weight`).
    """
    ws = tuple(weights)
    if len(ws) < 2:
        raise InvalidArgument(f"an experiment needs at least 2 variants, got {len(ws)}", field=field, reason="TOO_FEW_VARIANTS")
    for i, w in enumerate(ws):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise InvalidArgument(
                f"weight must be a finite number >= 0, got {w!r}", field=f"{field}[{i}].weight", reason="INVALID_WEIGHT"
            )
    total = math.fsum(ws)
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise InvalidArgument(
            f"variant weights must sum to 1, they sum to {total:.9g}", field=field, reason="WEIGHTS_DO_NOT_SUM_TO_ONE"
        )
    return tuple(float(w) for w in ws)


def validate_coverage(coverage: float, *, field: str = "coverage") -> float:
    """Coverage must be a number in (0, 1]."""
    if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not math.isfinite(coverage):
        raise InvalidArgument(f"coverage must be a number, got {coverage!r}", field=field, reason="INVALID_COVERAGE")
    if not 0 < coverage <= 1:
        raise InvalidArgument(f"coverage must be in (0, 1], got {coverage!r}", field=field, reason="INVALID_COVERAGE")
    return float(coverage)


def validate_variants(variant_ids: Sequence[str], weights: Sequence[float], *, field: str = "variants") -> tuple[float, ...]:
    """Validate ids (non-empty, unique) together with their weights; returns the weights as floats."""
    ids = list(variant_ids)
    if len(ids) != len(weights):
        raise InvalidArgument(f"{len(ids)} variant ids but {len(weights)} weights", field=field, reason="VARIANT_WEIGHT_MISMATCH")
    seen: set[str] = set()
    for i, vid in enumerate(ids):
        if not isinstance(vid, str) or not vid:
            raise InvalidArgument("variant id must not be empty", field=f"{field}[{i}].id", reason="INVALID_VARIANT_ID")
        if vid in seen:
            raise InvalidArgument(f"variant id {vid!r} is used twice", field=f"{field}[{i}].id", reason="DUPLICATE_VARIANT_ID")
        seen.add(vid)
    return validate_weights(weights, field=field)


# ----------------------------------------------------------------------------------------------- ranges


def bucket_ranges(weights: Sequence[float], coverage: float = 1.0) -> list[tuple[float, float]]:
    """GrowthBook's `getBucketRanges` for valid weights: variant i owns ``[c_i, c_i + coverage*w_i)``.

    Validates `weights` and `coverage` first. Bounds are in hash-value units [0, 1).
    """
    ws = validate_weights(weights)
    cov = validate_coverage(coverage)
    ranges: list[tuple[float, float]] = []
    cumulative = 0.0
    for w in ws:
        start = cumulative
        cumulative += w
        ranges.append((start, start + cov * w))
    return ranges


def choose_variant(n: float, ranges: Sequence[tuple[float, float]]) -> int:
    """GrowthBook's `chooseVariation`: index of the range holding `n` (half-open), or -1 when none does."""
    for i, (lo, hi) in enumerate(ranges):
        if lo <= n < hi:
            return i
    return -1


def variant_runs(weights: Sequence[float], coverage: float = 1.0) -> list[tuple[int, int, int]]:
    """Each variant's buckets as ``(variant, first, end)`` (end exclusive; empty runs left out), with the SDK's float
    comparisons (bucket / 10000 against the float range bounds). b / BUCKETS is monotonic in b, so each range owns
    one contiguous run; where float rounding made two ranges overlap, the earlier variant keeps the bucket, as in
    chooseVariation."""
    runs: list[tuple[int, int, int]] = []
    taken = 0  # buckets below this belong to an earlier variant
    for idx, (lo, hi) in enumerate(bucket_ranges(weights, coverage)):
        first = max(0, math.floor(lo * BUCKETS) - 1)
        while first < BUCKETS and first / BUCKETS < lo:
            first += 1
        end = first
        while end < BUCKETS and end / BUCKETS < hi:
            end += 1
        first = max(first, taken)
        if first < end:
            runs.append((idx, first, end))
            taken = end
    return runs


class BucketClasses:
    """The buckets of each epoch grouped by the earlier epochs whose plans covered them (see the module docstring).

    A class is named by its key, the smallest bucket in it: stable for an epoch once the epoch exists (it depends
    on the weights of that epoch and the earlier ones only) and recorded with each first exposure. The bucket line
    is cut at every run boundary of every epoch; between two cuts every epoch's variant is constant, so classes
    and shares come from the segments (at most 2·variants·epochs + 1), never from 10,000 buckets one by one.
    """

    __slots__ = ("_cuts", "_sizes", "_variant", "_keys", "_classes")

    def __init__(self, weights_history: Sequence[Sequence[float]], coverage: float = 1.0) -> None:
        epochs = [variant_runs(w, coverage) for w in weights_history]
        self._sizes = [len(w) for w in weights_history]
        cuts = sorted({0, BUCKETS} | {b for runs in epochs for _, first, end in runs for b in (first, end)})
        self._cuts = cuts
        at = {b: i for i, b in enumerate(cuts)}
        # variant of each segment [cuts[s], cuts[s+1]) in each epoch (None: outside that epoch's coverage)
        self._variant: list[list[int | None]] = []
        for runs in epochs:
            seg: list[int | None] = [None] * (len(cuts) - 1)
            for idx, first, end in runs:
                seg[at[first] : at[end]] = [idx] * (at[end] - at[first])
            self._variant.append(seg)
        # class key of each covered segment in each epoch, and each class's segments
        self._keys: list[list[int | None]] = []
        self._classes: list[dict[int, list[int]]] = []
        covered = [0] * (len(cuts) - 1)  # bit e set: epoch e covered the segment
        for e, seg in enumerate(self._variant):
            by_signature: dict[int, int] = {}
            keys: list[int | None] = [None] * len(seg)
            classes: dict[int, list[int]] = {}
            for s, variant in enumerate(seg):
                if variant is None:
                    continue
                key = by_signature.setdefault(covered[s], cuts[s])  # segments in bucket order: the first is the smallest
                keys[s] = key
                classes.setdefault(key, []).append(s)
                covered[s] |= 1 << e
            self._keys.append(keys)
            self._classes.append(classes)

    @property
    def epochs(self) -> int:
        return len(self._variant)

    def keys(self, epoch: int) -> list[int]:
        """The class keys of `epoch`, smallest first."""
        return sorted(self._classes[epoch])

    def key(self, epoch: int, bucket: int) -> int | None:
        """The class of `bucket` in `epoch`, None when the bucket is outside that epoch's coverage."""
        return self._keys[epoch][bisect.bisect_right(self._cuts, bucket) - 1]

    def table(self, epoch: int) -> list[int | None]:
        """bucket → class key of `epoch` (None outside its coverage) for all 10,000 buckets: the hot path's lookup."""
        out: list[int | None] = [None] * BUCKETS
        for s, key in enumerate(self._keys[epoch]):
            if key is not None:
                out[self._cuts[s] : self._cuts[s + 1]] = [key] * (self._cuts[s + 1] - self._cuts[s])
        return out

    def shares(self, epoch: int, key: int) -> tuple[float, ...] | None:
        """Share of the class's buckets that `epoch` assigns to each variant (what its new units must follow), or
        None when `key` is no class of `epoch`."""
        segments = self._classes[epoch].get(key) if 0 <= epoch < len(self._classes) else None
        if not segments:
            return None
        counts = [0] * self._sizes[epoch]
        for s in segments:
            variant = self._variant[epoch][s]
            assert variant is not None  # a class holds covered segments only
            counts[variant] += self._cuts[s + 1] - self._cuts[s]
        total = sum(counts)
        return tuple(c / total for c in counts)


# ------------------------------------------------------------------------------------------- assignment


@dataclass(frozen=True, slots=True)
class Assignment:
    """Result of assigning one unit.

    `variant` is the index into the experiment's variants, or None when the unit falls outside the
    coverage: then the caller serves the control (`served_variant` == 0) and records no exposure.
    `bucket` is the unit's hash bucket 0..9999. `sticky` is True when the assignment came from the
    store rather than the hash.
    """

    variant: int | None
    bucket: int
    sticky: bool = False

    @property
    def in_experiment(self) -> bool:
        return self.variant is not None

    @property
    def served_variant(self) -> int:
        return 0 if self.variant is None else self.variant


class AssignmentPlan:
    """Precomputed assignment for one (seed, weights, coverage): build once per experiment, reuse.

    >>> plan = AssignmentPlan("exp-1", [0.5, 0.5])
    >>> plan.assign("user-42").bucket
    7191
    """

    __slots__ = ("seed", "weights", "coverage", "ranges", "_seed_state", "_table")

    def __init__(self, seed: str, weights: Sequence[float], coverage: float = 1.0) -> None:
        if not isinstance(seed, str) or not seed:
            raise InvalidArgument("hash seed must not be empty", field="hash_seed", reason="INVALID_HASH_SEED")
        self.seed = seed
        self.weights = validate_weights(weights)
        self.coverage = validate_coverage(coverage)
        self.ranges = bucket_ranges(self.weights, self.coverage)
        self._seed_state = fnv1a32(seed)
        table: list[int | None] = [None] * BUCKETS
        for idx, first, end in variant_runs(self.weights, self.coverage):
            table[first:end] = [idx] * (end - first)
        self._table = table

    def bucket(self, unit_id: str) -> int:
        return _bucket_from_state(self._seed_state, unit_id)

    def assign(self, unit_id: str) -> Assignment:
        """Assign one unit. Raises `InvalidArgument(field="unit_id")` for an empty id."""
        if not unit_id or not isinstance(unit_id, str):
            raise InvalidArgument("unit_id must be a non-empty string", field="unit_id", reason="INVALID_UNIT_ID")
        b = _bucket_from_state(self._seed_state, unit_id)
        return Assignment(self._table[b], b)

    def variant_for_bucket(self, bucket: int) -> int | None:
        return self._table[bucket]

    @property
    def table(self) -> list[int | None]:
        """bucket → variant index (None outside the coverage) for all 10,000 buckets; do not modify."""
        return self._table


def assign(seed: str, unit_id: str, weights: Sequence[float], coverage: float = 1.0) -> Assignment:
    """One-shot assignment (builds a plan; prefer `AssignmentPlan` when assigning many units)."""
    if not isinstance(seed, str) or not seed:
        raise InvalidArgument("hash seed must not be empty", field="hash_seed", reason="INVALID_HASH_SEED")
    if not unit_id or not isinstance(unit_id, str):
        raise InvalidArgument("unit_id must be a non-empty string", field="unit_id", reason="INVALID_UNIT_ID")
    ranges = bucket_ranges(weights, coverage)
    b = hash_bucket(seed, unit_id)
    idx = choose_variant(b / BUCKETS, ranges)
    return Assignment(None if idx < 0 else idx, b)


def resolve_sticky(
    stored_variant_id: str | None,
    variant_ids: Sequence[str],
    fresh: Assignment,
) -> Assignment:
    """The sticky rule: a stored assignment wins over the hash, whatever the current weights/coverage.

    `stored_variant_id` is the variant id the store holds for this unit (None if none). `fresh` is the
    hash assignment under the current configuration (its bucket is kept for reporting). When the stored id
    no longer names a variant, the fresh assignment is used (as GrowthBook does for unknown sticky keys).
    Only in-experiment assignments should be persisted: persist `fresh` when the result is not sticky and
    `in_experiment` is True.
    """
    if stored_variant_id is not None:
        try:
            idx = list(variant_ids).index(stored_variant_id)
        except ValueError:
            return fresh
        return Assignment(idx, fresh.bucket, sticky=True)
    return fresh


class PhasedPlan:
    """Every phase (epoch) of one experiment: a plan per phase and, per bucket, whether it is ambiguous (an earlier
    phase covered it and gave another answer than the current phase; see the module docstring).

    >>> p = PhasedPlan("seed", [[0.5, 0.5], [0.2, 0.8]])
    >>> p.evaluate("user-1")[1] == p.plans[-1].assign("user-1").variant
    True
    """

    __slots__ = ("plans", "epoch", "_seed_state", "_current", "_ambiguous")

    def __init__(self, seed: str, phases: Sequence[Sequence[float]], coverage: float = 1.0) -> None:
        if not phases:
            raise InvalidArgument("an experiment has at least one phase", field="phases", reason="INVALID_WEIGHT")
        self.plans = [AssignmentPlan(seed, w, coverage) for w in phases]
        self.epoch = len(self.plans) - 1
        current = self.plans[-1]
        self._seed_state = current._seed_state
        self._current = current._table
        ambiguous = bytearray(BUCKETS)
        for plan in self.plans[:-1]:
            for b, (old, new) in enumerate(zip(plan._table, self._current, strict=True)):
                if old is not None and old != new:
                    ambiguous[b] = 1
        self._ambiguous = bytes(ambiguous)

    def bucket(self, unit_id: str) -> int:
        return _bucket_from_state(self._seed_state, unit_id)

    def evaluate(self, unit_id: str) -> tuple[int, int | None, bool]:
        """(bucket, the current phase's variant index or None outside its coverage, ambiguous)."""
        b = _bucket_from_state(self._seed_state, unit_id)
        return b, self._current[b], self._ambiguous[b] == 1

    def ambiguous(self, bucket: int) -> bool:
        return self._ambiguous[bucket] == 1

    def variant_in(self, epoch: int, bucket: int) -> int | None:
        """What phase `epoch` assigns `bucket` (None outside its coverage)."""
        return self.plans[epoch]._table[bucket]
