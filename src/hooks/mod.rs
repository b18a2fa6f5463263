//! Registry push notifications in: `/hooks/registry` (CNCF distribution envelope),
//! `/hooks/harbor` (default and CloudEvents payloads), `/hooks/dockerhub`, `/hooks/quay`.
//! A notification is a hint: the pushed tag is re-checked against the registry by the write
//! path (cause `push`). Bursts for one tag collapse into one re-check plus one after it.

mod parse;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::api::{ApiError, AppState};
use crate::config::Secret;
use crate::model::{StreamName, StreamTagRef};
use crate::store::{Hint, Store, StoreError};
pub use parse::Push;

/// The payload parsers, for the robustness tests and the fuzz targets.
#[doc(hidden)]
/// The parsers with a default context (registry `registry.example`), for fuzzing.
pub fn parse_for_fuzz(source: &str, body: &[u8]) -> Result<parse::Parsed, String> {
    let ctx = parse::Context {
        registry: Some("registry.example".into()),
        subdomain: false,
    };
    parse::parse(source, body, &ctx)
}

/// The senders `/hooks/<source>` takes.
pub const SOURCES: [&str; 11] = [
    "registry",
    "harbor",
    "dockerhub",
    "quay",
    "ghcr",
    "gitea",
    "artifactory",
    "nexus",
    "acr",
    "ecr",
    "gar",
];

/// How a sender proves it knows the hook secret.
#[derive(Clone, Copy)]
enum Proof {
    /// The secret itself: `Authorization: Bearer`, `X-Istream-Token` or `?token=`.
    Token,
    /// `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>` (GitHub).
    GithubHmac,
    /// `X-Gitea-Signature` / `X-Forgejo-Signature`: hex HMAC-SHA256 of the body.
    GiteaHmac,
    /// `X-JFrog-Event-Auth`: the secret, or (payload signing) hex HMAC-SHA256 of the body.
    Jfrog,
    /// `X-Nexus-Webhook-Signature`: hex HMAC-SHA1 of the body.
    NexusHmac,
}

fn proof_of(source: &str) -> Proof {
    match source {
        "ghcr" => Proof::GithubHmac,
        "gitea" => Proof::GiteaHmac,
        "artifactory" => Proof::Jfrog,
        "nexus" => Proof::NexusHmac,
        _ => Proof::Token,
    }
}

fn hmac_hex<M: hmac::Mac + hmac::digest::KeyInit>(key: &[u8], body: &[u8]) -> String {
    let mut m = <M as hmac::digest::KeyInit>::new_from_slice(key).expect("HMAC takes any key");
    m.update(body);
    hex::encode(m.finalize().into_bytes())
}

/// Constant-time comparison of a presented hex signature with the expected one.
fn same_hex(presented: Option<&str>, expected: &str) -> bool {
    presented.is_some_and(|p| {
        bool::from(
            p.trim()
                .to_ascii_lowercase()
                .as_bytes()
                .ct_eq(expected.as_bytes()),
        )
    })
}

/// The event header a sender uses to say what happened, and the one value that is a push
/// notification; any other event is acknowledged and ignored.
fn wanted_event(source: &str) -> Option<(&'static [&'static str], &'static str)> {
    match source {
        "ghcr" => Some((&["x-github-event"], "package")),
        "gitea" => Some((&["x-gitea-event", "x-forgejo-event"], "package")),
        "nexus" => Some((&["x-nexus-webhook-id"], "rm:repository:component")),
        _ => None,
    }
}

/// A re-check under way: the run asked for meanwhile, and the hint writes it covers.
type Running = (Option<Rerun>, Vec<Written>);

#[derive(Default)]
pub struct HookState {
    /// Re-checks running per `registry/repo:tag`, with the run asked for by pushes that
    /// arrived meanwhile and the recording of their hints.
    running: Mutex<HashMap<String, Running>>,
    /// The digest each recent re-check found per `registry/repo:tag`: a notification naming
    /// it again within `CONFIRMED_FOR` (a registry's retry, a second endpoint, a replay) costs
    /// no registry request.
    confirmed: Mutex<HashMap<String, (String, std::time::Instant)>>,
    limit: Option<Arc<tokio::sync::Semaphore>>,
    /// Group commit of push hints: notifications that arrive together are recorded in one
    /// store transaction, so a burst does not queue behind a write per request.
    writer: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<HintOp>>,
}

/// What the hint writer is asked to do, in order.
enum HintOp {
    Write(
        Vec<Hint>,
        tokio::sync::watch::Sender<Option<Result<(), StoreError>>>,
    ),
    Drop(String),
}

/// The outcome of recording a notification's hints, once written: awaited by the request
/// (its answer), and read by later notifications of a tag whose re-check it joined (with
/// the hint written, they need not write one).
type Written = tokio::sync::watch::Receiver<Option<Result<(), StoreError>>>;

async fn written(mut w: Written) -> Result<(), StoreError> {
    match w.wait_for(Option::is_some).await {
        Ok(r) => r.clone().unwrap_or(Ok(())),
        Err(_) => Err(StoreError::Backend("the hint writer stopped".into())),
    }
}

/// How long a re-check's answer stands for notifications that name the same digest.
const CONFIRMED_FOR: std::time::Duration = std::time::Duration::from_secs(30);
/// Beyond this many remembered answers, expired ones are dropped.
const CONFIRMED_MAX: usize = 10_000;

impl HookState {
    /// The hint writer: one task that applies hint writes and drops in the order they were
    /// asked for, writes that arrive together in one store transaction (group commit: a
    /// burst does not queue behind a write per request). The order is what keeps a hint
    /// written for a new notification from being dropped by the re-check before it.
    fn writer(&self, store: &Store) -> &tokio::sync::mpsc::UnboundedSender<HintOp> {
        self.writer.get_or_init(|| {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<HintOp>();
            let store = store.clone();
            // Not in the task tracker on purpose: it ends when the hook state goes, and the
            // requests waiting on it are tracked (they hold their answer until it has written).
            tokio::spawn(async move {
                while let Some(first) = rx.recv().await {
                    let mut ops = vec![first];
                    while ops.len() < 256
                        && let Ok(more) = rx.try_recv()
                    {
                        ops.push(more);
                    }
                    let mut ops = ops.into_iter().peekable();
                    while ops.peek().is_some() {
                        let mut writes = Vec::new();
                        while let Some(HintOp::Write(hints, done)) =
                            ops.next_if(|o| matches!(o, HintOp::Write(..)))
                        {
                            writes.push((hints, done));
                        }
                        if !writes.is_empty() {
                            // One row per key: the latest notification's digest.
                            let mut by_key: std::collections::BTreeMap<String, Hint> =
                                Default::default();
                            for h in writes.iter().flat_map(|(h, _)| h.iter()) {
                                by_key.insert(h.key(), h.clone());
                            }
                            let result = store.record_hints(by_key.into_values().collect()).await;
                            for (_, done) in writes {
                                done.send_replace(Some(result.clone()));
                            }
                        }
                        while let Some(HintOp::Drop(key)) =
                            ops.next_if(|o| matches!(o, HintOp::Drop(..)))
                        {
                            match store.drop_hint(&key).await {
                                Ok(()) => tracing::debug!(hint = %key, "push hint dropped"),
                                Err(e) => {
                                    tracing::warn!(hint = %key, error = %e, "cannot drop a re-checked push hint; it is re-checked again at the next start")
                                }
                            }
                        }
                    }
                }
            });
            tx
        })
    }

    /// Records `hints` durably, together with those of concurrent notifications.
    fn record(&self, store: &Store, hints: Vec<Hint>) -> Written {
        let (done, wait) = tokio::sync::watch::channel(None);
        // A writer gone drops `done`: the waiters see it stopped.
        let _ = self.writer(store).send(HintOp::Write(hints, done));
        wait
    }

    /// Drops the hint of `key` after the writes asked for before.
    fn drop_hint(&self, store: &Store, key: String) {
        let _ = self.writer(store).send(HintOp::Drop(key));
    }

    /// Whether a notification that came during the running re-check of `key` (for
    /// `digest`) names another image: the tag moves on to that one, which the next run looks
    /// for. A repeat, or one that names no image, does not end the looks for `digest`.
    fn newer_waiting(&self, key: &str, digest: Option<&str>) -> bool {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.get(key).is_some_and(|(again, _)| {
            again
                .as_ref()
                .and_then(|r| r.0.as_deref())
                .is_some_and(|newer| Some(newer) != digest)
        })
    }

    fn already_confirmed(&self, key: &str, digest: Option<&str>) -> bool {
        let Some(d) = digest else { return false };
        let confirmed = self.confirmed.lock().unwrap_or_else(|e| e.into_inner());
        confirmed
            .get(key)
            .is_some_and(|(seen, at)| seen == d && at.elapsed() < CONFIRMED_FOR)
    }

    fn confirm(&self, key: &str, digest: Option<String>) {
        let mut confirmed = self.confirmed.lock().unwrap_or_else(|e| e.into_inner());
        match digest {
            Some(d) => {
                if confirmed.len() >= CONFIRMED_MAX {
                    confirmed.retain(|_, (_, at)| at.elapsed() < CONFIRMED_FOR);
                }
                confirmed.insert(key.to_string(), (d, std::time::Instant::now()));
            }
            None => {
                confirmed.remove(key);
            }
        }
    }

    pub fn new(max_concurrency: usize) -> HookState {
        HookState {
            running: Mutex::new(HashMap::new()),
            confirmed: Mutex::new(HashMap::new()),
            writer: std::sync::OnceLock::new(),
            limit: Some(Arc::new(tokio::sync::Semaphore::new(
                max_concurrency.max(1),
            ))),
        }
    }
}

fn authorized(
    s: &AppState,
    source: &str,
    headers: &HeaderMap,
    query: Option<&str>,
    body: &[u8],
    peer: SocketAddr,
) -> bool {
    let secret: Option<&Secret> = s.config.hooks.tokens.get(source).or(s
        .config
        .hooks
        .token
        .as_ref());
    let Some(secret) = secret else {
        // No secret configured: like the API, serve loopback peers only.
        return peer.ip().is_loopback();
    };
    type Sha256Mac = hmac::Hmac<sha2::Sha256>;
    let key = secret.expose().as_bytes();
    let header = |n: &str| crate::api::header_str(headers, n);
    match proof_of(source) {
        Proof::GithubHmac => {
            let sig = header("x-hub-signature-256").and_then(|v| v.trim().strip_prefix("sha256="));
            return same_hex(sig, &hmac_hex::<Sha256Mac>(key, body));
        }
        Proof::GiteaHmac => {
            let sig = header("x-gitea-signature").or_else(|| header("x-forgejo-signature"));
            return same_hex(sig, &hmac_hex::<Sha256Mac>(key, body));
        }
        Proof::NexusHmac => {
            let sig = header("x-nexus-webhook-signature");
            return same_hex(sig, &hmac_hex::<hmac::Hmac<sha1::Sha1>>(key, body));
        }
        Proof::Jfrog => {
            let auth = header("x-jfrog-event-auth");
            return auth.is_some_and(|a| bool::from(a.trim().as_bytes().ct_eq(key)))
                || same_hex(auth, &hmac_hex::<Sha256Mac>(key, body));
        }
        Proof::Token => {}
    }
    let presented = crate::api::header_str(headers, "authorization")
        .map(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .unwrap_or(v)
                .trim()
        })
        // Harbor sends its "auth header" verbatim; a dedicated header is accepted too, and a
        // `?token=` query for Docker Hub and Quay, whose webhooks can set no header at all.
        .or_else(|| crate::api::header_str(headers, "x-istream-token"))
        .or_else(|| query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token="))));
    presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(secret.expose().as_bytes())))
}

pub async fn handle(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(source): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !SOURCES.contains(&source.as_str()) {
        return ApiError(
            StatusCode::NOT_FOUND,
            format!("unknown hook source \"{source}\" ({})", SOURCES.join(", ")),
        )
        .into_response();
    }
    if !authorized(&s, &source, &headers, query.as_deref(), &body, peer) {
        crate::metrics::hook(&source, "unauthorized");
        let how = match proof_of(&source) {
            Proof::Token => "the hook token (Authorization: Bearer, X-Istream-Token or ?token=)",
            Proof::GithubHmac => "a valid X-Hub-Signature-256",
            Proof::GiteaHmac => "a valid X-Gitea-Signature or X-Forgejo-Signature",
            Proof::Jfrog => "a valid X-JFrog-Event-Auth",
            Proof::NexusHmac => "a valid X-Nexus-Webhook-Signature",
        };
        return ApiError(
            StatusCode::UNAUTHORIZED,
            format!("/hooks/{source} needs {how}"),
        )
        .into_response();
    }
    if let Some((names, want)) = wanted_event(&source) {
        let event = names
            .iter()
            .find_map(|n| crate::api::header_str(&headers, n));
        if event.is_some_and(|e| e != want) {
            crate::metrics::hook(&source, "accepted");
            return (
                StatusCode::OK,
                axum::Json(serde_json::json!({"accepted": true, "ignored": format!("event {}", event.unwrap_or(""))})),
            )
                .into_response();
        }
    }
    let ctx = parse::Context {
        registry: s.config.hooks.registries.get(source.as_str()).cloned(),
        subdomain: source == "artifactory" && s.config.hooks.artifactory_subdomain,
    };
    let mut pushes = match parse::parse(&source, &body, &ctx) {
        Ok(p) => {
            for why in &p.skipped {
                tracing::warn!(source = %source, reason = %why, "hook event skipped; the others are handled");
            }
            p.pushes
        }
        Err(e) => {
            crate::metrics::hook(&source, "malformed");
            return ApiError(StatusCode::BAD_REQUEST, format!("/hooks/{source}: {e}"))
                .into_response();
        }
    };
    pushes.retain(|p| !s.hooks.already_confirmed(&hint_key(p), p.digest.as_deref()));
    // Durable before the answer: a crash after the 2xx leaves the hints for the next start.
    // A store that cannot take them answers 503, so the sender delivers again. The re-checks
    // need not wait for the write (a hint is only a reminder), so they start with it.
    let n = pushes.len();
    if let Some(recorded) = record_and_recheck(&s, pushes)
        && let Err(e) = written(recorded).await
    {
        tracing::error!(source = %source, error = %e, "cannot record push hints");
        return ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("/hooks/{source}: cannot record the notification yet ({e}); send it again"),
        )
        .into_response();
    }
    crate::metrics::hook(&source, "accepted");
    tracing::debug!(source = %source, pushes = n, "hook accepted");
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({"accepted": true})),
    )
        .into_response()
}

fn hint_key(p: &Push) -> String {
    format!("{}/{}:{}", p.registry, p.repository, p.tag)
}

fn hint_of(p: &Push) -> Hint {
    Hint {
        registry: p.registry.clone(),
        repository: p.repository.clone(),
        tag: p.tag.clone(),
        digest: p.digest.clone(),
    }
}

/// Re-checks the hints a previous run recorded but did not finish (called at start).
pub async fn resume_hints(s: &AppState) {
    match s.engine.store().pending_hints().await {
        Ok(hints) => {
            if !hints.is_empty() {
                tracing::info!(
                    hints = hints.len(),
                    "re-checking push hints recorded before the last stop"
                );
            }
            for h in hints {
                resume_recheck(
                    s,
                    Push {
                        registry: h.registry,
                        repository: h.repository,
                        tag: h.tag,
                        digest: h.digest,
                    },
                );
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read recorded push hints; they wait for the next start")
        }
    }
}

/// One more re-check asked for while one ran: for the digest the latest notification named,
/// or (None) for whatever the registry has now.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rerun(Option<String>);

impl Rerun {
    /// Whether the run that just found `seen` already answered this one.
    fn answered_by(&self, seen: Option<&str>) -> bool {
        self.0.is_some() && self.0.as_deref() == seen
    }
}

/// Another push of the same tag while a re-check runs or waits: the later notification's
/// digest is what the registry should show; one without a digest asks for a plain check.
fn merge_rerun(pending: Option<Rerun>, digest: Option<&str>) -> Rerun {
    match (pending, digest) {
        (Some(Rerun(None)), _) | (_, None) => Rerun(None),
        (_, Some(d)) => Rerun(Some(d.to_string())),
    }
}

/// Records the hints of `pushes` and re-checks their tags, coalesced: while a re-check runs
/// for a tag, further notifications only ask for one more run after it, and not even that
/// when they named the digest the run found (a burst of identical notifications costs one
/// check); nor do they write again once that re-check's hint is written (the hint stays
/// until a run that covers them has finished). Returns the write to wait for, if any.
fn record_and_recheck(s: &AppState, pushes: Vec<Push>) -> Option<Written> {
    let hooks = &s.hooks;
    let mut running = hooks.running.lock().unwrap_or_else(|e| e.into_inner());
    let mut new = Vec::new();
    for p in pushes {
        let key = hint_key(&p);
        match running.get_mut(&key) {
            Some((again, writes)) if writes.iter().any(|w| matches!(*w.borrow(), Some(Ok(())))) => {
                *again = Some(merge_rerun(again.take(), p.digest.as_deref()));
            }
            _ => new.push((key, p)),
        }
    }
    if new.is_empty() {
        return None;
    }
    // Asked for under the lock that a finishing re-check drops its hint under: the writer
    // applies this write after any drop of a re-check this notification did not join.
    let recorded = hooks.record(
        s.engine.store(),
        new.iter().map(|(_, p)| hint_of(p)).collect(),
    );
    let mut start = Vec::new();
    for (key, p) in new {
        match running.get_mut(&key) {
            Some((again, writes)) => {
                *again = Some(merge_rerun(again.take(), p.digest.as_deref()));
                writes.push(recorded.clone());
            }
            None => {
                running.insert(key, (None, vec![recorded.clone()]));
                start.push(p);
            }
        }
    }
    drop(running);
    for p in start {
        spawn_recheck(s, p);
    }
    Some(recorded)
}

/// Re-checks a hint read back from the store (its row is written already).
fn resume_recheck(s: &AppState, p: Push) {
    let key = hint_key(&p);
    {
        let mut running = s.hooks.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((again, _)) = running.get_mut(&key) {
            *again = Some(merge_rerun(again.take(), p.digest.as_deref()));
            return;
        }
        running.insert(key, (None, Vec::new()));
    }
    spawn_recheck(s, p);
}

/// The re-check task of one pushed tag (registered in `running` by the caller): runs until
/// no run is asked for, then drops the tag's hint.
fn spawn_recheck(s: &AppState, p: Push) {
    let key = hint_key(&p);
    let hooks = s.hooks.clone();
    let state = s.clone();
    s.tasks.spawn(async move {
        let _permit = match &hooks.limit {
            Some(l) => l.clone().acquire_owned().await.ok(),
            None => None,
        };
        let mut p = p;
        let mut runs = 0u32;
        loop {
            // A notification that passed the check in `handle` just before a run confirmed its
            // digest lands here: it costs no registry request either.
            let seen = if hooks.already_confirmed(&key, p.digest.as_deref()) {
                p.digest.clone()
            } else {
                runs += 1;
                let seen = recheck(&state, &p).await;
                hooks.confirm(&key, seen.clone());
                seen
            };
            let mut running = hooks.running.lock().unwrap_or_else(|e| e.into_inner());
            match running.get_mut(&key).and_then(|(again, _)| again.take()) {
                Some(again) if !again.answered_by(seen.as_deref()) => {
                    p.digest = again.0;
                    continue;
                }
                _ => {
                    // Under the lock: see `record_and_recheck`.
                    running.remove(&key);
                    hooks.drop_hint(state.engine.store(), key.clone());
                    break;
                }
            }
        }
        tracing::debug!(hint = %key, runs, "push re-checks done");
    });
}

/// Re-checks one pushed tag; returns the digest the registry showed when every stream tag
/// that follows it saw the same one.
async fn recheck(s: &AppState, p: &Push) -> Option<String> {
    let internal = s.config.registry(&p.registry).is_some_and(|r| r.internal);
    let create_in = if internal {
        internal_target(&p.repository, &p.tag)
    } else {
        None
    };
    // A registry may notify before it links the tag to the new manifest (distribution does:
    // the event leaves inside the manifest PUT). When the notification names a digest and the
    // registry still answers another one, look again shortly — but record only what the
    // registry says. distribution links the tag a millisecond or so after it notifies, so the
    // first looks come quickly (a push's latency is mostly this wait when the race is lost);
    // the doubling still covers ~2 s in all for a registry that links later.
    let look_again = crate::retry::Backoff::new(
        std::time::Duration::from_micros(500),
        std::time::Duration::from_secs(1),
    );
    const LOOKS: u32 = 13;
    for attempt in 0..LOOKS {
        match s
            .engine
            .pushed(&p.registry, &p.repository, &p.tag, create_in.clone())
            .await
        {
            Ok(tags) if tags.is_empty() => {
                tracing::debug!(registry = %p.registry, repository = %p.repository, tag = %p.tag, "push for an untracked repository ignored");
                return None;
            }
            Ok(tags) => {
                // Not linked yet (NotFound), or not yet the notified digest: look again.
                let failed = tags.iter().any(|(_, seen)| seen.is_none());
                let stale = failed
                    || p.digest.as_ref().is_some_and(|want| {
                        tags.iter()
                            .any(|(_, seen)| seen.as_ref().is_none_or(|d| d.as_str() != want))
                    });
                let first = tags
                    .first()
                    .and_then(|(_, d)| d.as_ref().map(|d| d.to_string()));
                let agreed = tags
                    .iter()
                    .all(|(_, d)| d.as_ref().map(|d| d.to_string()) == first);
                if stale && attempt + 1 < LOOKS {
                    // A newer notification for the tag waits for this run: its run looks for
                    // its own image, so this one stops (what the registry showed is recorded).
                    if s.hooks.newer_waiting(&hint_key(p), p.digest.as_deref()) {
                        tracing::debug!(registry = %p.registry, repository = %p.repository, tag = %p.tag, attempt, "a newer notification for the tag supersedes this re-check");
                        return if agreed { first } else { None };
                    }
                    tracing::debug!(registry = %p.registry, repository = %p.repository, tag = %p.tag, attempt, "the registry does not show the notified image yet; looking again");
                    look_after(look_again.delay(attempt + 1)).await;
                    continue;
                }
                for (t, seen) in tags {
                    match seen {
                        Some(d) => {
                            tracing::info!(tag = %t, digest = d.as_str(), registry = %p.registry, repository = %p.repository, "re-checked after push")
                        }
                        // Nothing recorded: the scheduled checks (if any) report real failures.
                        None => {
                            tracing::warn!(tag = %t, registry = %p.registry, repository = %p.repository, "push re-check gave up: the registry does not show the notified image")
                        }
                    }
                }
                return if agreed { first } else { None };
            }
            Err(e) => {
                tracing::warn!(registry = %p.registry, repository = %p.repository, tag = %p.tag, error = %e, "push re-check failed");
                return None;
            }
        }
    }
    None
}

/// Waits `d` before the next look. tokio's timer ticks in whole milliseconds, so a wait under
/// two of them (the first looks, when a registry links the tag a millisecond after it
/// notifies) sleeps on a blocking thread instead: 0.5 ms, not 1–2.
async fn look_after(d: std::time::Duration) {
    if d < std::time::Duration::from_millis(2) {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(d)).await;
    } else {
        tokio::time::sleep(d).await;
    }
}

/// Where a push to an internal registry lands: `ns/name:tag` for `ns/.../name`, else
/// `default/name:tag`.
pub fn internal_target(repository: &str, tag: &str) -> Option<StreamTagRef> {
    let parts: Vec<&str> = repository.split('/').collect();
    let (ns, name) = match parts.as_slice() {
        [name] => ("default".to_string(), name.to_string()),
        [ns, rest @ ..] => (ns.to_string(), rest.join("-")),
        [] => return None,
    };
    StreamTagRef::new(StreamName::new(&ns, &name).ok()?, tag).ok()
}

#[cfg(test)]
mod tests {
    use super::{Rerun, merge_rerun};

    #[test]
    fn a_rerun_is_skipped_only_when_the_run_found_the_notified_digest() {
        let r = merge_rerun(None, Some("sha256:a"));
        assert!(r.answered_by(Some("sha256:a")));
        assert!(!r.answered_by(Some("sha256:b")));
        assert!(!r.answered_by(None));
        // A later notification names another digest: that one must be seen.
        let r = merge_rerun(Some(r), Some("sha256:b"));
        assert_eq!(r, Rerun(Some("sha256:b".into())));
        // A notification without a digest asks for a check whatever was found.
        let r = merge_rerun(Some(r), None);
        assert!(!r.answered_by(Some("sha256:b")));
        assert_eq!(merge_rerun(Some(r), Some("sha256:c")), Rerun(None));
    }

    #[test]
    fn internal_targets() {
        assert_eq!(
            super::internal_target("app", "v1").unwrap().to_string(),
            "default/app:v1"
        );
        assert_eq!(
            super::internal_target("team/app", "v1")
                .unwrap()
                .to_string(),
            "team/app:v1"
        );
        assert!(super::internal_target("team/App", "v1").is_none());
    }
}
