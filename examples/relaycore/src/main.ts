/**
 * Runs the RelayCore flow for a few users and prints one JSON summary line.
 *
 *   node dist/main.js --experiments 127.0.0.1:50054 --experiment projects/default/experiments/advisor-ab \
 *     [--users 6] [--transport grpc|openai|both] [--token T] [--prompt "..."] \
 *     [--tls-ca ca.pem [--tls-cert me.pem --tls-key me-key.pem] [--tls-server-name NAME]]   (or env NW_TLS_*)
 *
 * Per user and transport: the variant (evaluated in-process by ExperimentsSdk; --local-evaluation false: AssignVariant)
 * → Generate (gRPC) or POST /v1/chat/completions (OpenAI HTTP) →
 * RecordMetricEvents(latency_ms, completion_tokens) → RecordAnswers (when the experiment judges answers: the
 * experiments service scores them with its registered judge; nothing is scored here); then simulated thumbs_up
 * feedback on the first answer of each user, and one deliberately repeated report (events and answer) to show
 * idempotency (counted as duplicates). With judging, waits (up to --judging-wait-ms) until the service has judged
 * every sampled answer and prints its judging status.
 * Exits 1 on any failure, printing the gRPC code and ErrorInfo reason.
 */
import { parseArgs } from "node:util";

import { createExperimentsClient, errorDetails, loadTls } from "@neuroweaver/client";

import { describeError, Gateway, type ChatResult, type Transport } from "./gateway.js";

const { values } = parseArgs({
  options: {
    experiments: { type: "string", default: "127.0.0.1:50054" },
    experiment: { type: "string" },
    users: { type: "string", default: "6" },
    transport: { type: "string", default: "both" },
    token: { type: "string" },
    "tls-ca": { type: "string" },
    "tls-cert": { type: "string" },
    "tls-key": { type: "string" },
    "tls-server-name": { type: "string" },
    prompt: { type: "string", default: "My 2019 sedan shakes when I brake at highway speed. What should I check?" },
    "max-tokens": { type: "string", default: "16" },
    "judging-wait-ms": { type: "string", default: "60000" },
    "local-evaluation": { type: "string", default: "true" },
  },
});
if (!values.experiment) {
  console.error("usage: main.js --experiment projects/{p}/experiments/{e} [--experiments host:port] [--users N] [--transport grpc|openai|both]");
  process.exit(2);
}
// Flags win over NW_TLS_* (the `nw` CLI's variables); neither set: plaintext.
const env = process.env;
const tls = loadTls({
  ca: values["tls-ca"] ?? env.NW_TLS_CA,
  cert: values["tls-cert"] ?? env.NW_TLS_CERT,
  key: values["tls-key"] ?? env.NW_TLS_KEY,
  serverName: values["tls-server-name"] ?? env.NW_TLS_SERVER_NAME,
});
const transports: Transport[] =
  values.transport === "both" ? ["grpc", "openai"] : values.transport === "openai" ? ["openai"] : ["grpc"];

async function main(): Promise<void> {
  const gateway = new Gateway({
    experimentsEndpoint: values.experiments!,
    experiment: values.experiment!,
    token: values.token,
    tls,
    requestBudgetMs: 60_000,
    localEvaluation: values["local-evaluation"] !== "false",
  });
  try {
    await gateway.ready(); // the SDK's first config snapshot: assignments are evaluated in-process from here on
  } catch (err) {
    console.error(`local evaluation not ready (${describeError(err)}): assignments go to AssignVariant meanwhile`);
  }
  const results: ChatResult[] = [];
  const feedback = { accepted: 0, duplicates: 0 };
  for (let i = 1; i <= Number(values.users); i++) {
    const userId = `user-${i}`;
    for (const transport of transports) {
      const result = await gateway.chat({
        userId,
        transport,
        maxTokens: Number(values["max-tokens"]),
        requestId: `req-${userId}-${transport}`,
        messages: [
          { role: "system", content: "You are a helpful dealership service advisor." },
          { role: "user", content: values.prompt! },
        ],
      });
      results.push(result);
      console.error(
        `${userId} -> ${result.variant} (${result.model}, served by ${result.servedVersion}) via ${transport}: ${result.completionTokens} tokens, ` +
          `${result.latencyMs.toFixed(1)} ms, answer ${result.answerRecorded ? (result.answerRecorded.sampled ? "sampled for judging" : "recorded") : "not judged"}`,
      );
    }
    // The user's feedback on their first answer arrives later (simulated: odd-numbered users like it).
    const first = results.find((r) => r.requestId.startsWith(`req-${userId}-`))!;
    const fb = await gateway.feedback(userId, first.requestId, i % 2 === 1);
    feedback.accepted += fb.accepted;
    feedback.duplicates += fb.duplicates;
  }

  // A retried report (same request id) is recognised by its idempotency keys and not counted twice.
  const again = results[0];
  const retry = await gateway.recordOutcome(`user-1`, again.requestId, Date.now() + 10_000, {
    latency_ms: again.latencyMs,
    completion_tokens: again.completionTokens,
  });
  const answerRetry = again.answerRecorded
    ? await gateway.recordAnswer(
        "user-1",
        again.variant,
        again.requestId,
        { messages: [{ role: "user", content: values.prompt! }] },
        again.text,
        Date.now() + 10_000,
      )
    : null;

  // Errors carry the canonical code and the ErrorInfo reason.
  const experiments = createExperimentsClient({ endpoint: values.experiments!, token: values.token, tls });

  // The service judges in the background: wait until every sampled answer is scored or failed.
  let judging = null;
  if (results.some((r) => r.answerRecorded)) {
    const waitUntil = Date.now() + Number(values["judging-wait-ms"]);
    for (;;) {
      const status = (await experiments.getExperimentResults({ name: values.experiment! })).judging;
      if (status && (status.pending === 0n || Date.now() > waitUntil)) {
        judging = {
          judgeVersion: status.judgeVersion,
          metric: status.metric,
          received: Number(status.received),
          sampled: Number(status.sampled),
          scored: Number(status.scored),
          failed: Number(status.failed),
          pending: Number(status.pending),
          lastError: status.lastError,
        };
        break;
      }
      await new Promise((resolve) => setTimeout(resolve, 200)); // polling the judging status
    }
  }
  let missing = null;
  try {
    await experiments.assignVariant({ experiment: "projects/default/experiments/no-such-experiment", unitId: "user-1" });
  } catch (err) {
    const e = errorDetails(err);
    missing = { code: e.codeName, reason: e.reason, domain: e.domain };
  }

  await gateway.close(); // flushes the SDK's exposures
  const perVariant: Record<string, { requests: number; models: string[]; servedVersions: string[]; modelVersion: string }> = {};
  for (const r of results) {
    const v = (perVariant[r.variant] ??= { requests: 0, models: [], servedVersions: [], modelVersion: r.modelVersion });
    v.requests += 1;
    if (!v.models.includes(r.model)) v.models.push(r.model);
    if (!v.servedVersions.includes(r.servedVersion)) v.servedVersions.push(r.servedVersion);
  }
  console.log(
    JSON.stringify({
      ok: true,
      requests: results.length,
      perVariant,
      assignments: Object.fromEntries(results.map((r) => [r.requestId, r.variant])),
      results: results.map(({ text: _text, ...rest }) => rest),
      feedback,
      retry,
      answerRetry,
      judging,
      missingExperiment: missing,
      localEvaluation: gateway.localEvaluationStats(),
    }),
  );
}

main().catch((err: unknown) => {
  console.error(`relaycore example failed: ${describeError(err)}`);
  process.exit(1);
});
