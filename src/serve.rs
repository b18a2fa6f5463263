//! `istream serve`: load and validate the config before anything binds, build the components,
//! run them under one cancellation token, and drain on SIGINT/SIGTERM.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::AppState;
use crate::bus::{Bus, NatsBus};
use crate::cluster::Cluster;
use crate::config::{Config, StoreKind};
use crate::core::Engine;
use crate::registry::RegistryClient;
use crate::scheduler::Scheduler;
use crate::store::Store;
use crate::store::nats::NatsStore;
use crate::trigger::Triggers;

pub async fn run(config: Config) -> anyhow::Result<()> {
    crate::metrics::init(&config);
    let config = Arc::new(config);
    let bus = match &config.nats {
        Some(n) => Bus::Nats(Box::new(NatsBus::connect(n).await?)),
        None => Bus::InProcess,
    };
    let (store, shared) = match (&config.store.kind, &bus) {
        (StoreKind::Sqlite, _) => (Store::open_sqlite(&config.store.path)?, None),
        (StoreKind::Nats, Bus::Nats(nats)) => {
            let cfg = config.nats.as_ref().expect("bus from [nats]");
            if !cfg.jetstream {
                anyhow::bail!(
                    "{}: key `nats.jetstream`: false cannot hold state; store.kind = \"nats\" needs JetStream",
                    config.path.display()
                );
            }
            let (store, cluster) = open_shared(nats.client(), cfg, &config).await?;
            (Store::Nats(store.clone()), Some((store, cluster)))
        }
        (StoreKind::Nats, Bus::InProcess) => anyhow::bail!(
            "{}: key `store.kind`: \"nats\" needs a [nats] section with the JetStream server to keep state in",
            config.path.display()
        ),
    };
    let registry = Arc::new(RegistryClient::new(&config));
    let (engine, rx) = Engine::new(
        store.clone(),
        registry,
        &config,
        shared.as_ref().map(|(_, c)| c.clone()),
    );
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
    // Before the planner's start-up pass (below), so every change is fired by one of them.
    let sink: Arc<dyn crate::core::FireSink> = triggers.clone();
    engine.set_fire_sink(Arc::downgrade(&sink));
    let ready = Arc::new(AtomicBool::new(false));
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let state = AppState {
        tasks: tracker.clone(),
        shutdown: cancel.clone(),
        engine: engine.clone(),
        config: config.clone(),
        scheduler: sched_handle,
        triggers: triggers.clone(),
        ready: ready.clone(),
        hooks: Arc::new(crate::hooks::HookState::new(config.hooks.max_concurrency)),
    };

    let state_for_hints = state.clone();
    tracker.spawn(crate::api::serve(listener, state, tls, cancel.clone()));
    if config.api_tokens.is_empty() {
        tracing::info!("no [[api.token]] declared: the API serves loopback clients only");
    }
    match &shared {
        Some((_, cluster)) => {
            tracing::info!(address = %addr, store = "nats", replica = cluster.id(), replicas = cluster.members().len(), "istream listening on {scheme}://{addr}")
        }
        None => {
            tracing::info!(address = %addr, store = %config.store.path.display(), "istream listening on {scheme}://{addr}")
        }
    }

    // Before anything reads the store: what the watcher must still announce starts here.
    let start_rev = match &shared {
        Some((store, _)) => store.last_revision().await?,
        None => 0,
    };
    let to_import = engine.apply_declared(&config.streams).await?;
    crate::memory::trim();
    {
        let engine = engine.clone();
        tracker.spawn(async move {
            engine.import_specs(to_import).await;
            crate::memory::trim();
        });
    }
    tracker.spawn(crate::bus::run_publisher(
        store.clone(),
        Arc::new(bus),
        engine.outbox_wake(),
        cancel.clone(),
    ));
    tracker.spawn(
        triggers
            .clone()
            .run_planner(rx.changed_tags, cancel.clone()),
    );
    tracker.spawn(triggers.clone().run_deliverer(cancel.clone()));
    tracker.spawn(scheduler.run(cancel.clone()));
    tracker.spawn(crate::memory::run_trimmer(cancel.clone()));
    tracker.spawn(run_retention(
        store.clone(),
        config.delivery.retention,
        cancel.clone(),
    ));
    if let Some((store, cluster)) = shared {
        tracker.spawn(crate::cluster::run_watcher(
            engine.clone(),
            store,
            cluster.clone(),
            start_rev,
            cancel.clone(),
        ));
        tracker.spawn(cluster.run(cancel.clone()));
    }
    crate::hooks::resume_hints(&state_for_hints).await;
    tracker.close();
    ready.store(true, Ordering::Relaxed);

    shutdown_signal().await;
    tracing::info!("shutting down");
    cancel.cancel();
    // The HTTP server drains for up to its grace period; the rest stop at the cancel.
    if tokio::time::timeout(
        crate::api::SHUTDOWN_GRACE + Duration::from_secs(5),
        tracker.wait(),
    )
    .await
    .is_err()
    {
        tracing::warn!(
            "some tasks did not stop within 10s; pending work resumes at the next start"
        );
    }
    Ok(())
}

/// Opens the JetStream store and joins the replicas, waiting up to 30 s for NATS: replicas
/// often start together with their NATS cluster.
async fn open_shared(
    client: async_nats::Client,
    cfg: &crate::config::NatsConfig,
    config: &Config,
) -> anyhow::Result<(Arc<NatsStore>, Arc<Cluster>)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let opened = async {
            let store = NatsStore::open(
                client.clone(),
                cfg,
                crate::store::nats::ack_wait(
                    config
                        .triggers
                        .iter()
                        .map(|t| t.timeout)
                        .fold(config.delivery.timeout, Duration::max),
                ),
            )
            .await?;
            let cluster = Cluster::join(client.clone(), cfg).await?;
            Ok::<_, crate::store::StoreError>((Arc::new(store), cluster))
        }
        .await;
        match opened {
            Ok(v) => return Ok(v),
            // Unreadable or newer data does not get better by waiting.
            Err(e @ crate::store::StoreError::Corrupt(_)) => {
                anyhow::bail!("{}: [store] kind = \"nats\": {e}", config.path.display())
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "cannot open the JetStream store yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => anyhow::bail!("{}: [store] kind = \"nats\": {e}", config.path.display()),
        }
    }
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

/// Once an hour, drops settled deliveries older than `[delivery] retention` (the same rule in
/// both stores; pending and dead ones are never dropped).
async fn run_retention(store: Store, retention: Duration, cancel: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = every.tick() => {
                let cutoff = chrono::Utc::now().timestamp_millis()
                    - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
                match store.purge_settled(cutoff).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deliveries = n, ?retention, "settled deliveries past their retention dropped"),
                    Err(e) => tracing::warn!(error = %e, "cannot drop old settled deliveries; trying again in an hour"),
                }
            }
        }
    }
}
