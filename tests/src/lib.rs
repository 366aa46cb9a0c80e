//! Harnesses for end-to-end tests against real peers.

pub mod kafka;
