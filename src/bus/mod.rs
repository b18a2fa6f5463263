//! The bus: publishes the outbox, in order, to where subscribers are. In-process (the embedded
//! default) means the commit-time broadcast `watch` reads from is all there is; with `[nats]`
//! every event also goes to NATS — JetStream with `Nats-Msg-Id` = event id and an awaited ack
//! (so a retry never duplicates), or core NATS fire-and-forget. An event leaves the outbox only
//! once published; while NATS is down they wait there and go out in order when it is back.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::NatsConfig;
use crate::model::Event;
use crate::store::Store;

/// Errors talking to NATS. `Unavailable` is retried by the publisher; `TooOld` and `Setup`
/// stop the engine at start.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error(
        "NATS server at {url} is version {version}; istream needs nats-server 2.10 or newer for JetStream"
    )]
    TooOld { url: String, version: String },
    #[error("NATS at {url}: {detail}")]
    Setup { url: String, detail: String },
    #[error("NATS publish of {subject}: {detail}")]
    Unavailable { subject: String, detail: String },
}

pub enum Bus {
    InProcess,
    Nats(Box<NatsBus>),
}

pub struct NatsBus {
    cfg: NatsConfig,
    client: async_nats::Client,
    js: Option<async_nats::jetstream::Context>,
}

/// The servers of `[nats] url`: one URL, or several separated by commas (the nodes of a
/// cluster; the client fails over between them).
pub fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| format!("\"{u}\" is not a NATS server URL: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|v| {
            if v.is_empty() {
                Err("no NATS server URL given".into())
            } else {
                Ok(v)
            }
        })
}

/// `major.minor` at least 2.10.
pub fn version_ok(v: &str) -> bool {
    let mut parts = v
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 10)
}

impl NatsBus {
    /// Connects, checks the server version and sets up the JetStream stream. An unreachable
    /// server is not fatal (the client keeps reconnecting; events wait in the outbox), an old
    /// server is.
    pub async fn connect(cfg: &NatsConfig) -> Result<NatsBus, BusError> {
        let setup = |detail: String| BusError::Setup {
            url: cfg.url.clone(),
            detail,
        };
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(server_addrs(&cfg.url).map_err(&setup)?)
            .await
            .map_err(|e| setup(e.to_string()))?;
        // Wait briefly for the first connection, to check the version when we can.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while client.connection_state() != async_nats::connection::State::Connected
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        if connected {
            let version = client.server_info().version;
            if !version_ok(&version) {
                return Err(BusError::TooOld {
                    url: cfg.url.clone(),
                    version,
                });
            }
        } else {
            tracing::warn!(url = %cfg.url, "NATS is not reachable yet; events wait in the outbox until it is");
        }
        let js = if cfg.jetstream {
            let js = async_nats::jetstream::new(client.clone());
            if connected {
                ensure_stream(&js, cfg).await.map_err(setup)?;
            }
            Some(js)
        } else {
            None
        };
        Ok(NatsBus {
            cfg: cfg.clone(),
            client,
            js,
        })
    }

    pub fn client(&self) -> async_nats::Client {
        self.client.clone()
    }

    async fn publish(&self, e: &Event, stream_ready: &mut bool) -> Result<(), BusError> {
        let subject = e.subject(&self.cfg.subject_prefix);
        let unavailable = |detail: String| BusError::Unavailable {
            subject: subject.clone(),
            detail,
        };
        let payload = serde_json::to_vec(e).map_err(|x| unavailable(x.to_string()))?;
        match &self.js {
            Some(js) => {
                if !*stream_ready {
                    ensure_stream(js, &self.cfg).await.map_err(unavailable)?;
                    *stream_ready = true;
                }
                let msg = async_nats::jetstream::message::PublishMessage::build()
                    .payload(payload.into())
                    .message_id(&e.id);
                let ack = js
                    .send_publish(subject.clone(), msg)
                    .await
                    .map_err(|x| unavailable(x.to_string()))?;
                ack.await.map_err(|x| unavailable(x.to_string()))?;
            }
            None => {
                self.client
                    .publish(subject.clone(), payload.into())
                    .await
                    .map_err(|x| unavailable(x.to_string()))?;
            }
        }
        Ok(())
    }
}

async fn ensure_stream(
    js: &async_nats::jetstream::Context,
    cfg: &NatsConfig,
) -> Result<(), String> {
    let config = async_nats::jetstream::stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![format!("{}.>", cfg.subject_prefix)],
        storage: async_nats::jetstream::stream::StorageType::File,
        max_age: cfg.max_age,
        num_replicas: cfg.replicas,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    js.create_or_update_stream(config)
        .await
        .map(|_| ())
        .map_err(|e| format!("cannot create or update stream {}: {e}", cfg.stream))
}

/// Drains the outbox to the bus, in order; stops at the first failure and retries with
/// backoff, so per-tag order holds and nothing is skipped.
pub async fn run_publisher(
    store: Store,
    bus: Arc<Bus>,
    wake: Arc<tokio::sync::Notify>,
    cancel: CancellationToken,
) {
    let mut retry = crate::retry::Retry::new(crate::retry::Backoff::new(
        Duration::from_millis(100),
        Duration::from_secs(5),
    ));
    let mut backoff = Duration::ZERO;
    let mut stream_ready = matches!(&*bus, Bus::Nats(n) if n.js.is_none());
    loop {
        let batch = match store.pending_events(256).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the outbox");
                Vec::new()
            }
        };
        let mut published = Vec::new();
        let mut failed = false;
        for (seq, e) in &batch {
            let res = match &*bus {
                Bus::InProcess => Ok(()),
                Bus::Nats(n) => n.publish(e, &mut stream_ready).await,
            };
            match res {
                Ok(()) => {
                    crate::metrics::event_published(
                        if matches!(&*bus, Bus::InProcess) {
                            "inprocess"
                        } else {
                            "nats"
                        },
                        &e.kind,
                    );
                    published.push(*seq);
                }
                Err(err) => {
                    backoff = retry.failed(None);
                    tracing::warn!(error = %err, retry_in = ?backoff, "event not published yet; it stays in the outbox");
                    failed = true;
                    if let Bus::Nats(n) = &*bus
                        && n.js.is_some()
                    {
                        stream_ready = false;
                    }
                    break;
                }
            }
        }
        if !published.is_empty()
            && let Err(e) = store.mark_published(published).await
        {
            tracing::error!(error = %e, "cannot mark events published; they will be re-sent with the same id");
        }
        if let Ok(d) = store.outbox_depth().await {
            crate::metrics::outbox_depth(d);
        }
        if failed {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            continue;
        }
        retry.succeeded();
        if batch.len() == 256 {
            continue;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions() {
        assert!(super::version_ok("2.10.0"));
        assert!(super::version_ok("2.15.1"));
        assert!(super::version_ok("3.0.0"));
        assert!(!super::version_ok("2.9.10"));
        assert!(!super::version_ok("garbage"));
    }
}
