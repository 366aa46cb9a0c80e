//! ONNX runtime, model registry and offers engine. Filled by their issue.
