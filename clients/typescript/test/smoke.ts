/**
 * Live smoke test of @neuroweaver/client against a running registry (started by tests/e2e/test_node_client.py).
 *
 *   node dist-test/smoke.js --registry 127.0.0.1:50051 --admin-token T --viewer-token V
 *
 * With `NW_TLS_CA` (and `NW_TLS_CERT` + `NW_TLS_KEY` for mTLS) set, every call goes over TLS (tests/e2e/test_mtls.py),
 * and the JSON line also says how a connection without the client certificate ended.
 *
 * Talks gRPC over HTTP/2 to the Python grpc.aio server through the package's public entry point (self-import
 * of "@neuroweaver/client"), checks every answer, prints one JSON line with what it saw and exits 0; any
 * failed check throws and exits 1.
 */
import { randomUUID } from "node:crypto";
import { parseArgs } from "node:util";

import {
  Code,
  createHealthClient,
  createRegistryClient,
  errorDetails,
  registryv1,
  RegistryService,
  tlsFromEnv,
  waitForServing,
  until,
  type ErrorDetails,
} from "@neuroweaver/client";

const { values } = parseArgs({
  options: {
    registry: { type: "string" },
    "admin-token": { type: "string" },
    "viewer-token": { type: "string" },
    model: { type: "string" },
  },
});
if (!values.registry || !values["admin-token"] || !values["viewer-token"]) {
  throw new Error("usage: smoke.js --registry HOST:PORT --admin-token T --viewer-token V [--model ID]");
}
const endpoint = values.registry;
const adminToken = values["admin-token"];

function check(condition: unknown, what: string): asserts condition {
  if (!condition) {
    throw new Error(`check failed: ${what}`);
  }
}

async function expectError(what: string, call: () => Promise<unknown>): Promise<ErrorDetails> {
  try {
    await call();
  } catch (err) {
    return errorDetails(err);
  }
  throw new Error(`check failed: ${what} succeeded but should have failed`);
}

const seen: Record<string, unknown> = {};

const tls = tlsFromEnv(); // undefined: plaintext
seen.tls = tls !== undefined;

// Health is open even with auth on; poll it until the registry says SERVING.
await waitForServing(createHealthClient({ endpoint, tls }), RegistryService.typeName, { timeoutMs: 20_000 });

// The token is read per call (a function), as a gateway with rotating credentials would do it.
let tokenReads = 0;
const registry = createRegistryClient({
  endpoint,
  token: () => {
    tokenReads += 1;
    return adminToken;
  },
  timeoutMs: 5_000,
  tls,
});
const anonymous = createRegistryClient({ endpoint, timeoutMs: 5_000, tls });
const viewer = createRegistryClient({ endpoint, token: values["viewer-token"], timeoutMs: 5_000, tls });

const modelId = values.model ?? `node-smoke-${randomUUID().slice(0, 8)}`;
const modelName = `projects/default/models/${modelId}`;

// 1. Create a model (admin token; the creator recorded is the token's subject).
const model = await registry.createModel({
  parent: "projects/default",
  modelId,
  model: { displayName: "Node smoke", specialization: "service_advisor", baseModel: "builtin:smollm2-135m-instruct" },
  requestId: randomUUID(),
});
check(model.name === modelName, `model name ${model.name}`);
check(model.state === registryv1.Model_State.ACTIVE, `model state ${model.state}`);
check(model.creator === "relaycore-smoke", `creator ${model.creator}`);
check(model.createTime !== undefined && model.etag !== "", "output-only fields set");
seen.model = { name: model.name, creator: model.creator, state: registryv1.Model_State[model.state] };

// 2. Create version 1.0.0 (explicit semver) and 1.1.0 (bump MINOR).
const artifactSha = "ab".repeat(32);
const v1 = await registry.createModelVersion({
  parent: modelName,
  version: "1.0.0",
  modelVersion: {
    artifact: { uri: "file:///tmp/adapters/node-smoke/1", sha256: artifactSha, sizeBytes: 1234n, format: registryv1.ArtifactFormat.LORA_ADAPTER },
    lineage: { method: "sft-lora", hyperparameters: { learning_rate: "0.0002" } },
    metrics: [{ name: "eval_loss", value: 1.25, direction: registryv1.MetricDirection.LOWER_IS_BETTER }],
    labels: { origin: "node" },
  },
});
check(v1.name === `${modelName}/versions/1.0.0` && v1.version === "1.0.0", `v1 ${v1.name}`);
check(v1.artifact?.sizeBytes === 1234n, "int64 size round-trips as bigint");
check(v1.lineage?.baseModel === "builtin:smollm2-135m-instruct", `lineage base model defaults to the model's: ${v1.lineage?.baseModel}`);
const v2 = await registry.createModelVersion({
  parent: modelName,
  bump: registryv1.VersionBump.MINOR,
  modelVersion: { artifact: { uri: "file:///tmp/adapters/node-smoke/2", sha256: "cd".repeat(32) } },
});
check(v2.version === "1.1.0", `bumped version ${v2.version}`);

// 3. Point `production` at 1.0.0 (compare-and-set: must not exist yet), then read it back through the alias.
const alias = await registry.setModelAlias({
  model: modelName,
  alias: "production",
  version: "1.0.0",
  expectedVersion: "-",
  reason: "node smoke",
});
check(alias.name === `${modelName}/aliases/production` && alias.version === "1.0.0", `alias ${alias.name} -> ${alias.version}`);
const viaAlias = await registry.getModelVersion({ name: `${modelName}/versions/production` }, { timeoutMs: 2_000 });
check(viaAlias.version === "1.0.0", `versions/production resolves to ${viaAlias.version}`);
check(viaAlias.aliases.includes("production"), `aliases ${viaAlias.aliases}`);
check(viaAlias.artifact?.sha256 === artifactSha, "artifact digest read back");
check(viaAlias.lineage?.hyperparameters["learning_rate"] === "0.0002", "map field read back");
const latest = await registry.getModelVersion({ name: `${modelName}/versions/latest` });
check(latest.version === "1.1.0", `versions/latest resolves to ${latest.version}`);
seen.production = viaAlias.name;
seen.latest = latest.version;

// 4. Errors: canonical code plus google.rpc.ErrorInfo from grpc-status-details-bin.
const missing = await expectError("GetModel of a missing model", () =>
  registry.getModel({ name: "projects/default/models/does-not-exist" }),
);
check(missing.code === Code.NotFound, `missing model code ${missing.codeName}`);
check(missing.reason === "MODEL_NOT_FOUND", `missing model reason ${missing.reason}`);
check(missing.domain === "registry.neuroweaver.v1", `missing model domain ${missing.domain}`);
seen.notFound = { code: missing.codeName, reason: missing.reason, domain: missing.domain, metadata: missing.metadata };

const missingVersion = await expectError("GetModelVersion of a missing version", () =>
  registry.getModelVersion({ name: `${modelName}/versions/9.9.9` }),
);
check(missingVersion.code === Code.NotFound && missingVersion.reason === "VERSION_NOT_FOUND", `missing version ${missingVersion.reason}`);
check(missingVersion.metadata["version"] === "9.9.9", `ErrorInfo.metadata ${JSON.stringify(missingVersion.metadata)}`);

const stale = await expectError("SetModelAlias with a stale expected version", () =>
  registry.setModelAlias({ model: modelName, alias: "production", version: "1.1.0", expectedVersion: "0.9.0" }),
);
check(stale.code === Code.Aborted && stale.reason === "ALIAS_VERSION_MISMATCH", `stale CAS ${stale.codeName} ${stale.reason}`);

const invalid = await expectError("CreateModelVersion with a bad digest", () =>
  registry.createModelVersion({ parent: modelName, version: "2.0.0", modelVersion: { artifact: { uri: "file:///x", sha256: "nope" } } }),
);
check(invalid.code === Code.InvalidArgument, `bad digest code ${invalid.codeName}`);
check(
  invalid.fieldViolations.some((v) => v.field === "model_version.artifact.sha256"),
  `BadRequest field violations ${JSON.stringify(invalid.fieldViolations)}`,
);
seen.invalidArgument = { reason: invalid.reason, fieldViolations: invalid.fieldViolations };

// 5. Auth: the bearer interceptor is what lets calls through.
const noToken = await expectError("GetModel without a token", () => anonymous.getModel({ name: modelName }));
check(noToken.code === Code.Unauthenticated && noToken.reason === "MISSING_TOKEN", `no token ${noToken.codeName} ${noToken.reason}`);
const viewerRead = await viewer.getModel({ name: modelName });
check(viewerRead.aliases["production"] === "1.0.0", `viewer reads aliases ${JSON.stringify(viewerRead.aliases)}`);
const viewerWrite = await expectError("SetModelAlias with a viewer token", () =>
  viewer.setModelAlias({ model: modelName, alias: "staging", version: "1.1.0" }),
);
check(viewerWrite.code === Code.PermissionDenied && viewerWrite.reason === "ROLE_TOO_LOW", `viewer write ${viewerWrite.reason}`);
check(tokenReads >= 6, `token function read per call (${tokenReads})`);
seen.auth = { noToken: noToken.reason, viewerWrite: viewerWrite.reason, tokenReads };

// 6. Deadlines: calls within a budget pass; a spent budget fails with DEADLINE_EXCEEDED instead of hanging.
const budgetEnd = Date.now() + 5_000;
const inBudget = await registry.getModel({ name: modelName }, until(budgetEnd));
check(inBudget.name === modelName, "call within its budget");
const late = await expectError("a call with a spent budget", () =>
  registry.listModelVersions({ parent: modelName }, until(Date.now() - 1_000)),
);
check(late.code === Code.DeadlineExceeded, `spent budget ${late.codeName}`);
seen.deadline = late.codeName;

// 7. A list, to see repeated messages and paging fields across the wire.
const versions = await registry.listModelVersions({ parent: modelName, pageSize: 1 });
check(versions.modelVersions.length === 1 && versions.nextPageToken !== "", "first page of one with a next token");
const rest = await registry.listModelVersions({ parent: modelName, pageSize: 1, pageToken: versions.nextPageToken });
check(rest.modelVersions.length === 1 && rest.modelVersions[0].version !== versions.modelVersions[0].version, "second page");

// 8. TLS: the same call without a client certificate (the CA only); a server requiring mTLS refuses the handshake.
if (tls) {
  const caOnly = { ca: tls.ca, serverName: tls.serverName };
  const noCert = createRegistryClient({ endpoint, token: adminToken, timeoutMs: 5_000, tls: caOnly });
  try {
    await noCert.getModel({ name: modelName });
    seen.withoutClientCertificate = { code: "OK" };
  } catch (err) {
    const e = errorDetails(err);
    seen.withoutClientCertificate = { code: e.codeName, message: e.message };
  }
}

console.log(JSON.stringify({ ok: true, ...seen }));
