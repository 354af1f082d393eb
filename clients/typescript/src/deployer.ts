// neuroweaver.deployer.v1: messages, enums and the DeployerService descriptor.
export * from "./gen/neuroweaver/deployer/v1/deployment_pb.js";
export * from "./gen/neuroweaver/deployer/v1/deployer_service_pb.js";
