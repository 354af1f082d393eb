// google.rpc.Status and the error detail messages (ErrorInfo, BadRequest, ...) NeuroWeaver servers send.
export * from "./gen/google/rpc/status_pb.js";
export * from "./gen/google/rpc/error_details_pb.js";
