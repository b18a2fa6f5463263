//! Integration tests: the real `istream` binary against a real registry, NATS and a local
//! receiver. One test binary (one link) with a module per area.
// Test and benchmark code: a failed unwrap is a failed run, which is what it should be.
#![allow(clippy::unwrap_used, unreachable_pub)]

mod support;

mod access;
mod bad_input;
mod cluster;
mod events;
mod hooks;
mod ops;
mod policy;
mod registries;
mod scheduler;
mod triggers;
mod ui;
mod upgrade;
mod walkthrough;
