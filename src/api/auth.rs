//! Who is calling. With `[[api.token]]` declared, every API call needs
//! `Authorization: Bearer <token>` (401 without, 403 when its scopes do not cover the call);
//! without tokens, only loopback peers are served. Tokens are compared in constant time.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::Digest as _;
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::config::{ApiToken, TokenCheck, Verb};

#[derive(Clone)]
pub enum Caller {
    /// No tokens are configured and the peer is on loopback.
    Local,
    Token(Arc<ApiToken>),
}

impl Caller {
    pub fn allow(&self, namespace: &str, verb: Verb) -> Result<(), ApiError> {
        match self {
            Caller::Local => Ok(()),
            Caller::Token(t) => {
                let ok = t.scopes.iter().any(|s| {
                    ns_matches(&s.namespace, namespace) && (s.verb == verb || s.verb == Verb::Admin)
                });
                if ok {
                    Ok(())
                } else {
                    Err(ApiError(
                        StatusCode::FORBIDDEN,
                        format!(
                            "token {} may not {} in namespace {namespace}",
                            t.name,
                            match verb {
                                Verb::Read => "read",
                                Verb::Tag => "tag",
                                Verb::Import => "import",
                                Verb::Admin => "administer",
                            }
                        ),
                    ))
                }
            }
        }
    }
}

/// `*` matches all; a trailing or leading `*` matches a prefix or suffix; else exact.
fn ns_matches(pattern: &str, ns: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(p) = pattern.strip_suffix('*') {
        return ns.starts_with(p) && ns != "*";
    }
    if let Some(p) = pattern.strip_prefix('*') {
        return ns.ends_with(p) && ns != "*";
    }
    pattern == ns
}

pub fn token_matches(check: &TokenCheck, presented: &str) -> bool {
    match check {
        TokenCheck::Plain(s) => s.expose().as_bytes().ct_eq(presented.as_bytes()).into(),
        TokenCheck::Sha256(h) => sha2::Sha256::digest(presented.as_bytes())
            .as_slice()
            .ct_eq(h)
            .into(),
    }
}

/// Who presents `presented` (a bearer token, or none) from `peer`: the API's rule, shared with
/// the web UI, which presents the token from its cookie.
pub(crate) fn identify(
    config: &crate::config::Config,
    peer: SocketAddr,
    presented: Option<&str>,
) -> Result<Caller, ApiError> {
    if config.api_tokens.is_empty() {
        if !peer.ip().is_loopback() && !config.server.allow_unauthenticated {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "no API tokens are configured: only loopback clients are served".into(),
            ));
        }
        return Ok(Caller::Local);
    }
    let Some(presented) = presented else {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <token> (set --token or ISTREAM_TOKEN)".into(),
        ));
    };
    config
        .api_tokens
        .iter()
        .find(|t| token_matches(&t.check, presented))
        .map(|t| Caller::Token(Arc::new(t.clone())))
        .ok_or_else(|| ApiError(StatusCode::UNAUTHORIZED, "invalid API token".into()))
}

/// The token of an `Authorization: Bearer` header.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

pub async fn authenticate(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    match identify(&s.config, peer, bearer(req.headers())) {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "caller not authenticated".into(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_patterns() {
        assert!(ns_matches("*", "team-a"));
        assert!(ns_matches("team-*", "team-a"));
        assert!(!ns_matches("team-*", "other"));
        assert!(ns_matches("team-a", "team-a"));
        assert!(!ns_matches("team-a", "*"));
    }
}
