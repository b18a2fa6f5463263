//! The HTTP surface of `istream serve`: the `/api/v1` the CLI uses (documented by
//! `/api/v1/openapi.json`), registry hooks under `/hooks/`, the web UI under `/ui/`, and
//! `/healthz`, `/readyz`, `/metrics`. Handlers translate HTTP to core calls and core errors to status codes; they
//! never touch the store's write side.

pub mod auth;
mod openapi;

use std::convert::Infallible;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::BroadcastStream;

use crate::config::{Config, Verb};
use crate::core::view::{self, TagView};
use crate::core::{CoreError, Engine, ImportRequest, Outcome, SourceKind, TagRequest};
use crate::model::{StreamImageRef, StreamName, StreamTagRef};
use crate::scheduler::SchedulerHandle;
use crate::trigger::Triggers;
use auth::Caller;

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub config: Arc<Config>,
    pub scheduler: SchedulerHandle,
    pub triggers: Arc<Triggers>,
    pub ready: Arc<AtomicBool>,
    pub hooks: Arc<crate::hooks::HookState>,
    /// Every task a request starts (connections, detached imports, hook re-checks): `serve`
    /// waits for them at shutdown.
    pub tasks: tokio_util::task::TaskTracker,
    /// Fires at shutdown: endless responses (`watch`) end so their connections can drain.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// An API error: status and a one-line message naming the thing at fault.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let status = match &e {
            CoreError::BadRequest(_) => StatusCode::BAD_REQUEST,
            CoreError::NotFound(_) => StatusCode::NOT_FOUND,
            CoreError::Conflict(_) => StatusCode::CONFLICT,
            CoreError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "request failed");
        }
        ApiError(status, e.to_string())
    }
}

impl From<crate::model::RefError> for ApiError {
    fn from(e: crate::model::RefError) -> Self {
        ApiError(StatusCode::BAD_REQUEST, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub fn router(state: AppState) -> Router {
    let max_body = state.config.server.max_body_bytes;
    let api = Router::new()
        .route("/api/v1/namespaces/{ns}/imagestreams", get(list_streams))
        .route(
            "/api/v1/namespaces/{ns}/imagestreams/{name}",
            get(get_stream).delete(delete_stream),
        )
        .route("/api/v1/namespaces/{ns}/imagestreamtags", get(list_tags))
        .route(
            "/api/v1/namespaces/{ns}/imagestreamtags/{istag}",
            get(get_tag).delete(delete_tag),
        )
        .route(
            "/api/v1/namespaces/{ns}/imagestreamimages/{isimage}",
            get(get_image),
        )
        .route("/api/v1/namespaces/{ns}/import", post(import))
        .route("/api/v1/namespaces/{ns}/tag", post(tag))
        .route("/api/v1/triggers", get(list_triggers))
        .route("/api/v1/triggers/{name}", get(get_trigger))
        .route("/api/v1/triggers/{name}/retry", post(retry_trigger))
        .route("/api/v1/triggers/{name}/test", post(test_trigger))
        .route("/api/v1/watch", get(watch))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    Router::new()
        .merge(api)
        .merge(crate::ui::router(state.clone()))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/hooks/{source}", post(crate::hooks::handle))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(max_body))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            BODY_READ_TIMEOUT,
        ))
        .with_state(state)
}

/// Serves until `cancel` fires, then drains in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    tls: Option<tokio_rustls::TlsAcceptor>,
    cancel: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let tasks = state.tasks.clone();
    let router = router(state);
    // One accept loop for HTTP and HTTPS, so both get the same limits: request headers must
    // arrive within HEADER_READ_TIMEOUT and fit in MAX_HEADER_BYTES (else 431), and bodies
    // must arrive within BODY_READ_TIMEOUT (the router's layer) — a slow client cannot hold
    // a connection or memory. The peer address goes into the request extensions as axum's
    // `ConnectInfo` would.
    let mut http =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    http.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    let http = Arc::new(http);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // Out of file descriptors, typically: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = tls.clone();
        let http = http.clone();
        let app = router.clone().layer(axum::Extension(ConnectInfo(peer)));
        let watcher = graceful.watcher();
        tasks.spawn(async move {
            let service = hyper_util::service::TowerToHyperService::new(app);
            match acceptor {
                None => {
                    let conn = http
                        .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tcp), service)
                        .into_owned();
                    let _ = watcher.watch(conn).await;
                }
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(tcp)).await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                    let conn = http
                        .serve_connection_with_upgrades(
                            hyper_util::rt::TokioIo::new(stream),
                            service,
                        )
                        .into_owned();
                    let _ = watcher.watch(conn).await;
                }
            }
        });
    }
    // Stop accepting; requests in flight finish and idle connections close, within the grace.
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; closing them");
    }
    Ok(())
}

/// How long in-flight requests get to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long a client may take to send a request's headers (and the TLS handshake).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Request line and headers together, at most.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// How long a client may take to send a request body (bodies are at most 1 MiB).
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The TLS acceptor for `[server] tls_cert_file` / `tls_key_file`.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    crate::registry::install_crypto();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn readyz(State(s): State<AppState>) -> Response {
    if !s.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response();
    }
    // A replica cut off from JetStream cannot write: take it out of the load balancer.
    if let Some(c) = s.engine.cluster()
        && !c.members().iter().any(|m| m == c.id())
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not a member of the replica set: NATS JetStream unreachable",
        )
            .into_response();
    }
    "ready".into_response()
}

async fn metrics() -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::render(),
    )
        .into_response()
}

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi::DOCUMENT,
    )
        .into_response()
}

fn ns_name(ns: &str) -> ApiResult<String> {
    StreamName::new(ns, "x")?;
    Ok(ns.to_string())
}

impl AppState {
    fn sched(&self) -> impl Fn(&str) -> Option<view::Schedule> + '_ {
        |k| self.scheduler.info(k)
    }
}

/// Every stream of a namespace as the API shows it (one store read for the namespace).
async fn namespace_views(
    s: &AppState,
    caller: &Caller,
    ns: &str,
) -> ApiResult<Vec<view::StreamView>> {
    let ns = ns_name(ns)?;
    caller.allow(&ns, Verb::Read)?;
    let streams = s
        .engine
        .store()
        .list(Some(&ns))
        .await
        .map_err(CoreError::from)?;
    Ok(streams
        .iter()
        .map(|x| view::stream_view(x, s.sched()))
        .collect())
}

async fn list_streams(
    State(s): State<AppState>,
    caller: Caller,
    Path(ns): Path<String>,
) -> ApiResult<Json<Vec<view::StreamView>>> {
    Ok(Json(namespace_views(&s, &caller, &ns).await?))
}

async fn get_stream(
    State(s): State<AppState>,
    caller: Caller,
    Path((ns, name)): Path<(String, String)>,
) -> ApiResult<Json<view::StreamView>> {
    let n = StreamName::new(&ns, &name)?;
    caller.allow(&ns, Verb::Read)?;
    let stream = s.engine.get_stream(&n).await?;
    Ok(Json(view::stream_view(&stream, s.sched())))
}

async fn delete_stream(
    State(s): State<AppState>,
    caller: Caller,
    Path((ns, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let n = StreamName::new(&ns, &name)?;
    caller.allow(&ns, Verb::Tag)?;
    s.engine.delete_stream(&n).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_tags(
    State(s): State<AppState>,
    caller: Caller,
    Path(ns): Path<String>,
) -> ApiResult<Json<Vec<TagView>>> {
    let views = namespace_views(&s, &caller, &ns).await?;
    Ok(Json(views.into_iter().flat_map(|v| v.tags).collect()))
}

async fn get_tag(
    State(s): State<AppState>,
    caller: Caller,
    Path((ns, istag)): Path<(String, String)>,
) -> ApiResult<Json<TagView>> {
    let t = StreamTagRef::parse(&istag, &ns)?;
    caller.allow(&t.stream.namespace, Verb::Read)?;
    Ok(Json(tag_view(&s, &t).await?))
}

async fn tag_view(s: &AppState, t: &StreamTagRef) -> ApiResult<TagView> {
    let stream = s.engine.get_tag(t).await.map_err(|e| match e {
        CoreError::NotFound(_) => ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "stream tag {t} not found: image stream {} does not exist",
                t.stream
            ),
        ),
        e => e.into(),
    })?;
    view::tag_view(&stream, &t.tag, s.scheduler.info(&t.to_string()))
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("stream tag {t} not found")))
}

async fn delete_tag(
    State(s): State<AppState>,
    caller: Caller,
    Path((ns, istag)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let t = StreamTagRef::parse(&istag, &ns)?;
    caller.allow(&t.stream.namespace, Verb::Tag)?;
    s.engine.delete_tags(&ns, &[istag]).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize)]
struct ImageView {
    namespace: String,
    stream: String,
    digest: String,
    image: String,
    created: chrono::DateTime<chrono::Utc>,
    media_type: Option<String>,
    platforms: Vec<String>,
    /// Tags whose history holds this image, current first.
    tags: Vec<ImageTagRef>,
}

#[derive(Serialize)]
struct ImageTagRef {
    tag: String,
    current: bool,
}

async fn get_image(
    State(s): State<AppState>,
    caller: Caller,
    Path((ns, isimage)): Path<(String, String)>,
) -> ApiResult<Json<ImageView>> {
    let r = StreamImageRef::parse(&isimage, &ns)?;
    caller.allow(&r.stream.namespace, Verb::Read)?;
    let stream = s.engine.get_stream(&r.stream).await?;
    let e = stream
        .find_image(&r.digest_prefix)
        .map_err(|m| ApiError(StatusCode::NOT_FOUND, m))?;
    let mut tags = Vec::new();
    for (name, t) in &stream.tags {
        if let Some(pos) = t.history.iter().position(|h| h.digest == e.digest) {
            tags.push(ImageTagRef {
                tag: name.clone(),
                current: pos == 0,
            });
        }
    }
    Ok(Json(ImageView {
        namespace: stream.namespace.clone(),
        stream: stream.name.clone(),
        digest: e.digest.to_string(),
        image: e.image.clone(),
        created: e.created,
        media_type: e.media_type.clone(),
        platforms: e.platforms.clone(),
        tags,
    }))
}

/// Body of `POST /api/v1/namespaces/{ns}/import`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportBody {
    pub name: String,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub confirm: bool,
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub scheduled: bool,
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub platform: Option<String>,
}

/// The result of one tag's import or tagging.
#[derive(Debug, Serialize, Deserialize)]
pub struct ResultView {
    pub tag: String,
    /// `Success` or `Failure`.
    pub status: String,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub view: Option<TagView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct OperationView {
    pub results: Vec<ResultView>,
}

async fn results(s: &AppState, outcomes: Vec<Outcome>) -> ApiResult<Json<OperationView>> {
    let mut results = Vec::new();
    for o in outcomes {
        let view = tag_view(s, &o.tag).await.ok();
        results.push(ResultView {
            tag: o.tag.to_string(),
            status: if o.error.is_none() {
                "Success"
            } else {
                "Failure"
            }
            .into(),
            reason: o.error.as_ref().map(|e| e.reason().to_string()),
            message: o.error.as_ref().map(|e| e.to_string()),
            view,
        });
    }
    Ok(Json(OperationView { results }))
}

async fn import(
    State(s): State<AppState>,
    caller: Caller,
    Path(ns): Path<String>,
    headers: HeaderMap,
    body: Result<Json<ImportBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Response> {
    let Json(b) = body.map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("import request body: {}", e.body_text()),
        )
    })?;
    let ns = ns_name(&ns)?;
    let t = StreamTagRef::parse(&b.name, &ns)?;
    caller.allow(&t.stream.namespace, Verb::Import)?;
    let mut req = ImportRequest {
        progress: None,
        name: b.name,
        namespace: ns,
        from: b.from,
        confirm: b.confirm,
        all: b.all,
        scheduled: b.scheduled,
        insecure: b.insecure,
        platform: b.platform,
    };
    let streaming = req.all
        && header_str(&headers, "accept").is_some_and(|a| a.contains("application/x-ndjson"));
    if !streaming {
        let engine = s.engine.clone();
        let outcomes = detached(&s, async move { engine.import_image(&req).await }).await?;
        return Ok(results(&s, outcomes).await?.into_response());
    }
    // `--all` with progress: one JSON line per event — `{"total": N}`, then a result per tag
    // as it completes, and `{"error": ...}` if the operation itself fails.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    req.progress = Some(tx.clone());
    let (line_tx, line_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let state = s.clone();
    s.tasks.spawn(async move {
        let engine = state.engine.clone();
        let errors = line_tx.clone();
        let work = state
            .tasks
            .spawn(async move { engine.import_image(&req).await });
        drop(tx);
        let mut rx = rx;
        while let Some(p) = rx.recv().await {
            let line = match p {
                crate::core::Progress::Total(n) => serde_json::json!({ "total": n }).to_string(),
                crate::core::Progress::Done(o) => {
                    let view = results(&state, vec![o])
                        .await
                        .ok()
                        .and_then(|Json(mut v)| v.results.pop());
                    serde_json::to_string(&view).unwrap_or_default()
                }
            };
            let _ = line_tx.send(line + "\n");
        }
        match work.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                let _ =
                    errors.send(serde_json::json!({ "error": e.to_string() }).to_string() + "\n");
            }
            Err(e) => {
                let _ = errors.send(
                    serde_json::json!({ "error": format!("import failed: {e}") }).to_string()
                        + "\n",
                );
            }
        }
    });
    let body = axum::body::Body::from_stream(
        tokio_stream::wrappers::UnboundedReceiverStream::new(line_rx).map(Ok::<_, Infallible>),
    );
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response())
}

/// Body of `POST /api/v1/namespaces/{ns}/tag`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagBody {
    pub source: String,
    #[serde(default)]
    pub source_kind: Option<SourceKind>,
    pub dests: Vec<String>,
    #[serde(default)]
    pub alias: bool,
    #[serde(default)]
    pub scheduled: bool,
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub platform: Option<String>,
    /// `tag REPOSITORY DEST --policy=...`: DEST follows the newest matching tag of `source`.
    #[serde(default)]
    pub policy: Option<crate::model::PolicySpec>,
}

async fn tag(
    State(s): State<AppState>,
    caller: Caller,
    Path(ns): Path<String>,
    body: Result<Json<TagBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Json<OperationView>> {
    let Json(b) = body.map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("tag request body: {}", e.body_text()),
        )
    })?;
    let ns = ns_name(&ns)?;
    let kind = b
        .source_kind
        .unwrap_or_else(|| crate::core::infer_source_kind(&b.source));
    match kind {
        SourceKind::Istag => caller.allow(
            &StreamTagRef::parse(&b.source, &ns)?.stream.namespace,
            Verb::Read,
        )?,
        SourceKind::Isimage => caller.allow(
            &StreamImageRef::parse(&b.source, &ns)?.stream.namespace,
            Verb::Read,
        )?,
        SourceKind::Docker => {}
    }
    for d in &b.dests {
        let t = StreamTagRef::parse(d, &ns)?;
        caller.allow(&t.stream.namespace, Verb::Tag)?;
        if kind == SourceKind::Docker {
            caller.allow(&t.stream.namespace, Verb::Import)?;
        }
    }
    let req = TagRequest {
        namespace: ns,
        source: b.source,
        source_kind: Some(kind),
        dests: b.dests,
        alias: b.alias,
        scheduled: b.scheduled,
        insecure: b.insecure,
        platform: b.platform,
        policy: b.policy,
    };
    let engine = s.engine.clone();
    let outcomes = detached(&s, async move { engine.tag(&req).await }).await?;
    results(&s, outcomes).await
}

async fn list_triggers(
    State(s): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<crate::trigger::TriggerView>>> {
    caller.allow("*", Verb::Read)?;
    Ok(Json(s.triggers.views(None).await.map_err(CoreError::from)?))
}

async fn get_trigger(
    State(s): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<crate::trigger::TriggerView>> {
    caller.allow("*", Verb::Read)?;
    let mut v = s
        .triggers
        .views(Some(&name))
        .await
        .map_err(CoreError::from)?;
    v.pop()
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("trigger {name} not found")))
}

async fn retry_trigger(
    State(s): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.allow("*", Verb::Admin)?;
    let n = s.triggers.retry(&name).await?;
    Ok(Json(serde_json::json!({ "trigger": name, "requeued": n })))
}

#[derive(Deserialize, Default)]
struct TestRequest {
    tag: Option<String>,
}

/// `triggers test`: one delivery now, marked as a test, nothing recorded. Answers 200 with the
/// receiver's status (or the error) in the body: the call itself succeeded either way.
async fn test_trigger(
    State(s): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Option<Json<TestRequest>>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.allow("*", Verb::Admin)?;
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let (tag, answer) = s.triggers.test(&name, req.tag.as_deref()).await?;
    Ok(Json(match answer {
        Ok(status) => {
            serde_json::json!({ "trigger": name, "tag": tag.to_string(), "status": status })
        }
        Err(e) => serde_json::json!({ "trigger": name, "tag": tag.to_string(), "error": e }),
    }))
}

#[derive(Deserialize)]
struct WatchQuery {
    namespace: Option<String>,
    stream: Option<String>,
    tag: Option<String>,
}

async fn watch(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<WatchQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let ns = q.namespace.clone().unwrap_or_else(|| "default".into());
    caller.allow(&ns, Verb::Read)?;
    let rx = s.engine.subscribe();
    let stream = futures_util::StreamExt::take_until(
        BroadcastStream::new(rx),
        s.shutdown.clone().cancelled_owned(),
    );
    let stream = stream.filter_map(move |e| {
        let e = e.ok()?;
        if e.data.namespace != ns
            || q.stream.as_ref().is_some_and(|x| *x != e.data.stream)
            || q.tag.as_ref().is_some_and(|x| *x != e.data.tag)
        {
            return None;
        }
        let json = serde_json::to_string(&e).ok()?;
        Some(Ok(SseEvent::default()
            .event(e.kind.clone())
            .id(e.id.clone())
            .data(json)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Runs an operation to its end even if the client goes away meanwhile: an import that was
/// started is recorded (image or condition), never left half done by a dropped request.
async fn detached<T: Send + 'static>(
    s: &AppState,
    work: impl Future<Output = Result<T, CoreError>> + Send + 'static,
) -> Result<T, ApiError> {
    s.tasks
        .spawn(work)
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("operation failed: {e}"),
            )
        })?
        .map_err(ApiError::from)
}

pub fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}
