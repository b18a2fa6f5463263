//! `istream serve`: load and validate the config before anything binds, build the components,
//! run them under one cancellation token, and drain on SIGINT/SIGTERM.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::AppState;
use crate::bus::{Bus, NatsBus};
use crate::config::{Config, StoreKind};
use crate::core::Engine;
use crate::registry::RegistryClient;
use crate::scheduler::Scheduler;
use crate::store::Store;
use crate::trigger::Triggers;

pub async fn run(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    if config.store.kind == StoreKind::Nats {
        anyhow::bail!(
            "{}: key `store.kind`: \"nats\" (the scale-out store) is not available in this version; use \"sqlite\"",
            config.path.display()
        );
    }
    let store = Store::open_sqlite(&config.store.path)?;
    let registry = Arc::new(RegistryClient::new(&config));
    let (engine, rx) = Engine::new(store.clone(), registry, &config);
    let bus = match &config.nats {
        Some(n) => Bus::Nats(Box::new(NatsBus::connect(n).await?)),
        None => Bus::InProcess,
    };
    let tls = match &config.server.tls {
        Some((cert, key)) => Some(
            crate::api::tls_acceptor(cert, key)
                .map_err(|e| anyhow::anyhow!("{}: [server] TLS: {e}", config.path.display()))?,
        ),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.server.listen))?;
    let addr = listener.local_addr()?;
    let (scheduler, sched_handle) = Scheduler::new(
        engine.clone(),
        config.schedule.interval.clone(),
        rx.spec_changes,
    );
    let triggers = Triggers::new(engine.clone(), &config.triggers, config.delivery.clone());
    let ready = Arc::new(AtomicBool::new(false));
    let state = AppState {
        engine: engine.clone(),
        config: config.clone(),
        scheduler: sched_handle,
        triggers: triggers.clone(),
        ready: ready.clone(),
        hooks: Arc::new(crate::hooks::HookState::new(config.hooks.max_concurrency)),
    };

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(crate::api::serve(listener, state, tls, cancel.clone()));
    if config.api_tokens.is_empty() {
        tracing::info!("no [[api.token]] declared: the API serves loopback clients only");
    }
    tracing::info!(address = %addr, store = %config.store.path.display(), "istream listening on {scheme}://{addr}");

    let to_import = engine.apply_declared(&config.streams).await?;
    {
        let engine = engine.clone();
        tracker.spawn(async move { engine.import_specs(to_import).await });
    }
    tracker.spawn(crate::bus::run_publisher(
        store.clone(),
        Arc::new(bus),
        engine.outbox.clone(),
        cancel.clone(),
    ));
    tracker.spawn(
        triggers
            .clone()
            .run_planner(rx.changed_tags, cancel.clone()),
    );
    tracker.spawn(triggers.clone().run_deliverer(cancel.clone()));
    tracker.spawn(scheduler.run(cancel.clone()));
    tracker.close();
    ready.store(true, Ordering::Relaxed);

    shutdown_signal().await;
    tracing::info!("shutting down");
    cancel.cancel();
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "some tasks did not stop within 10s; pending work resumes at the next start"
        );
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
