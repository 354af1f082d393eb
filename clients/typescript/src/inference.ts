// neuroweaver.inference.v1: messages, enums and the InferenceService (model server) descriptor.
export * from "./gen/neuroweaver/inference/v1/inference_pb.js";
export * from "./gen/neuroweaver/inference/v1/inference_service_pb.js";
