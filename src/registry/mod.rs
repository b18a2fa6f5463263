//! A thin OCI distribution client: the digest of a tag by `HEAD` (all four manifest types in
//! `Accept`, so an index is never silently replaced by a child), the platform's digest from an
//! index, tag listing with `Link` pagination. Polite by construction: every request goes through
//! its host's [`budget::HostBudget`] (concurrency, requests per second, `Retry-After` pauses),
//! tokens are cached per scope until they expire, one connection pool serves all.

mod auth;
#[doc(hidden)]
pub use auth::auth_for_fuzz;
pub mod budget;
mod credentials;
mod details;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{Method, StatusCode, header};

use crate::config::{Config, RegistryConfig};
use crate::model::{Digest, ImageRef};
use budget::HostBudget;

pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
/// Manifests larger than this are refused rather than read.
const MAX_MANIFEST_BYTES: usize = 4 << 20;
const MAX_TAGS: usize = 100_000;

/// Why a registry call failed. `retry_after` is set when the registry said when to come back.
/// Retryable: `RateLimited`, `Unreachable` and 5xx `InvalidResponse`; the rest are final until
/// something changes at the registry.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("{what} not found at {registry}")]
    NotFound { registry: String, what: String },
    #[error("{registry} refused access to {what}: {detail}")]
    Unauthorized {
        registry: String,
        what: String,
        detail: String,
    },
    #[error("{registry} is rate limiting requests (HTTP {status})")]
    RateLimited {
        registry: String,
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("{registry} is unreachable: {detail}")]
    Unreachable { registry: String, detail: String },
    #[error("{registry} sent an invalid response for {what}: {detail}")]
    InvalidResponse {
        registry: String,
        what: String,
        detail: String,
    },
    #[error("{what}: {detail}")]
    Unsupported { what: String, detail: String },
    /// A policy tag found no tag of its repository that matches its policy.
    #[error("no tag of {what} matches {detail}")]
    NoMatch { what: String, detail: String },
}

impl RegistryError {
    /// The condition reason recorded on the tag.
    pub fn reason(&self) -> &'static str {
        match self {
            RegistryError::NotFound { .. } => "NotFound",
            RegistryError::Unauthorized { .. } => "Unauthorized",
            RegistryError::RateLimited { .. } => "RateLimited",
            RegistryError::Unreachable { .. } => "Unreachable",
            RegistryError::InvalidResponse { .. } => "InvalidResponse",
            RegistryError::Unsupported { .. } => "Unsupported",
            RegistryError::NoMatch { .. } => "NoMatch",
        }
    }
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RegistryError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// What the registry says a reference points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub digest: Digest,
    pub media_type: Option<String>,
    /// Platforms of an index, `os/arch[/variant]`; empty for a single manifest or when unknown.
    pub platforms: Vec<String>,
    /// The registry answered 304: the digest is the one we already knew.
    pub unchanged: bool,
    /// The manifest itself, when it was read (a GET): the image details start from it
    /// instead of fetching it again.
    pub manifest: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Options<'a> {
    pub insecure: bool,
    pub platform: Option<&'a str>,
    /// The digest we believe current: sent as `If-None-Match`, a 304 answers cheaply.
    pub known: Option<&'a Digest>,
    /// Also list an index's platforms (one GET, only worth it when the digest changed).
    pub want_platforms: bool,
    /// GET the manifest at once instead of HEAD first: for a push the registry announced, the
    /// digest has changed and the details need the body anyway (one round trip fewer).
    pub read_manifest: bool,
}

pub struct RegistryClient {
    http: reqwest::Client,
    /// For `insecure` hosts speaking TLS with an unverifiable certificate.
    http_insecure: reqwest::Client,
    hosts: Mutex<HashMap<String, Arc<Host>>>,
    configs: Vec<RegistryConfig>,
    /// `[server] allowed_registries`: hosts outside it are never contacted.
    allowed: Option<Vec<String>>,
    /// Budget for hosts without a `[[registry]]` entry: (requests per second, concurrency).
    default_budget: Option<(f64, usize)>,
    tokens: auth::TokenCache,
}

/// Where a registry host's API is reached: the host itself, Docker Hub's API host for
/// `docker.io`, or a `[[registry]] endpoint` (a mirror or pull-through cache). Only requests
/// use it; references, pull specs, events, credentials and error messages keep the host's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Set when the endpoint URL names it; otherwise HTTPS, or as `insecure` finds out.
    scheme: Option<&'static str>,
    authority: String,
    /// Repository prefix (`dockerhub-proxy/`) for proxies that serve a registry under a path,
    /// as Harbor's proxy-cache projects and Artifactory's remote repositories do.
    prefix: String,
    /// False for a configured endpoint; true for the implied one (the host, or Docker Hub's).
    implied: bool,
}

/// Docker Hub's registry API; `docker.io/v2/` itself redirects to the web site.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

impl Endpoint {
    /// `http[s]://host[:port][/repository/prefix]`.
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        let (scheme, rest) = if let Some(r) = s.strip_prefix("https://") {
            ("https", r)
        } else if let Some(r) = s.strip_prefix("http://") {
            ("http", r)
        } else {
            return Err("must start with https:// or http://".into());
        };
        let rest = rest.trim_end_matches('/');
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !crate::model::reference::is_registry_host(authority) {
            return Err(format!("has no valid host[:port] (\"{authority}\")"));
        }
        if path == "v2" || path.starts_with("v2/") {
            return Err("must be the registry's base URL, without /v2/".into());
        }
        if !path.is_empty()
            && !path
                .split('/')
                .all(crate::model::reference::is_path_component)
        {
            return Err(format!(
                "path \"{path}\" is not a repository prefix (lowercase components)"
            ));
        }
        Ok(Endpoint {
            scheme: Some(scheme),
            authority: authority.to_string(),
            prefix: if path.is_empty() {
                String::new()
            } else {
                format!("{path}/")
            },
            implied: false,
        })
    }

    fn implied(host: &str) -> Endpoint {
        Endpoint {
            scheme: None,
            authority: if host == "docker.io" {
                DOCKER_HUB_API
            } else {
                host
            }
            .to_string(),
            prefix: String::new(),
            implied: true,
        }
    }

    /// The URL of `/v2/<repository><rest>` at this endpoint, for a scheme.
    fn url(&self, scheme: &str, path_and_query: &str) -> String {
        format!("{scheme}://{}{}", self.authority, path_and_query)
    }

    /// The repository name as the endpoint knows it.
    fn repository(&self, repository: &str) -> String {
        format!("{}{}", self.prefix, repository)
    }
}

pub struct Host {
    name: String,
    endpoint: Endpoint,
    budget: HostBudget,
    /// Scheme learned for an insecure host: None until the first answer.
    scheme: Mutex<Option<&'static str>>,
    creds: credentials::Source,
    insecure: bool,
    timeout: Duration,
}

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl RegistryClient {
    pub fn new(config: &Config) -> RegistryClient {
        let mut c = Self::with_registries(config.registries.clone());
        c.allowed = config.server.allowed_registries.clone();
        c
    }

    /// `allowed_registries` names what may be contacted: a configured endpoint's host, or
    /// the registry itself (Docker Hub's API host counts as `docker.io`).
    fn check_allowed(&self, host: &Host) -> Result<(), RegistryError> {
        let Some(list) = &self.allowed else {
            return Ok(());
        };
        let ep = &host.endpoint;
        let ok = crate::config::host_allowed(list, &ep.authority)
            || (ep.implied && crate::config::host_allowed(list, &host.name));
        if ok {
            Ok(())
        } else {
            Err(RegistryError::Unsupported {
                what: host.name.clone(),
                detail: if ep.implied {
                    "registry not in [server] allowed_registries".into()
                } else {
                    format!(
                        "its endpoint {} is not in [server] allowed_registries",
                        ep.authority
                    )
                },
            })
        }
    }

    pub fn with_registries(configs: Vec<RegistryConfig>) -> RegistryClient {
        install_crypto();
        let build = |insecure: bool| {
            reqwest::Client::builder()
                .user_agent(concat!("istream/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(64)
                .redirect(reqwest::redirect::Policy::limited(5))
                .tls_danger_accept_invalid_certs(insecure)
                .build()
                .expect("HTTP client with static settings")
        };
        RegistryClient {
            http: build(false),
            http_insecure: build(true),
            hosts: Mutex::new(HashMap::new()),
            configs,
            allowed: None,
            default_budget: None,
            tokens: auth::TokenCache::default(),
        }
    }

    /// Lifts the per-host request budget (benchmarks measure the engine, not the budget).
    pub fn set_budget(&mut self, rps: f64, concurrency: usize) {
        for c in &mut self.configs {
            c.max_requests_per_second = rps;
            c.max_concurrency = concurrency;
        }
        self.default_budget = Some((rps, concurrency));
    }

    fn host(&self, name: &str) -> Arc<Host> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        hosts
            .entry(name.to_string())
            .or_insert_with(|| {
                let cfg = self.configs.iter().find(|c| c.host == name);
                let (rps, conc) = cfg
                    .map(|c| (c.max_requests_per_second, c.max_concurrency))
                    .or(self.default_budget)
                    .unwrap_or((20.0, 8));
                Arc::new(Host {
                    name: name.to_string(),
                    endpoint: cfg
                        .and_then(|c| c.endpoint.clone())
                        .unwrap_or_else(|| Endpoint::implied(name)),
                    budget: HostBudget::new(rps, conc),
                    scheme: Mutex::new(None),
                    creds: credentials::Source::new(name, cfg),
                    insecure: cfg.map(|c| c.insecure).unwrap_or(false),
                    timeout: cfg.map_or(Duration::from_secs(30), |c| c.timeout),
                })
            })
            .clone()
    }

    /// Whether to fetch image details for changes at `host` (`[[registry]] fetch_details`).
    pub fn fetch_details(&self, host: &str) -> bool {
        self.configs
            .iter()
            .find(|c| c.host == host)
            .is_none_or(|c| c.fetch_details)
    }

    /// Resolves a reference to the digest a registry publishes for it (and, with a platform,
    /// that platform's manifest digest).
    pub async fn resolve(
        &self,
        r: &ImageRef,
        opts: Options<'_>,
    ) -> Result<Resolved, RegistryError> {
        let host = self.host(&r.registry);
        self.check_allowed(&host)?;
        let reference = r.manifest_reference();
        let what = format!("{}/{}:{}", r.registry, r.repository, reference);
        let path = format!(
            "/v2/{}/manifests/{}",
            host.endpoint.repository(&r.repository),
            reference
        );
        if let Some(platform) = opts.platform {
            let reply = self
                .send(&host, r, Method::GET, &path, opts.insecure, None, &what)
                .await?;
            let media = content_type(&reply.headers);
            let digest = header_digest(&reply.headers, &host.name, &what)?
                .unwrap_or_else(|| Digest::sha256_of(&reply.body));
            return pick_platform(&host.name, &what, &reply.body, media, digest, platform);
        }
        if opts.read_manifest {
            return self.read_manifest(&host, r, &path, opts, &what).await;
        }
        let known = opts.known.map(|d| format!("\"{d}\""));
        let reply = self
            .send(
                &host,
                r,
                Method::HEAD,
                &path,
                opts.insecure,
                known.as_deref(),
                &what,
            )
            .await?;
        if reply.status == StatusCode::NOT_MODIFIED
            && let Some(k) = opts.known
        {
            return Ok(Resolved {
                digest: k.clone(),
                media_type: None,
                platforms: vec![],
                unchanged: true,
                manifest: None,
            });
        }
        let media = content_type(&reply.headers);
        let is_index = media
            .as_deref()
            .is_some_and(|m| m == MEDIA_OCI_INDEX || m == MEDIA_DOCKER_LIST);
        if let Some(digest) = header_digest(&reply.headers, &host.name, &what)?
            && !(opts.want_platforms && is_index)
        {
            check_pinned(r, &digest, &host.name, &what)?;
            return Ok(Resolved {
                digest,
                media_type: media,
                platforms: vec![],
                unchanged: false,
                manifest: None,
            });
        }
        // No digest header (some registries) or an index whose platforms we want: read it.
        self.read_manifest(&host, r, &path, opts, &what).await
    }

    async fn read_manifest(
        &self,
        host: &Host,
        r: &ImageRef,
        path: &str,
        opts: Options<'_>,
        what: &str,
    ) -> Result<Resolved, RegistryError> {
        let reply = self
            .send(host, r, Method::GET, path, opts.insecure, None, what)
            .await?;
        let media = content_type(&reply.headers);
        check_manifest(&reply.body, &host.name, what)?;
        let digest = header_digest(&reply.headers, &host.name, what)?
            .unwrap_or_else(|| Digest::sha256_of(&reply.body));
        check_pinned(r, &digest, &host.name, what)?;
        let platforms = list_platforms(&reply.body);
        Ok(Resolved {
            digest,
            media_type: media,
            platforms,
            unchanged: false,
            manifest: Some(reply.body.to_vec()),
        })
    }

    /// All tags of a repository, following `Link` pagination.
    pub async fn list_tags(
        &self,
        r: &ImageRef,
        insecure: bool,
    ) -> Result<Vec<String>, RegistryError> {
        let host = self.host(&r.registry);
        self.check_allowed(&host)?;
        let what = format!("{}/{} tags", r.registry, r.repository);
        let mut path = format!(
            "/v2/{}/tags/list?n=1000",
            host.endpoint.repository(&r.repository)
        );
        let mut tags = Vec::new();
        for _page in 0..1000 {
            let reply = self
                .send(&host, r, Method::GET, &path, insecure, None, &what)
                .await?;
            #[derive(serde::Deserialize)]
            struct List {
                tags: Option<Vec<String>>,
            }
            let list: List = serde_json::from_slice(&reply.body).map_err(|e| {
                RegistryError::InvalidResponse {
                    registry: host.name.clone(),
                    what: what.clone(),
                    detail: format!("tag list is not JSON: {e}"),
                }
            })?;
            tags.extend(list.tags.unwrap_or_default());
            if tags.len() > MAX_TAGS {
                break;
            }
            match next_link(&reply.headers) {
                Some(next) => path = next,
                None => break,
            }
        }
        Ok(tags)
    }

    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        host: &Host,
        r: &ImageRef,
        method: Method,
        path_and_query: &str,
        insecure: bool,
        if_none_match: Option<&str>,
        what: &str,
    ) -> Result<Reply, RegistryError> {
        // Like docker, a registry on a loopback address may speak plain HTTP without opt-in.
        let insecure = insecure || host.insecure || is_loopback(&host.endpoint.authority);
        let scope = format!(
            "repository:{}:pull",
            host.endpoint.repository(&r.repository)
        );
        let mut authorization: Option<String> = self.tokens.get(&host.name, &scope);
        let mut tried_challenge = false;
        let mut tried_fallback = false;
        loop {
            let _permit = host.budget.acquire().await;
            let scheme = match host.endpoint.scheme {
                Some(s) => s,
                None if insecure => host.scheme(),
                None => "https",
            };
            let client = if insecure {
                &self.http_insecure
            } else {
                &self.http
            };
            let url = host.endpoint.url(scheme, path_and_query);
            let mut req = client
                .request(method.clone(), &url)
                .timeout(host.timeout)
                .header(header::ACCEPT, ACCEPT_ALL);
            if let Some(a) = &authorization {
                req = req.header(header::AUTHORIZATION, a);
            }
            if let Some(etag) = if_none_match {
                req = req.header(header::IF_NONE_MATCH, etag);
            }
            let resp = match req.send().await {
                Ok(resp) => resp,
                Err(e) => {
                    if insecure
                        && host.endpoint.scheme.is_none()
                        && scheme == "https"
                        && !tried_fallback
                        && !e.is_timeout()
                    {
                        // The first answer of an insecure host decides its scheme.
                        tried_fallback = true;
                        host.set_scheme("http");
                        continue;
                    }
                    return Err(RegistryError::Unreachable {
                        registry: host.name.clone(),
                        detail: describe_reqwest(&e),
                    });
                }
            };
            if insecure && scheme == "https" {
                host.set_scheme("https");
            }
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !tried_challenge {
                tried_challenge = true;
                let challenge = resp
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(auth::Challenge::parse);
                let Some(c) = challenge else {
                    return Err(RegistryError::Unauthorized {
                        registry: host.name.clone(),
                        what: what.into(),
                        detail: "401 without a usable WWW-Authenticate challenge".into(),
                    });
                };
                authorization = Some(
                    self.tokens
                        .authorize(
                            client,
                            &host.name,
                            &scope,
                            &c,
                            host.creds.get().await.as_ref(),
                        )
                        .await?,
                );
                continue;
            }
            let headers = resp.headers().clone();
            return match status {
                s if s.is_success() || s == StatusCode::NOT_MODIFIED => {
                    let body = if method == Method::HEAD || s == StatusCode::NOT_MODIFIED {
                        Vec::new()
                    } else {
                        read_limited(resp, MAX_MANIFEST_BYTES)
                            .await
                            .map_err(|detail| RegistryError::InvalidResponse {
                                registry: host.name.clone(),
                                what: what.into(),
                                detail,
                            })?
                    };
                    Ok(Reply {
                        status,
                        headers,
                        body,
                    })
                }
                StatusCode::NOT_FOUND => Err(RegistryError::NotFound {
                    registry: host.name.clone(),
                    what: what.into(),
                }),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    Err(RegistryError::Unauthorized {
                        registry: host.name.clone(),
                        what: what.into(),
                        detail: format!("HTTP {}", status.as_u16()),
                    })
                }
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                    let retry_after = parse_retry_after(&headers);
                    if let Some(d) = retry_after {
                        host.budget.pause_for(d);
                    }
                    Err(RegistryError::RateLimited {
                        registry: host.name.clone(),
                        status: status.as_u16(),
                        retry_after,
                    })
                }
                s => Err(RegistryError::InvalidResponse {
                    registry: host.name.clone(),
                    what: what.into(),
                    detail: format!("unexpected HTTP {}", s.as_u16()),
                }),
            };
        }
    }
}

struct Reply {
    status: StatusCode,
    headers: header::HeaderMap,
    body: Vec<u8>,
}

impl Host {
    fn scheme(&self) -> &'static str {
        self.scheme
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or("https")
    }
    fn set_scheme(&self, scheme: &'static str) {
        *self.scheme.lock().unwrap_or_else(|e| e.into_inner()) = Some(scheme);
    }
    pub fn budget(&self) -> &HostBudget {
        &self.budget
    }
}

fn is_loopback(host: &str) -> bool {
    let h = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn content_type(headers: &header::HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or(s).trim().to_string())
}

fn header_digest(
    headers: &header::HeaderMap,
    registry: &str,
    what: &str,
) -> Result<Option<Digest>, RegistryError> {
    match headers.get("docker-content-digest") {
        None => Ok(None),
        Some(v) => {
            let s = v.to_str().unwrap_or("");
            Digest::parse(s)
                .map(Some)
                .map_err(|e| RegistryError::InvalidResponse {
                    registry: registry.into(),
                    what: what.into(),
                    detail: format!("Docker-Content-Digest: {}", e.why),
                })
        }
    }
}

/// A manifest is a JSON object with a schema version; anything else is not one.
fn check_manifest(body: &[u8], registry: &str, what: &str) -> Result<(), RegistryError> {
    let ok = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .is_some_and(|v| v.get("schemaVersion").is_some_and(|s| s.is_u64()));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidResponse {
            registry: registry.into(),
            what: what.into(),
            detail: "manifest body is not a JSON manifest with a schemaVersion".into(),
        })
    }
}

fn check_pinned(
    r: &ImageRef,
    digest: &Digest,
    registry: &str,
    what: &str,
) -> Result<(), RegistryError> {
    match &r.digest {
        Some(pinned) if pinned != digest => Err(RegistryError::InvalidResponse {
            registry: registry.into(),
            what: what.into(),
            detail: format!("asked for {pinned}, got content with digest {digest}"),
        }),
        _ => Ok(()),
    }
}

#[derive(serde::Deserialize)]
struct IndexDoc {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<Vec<IndexEntry>>,
}

#[derive(serde::Deserialize)]
struct IndexEntry {
    digest: String,
    platform: Option<PlatformDoc>,
}

#[derive(serde::Deserialize)]
struct PlatformDoc {
    os: String,
    architecture: String,
    variant: Option<String>,
}

impl PlatformDoc {
    fn name(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{}", self.os, self.architecture, v),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

fn list_platforms(body: &[u8]) -> Vec<String> {
    serde_json::from_slice::<IndexDoc>(body)
        .ok()
        .and_then(|d| d.manifests)
        .map(|m| {
            m.iter()
                .filter_map(|e| e.platform.as_ref().map(PlatformDoc::name))
                .collect()
        })
        .unwrap_or_default()
}

fn pick_platform(
    registry: &str,
    what: &str,
    body: &[u8],
    media: Option<String>,
    digest: Digest,
    platform: &str,
) -> Result<Resolved, RegistryError> {
    let invalid = |detail: String| RegistryError::InvalidResponse {
        registry: registry.into(),
        what: what.into(),
        detail,
    };
    let doc: IndexDoc =
        serde_json::from_slice(body).map_err(|e| invalid(format!("manifest is not JSON: {e}")))?;
    let is_index = media
        .as_deref()
        .or(doc.media_type.as_deref())
        .is_some_and(|m| m == MEDIA_OCI_INDEX || m == MEDIA_DOCKER_LIST)
        || doc.manifests.is_some();
    if !is_index {
        // A single-platform image: its own digest is the platform's.
        return Ok(Resolved {
            digest,
            media_type: media,
            platforms: vec![],
            unchanged: false,
            manifest: None,
        });
    }
    let manifests = doc.manifests.unwrap_or_default();
    let platforms: Vec<String> = manifests
        .iter()
        .filter_map(|e| e.platform.as_ref().map(PlatformDoc::name))
        .collect();
    let wanted = |p: &PlatformDoc| {
        p.name() == platform
            || (platform.matches('/').count() == 1
                && format!("{}/{}", p.os, p.architecture) == platform)
    };
    let entry = manifests
        .iter()
        .find(|e| e.platform.as_ref().is_some_and(wanted))
        .ok_or_else(|| RegistryError::NotFound {
            registry: registry.into(),
            what: format!(
                "platform {platform} in {what} (has {})",
                platforms.join(", ")
            ),
        })?;
    let child = Digest::parse(&entry.digest).map_err(|e| invalid(format!("index entry: {e}")))?;
    Ok(Resolved {
        digest: child,
        media_type: media,
        platforms: vec![platform.to_string()],
        unchanged: false,
        manifest: None,
    })
}

fn next_link(headers: &header::HeaderMap) -> Option<String> {
    let link = headers.get(header::LINK)?.to_str().ok()?;
    for part in link.split(',') {
        let Some((url, params)) = part.split_once(';') else {
            continue;
        };
        let is_next = params.split(';').any(|p| {
            matches!(
                p.trim().replace(' ', "").as_str(),
                "rel=\"next\"" | "rel=next"
            )
        });
        if is_next {
            let url = url.trim().trim_start_matches('<').trim_end_matches('>');
            // Keep only path and query, so the host stays the one we trust.
            return url.find("/v2/").map(|i| url[i..].to_string());
        }
    }
    None
}

/// `Retry-After` in seconds or as an HTTP date, capped at one day.
pub fn parse_retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    let cap = Duration::from_secs(24 * 3600);
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(cap));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let d = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(d.to_std().unwrap_or(Duration::ZERO).min(cap))
}

/// Reads a body up to `limit` bytes; a larger one is an error, never an allocation.
pub async fn read_limited(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    if let Some(len) = resp.content_length()
        && len > limit as u64
    {
        return Err(format!(
            "body of {len} bytes exceeds the {limit} byte limit"
        ));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| describe_reqwest(&e))? {
        if body.len() + chunk.len() > limit {
            return Err(format!("body exceeds the {limit} byte limit"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A reqwest error with its causes, which carry the useful part ("connection refused").
pub fn describe_reqwest(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() {
        "timed out".to_string()
    } else {
        // The URL may carry a query with a secret; say where by host only.
        let text = e.to_string();
        match e.url() {
            Some(u) => text.replace(u.as_str(), u.host_str().unwrap_or("")),
            None => text,
        }
    };
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pagination() {
        let mut h = header::HeaderMap::new();
        h.insert(
            header::LINK,
            "</v2/a/b/tags/list?last=x&n=2>; rel=\"next\""
                .parse()
                .unwrap(),
        );
        assert_eq!(
            next_link(&h).as_deref(),
            Some("/v2/a/b/tags/list?last=x&n=2")
        );
        h.insert(
            header::LINK,
            "<https://r.example/v2/a/tags/list?last=y>; rel=next"
                .parse()
                .unwrap(),
        );
        assert_eq!(next_link(&h).as_deref(), Some("/v2/a/tags/list?last=y"));
    }

    #[test]
    fn platform_from_index() {
        let d1 = format!("sha256:{}", "1".repeat(64));
        let d2 = format!("sha256:{}", "2".repeat(64));
        let body = format!(
            r#"{{"mediaType":"{MEDIA_OCI_INDEX}","manifests":[{{"digest":"{d1}","platform":{{"os":"linux","architecture":"amd64"}}}},{{"digest":"{d2}","platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#
        );
        let top = Digest::sha256_of(body.as_bytes());
        let r = pick_platform(
            "r",
            "w",
            body.as_bytes(),
            Some(MEDIA_OCI_INDEX.into()),
            top.clone(),
            "linux/arm64",
        )
        .unwrap();
        assert_eq!(r.digest.as_str(), d2);
        let e = pick_platform("r", "w", body.as_bytes(), None, top, "linux/s390x").unwrap_err();
        assert_eq!(e.reason(), "NotFound");
        assert_eq!(
            list_platforms(body.as_bytes()),
            vec!["linux/amd64", "linux/arm64/v8"]
        );
    }

    #[test]
    fn retry_after_forms() {
        let mut h = header::HeaderMap::new();
        h.insert(header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&h), None);
    }

    #[test]
    fn allowed_registry_patterns() {
        let p = vec![
            "127.0.0.1:*".to_string(),
            "*.example.com".to_string(),
            "quay.io".to_string(),
        ];
        assert!(crate::config::host_allowed(&p, "127.0.0.1:5000"));
        assert!(crate::config::host_allowed(&p, "r.example.com"));
        assert!(crate::config::host_allowed(&p, "quay.io"));
        assert!(!crate::config::host_allowed(&p, "docker.io"));
        assert!(!crate::config::host_allowed(&p, "example.com.evil.org"));
    }

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example.com:5000"));
    }

    /// Docker Hub's API is at registry-1.docker.io (docker.io/v2/ redirects to the web site).
    #[test]
    fn docker_hub_requests_go_to_its_api_host() {
        let r = ImageRef::parse("python:3.12").unwrap();
        let ep = Endpoint::implied(&r.registry);
        let path = format!(
            "/v2/{}/manifests/{}",
            ep.repository(&r.repository),
            r.manifest_reference()
        );
        assert_eq!(
            ep.url("https", &path),
            "https://registry-1.docker.io/v2/library/python/manifests/3.12"
        );
        let other = Endpoint::implied("quay.io");
        assert_eq!(other.url("https", "/v2/"), "https://quay.io/v2/");
    }

    #[test]
    fn endpoints_parse_and_refuse() {
        let ep = Endpoint::parse("https://harbor.corp.example/dockerhub-proxy/").unwrap();
        assert_eq!(ep.scheme, Some("https"));
        assert_eq!(ep.authority, "harbor.corp.example");
        assert_eq!(
            ep.repository("library/python"),
            "dockerhub-proxy/library/python"
        );
        let ep = Endpoint::parse("http://127.0.0.1:5000").unwrap();
        assert_eq!(
            ep.url("http", "/v2/a/tags/list"),
            "http://127.0.0.1:5000/v2/a/tags/list"
        );
        assert_eq!(ep.repository("a"), "a");
        for bad in [
            "mirror.example.com",
            "ftp://mirror.example.com",
            "https://",
            "https://mirror.example.com/v2/",
            "https://mirror.example.com/Proxy",
            "https://bad host",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
