/**
 * Experiment assignment evaluated in-process, exactly as the experiments service's AssignVariant answers it
 * (the service's reference: neuroweaver_experiments' `domain/assignment.py`).
 *
 * - Hash: GrowthBook hashing version 2, `bucket = fnv1a32(String(fnv1a32(seed + unitId))) % 10000`, where
 *   `fnv1a32` is 32-bit FNV-1a over the string's UTF-16 code units (what GrowthBook's JS SDK computes).
 * - Ranges: variant i owns `[c_i, c_i + coverage * w_i)` in hash-value units (`bucket / 10000`), `c_i` the running
 *   float sum of the weights before it; the first range holding the value wins (GrowthBook's `chooseVariation`).
 *   The arithmetic is the same IEEE-754 double arithmetic as the service's, so bounds agree to the last bit.
 * - Phases: each weight change starts a phase (epoch). A bucket is *ambiguous* when an earlier phase covered it
 *   and gave it another answer than the current phase (another variant, or the current phase leaves it outside
 *   the coverage): a unit in it may have been exposed, and made sticky, by another evaluator in that phase, so
 *   only the server (or a sticky store shared by every evaluator) knows its answer. Every other bucket's answer
 *   is the current phase's, whoever saw the unit before.
 *
 * Pure: no I/O. `ExperimentsSdk` (experiments-sdk.ts) adds the config watch, stickiness and exposure logging.
 */
import type { ExperimentConfig, Variant } from "./gen/neuroweaver/experiments/v1/experiment_pb.js";

/** Number of hash buckets: a bucket is 0..9999, GrowthBook's hash value is bucket / 10000. */
export const BUCKETS = 10_000;

const FNV_OFFSET = 0x811c9dc5;
const FNV_PRIME = 0x01000193;

/** Continues a 32-bit FNV-1a state over the UTF-16 code units of `s` (GrowthBook's `fnv1a32` with a start state). */
export function fnv1a32(s: string, state: number = FNV_OFFSET): number {
  let h = state;
  for (let i = 0; i < s.length; i++) {
    h = Math.imul(h ^ s.charCodeAt(i), FNV_PRIME);
  }
  return h >>> 0;
}

/** GrowthBook hash v2 of `unitId` under `seed`, as an integer bucket 0..9999. */
export function hashBucket(seed: string, unitId: string): number {
  return bucketFromState(fnv1a32(seed), unitId);
}

function bucketFromState(seedState: number, unitId: string): number {
  return fnv1a32(String(fnv1a32(unitId, seedState))) % BUCKETS;
}

/** GrowthBook's `getBucketRanges` for valid weights (they sum to 1): `[start, end)` per variant. */
export function bucketRanges(weights: readonly number[], coverage: number): [number, number][] {
  const ranges: [number, number][] = [];
  let cumulative = 0;
  for (const w of weights) {
    const start = cumulative;
    cumulative += w;
    ranges.push([start, start + coverage * w]);
  }
  return ranges;
}

/** GrowthBook's `chooseVariation`: index of the first range holding `n` (half-open), or -1. */
export function chooseVariant(n: number, ranges: readonly (readonly [number, number])[]): number {
  for (let i = 0; i < ranges.length; i++) {
    const [lo, hi] = ranges[i]!;
    if (n >= lo && n < hi) {
      return i;
    }
  }
  return -1;
}

/** bucket → variant index (-1: outside the coverage) for one phase's weights. */
export function bucketTable(weights: readonly number[], coverage: number): Int16Array {
  const ranges = bucketRanges(weights, coverage);
  const table = new Int16Array(BUCKETS);
  for (let b = 0; b < BUCKETS; b++) {
    table[b] = chooseVariant(b / BUCKETS, ranges);
  }
  return table;
}

/** How the current config answers a unit locally. */
export type LocalAnswer =
  /** The current phase's variant `variant` (index), a first exposure when not sticky. */
  | { kind: "variant"; variant: number; bucket: number }
  /** Outside the current phase's coverage (and never covered with another answer): the control, no exposure. */
  | { kind: "outside"; bucket: number }
  /** Ambiguous bucket: the server (or a shared sticky store) decides. */
  | { kind: "ambiguous"; bucket: number };

/** Why a config cannot be evaluated locally (the SDK then asks the server for that experiment). */
export class UnusableConfigError extends Error {}

/**
 * One experiment's `ExperimentConfig`, compiled for the hot path: the seed's FNV state, the current phase's
 * bucket → variant table and the ambiguous buckets. Build once per config revision.
 */
export class CompiledConfig {
  readonly experiment: string;
  readonly revision: bigint;
  readonly variants: readonly Variant[];
  /** The current (last) phase's epoch: what exposures report. */
  readonly epoch: number;
  /** variant id → index. */
  readonly index: ReadonlyMap<string, number>;
  private readonly seedState: number;
  private readonly table: Int16Array;
  private readonly ambiguous: Uint8Array;
  /** Number of ambiguous buckets (0 with a single phase). */
  readonly ambiguousBuckets: number;

  constructor(config: ExperimentConfig) {
    const { experiment, hashSeed, coverage, variants, phases } = config;
    if (!experiment || !hashSeed) {
      throw new UnusableConfigError(`config of ${experiment || "?"}: no experiment name or hash seed`);
    }
    if (!(coverage > 0 && coverage <= 1)) {
      throw new UnusableConfigError(`config of ${experiment}: coverage ${coverage} is not in (0, 1]`);
    }
    if (variants.length < 2 || phases.length === 0) {
      throw new UnusableConfigError(`config of ${experiment}: ${variants.length} variants, ${phases.length} phases`);
    }
    const index = new Map<string, number>();
    variants.forEach((v, i) => index.set(v.id, i));
    if (index.size !== variants.length) {
      throw new UnusableConfigError(`config of ${experiment}: duplicate variant ids`);
    }
    const tables = phases.map((phase) => {
      const ws = phase.weights;
      if (ws.length !== variants.length || ws.some((w) => !Number.isFinite(w) || w < 0)) {
        throw new UnusableConfigError(`config of ${experiment}: phase ${phase.epoch} has weights ${JSON.stringify(ws)}`);
      }
      return bucketTable(ws, coverage);
    });
    const current = tables[tables.length - 1]!;
    const ambiguous = new Uint8Array(BUCKETS);
    let count = 0;
    for (const earlier of tables.slice(0, -1)) {
      for (let b = 0; b < BUCKETS; b++) {
        const v = earlier[b]!;
        if (v !== -1 && v !== current[b] && ambiguous[b] === 0) {
          ambiguous[b] = 1;
          count++;
        }
      }
    }
    this.experiment = experiment;
    this.revision = config.revision;
    this.variants = variants;
    this.epoch = phases[phases.length - 1]!.epoch;
    this.index = index;
    this.seedState = fnv1a32(hashSeed);
    this.table = current;
    this.ambiguous = ambiguous;
    this.ambiguousBuckets = count;
  }

  bucket(unitId: string): number {
    return bucketFromState(this.seedState, unitId);
  }

  /** The local answer for a unit with no sticky assignment (the caller checks stickiness first). */
  evaluate(unitId: string): LocalAnswer {
    const bucket = bucketFromState(this.seedState, unitId);
    if (this.ambiguous[bucket] === 1) {
      return { kind: "ambiguous", bucket };
    }
    const variant = this.table[bucket]!;
    return variant < 0 ? { kind: "outside", bucket } : { kind: "variant", variant, bucket };
  }
}

const LONE_SURROGATE = /\p{Surrogate}/u;

/**
 * Whether the SDK may hash `unitId` itself: 1..256 code points (the service's limit; others get its
 * INVALID_ARGUMENT from the server) and well-formed UTF-16 (a lone surrogate reaches the server as U+FFFD, so
 * the server's answer is the one that counts).
 */
export function locallyEvaluable(unitId: string): boolean {
  if (unitId.length === 0 || LONE_SURROGATE.test(unitId)) {
    return false;
  }
  if (unitId.length <= 256) {
    return true;
  }
  let points = 0;
  for (const _ of unitId) {
    if (++points > 256) {
      return false;
    }
  }
  return true;
}
