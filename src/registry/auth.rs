//! Registry authentication: the `WWW-Authenticate` challenge (Bearer token service or Basic),
//! and tokens cached per registry and scope until shortly before they expire.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::{RegistryError, credentials::Credentials, describe_reqwest, read_limited};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

impl Challenge {
    /// Parses `Bearer realm="...",service="...",scope="..."` or `Basic realm="..."`.
    pub(super) fn parse(h: &str) -> Option<Challenge> {
        let (scheme, params) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let mut map = HashMap::new();
        let mut rest = params.trim();
        while !rest.is_empty() {
            let (key, after) = rest.split_once('=')?;
            let after = after.trim_start();
            let (value, next) = if let Some(q) = after.strip_prefix('"') {
                let end = q.find('"')?;
                (
                    &q[..end],
                    q[end + 1..]
                        .trim_start()
                        .trim_start_matches(',')
                        .trim_start(),
                )
            } else {
                let end = after.find(',').unwrap_or(after.len());
                (
                    after[..end].trim(),
                    after[end..].trim_start_matches(',').trim_start(),
                )
            };
            map.insert(key.trim().to_ascii_lowercase(), value.to_string());
            rest = next;
        }
        Some(Challenge::Bearer {
            realm: map.remove("realm")?,
            service: map.remove("service"),
            scope: map.remove("scope"),
        })
    }
}

/// Tokens are re-fetched at least daily, whatever lifetime a registry announces.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Default)]
pub(super) struct TokenCache {
    /// (registry, scope) -> (Authorization header value, valid until).
    entries: Mutex<HashMap<(String, String), (String, Instant)>>,
}

impl TokenCache {
    pub(super) fn get(&self, registry: &str, scope: &str) -> Option<String> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(&(registry.to_string(), scope.to_string()))
            .filter(|(_, until)| *until > Instant::now())
            .map(|(h, _)| h.clone())
    }

    fn put(&self, registry: &str, scope: &str, value: String, ttl: Duration) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() > 10_000 {
            let now = Instant::now();
            entries.retain(|_, (_, until)| *until > now);
        }
        // A registry's `expires_in` is untrusted: a huge one must not overflow the clock.
        let until = Instant::now()
            .checked_add(ttl.min(MAX_TOKEN_TTL))
            .unwrap_or_else(Instant::now);
        entries.insert((registry.to_string(), scope.to_string()), (value, until));
    }

    /// Answers a challenge: fetches a bearer token (anonymous or with credentials) or builds
    /// basic auth, caches it, and returns the `Authorization` value.
    pub(super) async fn authorize(
        &self,
        client: &reqwest::Client,
        registry: &str,
        scope: &str,
        challenge: &Challenge,
        creds: Option<&Credentials>,
    ) -> Result<String, RegistryError> {
        let unauthorized = |detail: String| RegistryError::Unauthorized {
            registry: registry.into(),
            what: scope.into(),
            detail,
        };
        match challenge {
            Challenge::Basic => {
                let c = creds.ok_or_else(|| {
                    unauthorized(
                        "registry wants basic auth and no credentials are configured".into(),
                    )
                })?;
                let value = basic(c);
                self.put(registry, scope, value.clone(), Duration::from_secs(3600));
                Ok(value)
            }
            Challenge::Bearer {
                realm,
                service,
                scope: challenge_scope,
            } => {
                let realm_url = reqwest::Url::parse(realm)
                    .map_err(|_| unauthorized(format!("token realm \"{realm}\" is not a URL")))?;
                let mut req = client.get(realm_url);
                let mut query: Vec<(&str, &str)> = Vec::new();
                if let Some(s) = service {
                    query.push(("service", s));
                }
                query.push(("scope", challenge_scope.as_deref().unwrap_or(scope)));
                req = req.query(&query);
                if let Some(c) = creds {
                    req = req.header(reqwest::header::AUTHORIZATION, basic(c));
                }
                let resp = req.send().await.map_err(|e| RegistryError::Unreachable {
                    registry: registry.into(),
                    detail: format!("token service: {}", describe_reqwest(&e)),
                })?;
                let status = resp.status();
                if status == reqwest::StatusCode::UNAUTHORIZED
                    || status == reqwest::StatusCode::FORBIDDEN
                {
                    return Err(unauthorized(format!(
                        "token service answered HTTP {}",
                        status.as_u16()
                    )));
                }
                if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                    return Err(RegistryError::RateLimited {
                        registry: registry.into(),
                        status: 429,
                        retry_after: super::parse_retry_after(resp.headers()),
                    });
                }
                if !status.is_success() {
                    return Err(RegistryError::InvalidResponse {
                        registry: registry.into(),
                        what: "token".into(),
                        detail: format!("token service answered HTTP {}", status.as_u16()),
                    });
                }
                let body = read_limited(resp, 1 << 20).await.map_err(|detail| {
                    RegistryError::InvalidResponse {
                        registry: registry.into(),
                        what: "token".into(),
                        detail,
                    }
                })?;
                let (token, ttl) =
                    token_reply(&body).map_err(|detail| RegistryError::InvalidResponse {
                        registry: registry.into(),
                        what: "token".into(),
                        detail,
                    })?;
                let value = format!("Bearer {token}");
                self.put(registry, scope, value.clone(), ttl);
                Ok(value)
            }
        }
    }
}

/// A token service's reply: the token, and how long to keep it (refreshed a little before
/// expiry; the spec's default lifetime is 60 s; bounded either way, whatever it announces).
fn token_reply(body: &[u8]) -> Result<(String, Duration), String> {
    #[derive(serde::Deserialize)]
    struct TokenReply {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let t: TokenReply =
        serde_json::from_slice(body).map_err(|e| format!("token reply is not JSON: {e}"))?;
    let token = t
        .token
        .or(t.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| "token reply has no token".to_string())?;
    let ttl = Duration::from_secs(
        t.expires_in
            .unwrap_or(60)
            .clamp(10, MAX_TOKEN_TTL.as_secs())
            - 5,
    );
    Ok((token, ttl))
}

/// Fuzzing entry: a `WWW-Authenticate` challenge and a token reply, parsed and cached as a
/// real authorization would (any input: a value or an error, never a panic).
#[doc(hidden)]
pub fn auth_for_fuzz(challenge: &str, reply: &[u8]) -> Option<String> {
    let _ = Challenge::parse(challenge);
    let (token, ttl) = token_reply(reply).ok()?;
    let cache = TokenCache::default();
    cache.put(
        "fuzz.example",
        "repository:x:pull",
        format!("Bearer {token}"),
        ttl,
    );
    cache.get("fuzz.example", "repository:x:pull")
}

fn basic(c: &Credentials) -> String {
    let raw = format!("{}:{}", c.username, c.password.expose());
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/python:pull""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/python:pull".into())
            }
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse("Bearer service=x"), None);
        assert_eq!(Challenge::parse("Negotiate"), None);
    }

    /// Issue 15: `expires_in` near u64::MAX overflowed `Instant + ttl` and panicked.
    #[test]
    fn huge_token_lifetimes_do_not_overflow() {
        let cache = TokenCache::default();
        cache.put("r", "s", "Bearer x".into(), Duration::MAX);
        assert_eq!(cache.get("r", "s").as_deref(), Some("Bearer x"));
    }
}
