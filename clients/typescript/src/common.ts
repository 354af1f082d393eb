// neuroweaver.common.v1: the enums the services share (VersionBump, MetricDirection). The registry, trainer and
// experiments namespaces re-export the ones they use, so `registryv1.MetricDirection` and `commonv1.MetricDirection`
// are the same enum.
export * from "./gen/neuroweaver/common/v1/common_pb.js";
