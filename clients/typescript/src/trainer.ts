// neuroweaver.trainer.v1: messages, enums and the TrainerService descriptor.
export * from "./gen/neuroweaver/trainer/v1/training_job_pb.js";
export * from "./gen/neuroweaver/trainer/v1/trainer_service_pb.js";
// Shared enum of TrainingJob.version_bump.
export { VersionBump } from "./common.js";
