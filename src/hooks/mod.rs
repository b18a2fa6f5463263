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
pub use parse::Push;

/// The payload parsers, for the robustness tests and the fuzz targets.
#[doc(hidden)]
pub use parse::parse as parse_for_fuzz;

/// The senders `/hooks/<source>` takes.
pub const SOURCES: [&str; 4] = ["registry", "harbor", "dockerhub", "quay"];

#[derive(Default)]
pub struct HookState {
    /// Re-checks running per `registry/repo:tag`; true when another push arrived meanwhile.
    running: Mutex<HashMap<String, bool>>,
    limit: Option<Arc<tokio::sync::Semaphore>>,
}

impl HookState {
    pub fn new(max_concurrency: usize) -> HookState {
        HookState {
            running: Mutex::new(HashMap::new()),
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
            format!("unknown hook source \"{source}\" (registry, harbor, dockerhub, quay)"),
        )
        .into_response();
    }
    if !authorized(&s, &source, &headers, query.as_deref(), peer) {
        crate::metrics::hook(&source, "unauthorized");
        return ApiError(
            StatusCode::UNAUTHORIZED,
            format!("/hooks/{source} needs the hook token (Authorization: Bearer)"),
        )
        .into_response();
    }
    let pushes = match parse::parse(&source, &body) {
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
    crate::metrics::hook(&source, "accepted");
    let hooks = s.hooks.clone();
    for p in pushes {
        let key = format!("{}/{}:{}", p.registry, p.repository, p.tag);
        {
            let mut running = hooks.running.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(again) = running.get_mut(&key) {
                *again = true;
                continue;
            }
            running.insert(key.clone(), false);
        }
        let state = s.clone();
        let hooks = hooks.clone();
        s.tasks.spawn(async move {
            let _permit = match &hooks.limit {
                Some(l) => l.clone().acquire_owned().await.ok(),
                None => None,
            };
            loop {
                recheck(&state, &p).await;
                let mut running = hooks.running.lock().unwrap_or_else(|e| e.into_inner());
                if running.get(&key) == Some(&true) {
                    running.insert(key.clone(), false);
                    continue;
                }
                running.remove(&key);
                break;
            }
        });
    }
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({"accepted": true})),
    )
        .into_response()
}

async fn recheck(s: &AppState, p: &Push) {
    let internal = s.config.registry(&p.registry).is_some_and(|r| r.internal);
    let create_in = if internal {
        internal_target(&p.repository, &p.tag)
    } else {
        None
    };
    // A registry may notify before it links the tag to the new manifest (distribution does:
    // the event leaves inside the manifest PUT). When the notification names a digest and the
    // registry still answers another one, look again shortly — but record only what the
    // registry says.
    let mut delay = std::time::Duration::from_millis(2);
    for attempt in 0..10 {
        match s
            .engine
            .pushed(&p.registry, &p.repository, &p.tag, create_in.clone())
            .await
        {
            Ok(tags) if tags.is_empty() => {
                tracing::debug!(registry = %p.registry, repository = %p.repository, tag = %p.tag, "push for an untracked repository ignored");
                return;
            }
            Ok(tags) => {
                let stale = p.digest.as_ref().is_some_and(|want| {
                    tags.iter()
                        .any(|(_, seen)| seen.as_ref().is_none_or(|d| d.as_str() != want))
                });
                if stale && attempt < 9 {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    continue;
                }
                for (t, seen) in tags {
                    tracing::info!(tag = %t, digest = seen.as_ref().map(|d| d.as_str()).unwrap_or(""), registry = %p.registry, repository = %p.repository, "re-checked after push");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(registry = %p.registry, repository = %p.repository, tag = %p.tag, error = %e, "push re-check failed");
                return;
            }
        }
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
