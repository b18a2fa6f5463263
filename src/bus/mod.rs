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

/// Publishes every committed event, in order: as the commits hand them over (`Handoff`),
/// and by draining the outbox at start, after a failure, when woken for events that were not
/// handed over, and every few seconds. A failure stops publishing from memory until a drain
/// has caught up (retried with backoff), so per-tag order holds and nothing is skipped.
/// Events published from memory leave the outbox with their stream's next commit or, a moment
/// later, in the background (`Marker`); one that a drain meets again meanwhile is not sent
/// twice (`Recent`).
pub async fn run_publisher(
    store: Store,
    bus: Arc<Bus>,
    wake: Arc<tokio::sync::Notify>,
    cancel: CancellationToken,
) {
    let mut handed = store.attach_publisher(wake.clone());
    let marker = Marker::start(store.clone());
    let mut p = Publisher {
        store: store.clone(),
        bus,
        stream_ready: false,
        recent: Recent::default(),
        marker,
    };
    p.stream_ready = matches!(&*p.bus, Bus::Nats(n) if n.js.is_none());
    let mut retry = crate::retry::Retry::new(crate::retry::Backoff::new(
        Duration::from_millis(100),
        Duration::from_secs(5),
    ));
    let mut draining = true;
    loop {
        if draining {
            // What was handed over so far is in the outbox too: the drain sends it.
            while let Ok(b) = handed.try_recv() {
                store.unhand(&b.iter().map(|(s, _)| *s).collect::<Vec<_>>());
            }
            p.marker.flush().await;
            let batch = match store.pending_events(256).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the outbox");
                    Vec::new()
                }
            };
            let ok = p.send(&batch).await;
            p.marker.flush().await;
            if let Ok(d) = store.outbox_depth().await {
                crate::metrics::outbox_depth(d);
            }
            if !ok {
                let backoff = retry.failed(None);
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
        }
        // Caught up: publish from memory until a failure or a wake asks for a drain.
        tokio::select! {
            _ = cancel.cancelled() => {
                p.marker.flush().await;
                return;
            }
            b = handed.recv() => match b {
                Some(batch) => draining = !p.send(&batch).await,
                None => draining = true,
            },
            _ = wake.notified() => draining = true,
            _ = tokio::time::sleep(Duration::from_secs(5)) => draining = true,
        }
    }
}

struct Publisher {
    store: Store,
    bus: Arc<Bus>,
    stream_ready: bool,
    recent: Recent,
    marker: Marker,
}

impl Publisher {
    /// Publishes `batch` in order up to the first failure; false if there was one (the rest
    /// stays in the outbox). Published events are queued for marking.
    async fn send(&mut self, batch: &[(i64, Event)]) -> bool {
        let mut published = Vec::with_capacity(batch.len());
        let mut ok = true;
        for (i, (seq, e)) in batch.iter().enumerate() {
            if !self.recent.contains(&e.id) {
                let res = match &*self.bus {
                    Bus::InProcess => Ok(()),
                    Bus::Nats(n) => n.publish(e, &mut self.stream_ready).await,
                };
                if let Err(err) = res {
                    tracing::warn!(error = %err, "event not published yet; it stays in the outbox");
                    if let Bus::Nats(n) = &*self.bus
                        && n.js.is_some()
                    {
                        self.stream_ready = false;
                    }
                    ok = false;
                    let rest: Vec<i64> = batch[i..].iter().map(|(s, _)| *s).collect();
                    self.store.unhand(&rest);
                    break;
                }
                crate::metrics::event_published(
                    if matches!(&*self.bus, Bus::InProcess) {
                        "inprocess"
                    } else {
                        "nats"
                    },
                    &e.kind,
                );
                self.recent.insert(e.id.clone());
            }
            published.push(*seq);
        }
        self.store.note_published(&published);
        self.marker.mark(published);
        ok
    }
}

/// The ids of the events published lately (bounded), so that one published from memory and
/// met again by a drain before it left the outbox is not sent twice.
#[derive(Default)]
struct Recent {
    order: std::collections::VecDeque<String>,
    ids: std::collections::HashSet<String>,
}

impl Recent {
    const KEEP: usize = 4096;

    fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    fn insert(&mut self, id: String) {
        if self.ids.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > Self::KEEP
                && let Some(old) = self.order.pop_front()
            {
                self.ids.remove(&old);
            }
        }
    }
}

/// Takes published events off the outbox in the background, batching what accumulates
/// while a write is under way, so that publishing never waits for it. A lost mark only
/// means a re-send with the same id after a restart (JetStream drops the duplicate).
const MARK_DELAY: Duration = Duration::from_millis(25);

struct Marker {
    tx: tokio::sync::mpsc::UnboundedSender<(Vec<i64>, Option<tokio::sync::oneshot::Sender<()>>)>,
}

impl Marker {
    fn start(store: Store) -> Marker {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(
            Vec<i64>,
            Option<tokio::sync::oneshot::Sender<()>>,
        )>();
        tokio::spawn(async move {
            while let Some((mut seqs, done)) = rx.recv().await {
                let mut waiters: Vec<_> = done.into_iter().collect();
                // Deferred a little: a busy stream's next commit usually takes its published
                // events out of the outbox first, and the marks of a burst go out together.
                if waiters.is_empty() {
                    tokio::time::sleep(MARK_DELAY).await;
                }
                while let Ok((more, done)) = rx.try_recv() {
                    seqs.extend(more);
                    waiters.extend(done);
                }
                if !seqs.is_empty()
                    && let Err(e) = store.mark_published(seqs).await
                {
                    tracing::error!(error = %e, "cannot mark events published; they will be re-sent with the same id");
                }
                for w in waiters {
                    let _ = w.send(());
                }
            }
        });
        Marker { tx }
    }

    fn mark(&self, seqs: Vec<i64>) {
        if !seqs.is_empty() {
            let _ = self.tx.send((seqs, None));
        }
    }

    /// Waits until everything queued so far is marked (a drain reads the outbox after it).
    async fn flush(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.tx.send((Vec::new(), Some(done))).is_ok() {
            let _ = wait.await;
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
