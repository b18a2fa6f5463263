//! `triggers.toml`: raw serde types (`raw`), validated into [`Config`] here without binding
//! anything. Every error names the file, the key and, where the TOML parser knows it, the line.
//! Environment overrides `ISTREAM_<SECTION>__<KEY>` are applied between the two steps; the CLI's
//! own `ISTREAM_*` variables (no `__`) are never read as config.

mod raw;
pub mod schedule;
pub mod secret;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::Digest as _;

use crate::model::{ImageRef, StreamName, StreamTagRef, TagFrom, TagSpec};
pub use schedule::Schedule;
pub use secret::Secret;

/// A config that cannot be used; the message carries file, line and key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub nats: Option<NatsConfig>,
    pub schedule: ScheduleConfig,
    pub hooks: HooksConfig,
    pub api_tokens: Vec<ApiToken>,
    pub registries: Vec<RegistryConfig>,
    pub streams: Vec<DeclaredStream>,
    pub triggers: Vec<TriggerConfig>,
    pub delivery: DeliveryConfig,
    /// `[history] max_entries`: newest entries kept per tag (0: all, as OpenShift keeps).
    pub history_max_entries: usize,
    /// `[[forge]]`: (host, kind) of self-hosted forges, for compare links.
    pub forges: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub allow_unauthenticated: bool,
    /// Request bodies above this many bytes get 413.
    pub max_body_bytes: usize,
    /// Name of this engine in event sources (`istream://<instance>/...`).
    pub instance: String,
    /// PEM certificate chain and key: serve HTTPS instead of HTTP.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Registry host patterns the engine may contact (None: any).
    pub allowed_registries: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Nats,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub kind: StoreKind,
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub url: String,
    pub subject_prefix: String,
    /// Publish to JetStream (stream kept, acks awaited); false: core NATS fire-and-forget.
    pub jetstream: bool,
    pub stream: String,
    pub max_age: Duration,
    pub replicas: usize,
}

impl NatsConfig {
    /// The defaults of a `[nats]` section with only `url` set.
    pub fn with_url(url: &str) -> NatsConfig {
        NatsConfig {
            url: url.to_string(),
            subject_prefix: "istream".into(),
            jetstream: true,
            stream: "ISTREAM".into(),
            max_age: Duration::from_secs(7 * 24 * 3600),
            replicas: 1,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ScheduleConfig {
    pub interval: Schedule,
    /// Most tags `import-image --all` imports.
    pub max_import_all: usize,
}

#[derive(Debug, Clone)]
pub struct HooksConfig {
    pub token: Option<Secret>,
    /// Per-source overrides (`registry`, `dockerhub`, `harbor`, `quay`, `ghcr`, ...).
    pub tokens: BTreeMap<String, Secret>,
    /// `[hooks.<source>] registry`: the host for senders whose payload names none.
    pub registries: BTreeMap<String, String>,
    /// `[hooks.artifactory] subdomain`: Artifactory's subdomain access method.
    pub artifactory_subdomain: bool,
    /// Most hook requests handled at once.
    pub max_concurrency: usize,
}

#[derive(Debug, Clone)]
pub enum TokenCheck {
    Plain(Secret),
    Sha256([u8; 32]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verb {
    Read,
    Tag,
    Import,
    Admin,
}

#[derive(Debug, Clone)]
pub struct Scope {
    pub namespace: String,
    pub verb: Verb,
}

#[derive(Debug, Clone)]
pub struct ApiToken {
    pub name: String,
    pub check: TokenCheck,
    pub scopes: Vec<Scope>,
}

#[derive(Debug, Clone)]
pub struct RegistryConfig {
    pub host: String,
    pub insecure: bool,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub docker_config: Option<PathBuf>,
    pub max_requests_per_second: f64,
    pub max_concurrency: usize,
    pub internal: bool,
    /// Whole-request limit (connect, headers, body): a registry that trickles gives up.
    pub timeout: Duration,
    /// Where this host's requests go instead (a mirror or pull-through cache).
    pub endpoint: Option<crate::registry::Endpoint>,
    /// Fetch manifest and config of changed images for the event's details (SPEC 10).
    pub fetch_details: bool,
}

#[derive(Debug, Clone)]
pub struct DeclaredTag {
    pub name: String,
    pub spec: TagSpec,
    /// Hash of the declaration, to apply it only when it changed (`kubectl apply`).
    pub hash: String,
}

#[derive(Debug, Clone)]
pub struct DeclaredStream {
    pub name: StreamName,
    pub tags: Vec<DeclaredTag>,
}

#[derive(Debug, Clone)]
pub enum Sink {
    Webhook {
        url: reqwest::Url,
        secret: Option<Secret>,
        headers: Vec<(String, String)>,
        body_template: Option<String>,
        signature_header: String,
        /// CloudEvents HTTP binding: binary mode (data as the body, attributes as `ce-*`).
        binary: bool,
        /// `signature = "standard"`: Standard Webhooks headers instead of istream's.
        standard: bool,
    },
    GithubDispatch {
        api: reqwest::Url,
        repo: String,
        event_type: String,
        token: Secret,
    },
    GithubWorkflow {
        api: reqwest::Url,
        repo: String,
        workflow: String,
        git_ref: String,
        token: Secret,
    },
    Gitlab {
        api: reqwest::Url,
        project: String,
        git_ref: String,
        token: Secret,
    },
    Jenkins {
        job_url: reqwest::Url,
        user: String,
        token: Secret,
    },
    Buildkite {
        api: reqwest::Url,
        org: String,
        pipeline: String,
        branch: String,
        commit: String,
        token: Secret,
    },
    Circleci {
        api: reqwest::Url,
        project_slug: String,
        branch: String,
        token: Secret,
    },
    Azure {
        api: reqwest::Url,
        organization: String,
        project: String,
        pipeline_id: u64,
        branch: String,
        token: Secret,
    },
}

impl Sink {
    pub fn kind(&self) -> &'static str {
        match self {
            Sink::Webhook { .. } => "webhook",
            Sink::GithubDispatch { .. } | Sink::GithubWorkflow { .. } => "github",
            Sink::Gitlab { .. } => "gitlab",
            Sink::Jenkins { .. } => "jenkins",
            Sink::Buildkite { .. } => "buildkite",
            Sink::Circleci { .. } => "circleci",
            Sink::Azure { .. } => "azure",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TriggerConfig {
    pub name: String,
    pub on: Vec<StreamTagRef>,
    pub paused: bool,
    pub skip_initial: bool,
    pub sink: Sink,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub max_age: Duration,
}

#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    pub max_attempts: u32,
    pub max_age: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub timeout: Duration,
    /// Deliveries in flight at once, over all triggers.
    pub concurrency: usize,
    /// How long settled (delivered, superseded) deliveries are kept.
    pub retention: Duration,
}

/// Where a key sits in the file, for error messages.
struct Locator<'a> {
    file: String,
    text: &'a str,
    /// The spanned document, parsed only when an error must be located: a config of
    /// thousands of tags would otherwise hold a second parse of itself while it loads.
    table: std::cell::OnceCell<Option<toml::Spanned<toml::de::DeTable<'a>>>>,
}

enum P<'a> {
    K(&'a str),
    I(usize),
}

impl<'a> Locator<'a> {
    fn new(file: &Path, text: &'a str) -> Locator<'a> {
        Locator {
            file: file.display().to_string(),
            text,
            table: std::cell::OnceCell::new(),
        }
    }

    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    /// `file:line: key: message`, the line found by walking the spanned document.
    fn err(&self, path: &[P], msg: impl std::fmt::Display) -> ConfigError {
        let key = path
            .iter()
            .map(|p| match p {
                P::K(k) => format!(".{k}"),
                P::I(i) => format!("[{i}]"),
            })
            .collect::<String>();
        let key = key.trim_start_matches('.');
        let line = self.find(path).map(|o| format!(":{}", self.line_of(o)));
        ConfigError(format!(
            "{}{}: key `{}`: {}",
            self.file,
            line.unwrap_or_default(),
            key,
            msg
        ))
    }

    fn find(&self, path: &[P]) -> Option<usize> {
        let table = self
            .table
            .get_or_init(|| toml::de::DeTable::parse(self.text).ok())
            .as_ref()?;
        let mut best = None;
        let mut cur: Option<&toml::de::DeValue> = None;
        for (n, p) in path.iter().enumerate() {
            let next = match (n, p) {
                (0, P::K(k)) => table.get_ref().get(*k),
                (_, P::K(k)) => cur.and_then(|v| v.as_table()).and_then(|t| t.get(*k)),
                (_, P::I(i)) => cur.and_then(|v| v.as_array()).and_then(|a| a.get(*i)),
            }?;
            best = Some(next.span().start);
            cur = Some(next.get_ref());
        }
        best
    }

    /// Best effort for serde errors: the key on the line of the span, and its `[section]`.
    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let Some(span) = e.span() else {
            return ConfigError(format!("{}: {}", self.file, e.message()));
        };
        let line_no = self.line_of(span.start);
        let lines: Vec<&str> = self.text.lines().collect();
        let line = lines.get(line_no - 1).copied().unwrap_or("");
        let key = line
            .split_once('=')
            .map(|(k, _)| k.trim().trim_start_matches('{').trim().to_string())
            .filter(|k| !k.is_empty() && !k.starts_with('['));
        // The table the line belongs to: the line itself when it is a table header (an
        // unknown table is about itself, not the table above it).
        let section = lines[..line_no.min(lines.len())]
            .iter()
            .rev()
            .find(|l| l.trim_start().starts_with('['))
            .map(|l| l.trim().trim_matches(['[', ']']).trim().to_string());
        let is_header = line.trim_start().starts_with('[');
        let key = match (section, key) {
            (Some(s), Some(k)) => format!(" key `{s}.{k}`:"),
            (None, Some(k)) => format!(" key `{k}`:"),
            (Some(s), None) if is_header => format!(" table `[{s}]`:"),
            (Some(s), None) => format!(" in `[{s}]`:"),
            (None, None) => String::new(),
        };
        ConfigError(format!(
            "{}:{}:{} {}",
            self.file,
            line_no,
            key,
            e.message().trim()
        ))
    }
}

/// The environment variables read as config overrides: `ISTREAM_<SECTION>__<KEY>`.
fn env_overrides() -> Vec<(String, Vec<String>, String)> {
    let mut out = Vec::new();
    for (k, v) in std::env::vars() {
        let Some(rest) = k.strip_prefix("ISTREAM_") else {
            continue;
        };
        if !rest.contains("__") {
            continue;
        }
        let path = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        out.push((k, path, v));
    }
    out.sort();
    out
}

fn parse_env_value(v: &str) -> toml::Value {
    // A value that parses as a TOML value keeps its type (`8`, `true`, `["a"]`); anything else
    // is a string, so `ISTREAM_SERVER__LISTEN=127.0.0.1:9000` needs no quotes.
    toml::from_str::<toml::Table>(&format!("v = {v}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(v.to_string()))
}

impl Config {
    /// Loads from a file (which may be absent only when `must_exist` is false: then defaults).
    pub fn load(path: &Path, must_exist: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => String::new(),
            Err(e) => return Err(ConfigError(format!("{}: cannot read: {e}", path.display()))),
        };
        Config::from_str(path, &text)
    }

    pub fn from_str(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let loc = Locator::new(path, text);
        let mut raw: raw::Raw = toml::from_str(text).map_err(|e| loc.toml_error(&e))?;
        let overrides = env_overrides();
        if !overrides.is_empty() {
            let mut table: toml::Table = toml::from_str(text).map_err(|e| loc.toml_error(&e))?;
            for (var, keys, value) in &overrides {
                let mut t = &mut table;
                for k in &keys[..keys.len() - 1] {
                    let entry = t
                        .entry(k.clone())
                        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                    t = entry.as_table_mut().ok_or_else(|| {
                        ConfigError(format!("{var}: `{k}` is not a table in {}", path.display()))
                    })?;
                }
                t.insert(keys[keys.len() - 1].clone(), parse_env_value(value));
            }
            raw = raw::Raw::deserialize_value(toml::Value::Table(table)).map_err(|e| {
                let vars: Vec<&str> = overrides.iter().map(|o| o.0.as_str()).collect();
                ConfigError(format!(
                    "{} with environment overrides {}: {}",
                    path.display(),
                    vars.join(", "),
                    e.message().trim()
                ))
            })?;
        }
        validate(raw, path, &loc)
    }
}

fn secret(
    loc: &Locator,
    path: &[P],
    env: &Option<String>,
    file: &Option<String>,
) -> Result<Option<Secret>, ConfigError> {
    match (env, file) {
        (Some(_), Some(_)) => Err(loc.err(path, "give either *_env or *_file, not both")),
        (Some(var), None) => match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(Some(Secret::new(v))),
            _ => Err(loc.err(path, format!("environment variable {var} is not set"))),
        },
        (None, Some(f)) => match std::fs::read_to_string(expand_home(f)) {
            Ok(v) if !v.trim().is_empty() => Ok(Some(Secret::new(v.trim().to_string()))),
            Ok(_) => Err(loc.err(path, format!("secret file {f} is empty"))),
            Err(e) => Err(loc.err(path, format!("cannot read secret file {f}: {e}"))),
        },
        (None, None) => Ok(None),
    }
}

pub fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    }
}

/// A sink's token: `token_env` or `token_file`, one of them required (named at `at`).
fn sink_token(
    loc: &Locator,
    env_path: &[P],
    at: &[P],
    env: &Option<String>,
    file: &Option<String>,
    sink: &str,
) -> Result<Secret, ConfigError> {
    secret(loc, env_path, env, file)?
        .ok_or_else(|| loc.err(at, format!("{sink} needs token_env or token_file")))
}

/// A path segment of a sink's URL (an organization, a pipeline): non-empty, no `/`.
fn segment(loc: &Locator, path: &[P], v: &str) -> Result<(), ConfigError> {
    if v.is_empty() || v.contains('/') {
        return Err(loc.err(path, format!("\"{v}\" must be a name (no '/')")));
    }
    Ok(())
}

/// The longest duration any key takes: every period, timeout and age fits in a year, and
/// longer ones would overflow the clocks they are added to.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

fn duration(loc: &Locator, path: &[P], s: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(s).map_err(|e| {
        loc.err(
            path,
            format!("\"{s}\" is not a duration like 30s or 15m: {e}"),
        )
    })?;
    if d > MAX_DURATION {
        return Err(loc.err(path, format!("\"{s}\" is longer than the 366 days maximum")));
    }
    Ok(d)
}

fn url(loc: &Locator, path: &[P], s: &str) -> Result<reqwest::Url, ConfigError> {
    let u =
        reqwest::Url::parse(s).map_err(|e| loc.err(path, format!("\"{s}\" is not a URL: {e}")))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(loc.err(path, format!("\"{s}\" must be an http(s) URL with a host")));
    }
    Ok(u)
}

fn validate(raw: raw::Raw, path: &Path, loc: &Locator) -> Result<Config, ConfigError> {
    use P::{I, K};
    let listen_s = raw.server.listen.unwrap_or_else(|| "127.0.0.1:8080".into());
    let listen: SocketAddr = listen_s.parse().map_err(|_| {
        loc.err(
            &[K("server"), K("listen")],
            format!("\"{listen_s}\" is not an address like 127.0.0.1:8080"),
        )
    })?;
    let tls = match (&raw.server.tls_cert_file, &raw.server.tls_key_file) {
        (Some(c), Some(k)) => {
            for (key, f) in [("tls_cert_file", c), ("tls_key_file", k)] {
                if !expand_home(f).is_file() {
                    return Err(loc.err(
                        &[K("server"), K(key)],
                        format!("{f} is not a readable file"),
                    ));
                }
            }
            Some((expand_home(c), expand_home(k)))
        }
        (None, None) => None,
        _ => {
            return Err(loc.err(
                &[K("server"), K("tls_cert_file")],
                "give both tls_cert_file and tls_key_file",
            ));
        }
    };
    if let Some(list) = &raw.server.allowed_registries
        && let Some(bad) = list
            .iter()
            .find(|p| p.is_empty() || p.contains('/') || p.matches('*').count() > 1)
    {
        return Err(loc.err(
            &[K("server"), K("allowed_registries")],
            format!("\"{bad}\" is not a host pattern like registry.example.com, 127.0.0.1:* or *.example.com"),
        ));
    }
    let server = ServerConfig {
        allowed_registries: raw.server.allowed_registries.clone(),
        tls,
        listen,
        allow_unauthenticated: raw.server.allow_unauthenticated.unwrap_or(false),
        max_body_bytes: raw.server.max_body_bytes.unwrap_or(1 << 20),
        instance: raw.server.instance.unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "istream".into())
        }),
    };
    let store = StoreConfig {
        kind: match raw.store.kind.as_deref().unwrap_or("sqlite") {
            "sqlite" | "embedded" => StoreKind::Sqlite,
            "nats" => StoreKind::Nats,
            other => {
                return Err(loc.err(
                    &[K("store"), K("kind")],
                    format!("\"{other}\" is not a store kind (sqlite or nats)"),
                ));
            }
        },
        path: PathBuf::from(raw.store.path.unwrap_or_else(|| "istream.db".into())),
    };
    if store.kind == StoreKind::Nats && raw.nats.is_none() {
        return Err(loc.err(
            &[K("store"), K("kind")],
            "store kind \"nats\" needs a [nats] section",
        ));
    }
    let nats = match raw.nats {
        None => None,
        Some(n) => {
            let url = n.url.unwrap_or_else(|| "nats://127.0.0.1:4222".into());
            if let Err(e) = crate::bus::server_addrs(&url) {
                return Err(loc.err(&[K("nats"), K("url")], e));
            }
            let prefix = n.subject_prefix.unwrap_or_else(|| "istream".into());
            if prefix.is_empty()
                || prefix
                    .split('.')
                    .any(|t| t.is_empty() || t.contains(['*', '>', ' ']))
            {
                return Err(loc.err(
                    &[K("nats"), K("subject_prefix")],
                    format!("\"{prefix}\" is not a valid subject prefix"),
                ));
            }
            Some(NatsConfig {
                url,
                subject_prefix: prefix,
                jetstream: n.jetstream.unwrap_or(true),
                stream: n.stream.unwrap_or_else(|| "ISTREAM".into()),
                max_age: match n.max_age {
                    Some(s) => duration(loc, &[K("nats"), K("max_age")], &s)?,
                    None => Duration::from_secs(7 * 24 * 3600),
                },
                replicas: n.replicas.unwrap_or(1),
            })
        }
    };
    let interval_s = raw.schedule.interval.unwrap_or_else(|| "15m".into());
    let schedule = ScheduleConfig {
        interval: Schedule::parse(&interval_s)
            .map_err(|e| loc.err(&[K("schedule"), K("interval")], e))?,
        max_import_all: raw.schedule.max_import_all.unwrap_or(50),
    };
    let mut hook_tokens = BTreeMap::new();
    let mut hook_registries = BTreeMap::new();
    for (name, t) in raw.hooks.sources() {
        if let Some(r) = &t.registry {
            let host = crate::model::reference::canonical_host(r);
            if !crate::model::reference::is_registry_host(host) {
                return Err(loc.err(
                    &[K("hooks"), K(name), K("registry")],
                    format!("\"{r}\" is not a registry host[:port]"),
                ));
            }
            hook_registries.insert(name.to_string(), host.to_string());
        }
        if t.subdomain.is_some() && name != "artifactory" {
            return Err(loc.err(
                &[K("hooks"), K(name), K("subdomain")],
                "only [hooks.artifactory] has a subdomain access method",
            ));
        }
        if let Some(s) = secret(
            loc,
            &[K("hooks"), K(name), K("token_env")],
            &t.token_env,
            &t.token_file,
        )? {
            hook_tokens.insert(name.to_string(), s);
        }
    }
    let hooks = HooksConfig {
        token: secret(
            loc,
            &[K("hooks"), K("token_env")],
            &raw.hooks.token_env,
            &raw.hooks.token_file,
        )?,
        tokens: hook_tokens,
        registries: hook_registries,
        artifactory_subdomain: raw
            .hooks
            .artifactory
            .as_ref()
            .and_then(|a| a.subdomain)
            .unwrap_or(false),
        max_concurrency: raw.hooks.max_concurrency.unwrap_or(64),
    };

    let mut api_tokens = Vec::new();
    for (i, t) in raw.api.token.iter().enumerate() {
        let p = |k| [K("api"), K("token"), I(i), K(k)];
        let check = match (
            &t.sha256,
            secret(loc, &p("token_env"), &t.token_env, &t.token_file)?,
        ) {
            (Some(h), None) => {
                let bytes = hex::decode(h)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| loc.err(&p("sha256"), "must be 64 hex characters"))?;
                TokenCheck::Sha256(bytes)
            }
            (None, Some(s)) => TokenCheck::Plain(s),
            _ => {
                return Err(loc.err(
                    &p("name"),
                    "give exactly one of token_env, token_file or sha256",
                ));
            }
        };
        let mut scopes = Vec::new();
        for s in &t.scopes {
            let (ns, verb) = s
                .rsplit_once(':')
                .ok_or_else(|| loc.err(&p("scopes"), format!("\"{s}\" is not namespace:verb")))?;
            let verb = match verb {
                "read" => Verb::Read,
                "tag" => Verb::Tag,
                "import" => Verb::Import,
                "admin" => Verb::Admin,
                _ => {
                    return Err(loc.err(
                        &p("scopes"),
                        format!("\"{s}\": verb must be read, tag, import or admin"),
                    ));
                }
            };
            scopes.push(Scope {
                namespace: ns.to_string(),
                verb,
            });
        }
        api_tokens.push(ApiToken {
            name: t.name.clone(),
            check,
            scopes,
        });
    }
    if api_tokens.is_empty() && !server.listen.ip().is_loopback() && !server.allow_unauthenticated {
        return Err(loc.err(
            &[K("server"), K("listen")],
            format!(
                "{} is not a loopback address and no [[api.token]] is declared; declare tokens or set allow_unauthenticated = true",
                server.listen
            ),
        ));
    }

    let mut registries = Vec::new();
    for (i, r) in raw.registry.iter().enumerate() {
        let p = |k| [K("registry"), I(i), K(k)];
        if r.host.is_empty() || r.host.contains('/') {
            return Err(loc.err(&p("host"), format!("\"{}\" is not a host[:port]", r.host)));
        }
        let password = secret(loc, &p("password_env"), &r.password_env, &r.password_file)?;
        if password.is_some() && r.username.is_none() {
            return Err(loc.err(&p("username"), "a password needs a username"));
        }
        let rps = r.max_requests_per_second.unwrap_or(20.0);
        if !(rps == 0.0 || (0.001..=1_000_000.0).contains(&rps)) {
            return Err(loc.err(
                &p("max_requests_per_second"),
                format!("{rps} must be 0 (unlimited) or between 0.001 and 1000000"),
            ));
        }
        let conc = r.max_concurrency.unwrap_or(8);
        if conc == 0 {
            return Err(loc.err(&p("max_concurrency"), "must be at least 1"));
        }
        let timeout = match &r.timeout {
            Some(s) => duration(loc, &p("timeout"), s)?,
            None => Duration::from_secs(30),
        };
        if timeout.is_zero() {
            return Err(loc.err(&p("timeout"), "must be more than 0"));
        }
        let endpoint = match &r.endpoint {
            Some(e) => Some(
                crate::registry::Endpoint::parse(e)
                    .map_err(|why| loc.err(&p("endpoint"), format!("\"{e}\" {why}")))?,
            ),
            None => None,
        };
        registries.push(RegistryConfig {
            // Docker Hub's aliases are one registry (SPEC 1), as references normalise them.
            host: crate::model::reference::canonical_host(&r.host).to_string(),
            endpoint,
            fetch_details: r.fetch_details.unwrap_or(true),
            insecure: r.insecure.unwrap_or(false),
            username: r.username.clone(),
            password,
            docker_config: r.docker_config.as_deref().map(expand_home),
            max_requests_per_second: rps,
            max_concurrency: conc,
            internal: r.internal.unwrap_or(false),
            timeout,
        });
    }

    let mut streams = Vec::new();
    let mut seen_streams = HashSet::new();
    for (i, s) in raw.stream.iter().enumerate() {
        let name = StreamName::parse(&s.name, s.namespace.as_deref().unwrap_or("default"))
            .map_err(|e| loc.err(&[K("stream"), I(i), K("name")], e))?;
        if !seen_streams.insert(name.clone()) {
            return Err(loc.err(
                &[K("stream"), I(i), K("name")],
                format!("stream {name} declared twice"),
            ));
        }
        let mut tags = Vec::new();
        for (j, t) in s.tags.iter().enumerate() {
            let p = |k| [K("stream"), I(i), K("tags"), I(j), K(k)];
            crate::model::reference::check_tag("tag", &t.name, &t.name)
                .map_err(|e| loc.err(&p("name"), e))?;
            if tags.iter().any(|d: &DeclaredTag| d.name == t.name) {
                return Err(loc.err(&p("name"), format!("tag {} declared twice", t.name)));
            }
            let mut policy_platform = None;
            let from = match (&t.from.image, &t.from.tag, &t.from.digest) {
                (None, None, None) if t.from.policy.is_some() => {
                    let raw_p = t.from.policy.clone().expect("checked");
                    let spec = crate::model::PolicySpec {
                        repository: raw_p.repository,
                        semver: raw_p.semver,
                        order: raw_p.order,
                        filter: raw_p.filter,
                        extract: raw_p.extract,
                        prerelease: raw_p.prerelease.unwrap_or(false),
                        min_age: raw_p.min_age,
                    };
                    let pp = |k: &'static str| {
                        [
                            K("stream"),
                            I(i),
                            K("tags"),
                            I(j),
                            K("from"),
                            K("policy"),
                            K(k),
                        ]
                    };
                    crate::policy::Policy::compile(&spec).map_err(|(k, e)| loc.err(&pp(k), e))?;
                    if let Some(pl) = &raw_p.platform {
                        check_platform(pl).map_err(|e| loc.err(&pp("platform"), e))?;
                    }
                    policy_platform = raw_p.platform;
                    TagFrom::Policy(spec)
                }
                (Some(img), None, None) if t.from.policy.is_none() => {
                    ImageRef::parse(img).map_err(|e| loc.err(&p("from"), e))?;
                    TagFrom::Image(img.clone())
                }
                (None, Some(tag), None) if t.from.policy.is_none() => {
                    let src = if tag.contains(':') {
                        tag.clone()
                    } else {
                        format!("{}:{tag}", s.name)
                    };
                    let r = StreamTagRef::parse(&src, &name.namespace)
                        .map_err(|e| loc.err(&p("from"), e))?;
                    if r.stream == name {
                        if r.tag == t.name {
                            return Err(loc.err(&p("from"), "a tag cannot come from itself"));
                        }
                        TagFrom::Tag(r.tag)
                    } else {
                        if t.alias.unwrap_or(false) {
                            return Err(loc.err(&p("alias"), "alias only works within one stream"));
                        }
                        TagFrom::Tag(r.to_string())
                    }
                }
                (None, None, Some(d)) if t.from.policy.is_none() => {
                    let src = if d.contains('@') {
                        d.clone()
                    } else {
                        format!("{}@{d}", s.name)
                    };
                    crate::model::StreamImageRef::parse(&src, &name.namespace)
                        .map_err(|e| loc.err(&p("from"), e))?;
                    TagFrom::Digest(src)
                }
                _ => {
                    return Err(loc.err(
                        &p("from"),
                        "give exactly one of from.image, from.tag, from.digest or from.policy",
                    ));
                }
            };
            let alias = t.alias.unwrap_or(false);
            if alias && !matches!(from, TagFrom::Tag(_)) {
                return Err(loc.err(&p("alias"), "alias needs from.tag"));
            }
            let scheduled = t.scheduled.unwrap_or(false);
            if (scheduled || t.insecure.unwrap_or(false))
                && !matches!(from, TagFrom::Image(_) | TagFrom::Policy(_))
            {
                return Err(loc.err(
                    &p("scheduled"),
                    "scheduled and insecure apply only to from.image and from.policy",
                ));
            }
            if let Some(sch) = &t.schedule {
                Schedule::parse(sch).map_err(|e| loc.err(&p("schedule"), e))?;
            }
            if let Some(pl) = &t.platform {
                check_platform(pl).map_err(|e| loc.err(&p("platform"), e))?;
            }
            let spec = TagSpec {
                from,
                alias,
                scheduled,
                schedule: t.schedule.clone(),
                insecure: t.insecure.unwrap_or(false),
                platform: t.platform.clone().or(policy_platform),
            };
            let hash = hex::encode(sha2::Sha256::digest(
                serde_json::to_vec(&spec).unwrap_or_default(),
            ));
            tags.push(DeclaredTag {
                name: t.name.clone(),
                spec,
                hash: hash[..16].to_string(),
            });
        }
        streams.push(DeclaredStream { name, tags });
    }
    for s in &streams {
        for t in &s.tags {
            let mut seen = vec![t.name.clone()];
            let mut cur = t;
            while cur.spec.alias {
                let TagFrom::Tag(src) = &cur.spec.from else {
                    break;
                };
                if seen.contains(src) {
                    let i = raw
                        .stream
                        .iter()
                        .position(|r| r.name == s.name.name)
                        .unwrap_or(0);
                    return Err(loc.err(
                        &[K("stream"), I(i), K("tags")],
                        format!("aliases form a cycle: {} -> {src}", seen.join(" -> ")),
                    ));
                }
                seen.push(src.clone());
                match s.tags.iter().find(|d| &d.name == src) {
                    Some(next) => cur = next,
                    None => break,
                }
            }
        }
    }

    let d = &raw.delivery;
    let delivery = DeliveryConfig {
        max_attempts: d.max_attempts.unwrap_or(10),
        max_age: match &d.max_age {
            Some(s) => duration(loc, &[K("delivery"), K("max_age")], s)?,
            None => Duration::from_secs(24 * 3600),
        },
        initial_backoff: match &d.initial_backoff {
            Some(s) => duration(loc, &[K("delivery"), K("initial_backoff")], s)?,
            None => Duration::from_millis(500),
        },
        max_backoff: match &d.max_backoff {
            Some(s) => duration(loc, &[K("delivery"), K("max_backoff")], s)?,
            None => Duration::from_secs(300),
        },
        timeout: match &d.timeout {
            Some(s) => duration(loc, &[K("delivery"), K("timeout")], s)?,
            None => Duration::from_secs(10),
        },
        concurrency: d.concurrency.unwrap_or(32).max(1),
        retention: match &d.retention {
            Some(s) => duration(loc, &[K("delivery"), K("retention")], s)?,
            None => Duration::from_secs(7 * 24 * 3600),
        },
    };
    if delivery.max_attempts == 0 {
        return Err(loc.err(&[K("delivery"), K("max_attempts")], "must be at least 1"));
    }

    let mut triggers = Vec::new();
    for (i, t) in raw.trigger.iter().enumerate() {
        let p = |k: &'static str| [K("trigger"), I(i), K(k)];
        if t.name.is_empty()
            || t.name == "retry"
            || !t
                .name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        {
            return Err(loc.err(
                &p("name"),
                format!(
                    "\"{}\" is not a trigger name (letters, digits, '-', '_', '.'; not \"retry\")",
                    t.name
                ),
            ));
        }
        if triggers.iter().any(|x: &TriggerConfig| x.name == t.name) {
            return Err(loc.err(&p("name"), format!("trigger {} declared twice", t.name)));
        }
        if t.on.is_empty() {
            return Err(loc.err(&p("on"), "lists no stream tag"));
        }
        let mut on = Vec::new();
        for (j, s) in t.on.iter().enumerate() {
            let r = StreamTagRef::parse(s, "default")
                .map_err(|e| loc.err(&[K("trigger"), I(i), K("on"), I(j)], e))?;
            on.push(r);
        }
        let sinks = [
            t.webhook.is_some(),
            t.github.is_some(),
            t.gitlab.is_some(),
            t.jenkins.is_some(),
            t.buildkite.is_some(),
            t.circleci.is_some(),
            t.azure.is_some(),
        ];
        let n = sinks.iter().filter(|b| **b).count();
        if n != 1 {
            return Err(loc.err(
                &p("name"),
                format!(
                    "trigger {} needs exactly one sink (webhook, github, gitlab, jenkins, buildkite, circleci or azure), has {n}",
                    t.name
                ),
            ));
        }
        let mut timeout = delivery.timeout;
        let sink = if let Some(w) = &t.webhook {
            let pw = |k| [K("trigger"), I(i), K("webhook"), K(k)];
            if let Some(s) = &w.timeout {
                timeout = duration(loc, &pw("timeout"), s)?;
            }
            let mut headers = Vec::new();
            for (k, v) in &w.headers {
                if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err()
                    || reqwest::header::HeaderValue::from_str(v).is_err()
                {
                    return Err(loc.err(&pw("headers"), format!("\"{k}\" is not a valid header")));
                }
                headers.push((k.clone(), v.clone()));
            }
            let signature_header = w
                .signature_header
                .clone()
                .unwrap_or_else(|| "X-Istream-Signature-256".into());
            if reqwest::header::HeaderName::from_bytes(signature_header.as_bytes()).is_err() {
                return Err(loc.err(&pw("signature_header"), "not a valid header name"));
            }
            if let Some(tpl) = &w.body_template {
                crate::trigger::template::check(tpl)
                    .map_err(|e| loc.err(&pw("body_template"), e))?;
            }
            let binary = match w.mode.as_deref() {
                None | Some("structured") => false,
                Some("binary") if w.body_template.is_some() => {
                    return Err(loc.err(
                        &pw("mode"),
                        "binary mode sends the event's data as the body; it cannot be combined with body_template",
                    ));
                }
                Some("binary") => true,
                Some(other) => {
                    return Err(loc.err(
                        &pw("mode"),
                        format!("\"{other}\": must be \"structured\" or \"binary\""),
                    ));
                }
            };
            let standard = match w.signature.as_deref() {
                None | Some("istream") => false,
                Some("standard") => true,
                Some(other) => {
                    return Err(loc.err(
                        &pw("signature"),
                        format!("\"{other}\": must be \"istream\" or \"standard\""),
                    ));
                }
            };
            if standard {
                let Some(sec) = &secret(loc, &pw("secret_env"), &w.secret_env, &w.secret_file)?
                else {
                    return Err(loc.err(
                        &pw("signature"),
                        "signature = \"standard\" needs secret_env or secret_file",
                    ));
                };
                crate::trigger::sink::standard_key(sec.expose()).map_err(|e| {
                    loc.err(&pw("secret_env"), format!("Standard Webhooks secret: {e}"))
                })?;
            }
            Sink::Webhook {
                binary,
                standard,
                url: url(loc, &pw("url"), &w.url)?,
                secret: secret(loc, &pw("secret_env"), &w.secret_env, &w.secret_file)?,
                headers,
                body_template: w.body_template.clone(),
                signature_header,
            }
        } else if let Some(g) = &t.github {
            let pg = |k| [K("trigger"), I(i), K("github"), K(k)];
            if let Some(s) = &g.timeout {
                timeout = duration(loc, &pg("timeout"), s)?;
            }
            if g.repo.split('/').count() != 2 || g.repo.split('/').any(str::is_empty) {
                return Err(loc.err(&pg("repo"), format!("\"{}\" is not owner/name", g.repo)));
            }
            let api = url(
                loc,
                &pg("api_url"),
                g.api_url.as_deref().unwrap_or("https://api.github.com"),
            )?;
            let token = secret(loc, &pg("token_env"), &g.token_env, &g.token_file)?
                .ok_or_else(|| loc.err(&pg("repo"), "github needs token_env or token_file"))?;
            match (&g.event_type, &g.workflow) {
                (Some(e), None) => Sink::GithubDispatch {
                    api,
                    repo: g.repo.clone(),
                    event_type: e.clone(),
                    token,
                },
                (None, Some(w)) => Sink::GithubWorkflow {
                    api,
                    repo: g.repo.clone(),
                    workflow: w.clone(),
                    git_ref: g.r#ref.clone().unwrap_or_else(|| "main".into()),
                    token,
                },
                _ => {
                    return Err(loc.err(
                        &pg("repo"),
                        "github needs exactly one of event_type or workflow",
                    ));
                }
            }
        } else if let Some(g) = &t.gitlab {
            let pg = |k| [K("trigger"), I(i), K("gitlab"), K(k)];
            if let Some(s) = &g.timeout {
                timeout = duration(loc, &pg("timeout"), s)?;
            }
            if g.project.is_empty() {
                return Err(loc.err(&pg("project"), "must not be empty"));
            }
            Sink::Gitlab {
                api: url(
                    loc,
                    &pg("api_url"),
                    g.api_url.as_deref().unwrap_or("https://gitlab.com"),
                )?,
                project: g.project.clone(),
                git_ref: g.r#ref.clone().unwrap_or_else(|| "main".into()),
                token: secret(loc, &pg("token_env"), &g.token_env, &g.token_file)?.ok_or_else(
                    || loc.err(&pg("project"), "gitlab needs token_env or token_file"),
                )?,
            }
        } else if let Some(j) = &t.jenkins {
            let pj = |k| [K("trigger"), I(i), K("jenkins"), K(k)];
            if let Some(s) = &j.timeout {
                timeout = duration(loc, &pj("timeout"), s)?;
            }
            Sink::Jenkins {
                job_url: url(loc, &pj("job_url"), &j.job_url)?,
                user: j.user.clone(),
                token: secret(loc, &pj("token_env"), &j.token_env, &j.token_file)?.ok_or_else(
                    || loc.err(&pj("job_url"), "jenkins needs token_env or token_file"),
                )?,
            }
        } else if let Some(b) = &t.buildkite {
            let pb = |k| [K("trigger"), I(i), K("buildkite"), K(k)];
            if let Some(s) = &b.timeout {
                timeout = duration(loc, &pb("timeout"), s)?;
            }
            segment(loc, &pb("org"), &b.org)?;
            segment(loc, &pb("pipeline"), &b.pipeline)?;
            Sink::Buildkite {
                api: url(
                    loc,
                    &pb("api_url"),
                    b.api_url.as_deref().unwrap_or("https://api.buildkite.com"),
                )?,
                org: b.org.clone(),
                pipeline: b.pipeline.clone(),
                branch: b.branch.clone().unwrap_or_else(|| "main".into()),
                commit: b.commit.clone().unwrap_or_else(|| "HEAD".into()),
                token: sink_token(
                    loc,
                    &pb("token_env"),
                    &pb("org"),
                    &b.token_env,
                    &b.token_file,
                    "buildkite",
                )?,
            }
        } else if let Some(c) = &t.circleci {
            let pc = |k| [K("trigger"), I(i), K("circleci"), K(k)];
            if let Some(s) = &c.timeout {
                timeout = duration(loc, &pc("timeout"), s)?;
            }
            if c.project_slug.split('/').count() != 3
                || c.project_slug.split('/').any(str::is_empty)
            {
                return Err(loc.err(
                    &pc("project_slug"),
                    format!(
                        "\"{}\" is not <vcs>/<org>/<repo> (e.g. gh/acme/app)",
                        c.project_slug
                    ),
                ));
            }
            Sink::Circleci {
                api: url(
                    loc,
                    &pc("api_url"),
                    c.api_url.as_deref().unwrap_or("https://circleci.com"),
                )?,
                project_slug: c.project_slug.clone(),
                branch: c.branch.clone().unwrap_or_else(|| "main".into()),
                token: sink_token(
                    loc,
                    &pc("token_env"),
                    &pc("project_slug"),
                    &c.token_env,
                    &c.token_file,
                    "circleci",
                )?,
            }
        } else if let Some(a) = &t.azure {
            let pa = |k| [K("trigger"), I(i), K("azure"), K(k)];
            if let Some(s) = &a.timeout {
                timeout = duration(loc, &pa("timeout"), s)?;
            }
            segment(loc, &pa("organization"), &a.organization)?;
            segment(loc, &pa("project"), &a.project)?;
            Sink::Azure {
                api: url(
                    loc,
                    &pa("api_url"),
                    a.api_url.as_deref().unwrap_or("https://dev.azure.com"),
                )?,
                organization: a.organization.clone(),
                project: a.project.clone(),
                pipeline_id: a.pipeline_id,
                branch: a.branch.clone().unwrap_or_else(|| "main".into()),
                token: sink_token(
                    loc,
                    &pa("token_env"),
                    &pa("organization"),
                    &a.token_env,
                    &a.token_file,
                    "azure",
                )?,
            }
        } else {
            unreachable!("exactly one sink checked above")
        };
        triggers.push(TriggerConfig {
            name: t.name.clone(),
            on,
            paused: t.paused.unwrap_or(false),
            skip_initial: t.skip_initial.unwrap_or(false),
            sink,
            timeout,
            max_attempts: t.max_attempts.unwrap_or(delivery.max_attempts),
            max_age: match &t.max_age {
                Some(s) => duration(loc, &p("max_age"), s)?,
                None => delivery.max_age,
            },
        });
    }

    let mut forges = Vec::new();
    for (i, f) in raw.forge.iter().enumerate() {
        let pf = |k| [K("forge"), I(i), K(k)];
        if f.host.is_empty() || f.host.contains('/') {
            return Err(loc.err(&pf("host"), format!("\"{}\" is not a host name", f.host)));
        }
        if !matches!(f.kind.as_str(), "github" | "gitlab") {
            return Err(loc.err(
                &pf("kind"),
                format!("\"{}\": must be \"github\" or \"gitlab\"", f.kind),
            ));
        }
        forges.push((f.host.clone(), f.kind.clone()));
    }

    Ok(Config {
        path: path.to_path_buf(),
        server,
        store,
        nats,
        schedule,
        hooks,
        api_tokens,
        registries,
        streams,
        triggers,
        delivery,
        history_max_entries: raw.history.max_entries.unwrap_or(0),
        forges,
    })
}

/// Whether `host` matches a pattern: exact, or one `*` standing for any run of characters.
pub fn host_allowed(patterns: &[String], host: &str) -> bool {
    patterns.iter().any(|p| match p.split_once('*') {
        None => p == host,
        Some((pre, post)) => {
            host.len() >= pre.len() + post.len() && host.starts_with(pre) && host.ends_with(post)
        }
    })
}

/// `os/arch[/variant]`.
pub fn check_platform(p: &str) -> Result<(), String> {
    let parts: Vec<&str> = p.split('/').collect();
    let ok = (2..=3).contains(&parts.len())
        && parts
            .iter()
            .all(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "\"{p}\" is not a platform like linux/arm64 or linux/arm/v7"
        ))
    }
}

impl Config {
    pub fn registry(&self, host: &str) -> Option<&RegistryConfig> {
        self.registries.iter().find(|r| r.host == host)
    }
}

#[cfg(test)]
mod tests;
