//! ONNX runtime, model registry and the offers engine.
//!
//! [`offers`]: presence events to offer decisions, with HQ's campaigns, prices, frequency caps
//! and budget leases, offline. The ONNX runtime and the model registry come with their issues.

pub mod offers;
