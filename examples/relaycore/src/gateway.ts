/**
 * The NeuroWeaver side of a RelayCore-style AI gateway, on @neuroweaver/client:
 *
 *   1. Which variant (model version + deployment) serves this user: evaluated in-process by the SDK's
 *      `ExperimentsSdk` from the configs WatchExperimentConfigs streams (exactly AssignVariant's answer, sticky;
 *      only units in buckets a weight change made ambiguous cost an AssignVariant call). A first exposure is sent in
 *      the background over IngestEvents while the model answers, and is acknowledged before step 3 reports
 *      outcomes for the unit. `localEvaluation: false` calls AssignVariant for every request instead.
 *   2. The variant's model server: gRPC InferenceService/Generate at `variant.endpoint` with
 *      `variant.model`, or the OpenAI-compatible `POST {variant.openaiBaseUrl}/chat/completions`. `variant.model`
 *      is the deployment's stable name: it keeps working when the deployment rolls over to another version, and
 *      each answer says which version served it (gRPC `modelVersion`, the `x-neuroweaver-model-version` header).
 *   3. ExperimentsService/RecordMetricEvents: the outcome (latency_ms, completion_tokens and, when the user gave
 *      feedback, thumbs_up), each event with an idempotency key so a retried report is counted once.
 *   4. ExperimentsService/RecordAnswers, when the experiment judges answers (`answerJudging`): the prompt and the
 *      answer. The gateway scores nothing itself: the experiments service judges a sample of the answers in the
 *      background with the experiment's registered judge version and records each score as the judging metric
 *      (progress and failures in GetExperimentResults' `judging`).
 *
 * Every call runs under the request's overall budget (`until(deadline)`), so a slow dependency fails the
 * request with DEADLINE_EXCEEDED instead of holding it. With `tls` set, every hop (experiments service,
 * model servers over gRPC and HTTP) uses TLS with that CA and, for mTLS, that client certificate. `token` goes
 * on every hop too: with auth on, model servers serve only callers with a token of their deployment's project
 * (`authorization: Bearer` on gRPC, `Authorization: Bearer` on the OpenAI endpoint), as the platform services do.
 */
import { randomUUID } from "node:crypto";
import { request as httpRequest } from "node:http";
import { request as httpsRequest } from "node:https";

import {
  Code,
  ConnectError,
  createExperimentsClient,
  createInferenceClient,
  errorDetails,
  ExperimentsSdk,
  inferencev1,
  until,
  type ExperimentsClient,
  type InferenceClient,
  type TlsOptions,
  type TokenSource,
} from "@neuroweaver/client";

export type Transport = "grpc" | "openai";

export interface ChatMessage {
  role: "system" | "user" | "assistant";
  content: string;
}

export interface GatewayOptions {
  /** ExperimentsService address, `host:port`. */
  experimentsEndpoint: string;
  /** `projects/{p}/experiments/{e}`. */
  experiment: string;
  /** Bearer token for the platform services and their model servers (omit when auth is off). */
  token?: TokenSource;
  /** TLS / mTLS for every hop (PEM contents; `tlsFromEnv()` reads NW_TLS_*). Omit for plaintext. */
  tls?: TlsOptions;
  /** Budget of one chat request, all calls included (ms). */
  requestBudgetMs?: number;
  /** Assign in-process with `ExperimentsSdk` (default true); false: one AssignVariant call per request. */
  localEvaluation?: boolean;
}

export interface ChatRequest {
  /** Stable id of the user (the experiment's unit). */
  userId: string;
  messages: ChatMessage[];
  maxTokens?: number;
  /** Which way to call the model server. */
  transport?: Transport;
  /** Gateway request id; the metric events' idempotency keys derive from it. */
  requestId?: string;
  /** A reference answer, when the application knows one (the judge sees it; a reference-similarity judge needs it). */
  reference?: string;
}

export interface ChatResult {
  requestId: string;
  variant: string;
  inExperiment: boolean;
  /** Who decided the variant: the SDK in-process (`local`, `sticky`) or AssignVariant (`server`). */
  assignedBy: "local" | "sticky" | "server";
  /** The variant's model version (what the experiment assigned). */
  modelVersion: string;
  /** The model name sent and echoed: the deployment's stable name. */
  model: string;
  /** The registry version that served the answer, as the model server reports it. */
  servedVersion: string;
  transport: Transport;
  text: string;
  finishReason: string;
  promptTokens: number;
  completionTokens: number;
  latencyMs: number;
  /** Events accepted / ignored as duplicates by RecordMetricEvents. */
  recorded: { accepted: number; duplicates: number };
  /** RecordAnswers' answer (null when the experiment does not judge answers or the user is outside it). */
  answerRecorded: AnswerRecorded | null;
}

/** RecordAnswers' counts for one answer: stored, duplicate, selected for judging. */
export interface AnswerRecorded {
  accepted: number;
  duplicates: number;
  sampled: number;
}

export class Gateway {
  private readonly experiments: ExperimentsClient;
  /** Local evaluation of the experiment's assignment (undefined with `localEvaluation: false`). */
  private readonly sdk?: ExperimentsSdk;
  private readonly servers = new Map<string, InferenceClient>();
  private readonly budgetMs: number;
  /** Whether the experiment judges answers (its `answerJudging`), read once. */
  private judging?: Promise<boolean>;

  constructor(private readonly options: GatewayOptions) {
    this.experiments = createExperimentsClient({ endpoint: options.experimentsEndpoint, token: options.token, tls: options.tls });
    this.budgetMs = options.requestBudgetMs ?? 30_000;
    if (options.localEvaluation !== false) {
      const project = options.experiment.split("/").slice(0, 2).join("/");
      this.sdk = new ExperimentsSdk({
        client: this.experiments,
        project,
        onError: (e) => console.error(`experiments SDK (${e.kind}): ${describeError(e.error)}`),
      }).start();
    }
  }

  /** Waits for the SDK's first config snapshot (until then assignments are asked from the server). */
  async ready(timeoutMs = 10_000): Promise<void> {
    await this.sdk?.ready(timeoutMs);
  }

  /** Flushes the exposures and stops the SDK's streams. */
  async close(): Promise<void> {
    await this.sdk?.close();
  }

  /** The SDK's counters (local/sticky/server answers, exposures sent), or null without local evaluation. */
  localEvaluationStats(): Record<string, number> | null {
    const stats = this.sdk?.stats();
    return stats ? Object.fromEntries(Object.entries(stats).map(([k, v]) => [k, Number(v)])) : null;
  }

  /** One HTTP/2 connection per model-server endpoint, reused across requests. */
  private server(endpoint: string): InferenceClient {
    let client = this.servers.get(endpoint);
    if (!client) {
      // The model server authorizes the gateway itself (auth on: a viewer token of the deployment's project).
      client = createInferenceClient({ endpoint, token: this.options.token, tls: this.options.tls });
      this.servers.set(endpoint, client);
    }
    return client;
  }

  async chat(req: ChatRequest): Promise<ChatResult> {
    const deadline = Date.now() + this.budgetMs;
    const requestId = req.requestId ?? randomUUID();
    const transport = req.transport ?? "grpc";

    // 1. Which variant serves this user.
    const unit = { experiment: this.options.experiment, unitId: req.userId };
    const assignment = this.sdk
      ? await this.sdk.assign(unit.experiment, unit.unitId, until(deadline))
      : { ...(await this.experiments.assignVariant(unit, until(deadline))), source: "server" as const };
    // A first exposure evaluated here is queued: have it acknowledged (while the model answers) before outcomes of
    // the unit are recorded, which the service accepts only for exposed units.
    const exposed =
      assignment.source === "local" && assignment.inExperiment ? this.sdk!.flush(deadline - Date.now()) : undefined;
    exposed?.catch(() => {}); // awaited below; not an unhandled rejection if generation fails first
    const variant = assignment.variant;
    // `model` is the deployment's stable name (the deprecated `servedModelName` carries the same for older servers).
    const model = variant?.model || variant?.servedModelName;
    if (!variant || !variant.endpoint || !model) {
      throw new ConnectError(
        `variant ${variant?.id ?? "?"} of ${this.options.experiment} has no resolved endpoint (is its deployment running?)`,
        Code.FailedPrecondition,
      );
    }

    // 2. Call the deployment's model server.
    const started = performance.now();
    const answer =
      transport === "grpc"
        ? await this.generateGrpc(variant.endpoint, model, req, deadline)
        : await this.generateOpenAI(variant.openaiBaseUrl, model, req, deadline);
    const latencyMs = performance.now() - started;

    // 3. Report the outcome. Units outside the experiment's coverage were not exposed: nothing to record.
    let recorded = { accepted: 0, duplicates: 0 };
    let answerRecorded: AnswerRecorded | null = null;
    if (assignment.inExperiment) {
      await exposed;
      recorded = await this.recordOutcome(req.userId, requestId, deadline, {
        latency_ms: latencyMs,
        completion_tokens: answer.completionTokens,
      });
      // 4. The answer, for the service's judge.
      if (await this.judgesAnswers(deadline)) {
        answerRecorded = await this.recordAnswer(req.userId, variant.id, requestId, req, answer.text, deadline);
      }
    }
    return {
      requestId,
      variant: variant.id,
      inExperiment: assignment.inExperiment,
      assignedBy: assignment.source,
      modelVersion: variant.modelVersion,
      model: answer.model,
      servedVersion: answer.servedVersion,
      transport,
      text: answer.text,
      finishReason: answer.finishReason,
      promptTokens: answer.promptTokens,
      completionTokens: answer.completionTokens,
      latencyMs,
      recorded,
      answerRecorded,
    };
  }

  /** Whether the experiment has `answerJudging` (GetExperiment once per gateway). */
  private judgesAnswers(deadline: number): Promise<boolean> {
    this.judging ??= this.experiments
      .getExperiment({ name: this.options.experiment }, until(deadline))
      .then((e) => e.answerJudging !== undefined);
    this.judging.catch(() => (this.judging = undefined)); // a failed read is retried by the next request
    return this.judging;
  }

  /**
   * RecordAnswers for one answer: the last user message as the prompt, the variant that answered, and the key
   * `{requestId}:answer`, so a retried report is a duplicate (and is sampled the same way).
   */
  async recordAnswer(
    userId: string,
    variant: string,
    requestId: string,
    req: Pick<ChatRequest, "messages" | "reference">,
    text: string,
    deadline: number,
  ): Promise<AnswerRecorded> {
    const prompt = [...req.messages].reverse().find((m) => m.role === "user")?.content ?? "";
    const res = await this.experiments.recordAnswers(
      {
        experiment: this.options.experiment,
        answers: [
          { unitId: userId, variant, prompt, answer: text, reference: req.reference ?? "", idempotencyKey: `${requestId}:answer` },
        ],
      },
      until(deadline),
    );
    return { accepted: Number(res.accepted), duplicates: Number(res.duplicates), sampled: Number(res.sampled) };
  }

  /** The user's thumbs up/down on an earlier answer, reported later (same idempotency scheme). */
  async feedback(userId: string, requestId: string, thumbsUp: boolean): Promise<{ accepted: number; duplicates: number }> {
    return this.recordOutcome(userId, requestId, Date.now() + this.budgetMs, { thumbs_up: thumbsUp ? 1 : 0 });
  }

  /** RecordMetricEvents for one request; `{requestId}:{metric}` keys make a retried report count once. */
  async recordOutcome(
    userId: string,
    requestId: string,
    deadline: number,
    metrics: Record<string, number>,
  ): Promise<{ accepted: number; duplicates: number }> {
    const eventTime = { seconds: BigInt(Math.floor(Date.now() / 1000)), nanos: (Date.now() % 1000) * 1_000_000 };
    const res = await this.experiments.recordMetricEvents(
      {
        experiment: this.options.experiment,
        events: Object.entries(metrics).map(([metric, value]) => ({
          unitId: userId,
          metric,
          value,
          eventTime,
          idempotencyKey: `${requestId}:${metric}`,
        })),
      },
      until(deadline),
    );
    return { accepted: Number(res.accepted), duplicates: Number(res.duplicates) };
  }

  private async generateGrpc(endpoint: string, model: string, req: ChatRequest, deadline: number): Promise<Answer> {
    const res = await this.server(endpoint).generate(
      { model, messages: req.messages, sampling: { maxTokens: req.maxTokens ?? 64, temperature: 0 } },
      until(deadline),
    );
    return {
      model: res.model,
      servedVersion: res.modelVersion,
      text: res.text,
      finishReason: inferencev1.FinishReason[res.finishReason] ?? String(res.finishReason),
      promptTokens: res.usage?.promptTokens ?? 0,
      completionTokens: res.usage?.completionTokens ?? 0,
    };
  }

  private async generateOpenAI(baseUrl: string, model: string, req: ChatRequest, deadline: number): Promise<Answer> {
    if (!baseUrl) {
      throw new ConnectError("variant has no OpenAI base URL", Code.FailedPrecondition);
    }
    const response = await postJson(
      `${baseUrl.replace(/\/+$/, "")}/chat/completions`,
      { model, messages: req.messages, max_tokens: req.maxTokens ?? 64, temperature: 0 },
      AbortSignal.timeout(Math.max(1, deadline - Date.now())),
      this.options.tls,
      await bearer(this.options.token),
    );
    const body = response.body as OpenAIChatCompletion | { error?: { message?: string; code?: string } };
    if (response.status !== 200 || !("choices" in body)) {
      const error = "error" in body ? body.error : undefined;
      throw new Error(`model server HTTP ${response.status}: ${error?.code ?? ""} ${error?.message ?? JSON.stringify(body)}`);
    }
    return {
      model: body.model,
      servedVersion: response.headers[MODEL_VERSION_HEADER] ?? "",
      text: body.choices[0]?.message.content ?? "",
      finishReason: body.choices[0]?.finish_reason ?? "",
      promptTokens: body.usage?.prompt_tokens ?? 0,
      completionTokens: body.usage?.completion_tokens ?? 0,
    };
  }
}

/**
 * POST a JSON body, parse the JSON answer. node:http(s) rather than fetch: fetch cannot take a CA bundle or a
 * client certificate, which an https:// model server with its own CA (or mTLS) needs.
 */
function postJson(
  url: string,
  payload: unknown,
  signal: AbortSignal,
  tls?: TlsOptions,
  authorization?: string,
): Promise<{ status: number; headers: Record<string, string | undefined>; body: any }> {
  const data = Buffer.from(JSON.stringify(payload));
  const headers: Record<string, string> = { "content-type": "application/json", "content-length": String(data.length) };
  if (authorization) {
    headers.authorization = authorization;
  }
  return new Promise((resolve, reject) => {
    const options = { method: "POST", headers, signal };
    const onResponse = (res: import("node:http").IncomingMessage) => {
      const chunks: Buffer[] = [];
      res.on("data", (chunk: Buffer) => chunks.push(chunk));
      res.on("error", reject);
      res.on("end", () => {
        const text = Buffer.concat(chunks).toString("utf8");
        try {
          const headers = Object.fromEntries(
            Object.entries(res.headers).map(([k, v]) => [k, Array.isArray(v) ? v.join(", ") : v]),
          );
          resolve({ status: res.statusCode ?? 0, headers, body: JSON.parse(text) });
        } catch {
          reject(new Error(`model server HTTP ${res.statusCode}: not JSON: ${text.slice(0, 200)}`));
        }
      });
    };
    const req = url.startsWith("https:")
      ? httpsRequest(url, { ...options, ca: tls?.ca, cert: tls?.cert, key: tls?.key, servername: tls?.serverName }, onResponse)
      : httpRequest(url, options, onResponse);
    req.on("error", reject);
    req.end(data);
  });
}

/** `Bearer <token>` for the OpenAI endpoint (as the gRPC clients send it), or undefined when auth is off. */
async function bearer(token?: TokenSource): Promise<string | undefined> {
  const value = typeof token === "function" ? await token() : token;
  return value ? `Bearer ${value}` : undefined;
}

/** The registry version that served an OpenAI-compatible answer (the gRPC answer has it as `modelVersion`). */
const MODEL_VERSION_HEADER = "x-neuroweaver-model-version";

interface Answer {
  /** The name the model server echoes: the one sent. */
  model: string;
  /** The registry version that served the answer. */
  servedVersion: string;
  text: string;
  finishReason: string;
  promptTokens: number;
  completionTokens: number;
}

interface OpenAIChatCompletion {
  model: string;
  choices: { index: number; message: { role: string; content: string }; finish_reason: string }[];
  usage?: { prompt_tokens: number; completion_tokens: number };
}

/** One line for logs: the gRPC code and the ErrorInfo reason of a failed platform call. */
export function describeError(err: unknown): string {
  if (err instanceof ConnectError) {
    const e = errorDetails(err);
    return `${e.codeName} ${e.reason || "-"} (${e.domain || "-"}): ${e.message}`;
  }
  return err instanceof Error ? err.message : String(err);
}
