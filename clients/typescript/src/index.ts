/**
 * @neuroweaver/client: typed clients for the NeuroWeaver gRPC services.
 *
 * Messages and service descriptors are generated from protos/ by protoc-gen-es v2 (src/gen, committed);
 * calls go through Connect's gRPC transport for Node (`createGrpcTransport`): plain gRPC over HTTP/2, the
 * same wire protocol as grpcurl or @grpc/grpc-js, against the Python grpc.aio servers.
 *
 * ```ts
 * import { createNeuroWeaverClients, errorDetails } from "@neuroweaver/client";
 * const nw = createNeuroWeaverClients({ registry: "127.0.0.1:50051", token: process.env.NW_TOKEN, timeoutMs: 5000 });
 * const version = await nw.registry.getModelVersion({ name: "projects/default/models/auto-advisor/versions/production" });
 * ```
 *
 * TLS / mTLS: `tls: { ca, cert, key }` (PEM contents; `tlsFromEnv()` reads the files named by `NW_TLS_CA`,
 * `NW_TLS_CERT`, `NW_TLS_KEY`, as the `nw` CLI does) on any client or on `createNeuroWeaverClients`.
 */
import { readFileSync } from "node:fs";

import { Code, ConnectError, createClient, type CallOptions, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcTransport, type GrpcTransportOptions } from "@connectrpc/connect-node";

import { RegistryService } from "./gen/neuroweaver/registry/v1/registry_service_pb.js";
import { TrainerService } from "./gen/neuroweaver/trainer/v1/trainer_service_pb.js";
import { DeployerService } from "./gen/neuroweaver/deployer/v1/deployer_service_pb.js";
import { ExperimentsService } from "./gen/neuroweaver/experiments/v1/experiments_service_pb.js";
import { InferenceService } from "./gen/neuroweaver/inference/v1/inference_service_pb.js";
import { Health, HealthCheckResponse_ServingStatus } from "./gen/grpc/health/v1/health_pb.js";

export { RegistryService, TrainerService, DeployerService, ExperimentsService, InferenceService, Health };
export * as commonv1 from "./common.js";
export * as registryv1 from "./registry.js";
export * as trainerv1 from "./trainer.js";
export * as deployerv1 from "./deployer.js";
export * as experimentsv1 from "./experiments.js";
export * as inferencev1 from "./inference.js";
export * as rpc from "./rpc.js";
export * as healthv1 from "./gen/grpc/health/v1/health_pb.js";
export { Code, ConnectError } from "@connectrpc/connect";
export type { Client, Interceptor, Transport, CallOptions } from "@connectrpc/connect";
export { errorDetails, type ErrorDetails, type FieldViolation } from "./errors.js";
export {
  ExperimentsSdk,
  type ExperimentsSdkOptions,
  type SdkAssignment,
  type SdkError,
  type SdkStats,
  type StickyStore,
  type TrackOptions,
  type BackoffOptions,
} from "./experiments-sdk.js";
export * as assignment from "./assignment.js";

export type RegistryClient = Client<typeof RegistryService>;
export type TrainerClient = Client<typeof TrainerService>;
export type DeployerClient = Client<typeof DeployerService>;
export type ExperimentsClient = Client<typeof ExperimentsService>;
export type InferenceClient = Client<typeof InferenceService>;
export type HealthClient = Client<typeof Health>;

/** Default project of the embedded deployment; resource names start with `projects/default/`. */
export const DEFAULT_PROJECT = "projects/default";

/** A bearer token, or a function that returns one per call (for rotating tokens). */
export type TokenSource = string | (() => string | Promise<string>);

/**
 * Adds `authorization: Bearer <token>` to every request, the form the servers' auth interceptor reads.
 * Health and reflection stay open on the server side, so sending a token there is harmless.
 */
export function bearerTokenInterceptor(token: TokenSource): Interceptor {
  return (next) => async (req) => {
    const value = typeof token === "function" ? await token() : token;
    if (value) {
      req.header.set("authorization", `Bearer ${value}`);
    }
    return next(req);
  };
}

/**
 * Call options for a call that must finish by an absolute time (epoch milliseconds), for example the
 * gateway's own request budget: `await client.assignVariant(req, until(budgetEnd))`.
 * The deadline travels as `grpc-timeout`, so the server stops work when the caller gives up.
 * A budget already spent fails the call at once with DEADLINE_EXCEEDED, without touching the network
 * (Connect reads `timeoutMs: 0` as "no deadline", so it is never passed through).
 */
export function until(deadlineEpochMs: number, signal?: AbortSignal): CallOptions {
  const timeoutMs = Math.floor(deadlineEpochMs - Date.now());
  if (timeoutMs <= 0) {
    return { signal: AbortSignal.abort(new ConnectError("deadline already passed", Code.DeadlineExceeded)) };
  }
  return signal ? { timeoutMs, signal } : { timeoutMs };
}

/**
 * Turns what service responses and config carry into a base URL for the gRPC transport:
 * `host:port` (as in `Variant.endpoint` or `Deployment.endpoint`) becomes `http://host:port`, or
 * `https://host:port` when `tls` is on; a URL with a scheme is kept.
 */
export function toBaseUrl(endpoint: string, tls = false): string {
  const trimmed = endpoint.trim();
  if (!trimmed) {
    throw new Error("empty endpoint");
  }
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(trimmed)) {
    return trimmed.replace(/\/+$/, "");
  }
  return `${tls ? "https" : "http"}://${trimmed}`;
}

/**
 * TLS settings of a connection, PEM contents (not paths). `ca` verifies the server (default: Node's
 * built-in roots); `cert` + `key` are this client's identity for servers that require client certificates
 * (mTLS); `serverName` is the name checked against the server certificate instead of the dialled host.
 */
export interface TlsOptions {
  ca?: string | Buffer;
  cert?: string | Buffer;
  key?: string | Buffer;
  serverName?: string;
}

/**
 * TLS settings from PEM files named by `NW_TLS_CA`, `NW_TLS_CERT`, `NW_TLS_KEY` (and `NW_TLS_SERVER_NAME`),
 * the variables the `nw` CLI reads; undefined when neither a CA nor a certificate is set (plaintext).
 */
export function tlsFromEnv(env: NodeJS.ProcessEnv = process.env): TlsOptions | undefined {
  return loadTls({ ca: env.NW_TLS_CA, cert: env.NW_TLS_CERT, key: env.NW_TLS_KEY, serverName: env.NW_TLS_SERVER_NAME });
}

/** Reads PEM files into `TlsOptions`; undefined when neither `ca` nor `cert` is given. */
export function loadTls(paths: { ca?: string; cert?: string; key?: string; serverName?: string }): TlsOptions | undefined {
  const { ca, cert, key, serverName } = paths;
  if (!ca && !cert) {
    if (key || serverName) {
      throw new Error("TLS: a key or server name without a CA bundle or certificate");
    }
    return undefined;
  }
  if (!cert !== !key) {
    throw new Error("TLS: a client certificate needs its private key and a key its certificate (set both)");
  }
  const read = (path: string | undefined) => (path ? readFileSync(path) : undefined);
  return { ca: read(ca), cert: read(cert), key: read(key), serverName: serverName || undefined };
}

export interface TransportOptions {
  /** `host:port` or a URL (`http://host:port`, `https://host:port`). */
  endpoint: string;
  /** Bearer token sent as `authorization: Bearer ...`. */
  token?: TokenSource;
  /** Deadline for calls that do not pass their own `timeoutMs` (milliseconds). Default 10,000; 0 = none. */
  timeoutMs?: number;
  /** More interceptors, run after the bearer token one. */
  interceptors?: Interceptor[];
  /** TLS / mTLS; a `host:port` endpoint is then dialled as `https://`. */
  tls?: TlsOptions;
  /** Anything else createGrpcTransport accepts (ping interval, compression, ...). */
  transport?: Partial<Omit<GrpcTransportOptions, "baseUrl" | "interceptors" | "defaultTimeoutMs">>;
}

export const DEFAULT_TIMEOUT_MS = 10_000;

/** A gRPC (HTTP/2) transport with bearer auth and a default deadline. One transport = one HTTP/2 connection. */
export function createTransport(options: TransportOptions): Transport {
  const interceptors: Interceptor[] = [];
  if (options.token !== undefined) {
    interceptors.push(bearerTokenInterceptor(options.token));
  }
  interceptors.push(...(options.interceptors ?? []));
  const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const baseUrl = toBaseUrl(options.endpoint, options.tls !== undefined);
  const tls = options.tls;
  if (tls && !baseUrl.startsWith("https://")) {
    throw new Error(`TLS options given for a plaintext endpoint (${baseUrl}); use host:port or https://`);
  }
  return createGrpcTransport({
    ...options.transport,
    ...(tls && {
      nodeOptions: { ...options.transport?.nodeOptions, ca: tls.ca, cert: tls.cert, key: tls.key, servername: tls.serverName },
    }),
    baseUrl,
    interceptors,
    defaultTimeoutMs: timeoutMs > 0 ? timeoutMs : undefined,
  });
}

type ClientOptions = TransportOptions | { transport: Transport };

function transportOf(options: ClientOptions | string): Transport {
  if (typeof options === "string") {
    return createTransport({ endpoint: options });
  }
  if ("endpoint" in options) {
    return createTransport(options);
  }
  return options.transport;
}

export function createRegistryClient(options: ClientOptions | string): RegistryClient {
  return createClient(RegistryService, transportOf(options));
}

export function createTrainerClient(options: ClientOptions | string): TrainerClient {
  return createClient(TrainerService, transportOf(options));
}

export function createDeployerClient(options: ClientOptions | string): DeployerClient {
  return createClient(DeployerService, transportOf(options));
}

export function createExperimentsClient(options: ClientOptions | string): ExperimentsClient {
  return createClient(ExperimentsService, transportOf(options));
}

/** A client for one deployment's model server, for example from `Variant.endpoint`. */
export function createInferenceClient(options: ClientOptions | string): InferenceClient {
  return createClient(InferenceService, transportOf(options));
}

export function createHealthClient(options: ClientOptions | string): HealthClient {
  return createClient(Health, transportOf(options));
}

export interface NeuroWeaverEndpoints {
  registry?: string;
  trainer?: string;
  deployer?: string;
  experiments?: string;
}

export interface NeuroWeaverClients {
  registry: RegistryClient;
  trainer: TrainerClient;
  deployer: DeployerClient;
  experiments: ExperimentsClient;
}

/** Default local ports of `make up`. */
export const DEFAULT_ENDPOINTS: Required<NeuroWeaverEndpoints> = {
  registry: "127.0.0.1:50051",
  trainer: "127.0.0.1:50052",
  deployer: "127.0.0.1:50053",
  experiments: "127.0.0.1:50054",
};

/**
 * Clients for the four platform services with shared auth and deadline settings.
 * Endpoints not given fall back to the `make up` defaults; connections open lazily on the first call.
 */
export function createNeuroWeaverClients(
  options: NeuroWeaverEndpoints & Omit<TransportOptions, "endpoint"> = {},
): NeuroWeaverClients {
  const { registry, trainer, deployer, experiments, ...common } = options;
  const endpoints = { ...DEFAULT_ENDPOINTS, ...definedOnly({ registry, trainer, deployer, experiments }) };
  return {
    registry: createRegistryClient({ ...common, endpoint: endpoints.registry }),
    trainer: createTrainerClient({ ...common, endpoint: endpoints.trainer }),
    deployer: createDeployerClient({ ...common, endpoint: endpoints.deployer }),
    experiments: createExperimentsClient({ ...common, endpoint: endpoints.experiments }),
  };
}

function definedOnly<T extends object>(value: T): Partial<T> {
  return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined)) as Partial<T>;
}

/**
 * Polls `grpc.health.v1.Health/Check` for `service` until it answers SERVING or `timeoutMs` passes.
 * Connection refusals and NOT_SERVING are retried with a short backoff; anything else is thrown.
 */
export async function waitForServing(
  health: HealthClient,
  service: string,
  { timeoutMs = 30_000, intervalMs = 100 }: { timeoutMs?: number; intervalMs?: number } = {},
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = "no answer";
  for (;;) {
    const left = deadline - Date.now();
    if (left <= 0) {
      throw new Error(`${service} not SERVING after ${timeoutMs} ms (last: ${last})`);
    }
    try {
      const res = await health.check({ service }, { timeoutMs: Math.min(left, 2_000) });
      if (res.status === HealthCheckResponse_ServingStatus.SERVING) {
        return;
      }
      last = HealthCheckResponse_ServingStatus[res.status] ?? String(res.status);
    } catch (err) {
      last = err instanceof Error ? err.message : String(err);
    }
    await new Promise((resolve) => setTimeout(resolve, Math.min(intervalMs, Math.max(0, deadline - Date.now()))));
    intervalMs = Math.min(intervalMs * 2, 1_000);
  }
}
