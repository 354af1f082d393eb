/**
 * The local-evaluation SDK (`ExperimentsSdk`, src/experiments-sdk.ts) against a real experiments service, run by
 * tests/e2e/test_node_experiments_sdk.py. Prints one JSON line with what it saw; the Python side asserts on it.
 *
 *   node dist-test/experiments-sdk.js --experiments HOST:PORT --scenario agreement|weight-change|delivery [--seed N]
 *
 * agreement:     many experiments (seeds incl. non-ASCII, 2-4 variants, awkward weights, coverages 0.05..1); for
 *                every unit the SDK's pure evaluation (hash v2 over UTF-16, bucket ranges, coverage) from the config
 *                the watch delivered vs BatchAssignVariants (bucket, variant, in_experiment); then sdk.assign() for
 *                fresh units, flushed over IngestEvents, equal to the server's (now sticky) answers. The same units
 *                through GrowthBook's JS SDK (`@growthbook/growthbook`, runInlineExperiment with hashVersion 2, the
 *                experiment's seed, weights and coverage) give the same variant, in-experiment flag and hash value.
 * weight-change: three phases per experiment (two UpdateExperiment weight changes); in each phase units are
 *                exposed by the server (another evaluator) and by an SDK; then an SDK that saw them and a fresh SDK
 *                assign every unit (old and new) and the server's answers afterwards must be the same, unit by unit.
 * restart:       units assigned and tracked at a steady pace while the test freezes the server (SIGSTOP: batches go
 *                unanswered, the SDK gives the stream up after its 1 s ack timeout) and then restarts it (SIGTERM,
 *                same port and database): prints {"stage":"running"} once under way, keeps going until the file
 *                --restarted-flag exists and 300 more units are done, then flushes; the Python side compares the
 *                server's results with what Node counted (no exposure or event lost, none counted twice).
 * bench:         (not asserted: numbers only) evaluations/s and p99 of the SDK's in-process evaluation vs GrowthBook's
 *                JS SDK on the same config and units, identical answers counted; then 50,000 local first exposures
 *                through IngestEvents, timed until all are acknowledged.
 * delivery:      metric events over IngestEvents: duplicates by key counted once, an invalid event isolated and
 *                dropped while the rest of its batch lands, the memory bound refusing events, flush/close; a shared
 *                sticky store answering a fresh SDK after a weight change without the server; a stopped experiment
 *                leaving the SDK's configs, after which assign() throws what AssignVariant throws.
 */
import { GrowthBookClient } from "@growthbook/growthbook";
import { existsSync } from "node:fs";
import { parseArgs } from "node:util";

import {
  Code,
  ConnectError,
  createExperimentsClient,
  errorDetails,
  ExperimentsSdk,
  experimentsv1,
  type ExperimentsClient,
  type SdkAssignment,
  type SdkError,
  assignment,
} from "@neuroweaver/client";

const { hashBucket, locallyEvaluable } = assignment;

const PROJECT = "projects/default";

const { values: args } = parseArgs({
  options: {
    experiments: { type: "string" },
    scenario: { type: "string" },
    seed: { type: "string", default: "1" },
    "restarted-flag": { type: "string" },
  },
});

/** mulberry32: a small deterministic PRNG, so a failure is reproducible from --seed. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Progress on stderr (pytest shows it when the script fails). */
const progress = (what: string) => process.stderr.write(`[${new Date().toISOString()}] ${what}\n`);

const random = rng(Number(args.seed));
const pick = <T>(xs: readonly T[]): T => xs[Math.floor(random() * xs.length)]!;

const SEED_STYLES = ["exp-", "ab_test:", "séed-ü-", "种子-", "🚗💨-", "k"];
const UNIT_STYLES = ["user-", "session:", "usuário-", "ユーザー", "😀-", "conv/"];
const FIXED_WEIGHTS: number[][] = [
  [0.5, 0.5],
  [0.1, 0.9],
  [0.1, 0.2, 0.7],
  [1 / 3, 1 / 3, 1 / 3],
  [0.05, 0.95],
  [0.25, 0.25, 0.25, 0.25],
  [0.999, 0.001],
  [0, 0.5, 0.5],
  [0.3, 0.3, 0.4],
  [0.7, 0.2, 0.1],
];
const COVERAGES = [1, 0.5, 0.05, 0.3333, 0.999, 0.7, 0.123];

function randomWeights(): number[] {
  if (random() < 0.6) {
    return pick(FIXED_WEIGHTS);
  }
  const n = 2 + Math.floor(random() * 3);
  const ks = Array.from({ length: n }, () => 1 + Math.floor(random() * 97));
  const total = ks.reduce((a, b) => a + b, 0);
  return ks.map((k) => k / total);
}

function unitIds(prefix: string, count: number): string[] {
  return Array.from({ length: count }, (_, i) => `${pick(UNIT_STYLES)}${prefix}-${i}-${Math.floor(random() * 1e9)}`);
}

const VARIANT_IDS = ["control", "treatment", "t2", "t3"];

async function createExperiment(
  client: ExperimentsClient,
  id: string,
  weights: number[],
  coverage: number,
  hashSeed: string,
): Promise<string> {
  const created = await client.createExperiment({
    parent: PROJECT,
    experimentId: id,
    experiment: {
      variants: weights.map((weight, i) => ({
        id: VARIANT_IDS[i]!,
        modelVersion: `${PROJECT}/models/m/versions/1.0.${i}`,
        weight,
      })),
      hashSeed,
      coverage,
      primaryMetric: { name: "score", kind: experimentsv1.MetricKind.MEAN },
    },
  });
  await client.startExperiment({ name: created.name });
  return created.name;
}

async function setWeights(client: ExperimentsClient, name: string, weights: number[]): Promise<void> {
  const exp = await client.getExperiment({ name });
  await client.updateExperiment({
    experiment: {
      name,
      etag: exp.etag,
      variants: exp.variants.map((v, i) => ({ id: v.id, modelVersion: v.modelVersion, weight: weights[i]! })),
    },
    updateMask: { paths: ["variants"] },
  });
}

/** The server's answers (BatchAssignVariants, ≤ 10,000 per call): unit → "variant|in|bucket". */
async function serverAnswers(client: ExperimentsClient, name: string, units: string[]): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (let i = 0; i < units.length; i += 5_000) {
    const part = units.slice(i, i + 5_000);
    const res = await client.batchAssignVariants({ experiment: name, unitIds: part }, { timeoutMs: 60_000 });
    res.assignments.forEach((a, j) => out.set(part[j]!, `${a.variant!.id}|${a.inExperiment}|${a.bucket}`));
  }
  return out;
}

function key(a: SdkAssignment): string {
  return `${a.variant.id}|${a.inExperiment}|${a.bucket}`;
}

/** Waits until `check` holds (the watch delivers changes within its poll interval), with a deadline. */
async function until(what: string, check: () => boolean, timeoutMs = 20_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > end) {
      throw new Error(`timed out waiting for ${what}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

function newSdk(client: ExperimentsClient, errors: SdkError[], extra: Partial<ConstructorParameters<typeof ExperimentsSdk>[0]> = {}) {
  return new ExperimentsSdk({
    client,
    project: PROJECT,
    flushIntervalMs: 50,
    backoff: { initialMs: 50, maxMs: 500 },
    onError: (e) => {
      errors.push(e);
      progress(`sdk ${describe(e)}`);
    },
    ...extra,
  }).start();
}

function describe(e: SdkError): string {
  const err = e.error instanceof ConnectError ? `${Code[e.error.code]} ${errorDetails(e.error).reason}` : String(e.error);
  return `${e.kind}: ${err}`;
}

// ------------------------------------------------------------------------------------------------ scenarios

async function agreement(client: ExperimentsClient) {
  const errors: SdkError[] = [];
  const experiments: { name: string; weights: number[]; coverage: number; seed: string }[] = [];
  const count = 24;
  for (let i = 0; i < count; i++) {
    const weights = randomWeights();
    const coverage = i < COVERAGES.length ? COVERAGES[i]! : random() < 0.5 ? pick(COVERAGES) : 0.01 + random() * 0.99;
    const seed = `${pick(SEED_STYLES)}${i}-${Math.floor(random() * 1e6)}`;
    experiments.push({ name: await createExperiment(client, `agree-${args.seed}-${i}`, weights, coverage, seed), weights, coverage, seed });
  }
  progress(`created ${experiments.length} experiments`);
  const sdk = newSdk(client, errors);
  await sdk.ready();
  progress("sdk ready");
  await until("configs of every experiment", () => experiments.every((e) => sdk.config(e.name) !== undefined));

  let units = 0;
  let inCoverage = 0;
  const mismatches: string[] = [];
  const gb = new GrowthBookClient({});
  let gbMismatches = 0;
  let gbBuckets = 0;
  const gbExamples: string[] = [];
  for (const exp of experiments) {
    const cfg = sdk.config(exp.name)!;
    const ids = unitIds("pure", 4_000);
    const server = await serverAnswers(client, exp.name, ids);
    progress(`server answered ${exp.name}`);
    for (const unit of ids) {
      const local = cfg.evaluate(unit);
      if (local.kind === "ambiguous") {
        mismatches.push(`${exp.name} ${unit}: ambiguous with one phase`);
        continue;
      }
      const mine =
        local.kind === "variant"
          ? `${cfg.variants[local.variant]!.id}|true|${local.bucket}`
          : `${cfg.variants[0]!.id}|false|${local.bucket}`;
      units++;
      inCoverage += local.kind === "variant" ? 1 : 0;
      if (mine !== server.get(unit)) {
        mismatches.push(`${exp.name} (${exp.weights}, ${exp.coverage}, seed ${exp.seed}) ${unit}: sdk ${mine} server ${server.get(unit)}`);
      }
      const r = gb.runInlineExperiment(
        { key: exp.name, variations: exp.weights.map((_, i) => i) as [number, number, ...number[]], weights: exp.weights, coverage: exp.coverage, hashVersion: 2, seed: exp.seed },
        { attributes: { id: unit } },
      );
      // GrowthBook reports the hash value (`bucket`) of units it puts in the experiment only.
      const gbBucket = r.bucket === undefined ? "-" : String(Math.round(r.bucket * 10_000));
      const mineComparable = r.bucket === undefined ? mine.replace(/\|\d+$/, "|-") : mine;
      const theirs = `${cfg.variants[r.variationId]!.id}|${r.inExperiment}|${gbBucket}`;
      gbBuckets += r.bucket === undefined ? 0 : 1;
      if (theirs !== mineComparable) {
        gbMismatches++;
        if (gbExamples.length < 10) {
          gbExamples.push(`${exp.name} ${unit}: sdk ${mine} growthbook ${theirs}`);
        }
      }
    }
  }

  // The SDK proper: assign() for fresh units (local answers queued as exposures), flushed, then the server agrees.
  const sdkMismatches: string[] = [];
  let local = 0;
  let assigned = 0;
  for (const exp of experiments.slice(0, 8)) {
    const ids = unitIds("sdk", 500);
    const answers = new Map<string, string>();
    for (const unit of ids) {
      const a = await sdk.assign(exp.name, unit);
      answers.set(unit, key(a));
      local += a.source === "local" ? 1 : 0;
      assigned++;
    }
    await sdk.flush();
    const server = await serverAnswers(client, exp.name, ids);
    for (const unit of ids) {
      if (answers.get(unit) !== server.get(unit)) {
        sdkMismatches.push(`${exp.name} ${unit}: sdk ${answers.get(unit)} server ${server.get(unit)}`);
      }
    }
  }
  // Hash vectors: the reference implementation's doctest value, and units the SDK leaves to the server.
  const vectors = { "exp-1/user-42": hashBucket("exp-1", "user-42") };
  const remoteOnly = ["", "x".repeat(257), "lone-\uD800-surrogate"].map((u) => locallyEvaluable(u));
  const stats = sdk.stats();
  await sdk.close();
  return {
    experiments: experiments.length,
    units,
    inCoverage,
    mismatches: mismatches.slice(0, 20),
    mismatchCount: mismatches.length,
    growthbook: { mismatchCount: gbMismatches, bucketsCompared: gbBuckets, examples: gbExamples },
    sdk: { assigned, local, mismatches: sdkMismatches.slice(0, 20), mismatchCount: sdkMismatches.length },
    stats: jsonStats(stats),
    vectors,
    remoteOnly,
    errors: errors.map(describe),
  };
}

async function weightChange(client: ExperimentsClient) {
  const errors: SdkError[] = [];
  const plans: { weights: number[][]; coverage: number }[] = [
    { weights: [[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]], coverage: 0.5 },
    { weights: [[0.5, 0.5], [0.2, 0.8], [0.5, 0.5]], coverage: 1 },
    { weights: [[0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3], [0.7, 0.2, 0.1]], coverage: 0.3333 },
    { weights: [[0.25, 0.25, 0.25, 0.25], [0.1, 0.6, 0.2, 0.1], [0, 0.5, 0.5, 0]], coverage: 0.8 },
    { weights: [[0.05, 0.95], [0.95, 0.05], [0.5, 0.5]], coverage: 0.05 },
  ];
  for (let i = 0; i < 2; i++) {
    const first = randomWeights();
    const next = () => {
      let w = randomWeights();
      while (w.length !== first.length) {
        w = randomWeights();
      }
      return w;
    };
    plans.push({ weights: [first, next(), next()], coverage: pick(COVERAGES) });
  }
  const names: string[] = [];
  for (const [i, plan] of plans.entries()) {
    names.push(await createExperiment(client, `phases-${args.seed}-${i}`, plan.weights[0]!, plan.coverage, `phase-seed-${pick(SEED_STYLES)}${i}`));
  }
  const sdkA = newSdk(client, errors); // sees every phase, exposes units in each
  await sdkA.ready();
  const all = new Map<string, string[]>(names.map((n) => [n, []]));
  for (let phase = 0; phase < 3; phase++) {
    if (phase > 0) {
      for (const [i, name] of names.entries()) {
        await setWeights(client, name, plans[i]!.weights[phase]!);
      }
    }
    await until(`phase ${phase} in the SDK`, () => names.every((n) => sdkA.config(n)?.epoch === phase));
    for (const name of names) {
      const byServer = unitIds(`srv${phase}`, 600); // exposed by another evaluator (AssignVariant)
      await serverAnswers(client, name, byServer);
      const bySdk = unitIds(`sdk${phase}`, 200);
      for (const unit of bySdk) {
        await sdkA.assign(name, unit);
      }
      all.get(name)!.push(...byServer, ...bySdk);
    }
    await sdkA.flush();
  }
  const sdkB = newSdk(client, errors); // fresh: no sticky knowledge at all
  await sdkB.ready();
  await until("phase 2 in the fresh SDK", () => names.every((n) => sdkB.config(n)?.epoch === 2));

  const result: Record<string, unknown>[] = [];
  let mismatchCount = 0;
  const mismatches: string[] = [];
  for (const [i, name] of names.entries()) {
    const units = [...all.get(name)!, ...unitIds("new", 500)];
    const a = new Map<string, SdkAssignment>();
    const b = new Map<string, SdkAssignment>();
    for (const unit of units) {
      a.set(unit, await sdkA.assign(name, unit));
      b.set(unit, await sdkB.assign(name, unit));
    }
    await sdkA.flush();
    await sdkB.flush();
    const server = await serverAnswers(client, name, units);
    const sources = { A: {} as Record<string, number>, B: {} as Record<string, number> };
    for (const unit of units) {
      for (const [label, m] of [["A", a], ["B", b]] as const) {
        const got = m.get(unit)!;
        sources[label][got.source] = (sources[label][got.source] ?? 0) + 1;
        if (key(got) !== server.get(unit)) {
          mismatchCount++;
          if (mismatches.length < 20) {
            mismatches.push(`${name} sdk${label} ${unit}: ${key(got)} (${got.source}) server ${server.get(unit)}`);
          }
        }
      }
    }
    const cfg = sdkB.config(name)!;
    result.push({ name, coverage: plans[i]!.coverage, weights: plans[i]!.weights, units: units.length, ambiguousBuckets: cfg.ambiguousBuckets, sources });
  }
  const stats = { A: jsonStats(sdkA.stats()), B: jsonStats(sdkB.stats()) };
  await sdkA.close();
  await sdkB.close();
  return { experiments: result, mismatchCount, mismatches, stats, errors: errors.map(describe) };
}

async function delivery(client: ExperimentsClient) {
  const errors: SdkError[] = [];
  const name = await createExperiment(client, `delivery-${args.seed}`, [0.5, 0.5], 1, "delivery");
  const sdk = newSdk(client, errors, { batchSize: 64 });
  await sdk.ready();
  await until("the experiment's config", () => sdk.config(name) !== undefined);
  const units = unitIds("d", 300);
  for (const unit of units) {
    await sdk.assign(name, unit);
  }
  let tracked = 0;
  for (const [i, unit] of units.entries()) {
    sdk.track(name, unit, "score", i % 7, { idempotencyKey: `req-${i}:score` });
    tracked++;
    if (i === 150) {
      sdk.track(name, unit, "no_such_metric", 1); // the server rejects this one: isolated, dropped, reported
    }
  }
  for (let i = 0; i < 100; i++) {
    sdk.track(name, units[i]!, "score", i % 7, { idempotencyKey: `req-${i}:score` }); // a retry: same keys
  }
  await sdk.flush();
  const afterFlush = jsonStats(sdk.stats());
  // Bounded memory: a tiny SDK refuses events past its bound instead of growing.
  const small = newSdk(client, errors, { maxPendingItems: 10, flushIntervalMs: 60_000, batchSize: 10_000 });
  await small.ready();
  const taken = Array.from({ length: 25 }, (_, i) => small.track(name, units[i]!, "score", 1, { idempotencyKey: `small-${i}` }));
  await small.close();
  await sdk.close();
  let closedError = "";
  try {
    await sdk.assign(name, "after-close");
  } catch (err) {
    closedError = err instanceof ConnectError ? Code[err.code] : String(err);
  }
  const results = await client.getExperimentResults({ name });
  const rejected = errors.filter((e) => e.kind === "rejected");

  // A sticky store shared by two SDKs: the second, fresh, answers units the first exposed before a weight change
  // from the store (no AssignVariant call), as the server does.
  const shared = new Map<string, string>();
  const store = {
    get: async (experiment: string, unit: string) => shared.get(`${experiment}|${unit}`),
    set: (experiment: string, unit: string, variant: string) => void shared.set(`${experiment}|${unit}`, variant),
  };
  const storeExp = await createExperiment(client, `store-${args.seed}`, [0.5, 0.5], 1, "store-seed");
  const first = newSdk(client, errors, { stickyStore: store });
  await first.ready();
  await until("the store experiment's config", () => first.config(storeExp) !== undefined);
  const storeUnits = unitIds("store", 300);
  const before = new Map<string, string>();
  for (const unit of storeUnits) {
    before.set(unit, key(await first.assign(storeExp, unit)));
  }
  await first.close();
  await setWeights(client, storeExp, [0.1, 0.9]);
  const second = newSdk(client, errors, { stickyStore: store });
  await second.ready();
  await until("phase 1 in the second SDK", () => second.config(storeExp)?.epoch === 1);
  const sources: Record<string, number> = {};
  let storeMismatches = 0;
  for (const unit of storeUnits) {
    const a = await second.assign(storeExp, unit);
    sources[a.source] = (sources[a.source] ?? 0) + 1;
    storeMismatches += key(a) === before.get(unit) ? 0 : 1;
  }
  const storeServer = await serverAnswers(client, storeExp, storeUnits);
  storeMismatches += storeUnits.filter((u) => storeServer.get(u) !== before.get(u)).length;

  // A stopped experiment leaves the configs; assign() then throws what AssignVariant throws.
  await client.stopExperiment({ name: storeExp });
  await until("the stopped experiment removed", () => second.config(storeExp) === undefined);
  const codeOf = async (f: () => Promise<unknown>) => {
    try {
      await f();
      return "OK";
    } catch (err) {
      const e = errorDetails(err);
      return `${e.codeName} ${e.reason}`;
    }
  };
  const stopped = {
    sdk: await codeOf(() => second.assign(storeExp, storeUnits[0]!)),
    server: await codeOf(() => client.assignVariant({ experiment: storeExp, unitId: storeUnits[0]! })),
  };
  const missing = {
    sdk: await codeOf(() => second.assign(`${PROJECT}/experiments/no-such-experiment`, "u")),
    server: await codeOf(() => client.assignVariant({ experiment: `${PROJECT}/experiments/no-such-experiment`, unitId: "u" })),
  };
  await second.close();

  // The staleness window: an SDK that missed a weight change serves the old phase's answer to units the server
  // already assigned under the new one; their exposures come back as conflicts, which correct its sticky cache, and
  // from then on it answers as the server does.
  const staleExp = await createExperiment(client, `stale-${args.seed}`, [0.5, 0.5], 1, "stale-seed");
  let gate = false; // set: the watch delivers nothing more (a stalled config feed)
  const gated: ExperimentsClient = {
    ...client,
    watchExperimentConfigs: (req, opts) => {
      const inner = client.watchExperimentConfigs(req, opts);
      return (async function* () {
        for await (const res of inner) {
          if (!gate) {
            yield res;
          }
        }
      })();
    },
  };
  const stale = newSdk(gated, errors);
  await stale.ready();
  await until("the stale experiment's config", () => stale.config(staleExp) !== undefined);
  gate = true;
  await setWeights(client, staleExp, [0.1, 0.9]);
  const staleUnits = unitIds("stale", 400);
  const serverFirst = await serverAnswers(client, staleExp, staleUnits); // exposed under phase 1 by the server
  let staleServed = 0;
  for (const unit of staleUnits) {
    const a = await stale.assign(staleExp, unit);
    staleServed += key(a) === serverFirst.get(unit) ? 0 : 1;
  }
  await stale.flush();
  let staleAfter = 0;
  for (const unit of staleUnits) {
    staleAfter += key(await stale.assign(staleExp, unit)) === serverFirst.get(unit) ? 0 : 1;
  }
  const staleStats = jsonStats(stale.stats());
  await stale.close();
  // Phase 0 gives buckets 0-4999 the control, phase 1 only 0-999: the units in 1000-4999 differ.
  const expectedConflicts = staleUnits.filter((u) => {
    const b = hashBucket("stale-seed", u);
    return b >= 1_000 && b < 5_000;
  }).length;

  // A small sticky cache: entries are evicted (never while their exposure is unacknowledged); an evicted unit is
  // answered the same again and its repeated exposure is a duplicate on the server, not a second unit.
  const bounded = newSdk(client, errors, { maxStickyUnits: 50 });
  await bounded.ready();
  const boundedUnits = unitIds("bounded", 200);
  const firstPass = new Map<string, string>();
  for (const unit of boundedUnits) {
    firstPass.set(unit, key(await bounded.assign(name, unit)));
  }
  await bounded.flush();
  for (const unit of unitIds("bounded-extra", 100)) {
    await bounded.assign(name, unit); // new entries: the acknowledged old ones make room
  }
  await bounded.flush();
  let boundedChanged = 0;
  for (const unit of boundedUnits) {
    boundedChanged += key(await bounded.assign(name, unit)) === firstPass.get(unit) ? 0 : 1;
  }
  await bounded.flush();
  const boundedStats = jsonStats(bounded.stats());
  await bounded.close();

  // A watch the server refuses: ready() fails with the server's error at once (not a timeout).
  const refused = new ExperimentsSdk({ client, project: "projects/Not_Valid!", onError: () => {} }).start();
  const refusal = await codeOf(() => refused.ready(20_000));
  await refused.close();
  return {
    name,
    exposed: units.length,
    tracked,
    afterFlush,
    small: { taken: taken.filter(Boolean).length, refused: taken.filter((t) => !t).length, stats: jsonStats(small.stats()) },
    rejected: rejected.map((e) => ({ metric: e.item?.event?.metric, error: describe(e) })),
    primaryUnits: Object.fromEntries((results.primary?.variants ?? []).map((v) => [v.variant, Number(v.units)])),
    closedError,
    store: { units: storeUnits.length, sources, mismatches: storeMismatches, entries: shared.size },
    stopped,
    missing,
    refusal,
    bounded: { units: boundedUnits.length, changed: boundedChanged, stats: boundedStats },
    stale: { units: staleUnits.length, servedDifferently: staleServed, expectedConflicts, conflicts: staleStats.exposureConflicts, wrongAfter: staleAfter },
    errors: errors.filter((e) => e.kind !== "rejected").map(describe),
  };
}

async function restart(client: ExperimentsClient) {
  const errors: SdkError[] = [];
  const name = await createExperiment(client, `restart-${args.seed}`, [0.3, 0.7], 0.8, "restart");
  const sdk = newSdk(client, errors, { batchSize: 200, backoff: { initialMs: 50, maxMs: 400 }, ackTimeoutMs: 1_000 });
  await sdk.ready();
  await until("the experiment's config", () => sdk.config(name) !== undefined);
  // unit → [variant, values]: what the server must end up with.
  const expected: Record<string, { variant: string; values: number[] }> = {};
  let i = 0;
  let afterFlag = -1;
  while (i < 20_000 && (afterFlag < 0 || i < afterFlag + 300)) {
    const unit = `restart-user-${i}`;
    const a = await sdk.assign(name, unit);
    if (a.inExperiment) {
      const values = [i % 10, 100 + (i % 7)];
      values.forEach((v, k) => sdk.track(name, unit, "score", v, { idempotencyKey: `${unit}:${k}` }));
      expected[unit] = { variant: a.variant.id, values };
    }
    i++;
    if (i === 300) {
      console.log(JSON.stringify({ stage: "running" }));
    }
    if (afterFlag < 0 && i % 20 === 0 && existsSync(args["restarted-flag"]!)) {
      afterFlag = i;
    }
    if (i % 10 === 0) {
      await new Promise((r) => setTimeout(r, 10)); // a steady pace, so the freeze and the restart fall mid-stream
    }
  }
  await sdk.flush();
  const stats = jsonStats(sdk.stats());
  await sdk.close();
  const variants: Record<string, { units: number; sumOfUnitMeans: number }> = {};
  for (const { variant, values } of Object.values(expected)) {
    const v = (variants[variant] ??= { units: 0, sumOfUnitMeans: 0 });
    v.units++;
    v.sumOfUnitMeans += values.reduce((x, y) => x + y, 0) / values.length;
  }
  return {
    name,
    units: i,
    afterFlag,
    exposed: Object.keys(expected).length,
    events: 2 * Object.keys(expected).length,
    variants: Object.fromEntries(Object.entries(variants).map(([k, v]) => [k, { units: v.units, mean: v.sumOfUnitMeans / v.units }])),
    stats,
    errors: errors.map(describe),
  };
}

async function bench(client: ExperimentsClient) {
  const errors: SdkError[] = [];
  const weights = [0.5, 0.5];
  const name = await createExperiment(client, `bench-${args.seed}`, weights, 1, "bench-seed");
  const sdk = newSdk(client, errors, { maxPendingItems: 200_000, batchSize: 5_000, maxInFlightBatches: 4 });
  await sdk.ready();
  await until("the experiment's config", () => sdk.config(name) !== undefined);
  const cfg = sdk.config(name)!;
  const units = Array.from({ length: 200_000 }, (_, i) => `bench-user-${i}`);
  const gb = new GrowthBookClient({});
  const gbExperiment = { key: name, variations: [0, 1] as [number, number], weights, coverage: 1, hashVersion: 2, seed: "bench-seed" };
  const timeIt = (f: (u: string) => unknown) => {
    const sample: number[] = [];
    const started = process.hrtime.bigint();
    for (let i = 0; i < units.length; i++) {
      if (i % 100 === 0) {
        const t0 = process.hrtime.bigint();
        f(units[i]!);
        sample.push(Number(process.hrtime.bigint() - t0));
      } else {
        f(units[i]!);
      }
    }
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    sample.sort((a, b) => a - b);
    return { perSecond: Math.round(units.length / seconds), p99Ns: sample[Math.floor(sample.length * 0.99)] };
  };
  let same = 0;
  for (const unit of units) {
    const a = cfg.evaluate(unit);
    const r = gb.runInlineExperiment(gbExperiment, { attributes: { id: unit } });
    same += a.kind === "variant" && a.variant === r.variationId && a.bucket === Math.round(r.bucket! * 10_000) ? 1 : 0;
  }
  const growthbook = timeIt((u) => gb.runInlineExperiment(gbExperiment, { attributes: { id: u } }));
  const local = timeIt((u) => cfg.evaluate(u));
  // End to end: local first exposures, queued by evaluate() and delivered over IngestEvents.
  const exposures = units.slice(0, 50_000);
  const started = performance.now();
  for (const unit of exposures) {
    sdk.evaluate(name, unit);
  }
  const queuedMs = performance.now() - started;
  await sdk.flush();
  const deliveredMs = performance.now() - started;
  const stats = jsonStats(sdk.stats());
  await sdk.close();
  return {
    units: units.length,
    identical: same,
    sdkEvaluate: local,
    growthbookRunInline: growthbook,
    exposures: { count: exposures.length, queuedMs: Math.round(queuedMs), acknowledgedMs: Math.round(deliveredMs), perSecond: Math.round(exposures.length / (deliveredMs / 1000)) },
    stats,
    errors: errors.map(describe),
  };
}

function jsonStats(stats: ReturnType<ExperimentsSdk["stats"]>): Record<string, number> {
  return Object.fromEntries(Object.entries(stats).map(([k, v]) => [k, Number(v)]));
}

async function main() {
  if (!args.experiments || !args.scenario) {
    throw new Error("--experiments HOST:PORT and --scenario are required");
  }
  const client = createExperimentsClient({ endpoint: args.experiments, timeoutMs: 30_000 });
  const scenarios: Record<string, (c: ExperimentsClient) => Promise<unknown>> = {
    agreement,
    "weight-change": weightChange,
    delivery,
    restart,
    bench,
  };
  const run = scenarios[args.scenario];
  if (!run) {
    throw new Error(`unknown scenario ${args.scenario}`);
  }
  const out = await run(client);
  console.log(JSON.stringify({ ok: true, scenario: args.scenario, ...(out as object) }));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
