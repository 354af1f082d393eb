// neuroweaver.experiments.v1: messages, enums and the ExperimentsService descriptor.
export * from "./gen/neuroweaver/experiments/v1/experiment_pb.js";
export * from "./gen/neuroweaver/experiments/v1/experiments_service_pb.js";
// Shared enum of MetricSpec.direction.
export { MetricDirection } from "./common.js";
