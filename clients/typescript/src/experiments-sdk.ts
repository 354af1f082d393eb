/**
 * Local evaluation SDK for NeuroWeaver experiments: AssignVariant's answer computed in-process from the configs
 * that `WatchExperimentConfigs` streams, with exposures and metric events sent asynchronously, in batches, over
 * `IngestEvents`.
 *
 * Evaluation rule for (experiment, unit), the same as the service's (see `ExperimentConfig` in experiment.proto):
 *   1. sticky: a unit this SDK exposed (or learnt from the server), or one the caller's `stickyStore` holds,
 *      keeps its variant;
 *   2. else, when the unit's bucket is ambiguous (an earlier phase covered it with another answer than the current
 *      phase, see assignment.ts), the server decides: one AssignVariant call (which also records the exposure);
 *   3. else the current phase decides; an in-coverage answer is a first exposure, queued for IngestEvents with the
 *      current phase's epoch. Experiments the SDK holds no usable config for (not running, not yet received, the
 *      watch down before its first snapshot) and unit ids it may not hash (see `locallyEvaluable`) go to the
 *      server too, so every answer is exactly the server's.
 *
 * Delivery: every queued item (exposure or metric event) is resent until the server acknowledges its batch;
 * exposures are idempotent per (experiment, unit) and metric events by their idempotency key (generated when the
 * caller gives none), so a batch resent after a broken stream is never counted twice. Memory is bounded by
 * `maxPendingItems` (queued + in flight): when full, an exposure is recorded by AssignVariant instead (the answer
 * stays exact) and `track` refuses the event (returns false). A batch the server rejects as invalid is split in
 * halves until the offending item is alone; that item is dropped and reported to `onError`. `close()` flushes.
 */
import { Code, ConnectError, type CallOptions } from "@connectrpc/connect";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { randomUUID } from "node:crypto";

import { CompiledConfig, locallyEvaluable } from "./assignment.js";
import { errorDetails } from "./errors.js";
import type { ExperimentConfig, Variant } from "./gen/neuroweaver/experiments/v1/experiment_pb.js";
import type {
  ExposureSchema,
  MetricEventSchema,
} from "./gen/neuroweaver/experiments/v1/experiment_pb.js";
import type {
  IngestEventsRequestSchema,
  IngestEventsResponse,
  WatchExperimentConfigsResponse,
} from "./gen/neuroweaver/experiments/v1/experiments_service_pb.js";
import type { ExperimentsClient } from "./index.js";

type ExposureInit = MessageInitShape<typeof ExposureSchema>;
type MetricEventInit = MessageInitShape<typeof MetricEventSchema>;
type IngestRequestInit = MessageInitShape<typeof IngestEventsRequestSchema>;

/** Where a unit's variant is kept across evaluators (Redis, a database, a cookie...). */
export interface StickyStore {
  /** The variant id stored for the unit, or undefined. */
  get(experiment: string, unitId: string): string | undefined | Promise<string | undefined>;
  /** Called for every in-experiment assignment this SDK makes or learns (exposures, server answers, conflicts). */
  set(experiment: string, unitId: string, variant: string): void | Promise<void>;
}

export interface BackoffOptions {
  /** First delay (ms), default 100. */
  initialMs?: number;
  /** Largest delay (ms), default 5,000. Delays double, with ±50 % jitter. */
  maxMs?: number;
}

export interface ExperimentsSdkOptions {
  /** An ExperimentsService client (`createExperimentsClient`). */
  client: ExperimentsClient;
  /** `projects/{project}` whose RUNNING experiments are evaluated locally. */
  project: string;
  /** Optional shared sticky store (consulted before the hash; kept up to date). */
  stickyStore?: StickyStore;
  /** Items per IngestEvents batch (default 500, at most 10,000). */
  batchSize?: number;
  /** Longest an item waits before its batch is sent (ms, default 200). */
  flushIntervalMs?: number;
  /** Batches sent and not yet acknowledged, per stream (default 8). */
  maxInFlightBatches?: number;
  /** Queued + in-flight items at most (default 100,000): the SDK's memory bound. */
  maxPendingItems?: number;
  /** Units kept in the local sticky cache (default 1,000,000; acknowledged entries are evicted oldest first). */
  maxStickyUnits?: number;
  /** Reconnect delays of the watch and the ingest stream. */
  backoff?: BackoffOptions;
  /** A batch unanswered this long (ms, default 30,000) counts the stream as broken: reopened, batches resent. */
  ackTimeoutMs?: number;
  /** Deadline of an AssignVariant fallback call (ms, default 5,000). */
  remoteTimeoutMs?: number;
  /** Errors the SDK handled itself (stream breaks, rejected items, unusable configs); default: ignored. */
  onError?: (error: SdkError) => void;
}

export interface SdkError {
  /** watch/ingest: a stream broke (retried); rejected: an item dropped; config: an unusable config or a failed
   * sticky store read (the server answered instead). */
  kind: "watch" | "ingest" | "rejected" | "config";
  error: unknown;
  /** For `rejected`: the dropped item. */
  item?: { exposure?: ExposureInit; event?: MetricEventInit };
}

/** What `assign` answers: AssignVariant's response, and where it came from. */
export interface SdkAssignment {
  /** The variant (model version, deployment, endpoint as the latest config or the server has them). */
  variant: Variant;
  /** False outside the coverage: the unit gets the control and is not exposed. */
  inExperiment: boolean;
  /** The unit's hash bucket 0..9999. */
  bucket: number;
  /** sticky: a stored assignment; local: the current phase; server: AssignVariant. */
  source: "sticky" | "local" | "server";
}

export interface TrackOptions {
  /** Events with a key already recorded are ignored by the server; default: a key unique to this call. */
  idempotencyKey?: string;
  /** Default: now. */
  eventTime?: Date;
  /** Pre-experiment covariate for CUPED. */
  covariate?: number;
}

export interface SdkStats {
  configVersion: bigint;
  experiments: number;
  localAssignments: number;
  stickyAssignments: number;
  serverAssignments: number;
  exposuresQueued: number;
  exposuresAccepted: number;
  exposuresDuplicate: number;
  exposureConflicts: number;
  eventsQueued: number;
  eventsAccepted: number;
  eventsDuplicate: number;
  /** `track` calls refused because the queue was full. */
  eventsRefused: number;
  /** Items the server rejected as invalid (dropped, reported to onError). */
  rejected: number;
  /** Items queued or in flight. */
  pending: number;
  /** Units in the local sticky cache. */
  stickyUnits: number;
  batchesSent: number;
  watchReconnects: number;
  ingestReconnects: number;
  /** Streams given up because a batch stayed unanswered for `ackTimeoutMs`. */
  ackTimeouts: number;
}

interface Item {
  seq: number;
  /** When it was queued (epoch ms): the exposure's or default event time, turned into a Timestamp when sent. */
  at: number;
  exposure?: ExposureInit;
  event?: MetricEventInit;
}

interface Batch {
  id: bigint;
  items: Item[];
  /** When it was (last) sent, epoch ms. */
  sentAt?: number;
}

/** Codes of a watch the server refuses (rather than fails to serve): `ready()` reports them at once. */
const REFUSED = new Set([Code.InvalidArgument, Code.PermissionDenied, Code.Unauthenticated, Code.NotFound, Code.Unimplemented]);

/** Codes for which a batch is at fault (it is split, then its bad item dropped); others are retried. */
const REJECTED = new Set([Code.InvalidArgument, Code.FailedPrecondition, Code.NotFound, Code.OutOfRange, Code.AlreadyExists]);

export class ExperimentsSdk {
  private readonly client: ExperimentsClient;
  private readonly project: string;
  private readonly store?: StickyStore;
  private readonly batchSize: number;
  private readonly flushIntervalMs: number;
  private readonly maxInFlight: number;
  private readonly maxPending: number;
  private readonly maxSticky: number;
  private readonly backoffInitial: number;
  private readonly backoffMax: number;
  private readonly remoteTimeoutMs: number;
  private readonly ackTimeoutMs: number;
  private readonly onError: (error: SdkError) => void;
  private readonly instance = randomUUID();

  private configs = new Map<string, CompiledConfig>();
  private version = 0n;
  private readyResolve!: () => void;
  private readonly readyPromise: Promise<void>;
  private isReady = false;
  /** The server's refusal of the watch (see REFUSED) while no snapshot is held: `ready()` rejects with it. */
  private watchRefusal?: ConnectError;
  private readonly refusalWaiters = new Set<(error: ConnectError) => void>();

  /** experiment → unit → variant id, insertion order = age. */
  private readonly sticky = new Map<string, Map<string, string>>();
  private stickySize = 0;

  private queue: Item[] = [];
  private inflight: Batch[] = [];
  private nextSeq = 0;
  private nextBatch = 1n;
  private oldestQueuedAt = 0;
  private flushWaiters: { seq: number; resolve: () => void }[] = [];
  private readonly waiters = new Set<() => void>();

  private closing = false;
  private closed = false;
  private readonly abort = new AbortController();
  private watchTask?: Promise<void>;
  private ingestTask?: Promise<void>;
  private readonly counters = {
    localAssignments: 0,
    stickyAssignments: 0,
    serverAssignments: 0,
    exposuresQueued: 0,
    exposuresAccepted: 0,
    exposuresDuplicate: 0,
    exposureConflicts: 0,
    eventsQueued: 0,
    eventsAccepted: 0,
    eventsDuplicate: 0,
    eventsRefused: 0,
    rejected: 0,
    batchesSent: 0,
    watchReconnects: 0,
    ingestReconnects: 0,
    ackTimeouts: 0,
  };

  constructor(options: ExperimentsSdkOptions) {
    if (!/^projects\/[^/]+$/.test(options.project)) {
      throw new Error(`project must be projects/{project}, got ${JSON.stringify(options.project)}`);
    }
    this.client = options.client;
    this.project = options.project;
    this.store = options.stickyStore;
    this.batchSize = clamp(options.batchSize ?? 500, 1, 10_000);
    this.flushIntervalMs = Math.max(0, options.flushIntervalMs ?? 200);
    this.maxInFlight = Math.max(1, options.maxInFlightBatches ?? 8);
    this.maxPending = Math.max(1, options.maxPendingItems ?? 100_000);
    this.maxSticky = Math.max(1, options.maxStickyUnits ?? 1_000_000);
    this.backoffInitial = Math.max(1, options.backoff?.initialMs ?? 100);
    this.backoffMax = Math.max(this.backoffInitial, options.backoff?.maxMs ?? 5_000);
    this.remoteTimeoutMs = options.remoteTimeoutMs ?? 5_000;
    this.ackTimeoutMs = Math.max(1, options.ackTimeoutMs ?? 30_000);
    this.onError = options.onError ?? (() => {});
    this.readyPromise = new Promise((resolve) => (this.readyResolve = resolve));
  }

  /** Opens the config watch and the ingest loop. Call once; `ready()` tells when the first snapshot arrived. */
  start(): this {
    if (this.watchTask) {
      return this;
    }
    this.watchTask = this.watchLoop();
    this.ingestTask = this.ingestLoop();
    return this;
  }

  /**
   * Resolves once the first config snapshot is held (until then every assignment goes to the server). Rejects with
   * the server's error when it refuses the watch (INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED, NOT_FOUND,
   * UNIMPLEMENTED; the watch keeps retrying in the background), or with DEADLINE_EXCEEDED after `timeoutMs`.
   */
  async ready(timeoutMs = 10_000): Promise<void> {
    if (this.isReady) {
      return;
    }
    if (this.watchRefusal) {
      throw this.watchRefusal;
    }
    let timer: NodeJS.Timeout | undefined;
    let onRefusal: ((error: ConnectError) => void) | undefined;
    const failure = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new ConnectError("no experiment config snapshot yet", Code.DeadlineExceeded)), timeoutMs);
      onRefusal = reject;
      this.refusalWaiters.add(onRefusal);
    });
    try {
      await Promise.race([this.readyPromise, failure]);
    } finally {
      clearTimeout(timer);
      this.refusalWaiters.delete(onRefusal!);
    }
  }

  /** The config held for an experiment (undefined: not running, or not received yet). */
  config(experiment: string): CompiledConfig | undefined {
    return this.configs.get(experiment);
  }

  /**
   * AssignVariant's answer for (experiment, unit): local when the rule allows, else one AssignVariant call
   * (whose errors, e.g. NOT_FOUND or FAILED_PRECONDITION, are thrown as the server gives them).
   */
  async assign(experiment: string, unitId: string, options?: CallOptions): Promise<SdkAssignment> {
    if (this.closed) {
      throw new ConnectError("experiments SDK is closed", Code.FailedPrecondition);
    }
    const cfg = this.configs.get(experiment);
    if (cfg && locallyEvaluable(unitId)) {
      let stored = this.sticky.get(experiment)?.get(unitId);
      if (stored === undefined && this.store) {
        try {
          stored = await this.store.get(experiment, unitId);
        } catch (error) {
          this.onError({ kind: "config", error }); // the store is down: the server knows the unit's answer
          return this.assignRemote(experiment, unitId, options);
        }
      }
      const local = this.evaluateWith(cfg, unitId, stored);
      if (local) {
        return local;
      }
    }
    return this.assignRemote(experiment, unitId, options);
  }

  /**
   * The synchronous part of `assign` (no sticky store lookup): the answer, or undefined when only the server can
   * give it (then call `assign`). An in-coverage local answer is queued as an exposure.
   */
  evaluate(experiment: string, unitId: string): SdkAssignment | undefined {
    const cfg = this.configs.get(experiment);
    if (!cfg || this.closed || !locallyEvaluable(unitId)) {
      return undefined;
    }
    return this.evaluateWith(cfg, unitId, this.sticky.get(experiment)?.get(unitId));
  }

  private evaluateWith(cfg: CompiledConfig, unitId: string, stored: string | undefined): SdkAssignment | undefined {
    if (stored !== undefined) {
      const idx = cfg.index.get(stored);
      if (idx !== undefined) {
        this.counters.stickyAssignments++;
        return { variant: cfg.variants[idx]!, inExperiment: true, bucket: cfg.bucket(unitId), source: "sticky" };
      }
    }
    const answer = cfg.evaluate(unitId);
    if (answer.kind === "ambiguous") {
      return undefined;
    }
    if (answer.kind === "outside") {
      this.counters.localAssignments++;
      return { variant: cfg.variants[0]!, inExperiment: false, bucket: answer.bucket, source: "local" };
    }
    const variant = cfg.variants[answer.variant]!;
    if (this.closing || !this.room()) {
      return undefined; // closing, or the queue is full: AssignVariant records this exposure
    }
    this.enqueue({
      seq: this.nextSeq++,
      at: Date.now(),
      exposure: {
        experiment: cfg.experiment,
        unitId,
        variant: variant.id,
        epoch: cfg.epoch,
      },
    });
    this.counters.exposuresQueued++;
    this.remember(cfg.experiment, unitId, variant.id);
    this.counters.localAssignments++;
    return { variant, inExperiment: true, bucket: answer.bucket, source: "local" };
  }

  private async assignRemote(experiment: string, unitId: string, options?: CallOptions): Promise<SdkAssignment> {
    const res = await this.client.assignVariant({ experiment, unitId }, { timeoutMs: this.remoteTimeoutMs, ...options });
    this.counters.serverAssignments++;
    if (!res.variant) {
      throw new ConnectError(`AssignVariant of ${experiment} answered no variant`, Code.Internal);
    }
    if (res.inExperiment) {
      this.remember(experiment, unitId, res.variant.id);
    }
    return { variant: res.variant, inExperiment: res.inExperiment, bucket: res.bucket, source: "server" };
  }

  /**
   * Queues a metric event. Returns false (nothing queued) when the SDK holds `maxPendingItems` already or is
   * closed; throws for an invalid event (empty names, a value that is not a finite number).
   */
  track(experiment: string, unitId: string, metric: string, value: number, options: TrackOptions = {}): boolean {
    if (!experiment || !unitId || !metric) {
      throw new TypeError("track: experiment, unitId and metric must not be empty");
    }
    if (typeof value !== "number" || !Number.isFinite(value)) {
      throw new TypeError(`track: value must be a finite number, got ${value}`);
    }
    if (options.covariate !== undefined && !Number.isFinite(options.covariate)) {
      throw new TypeError(`track: covariate must be a finite number, got ${options.covariate}`);
    }
    if (this.closing || !this.room()) {
      this.counters.eventsRefused++;
      return false;
    }
    const seq = this.nextSeq++;
    this.enqueue({
      seq,
      at: options.eventTime?.getTime() ?? Date.now(),
      event: {
        experiment,
        unitId,
        metric,
        value,
        idempotencyKey: options.idempotencyKey ?? `sdk:${this.instance}:${seq}`,
        covariate: options.covariate,
      },
    });
    this.counters.eventsQueued++;
    return true;
  }

  /**
   * Resolves when every item queued before the call is acknowledged (or rejected and reported); with `timeoutMs`,
   * rejects with DEADLINE_EXCEEDED when that takes longer (the items stay queued).
   */
  flush(timeoutMs?: number): Promise<void> {
    const seq = this.nextSeq;
    if (this.minOutstanding() >= seq) {
      return Promise.resolve();
    }
    const flushed = new Promise<void>((resolve) => {
      this.flushWaiters.push({ seq, resolve });
      this.wake();
    });
    if (timeoutMs === undefined) {
      return flushed;
    }
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new ConnectError("exposures/events not acknowledged in time", Code.DeadlineExceeded)),
        Math.max(0, timeoutMs),
      );
    });
    return Promise.race([flushed, timeout]).finally(() => clearTimeout(timer));
  }

  /**
   * Stops the watch, sends everything queued and waits for its acknowledgement (at most `timeoutMs`), then closes
   * the streams. Rejects when items are still unacknowledged at the deadline (their count in the message).
   */
  async close(timeoutMs = 10_000): Promise<void> {
    if (this.closed) {
      return;
    }
    this.closing = true;
    this.wake();
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<"timeout">((resolve) => (timer = setTimeout(() => resolve("timeout"), timeoutMs)));
    const outcome = await Promise.race([this.flush().then(() => "flushed" as const), deadline]);
    clearTimeout(timer);
    this.closed = true;
    this.abort.abort();
    this.wake();
    await Promise.allSettled([this.watchTask, this.ingestTask]);
    if (outcome === "timeout") {
      const left = this.queue.length + this.inflight.reduce((n, b) => n + b.items.length, 0);
      throw new ConnectError(`experiments SDK closed with ${left} events/exposures unacknowledged`, Code.DeadlineExceeded);
    }
  }

  stats(): SdkStats {
    return {
      ...this.counters,
      configVersion: this.version,
      experiments: this.configs.size,
      pending: this.pendingCount(),
      stickyUnits: this.stickySize,
    };
  }

  // ---------------------------------------------------------------------------------------------- stickiness

  private remember(experiment: string, unitId: string, variant: string): void {
    let units = this.sticky.get(experiment);
    if (!units) {
      units = new Map();
      this.sticky.set(experiment, units);
    }
    if (!units.has(unitId)) {
      this.stickySize++;
    } else {
      units.delete(unitId); // re-inserted: youngest
    }
    units.set(unitId, variant);
    if (this.store) {
      void Promise.resolve()
        .then(() => this.store!.set(experiment, unitId, variant))
        .catch((error) => this.onError({ kind: "config", error }));
    }
    if (this.stickySize > this.maxSticky) {
      this.evict();
    }
  }

  /**
   * Drops the oldest entries down to 90 % of the bound (the server keeps them; see assignment.ts), never those whose
   * exposure is still queued or in flight (found by scanning them: eviction is rare, a first exposure is not).
   */
  private evict(): void {
    const target = Math.floor(this.maxSticky * 0.9);
    const unacked = new Set<string>();
    for (const item of [...this.queue, ...this.inflight.flatMap((b) => b.items)]) {
      if (item.exposure) {
        unacked.add(stickyKey(item.exposure.experiment!, item.exposure.unitId!));
      }
    }
    for (const [experiment, units] of this.sticky) {
      for (const unit of units.keys()) {
        if (this.stickySize <= target) {
          return;
        }
        if (!unacked.has(stickyKey(experiment, unit))) {
          units.delete(unit);
          this.stickySize--;
        }
      }
    }
  }

  // ---------------------------------------------------------------------------------------------- config watch

  private async watchLoop(): Promise<void> {
    let delay = this.backoffInitial;
    while (!this.closing) {
      try {
        const stream = this.client.watchExperimentConfigs(
          { parent: this.project, sinceVersion: this.version },
          { timeoutMs: 0, signal: this.abort.signal },
        );
        for await (const res of stream) {
          this.apply(res);
          delay = this.backoffInitial;
        }
      } catch (error) {
        if (this.closing) {
          break;
        }
        this.onError({ kind: "watch", error });
        if (!this.isReady && error instanceof ConnectError && REFUSED.has(error.code)) {
          this.watchRefusal = error;
          for (const reject of [...this.refusalWaiters]) {
            reject(error);
          }
        }
      }
      if (this.closing) {
        break;
      }
      this.counters.watchReconnects++;
      await abortableDelay(jitter(delay), this.abort.signal);
      delay = Math.min(delay * 2, this.backoffMax);
    }
  }

  private apply(res: WatchExperimentConfigsResponse): void {
    const next = res.snapshot ? new Map<string, CompiledConfig>() : new Map(this.configs);
    for (const config of res.configs) {
      const held = this.configs.get(config.experiment);
      if (held && held.revision === config.revision && sameEndpoints(held, config)) {
        next.set(config.experiment, held);
        continue;
      }
      if (!res.snapshot && held && held.revision > config.revision) {
        continue; // older than what is held
      }
      try {
        next.set(config.experiment, new CompiledConfig(config));
      } catch (error) {
        next.delete(config.experiment); // evaluated by the server instead
        this.onError({ kind: "config", error });
      }
    }
    for (const name of res.removed) {
      next.delete(name);
    }
    this.configs = next;
    this.version = res.version;
    if (!this.isReady) {
      this.isReady = true;
      this.watchRefusal = undefined;
      this.readyResolve();
    }
  }

  // ---------------------------------------------------------------------------------------------- ingest

  private room(): boolean {
    return this.pendingCount() < this.maxPending;
  }

  private pendingCount(): number {
    let n = this.queue.length;
    for (const b of this.inflight) {
      n += b.items.length;
    }
    return n;
  }

  private enqueue(item: Item): void {
    if (this.queue.length === 0) {
      this.oldestQueuedAt = Date.now();
    }
    this.queue.push(item);
    if (this.queue.length === this.batchSize || this.queue.length === 1) {
      this.wake();
    }
  }

  private minOutstanding(): number {
    let min = this.queue.length ? this.queue[0]!.seq : this.nextSeq;
    for (const b of this.inflight) {
      for (const item of b.items) {
        if (item.seq < min) {
          min = item.seq;
        }
      }
    }
    return min;
  }

  private settleFlushes(): void {
    if (this.flushWaiters.length === 0) {
      return;
    }
    const min = this.minOutstanding();
    const waiting = [];
    for (const w of this.flushWaiters) {
      if (w.seq <= min) {
        w.resolve();
      } else {
        waiting.push(w);
      }
    }
    this.flushWaiters = waiting;
  }

  private wake(): void {
    const waiters = [...this.waiters];
    this.waiters.clear();
    for (const w of waiters) {
      w();
    }
  }

  /** Waits for `wake()` or `ms` (the ingest loop's wait). */
  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.waiters.delete(done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.waiters.add(done);
    });
  }

  private async ingestLoop(): Promise<void> {
    let delay = this.backoffInitial;
    while (!this.closed) {
      if (this.queue.length === 0 && this.inflight.length === 0) {
        await this.sleep(60_000);
        continue;
      }
      try {
        await this.runStream();
        delay = this.backoffInitial;
      } catch (error) {
        if (this.closed) {
          break;
        }
        const code = error instanceof ConnectError ? error.code : Code.Unknown;
        if (REJECTED.has(code) && this.inflight.length > 0) {
          this.splitRejected(error);
          continue; // at once: the split batches are smaller, the rest was fine
        }
        this.onError({ kind: "ingest", error });
        this.counters.ingestReconnects++;
        await this.sleepUnlessClosed(jitter(delay));
        delay = Math.min(delay * 2, this.backoffMax);
      }
    }
  }

  private async sleepUnlessClosed(ms: number): Promise<void> {
    const end = Date.now() + ms;
    while (!this.closed && Date.now() < end) {
      await this.sleep(end - Date.now());
    }
  }

  /**
   * A batch was rejected (the server names it in ErrorInfo.metadata.batch_id; else the oldest unacknowledged one,
   * since batches are answered in order): split it in halves, or drop its single item.
   */
  private splitRejected(error: unknown): void {
    const named = error instanceof ConnectError ? errorDetails(error).metadata["batch_id"] : undefined;
    let at = named === undefined ? -1 : this.inflight.findIndex((b) => String(b.id) === named);
    if (at < 0) {
      at = 0;
    }
    const [bad] = this.inflight.splice(at, 1);
    if (bad!.items.length > 1) {
      const mid = Math.ceil(bad!.items.length / 2);
      this.inflight.splice(
        at,
        0,
        { id: this.nextBatch++, items: bad!.items.slice(0, mid) },
        { id: this.nextBatch++, items: bad!.items.slice(mid) },
      );
      return;
    }
    const item = bad!.items[0]!;
    this.counters.rejected++;
    if (item.exposure) {
      const { experiment, unitId } = item.exposure;
      this.forget(experiment!, unitId!);
    }
    this.onError({ kind: "rejected", error, item: { exposure: item.exposure, event: item.event } });
    this.settleFlushes();
  }

  private forget(experiment: string, unitId: string): void {
    const units = this.sticky.get(experiment);
    if (units?.delete(unitId)) {
      this.stickySize--;
    }
  }

  /** One IngestEvents stream: resends what is in flight, then sends batches until it breaks or the SDK closes. */
  private async runStream(): Promise<void> {
    const requests = new Pushable<IngestRequestInit>();
    const abort = new AbortController();
    const onClose = () => abort.abort();
    this.abort.signal.addEventListener("abort", onClose);
    let failure: unknown;
    let ended = false;
    const reader = (async () => {
      try {
        for await (const res of this.client.ingestEvents(requests.stream(), { timeoutMs: 0, signal: abort.signal })) {
          this.acknowledge(res);
        }
      } catch (error) {
        failure = error;
      } finally {
        ended = true;
        this.wake();
      }
    })();
    try {
      for (const batch of this.inflight) {
        batch.sentAt = Date.now();
        requests.push(toRequest(batch));
        this.counters.batchesSent++;
      }
      while (!ended && !this.closed) {
        const now = Date.now();
        const oldest = this.inflight[0]?.sentAt;
        if (oldest !== undefined && now - oldest >= this.ackTimeoutMs) {
          failure = new ConnectError(`IngestEvents: batch unanswered for ${now - oldest} ms`, Code.DeadlineExceeded);
          this.counters.ackTimeouts++;
          abort.abort();
          break;
        }
        const due =
          this.queue.length >= this.batchSize ||
          (this.queue.length > 0 &&
            (this.closing || this.flushWaiters.length > 0 || now - this.oldestQueuedAt >= this.flushIntervalMs));
        if (due && this.inflight.length < this.maxInFlight) {
          const items = this.queue.splice(0, this.batchSize);
          this.oldestQueuedAt = now;
          const batch = { id: this.nextBatch++, items, sentAt: now };
          this.inflight.push(batch);
          requests.push(toRequest(batch));
          this.counters.batchesSent++;
          continue;
        }
        if (this.closing && this.queue.length === 0 && this.inflight.length === 0) {
          break;
        }
        let wait = this.queue.length > 0 && this.inflight.length < this.maxInFlight
          ? Math.max(1, this.oldestQueuedAt + this.flushIntervalMs - now)
          : 60_000;
        if (oldest !== undefined) {
          wait = Math.min(wait, Math.max(1, oldest + this.ackTimeoutMs - now));
        }
        await this.sleep(wait);
      }
    } finally {
      requests.end();
      if (!ended && this.closed) {
        abort.abort();
      }
      const timedOut = failure;
      await reader;
      failure = timedOut ?? failure; // the ack timeout, not the abort it caused
      this.abort.signal.removeEventListener("abort", onClose);
    }
    if (failure !== undefined && !this.closed) {
      throw failure;
    }
    if (this.inflight.length > 0 && !this.closed) {
      throw new ConnectError(`IngestEvents ended with ${this.inflight.length} batches unanswered`, Code.Unavailable);
    }
  }

  private acknowledge(res: IngestEventsResponse): void {
    const at = this.inflight.findIndex((b) => b.id === res.batchId);
    if (at < 0) {
      return; // an answer to a batch already settled (cannot happen on one stream; ignored)
    }
    this.inflight.splice(at, 1);
    this.counters.exposuresAccepted += Number(res.exposuresAccepted);
    this.counters.exposuresDuplicate += Number(res.exposuresDuplicate);
    this.counters.eventsAccepted += Number(res.eventsAccepted);
    this.counters.eventsDuplicate += Number(res.eventsDuplicate);
    for (const c of res.conflicts) {
      this.counters.exposureConflicts++;
      this.remember(c.experiment, c.unitId, c.storedVariant);
    }
    this.settleFlushes();
    this.wake();
  }
}

function toRequest(batch: Batch): IngestRequestInit {
  const exposures: ExposureInit[] = [];
  const events: MetricEventInit[] = [];
  for (const item of batch.items) {
    if (item.exposure) {
      exposures.push({ ...item.exposure, exposureTime: timestampFromMs(item.at) });
    } else if (item.event) {
      events.push({ ...item.event, eventTime: timestampFromMs(item.at) });
    }
  }
  return { batchId: batch.id, exposures, events };
}

function stickyKey(experiment: string, unitId: string): string {
  return `${experiment}\u0000${unitId}`;
}

function sameEndpoints(held: CompiledConfig, config: ExperimentConfig): boolean {
  return held.variants.every((v, i) => {
    const c = config.variants[i];
    return c !== undefined && c.endpoint === v.endpoint && c.openaiBaseUrl === v.openaiBaseUrl && c.model === v.model;
  });
}

function abortableDelay(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done);
  });
}

function clamp(n: number, lo: number, hi: number): number {
  return Math.min(hi, Math.max(lo, Math.floor(n)));
}

function jitter(ms: number): number {
  return ms * (0.5 + Math.random());
}

/** An async iterable fed by `push`, ended by `end` (the request side of a bidi stream). */
class Pushable<T> {
  private items: T[] = [];
  private done = false;
  private notify: (() => void) | undefined;

  push(item: T): void {
    if (!this.done) {
      this.items.push(item);
      this.signal();
    }
  }

  end(): void {
    this.done = true;
    this.signal();
  }

  private signal(): void {
    const notify = this.notify;
    this.notify = undefined;
    notify?.();
  }

  /** A generator (Connect needs `throw` and `return` on the request iterable). */
  async *stream(): AsyncGenerator<T> {
    while (true) {
      if (this.items.length > 0) {
        yield this.items.shift()!;
      } else if (this.done) {
        return;
      } else {
        await new Promise<void>((resolve) => (this.notify = resolve));
      }
    }
  }
}
