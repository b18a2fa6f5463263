//! istream: OpenShift-style image streams and image change triggers for any registry and CI.
//!
//! Data flows one way:
//!
//! ```text
//! scheduler (due tags) ─┐
//! hooks (registry push) ├─► core (importer) ─► store (+outbox) ─► bus ─► trigger ─► sinks
//! api / cli (tag, import)┘
//! ```
//!
//! - [`model`]: references, the image stream document, CloudEvents. Pure.
//! - [`config`]: `triggers.toml` parsed, validated, with file/line/key in every error.
//! - [`registry`]: the OCI distribution client (HEAD digests, auth, per-host budgets).
//! - [`core`]: the one write path (import, tag, alias, rollback, delete, push).
//! - [`store`]: durable state; SQLite embedded default, JetStream for replicas.
//! - [`cluster`]: membership and ownership when replicas share the JetStream store.
//! - [`scheduler`]: due-time queue of scheduled tags.
//! - [`bus`]: the outbox publisher (in-process or NATS/JetStream).
//! - [`trigger`]: firing rule, delivery queue, sinks (webhook, GitHub, GitLab, Jenkins).
//! - [`hooks`]: registry notification parsers.
//! - [`memory`]: allocator settings that keep resident memory near what is live.
//! - [`api`]: the HTTP server; [`cli`]: the `oc`-style client; [`serve`]: wiring and lifecycle.
// One module (`memory`) calls two glibc functions; everything else is safe code.
#![deny(unsafe_code)]

pub mod api;
pub mod bus;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod core;
pub mod hooks;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod registry;
pub mod retry;
mod robustness;
pub mod scheduler;
pub mod serve;
pub mod store;
pub mod trigger;
mod ui;
