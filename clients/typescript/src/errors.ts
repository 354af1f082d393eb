/**
 * Reading NeuroWeaver errors: servers answer with a canonical gRPC code and a `google.rpc.Status` in the
 * `grpc-status-details-bin` trailer carrying an `ErrorInfo{reason, domain, metadata}` and, for invalid fields,
 * a `BadRequest` with field violations. Connect decodes the trailer into `ConnectError.details`;
 * `errorDetails` unpacks it into plain values a caller can switch on.
 */
import { Code, ConnectError } from "@connectrpc/connect";

import { BadRequestSchema, ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";

export interface FieldViolation {
  field: string;
  description: string;
}

export interface ErrorDetails {
  /** Canonical gRPC code (Connect numbers them as gRPC does: NOT_FOUND = 5). */
  code: Code;
  /** Its name, for example `NotFound`. */
  codeName: string;
  /** The server's message, without Connect's `[code]` prefix. */
  message: string;
  /** `ErrorInfo.reason`, a stable UPPER_SNAKE identifier, for example `MODEL_NOT_FOUND`; empty when absent. */
  reason: string;
  /** `ErrorInfo.domain`, for example `registry.neuroweaver.v1`. */
  domain: string;
  metadata: Record<string, string>;
  fieldViolations: FieldViolation[];
}

/** Unpacks any thrown value into ErrorDetails (non-Connect errors come out as UNKNOWN with no reason). */
export function errorDetails(err: unknown): ErrorDetails {
  const ce = ConnectError.from(err);
  const [info] = ce.findDetails(ErrorInfoSchema);
  const fieldViolations = ce
    .findDetails(BadRequestSchema)
    .flatMap((br) => br.fieldViolations.map((v) => ({ field: v.field, description: v.description })));
  return {
    code: ce.code,
    codeName: Code[ce.code] ?? String(ce.code),
    message: ce.rawMessage,
    reason: info?.reason ?? "",
    domain: info?.domain ?? "",
    metadata: { ...(info?.metadata ?? {}) },
    fieldViolations,
  };
}
