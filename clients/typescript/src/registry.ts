// neuroweaver.registry.v1: messages, enums and the RegistryService descriptor.
export * from "./gen/neuroweaver/registry/v1/registry_pb.js";
export * from "./gen/neuroweaver/registry/v1/registry_service_pb.js";
// Shared enums of CreateModelVersionRequest.bump and Metric.direction.
export { MetricDirection, VersionBump } from "./common.js";
