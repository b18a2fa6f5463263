//! The web UI under `/ui/` (SPEC section 12): server-rendered pages over the same engine, store
//! and access rules as the API, plus one small script that refreshes a page when the engine
//! reports a change on `/ui/events`. Pages are built with maud (checked at compile time, every
//! interpolation escaped); the stylesheet and script are embedded in the binary.
//!
//! Access: without `[[api.token]]` the API's loopback rule applies; with tokens, `/ui/login`
//! asks for one and keeps it in an `HttpOnly`, `SameSite=Strict` cookie, and every page applies
//! that token's scopes as the API would. Every form carries a CSRF token derived from the
//! session (HMAC of a fixed label under the API token, or under a per-process key without
//! tokens), so any replica can check it and no session state is kept.

mod pages;
mod timeline;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::rejection::FormRejection;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use base64::Engine as _;
use futures_util::Stream;
use hmac::Mac as _;
use serde::Deserialize;
use subtle::ConstantTimeEq as _;
use tokio_stream::StreamExt as _;

use crate::api::AppState;
use crate::api::auth::{self, Caller};
use crate::config::Verb;
use crate::core::CoreError;
use crate::model::StreamName;

const TOKEN_COOKIE: &str = "istream_token";
const LOGIN_COOKIE: &str = "istream_login";
const CSRF_LABEL: &[u8] = b"istream-ui-csrf";
/// Live pages open at once; beyond it `/ui/events` answers 503 and pages stay static.
const MAX_LIVE: usize = 256;

static LIVE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_LIVE);

/// Who is looking, and the CSRF token their forms carry.
#[derive(Clone)]
pub(crate) struct Session {
    pub(crate) caller: Caller,
    pub(crate) csrf: String,
    /// With tokens: the name of the token, shown next to the log-out button.
    pub(crate) who: Option<String>,
}

impl Session {
    pub(crate) fn may(&self, namespace: &str, verb: Verb) -> bool {
        self.caller.allow(namespace, verb).is_ok()
    }
}

pub(crate) fn router(state: AppState) -> Router<AppState> {
    let pages = Router::new()
        .route("/ui/", get(streams_page))
        .route("/ui/streams/{ns}/{name}", get(stream_page))
        .route("/ui/triggers", get(triggers_page))
        .route("/ui/triggers/{name}", get(trigger_page))
        .route("/ui/triggers/{name}/retry", post(retry))
        .route("/ui/logout", post(logout))
        .route("/ui/events", get(events))
        .route("/ui/{*rest}", get(not_found))
        .route_layer(axum::middleware::from_fn_with_state(state, session));
    Router::new()
        .merge(pages)
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/assets/{file}", get(asset))
        .layer(axum::middleware::map_response(security_headers))
}

/// Pages may load only their own stylesheet and script, may not be framed, and are not cached
/// (they show live state and, with tokens, what one token may see).
async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "style.css" => (include_str!("assets/style.css"), "text/css; charset=utf-8"),
        "live.js" => (
            include_str!("assets/live.js"),
            "text/javascript; charset=utf-8",
        ),
        _ => return pages::not_found_page(None, "no such file").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// The token a browser presents: its cookie, or (for scripts and tests) a bearer header.
fn presented(headers: &HeaderMap) -> Option<String> {
    if let Some(t) = auth::bearer(headers) {
        return Some(t.to_string());
    }
    let raw = cookie(headers, TOKEN_COOKIE)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw)
        .ok()?;
    String::from_utf8(bytes).ok()
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn process_key() -> &'static [u8; 32] {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut k = [0u8; 32];
        k[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        k[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        k
    })
}

fn csrf_for(key: &[u8]) -> String {
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key");
    m.update(CSRF_LABEL);
    hex::encode(&m.finalize().into_bytes()[..16])
}

fn csrf_ok(session: &Session, presented: Option<&str>) -> bool {
    presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(session.csrf.as_bytes())))
}

fn secure(s: &AppState) -> &'static str {
    if s.config.server.tls.is_some() {
        "; Secure"
    } else {
        ""
    }
}

/// Identifies the caller of every page; sends a browser without a valid token to the login.
async fn session(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    let token = presented(req.headers());
    match auth::identify(&s.config, peer, token.as_deref()) {
        Ok(caller) => {
            let (csrf, who) = match (&caller, &token) {
                (Caller::Token(t), Some(tok)) => (csrf_for(tok.as_bytes()), Some(t.name.clone())),
                _ => (csrf_for(process_key()), None),
            };
            req.extensions_mut().insert(Session { caller, csrf, who });
            next.run(req).await
        }
        Err(e) if e.0 == StatusCode::UNAUTHORIZED => {
            if req.method() == axum::http::Method::GET && req.uri().path() != "/ui/events" {
                let next_path = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/ui/");
                let to = format!(
                    "/ui/login?next={}",
                    percent_encoding::utf8_percent_encode(next_path, pages::SEGMENT)
                );
                let mut r = Redirect::to(&to).into_response();
                if token.is_some() {
                    // A stale or revoked token: forget it so the login page is not a loop.
                    clear_token_cookie(&s, &mut r);
                }
                r
            } else {
                pages::error_page(None, e.0, &e.1).into_response()
            }
        }
        Err(e) => pages::error_page(None, e.0, &e.1).into_response(),
    }
}

fn clear_token_cookie(s: &AppState, r: &mut Response) {
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{TOKEN_COOKIE}=; Path=/ui; Max-Age=0; HttpOnly; SameSite=Strict{}",
        secure(s)
    )) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// The session the middleware attached to the request; a route without the middleware
/// answers 500 rather than serving anyone as a local caller.
pub(crate) struct Viewer(Session);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Viewer {
    type Rejection = Response;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Session>()
            .cloned()
            .map(Viewer)
            .ok_or_else(|| {
                pages::error_page(
                    None,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "page served without a session",
                )
                .into_response()
            })
    }
}

async fn streams_page(State(s): State<AppState>, Viewer(v): Viewer) -> Response {
    match s.engine.store().list(None).await {
        Ok(mut streams) => {
            streams.retain(|x| v.may(&x.namespace, Verb::Read));
            pages::streams(&v, &streams, chrono::Utc::now()).into_response()
        }
        Err(e) => pages::error_page(Some(&v), StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
            .into_response(),
    }
}

async fn stream_page(
    State(s): State<AppState>,
    Viewer(v): Viewer,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    let n = match StreamName::new(&ns, &name) {
        Ok(n) => n,
        Err(e) => {
            return pages::not_found_page(Some(&v), &format!("no image stream here: {e}"))
                .into_response();
        }
    };
    if let Err(e) = v.caller.allow(&ns, Verb::Read) {
        return pages::error_page(Some(&v), e.0, &e.1).into_response();
    }
    match s.engine.get_stream(&n).await {
        Ok(stream) => pages::stream(&v, &stream, chrono::Utc::now()).into_response(),
        Err(CoreError::NotFound(_)) => {
            pages::not_found_page(Some(&v), &format!("image stream {n} not found")).into_response()
        }
        Err(e) => pages::error_page(Some(&v), StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
            .into_response(),
    }
}

async fn triggers_page(State(s): State<AppState>, Viewer(v): Viewer) -> Response {
    if let Err(e) = v.caller.allow("*", Verb::Read) {
        return pages::error_page(Some(&v), e.0, &e.1).into_response();
    }
    match s.triggers.views(None).await {
        Ok(views) => pages::triggers(&v, &views).into_response(),
        Err(e) => pages::error_page(Some(&v), StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
            .into_response(),
    }
}

#[derive(Deserialize)]
struct TriggerQuery {
    requeued: Option<usize>,
}

async fn trigger_page(
    State(s): State<AppState>,
    Viewer(v): Viewer,
    Path(name): Path<String>,
    Query(q): Query<TriggerQuery>,
) -> Response {
    if let Err(e) = v.caller.allow("*", Verb::Read) {
        return pages::error_page(Some(&v), e.0, &e.1).into_response();
    }
    match s.triggers.views(Some(&name)).await {
        Ok(mut views) => match views.pop() {
            Some(t) => {
                let requeued = q.requeued;
                pages::trigger(&v, &t, requeued, chrono::Utc::now()).into_response()
            }
            None => pages::not_found_page(Some(&v), &format!("trigger {name} not found"))
                .into_response(),
        },
        Err(e) => pages::error_page(Some(&v), StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
            .into_response(),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: Option<String>,
}

fn forged(v: &Session) -> Response {
    pages::error_page(
        Some(v),
        StatusCode::FORBIDDEN,
        "missing or invalid CSRF token: reload the page and try again",
    )
    .into_response()
}

/// The "retry dead deliveries" button: `istream triggers retry NAME`, with its scope check.
async fn retry(
    State(s): State<AppState>,
    Viewer(v): Viewer,
    Path(name): Path<String>,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    if !csrf_ok(&v, form.as_ref().ok().and_then(|f| f.csrf.as_deref())) {
        return forged(&v);
    }
    if let Err(e) = v.caller.allow("*", Verb::Admin) {
        return pages::error_page(Some(&v), e.0, &e.1).into_response();
    }
    match s.triggers.retry(&name).await {
        Ok(n) => Redirect::to(&format!(
            "/ui/triggers/{}?requeued={n}",
            percent_encoding::utf8_percent_encode(&name, pages::SEGMENT)
        ))
        .into_response(),
        Err(CoreError::NotFound(m)) => pages::not_found_page(Some(&v), &m).into_response(),
        Err(e) => {
            let e = crate::api::ApiError::from(e);
            pages::error_page(Some(&v), e.0, &e.1).into_response()
        }
    }
}

async fn logout(
    State(s): State<AppState>,
    Viewer(v): Viewer,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    if !csrf_ok(&v, form.as_ref().ok().and_then(|f| f.csrf.as_deref())) {
        return forged(&v);
    }
    let mut r = Redirect::to("/ui/login").into_response();
    clear_token_cookie(&s, &mut r);
    r
}

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

/// Only paths of the UI itself: a login link cannot send the browser elsewhere.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with("/ui/") && !n.starts_with("/ui//") && !n.contains('\\') => n,
        _ => "/ui/",
    }
}

async fn login_page(State(s): State<AppState>, Query(q): Query<LoginQuery>) -> Response {
    let next = q.next;
    if s.config.api_tokens.is_empty() {
        return Redirect::to(safe_next(next.as_deref())).into_response();
    }
    login_form(&s, safe_next(next.as_deref()), StatusCode::OK, None)
}

/// The login form, with a fresh nonce in a cookie and in the form (double submit): a login
/// cannot be posted from another site.
fn login_form(s: &AppState, next: &str, status: StatusCode, error: Option<&str>) -> Response {
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let mut r = pages::login(status, next, &nonce, error).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{LOGIN_COOKIE}={nonce}; Path=/ui/login; HttpOnly; SameSite=Strict{}",
        secure(s)
    )) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

#[derive(Deserialize)]
struct LoginForm {
    token: Option<String>,
    next: Option<String>,
    nonce: Option<String>,
}

async fn login(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let Ok(Form(f)) = form else {
        return pages::error_page(None, StatusCode::BAD_REQUEST, "login form: expected token")
            .into_response();
    };
    let next = safe_next(f.next.as_deref()).to_string();
    let nonce_ok = match (cookie(&headers, LOGIN_COOKIE), f.nonce.as_deref()) {
        (Some(c), Some(n)) if !n.is_empty() => bool::from(c.as_bytes().ct_eq(n.as_bytes())),
        _ => false,
    };
    if !nonce_ok {
        return pages::error_page(
            None,
            StatusCode::FORBIDDEN,
            "missing or invalid CSRF token: open the login page again",
        )
        .into_response();
    }
    if s.config.api_tokens.is_empty() {
        return Redirect::to(&next).into_response();
    }
    let token = f.token.unwrap_or_default();
    let token = token.trim();
    if token.is_empty() || auth::identify(&s.config, peer, Some(token)).is_err() {
        return login_form(
            &s,
            &next,
            StatusCode::UNAUTHORIZED,
            Some("That token is not one of this engine's API tokens."),
        );
    }
    let mut r = Redirect::to(&next).into_response();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token);
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{TOKEN_COOKIE}={b64}; Path=/ui; HttpOnly; SameSite=Strict{}",
        secure(&s)
    )) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{LOGIN_COOKIE}=; Path=/ui/login; Max-Age=0; HttpOnly; SameSite=Strict{}",
        secure(&s)
    )) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

async fn not_found(Viewer(v): Viewer) -> Response {
    pages::not_found_page(Some(&v), "no such page").into_response()
}

/// What live pages listen to: `tag` (a tag of a stream the viewer may read changed, failed to
/// import or was deleted) and `deliveries` (a delivery was claimed, settled or re-queued on
/// this replica). Ends at shutdown so the connection drains.
async fn events(
    State(s): State<AppState>,
    Viewer(v): Viewer,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, Response> {
    let permit = LIVE.try_acquire().map_err(|_| {
        pages::error_page(
            Some(&v),
            StatusCode::SERVICE_UNAVAILABLE,
            "too many live pages open; this one will not update by itself",
        )
        .into_response()
    })?;
    let caller = v.caller.clone();
    let tags =
        tokio_stream::wrappers::BroadcastStream::new(s.engine.subscribe()).filter_map(move |e| {
            match e {
                Ok(e) => caller
                    .allow(&e.data.namespace, Verb::Read)
                    .is_ok()
                    .then(|| {
                        let data = serde_json::json!({
                            "namespace": e.data.namespace,
                            "stream": e.data.stream,
                            "tag": e.data.tag,
                        });
                        SseEvent::default().event("tag").data(data.to_string())
                    }),
                // Missed some: let the page refresh whatever it shows.
                Err(_) => Some(SseEvent::default().event("resync").data("{}")),
            }
        });
    let see_deliveries = v.may("*", Verb::Read);
    let deliveries =
        tokio_stream::wrappers::WatchStream::from_changes(s.triggers.subscribe_changes())
            .filter(move |_| see_deliveries)
            .map(|_| SseEvent::default().event("deliveries").data("{}"));
    let stream = tags.merge(deliveries).map(move |e| {
        let _held = &permit;
        Ok(e)
    });
    let stream = futures_util::StreamExt::take_until(stream, s.shutdown.clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
