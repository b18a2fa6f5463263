//! The file as written: serde types that reject unknown keys. Every field is documented in
//! `docs/config.md`; `tests::reference_documents_every_key` keeps the two in step.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Raw {
    #[serde(default)]
    pub server: Server,
    #[serde(default)]
    pub store: Store,
    pub nats: Option<Nats>,
    #[serde(default)]
    pub schedule: Schedule,
    #[serde(default)]
    pub hooks: Hooks,
    #[serde(default)]
    pub api: Api,
    #[serde(default)]
    pub registry: Vec<Registry>,
    #[serde(default)]
    pub stream: Vec<Stream>,
    #[serde(default)]
    pub trigger: Vec<Trigger>,
    #[serde(default)]
    pub delivery: Delivery,
    #[serde(default)]
    pub history: History,
    #[serde(default)]
    pub forge: Vec<Forge>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Forge {
    pub host: String,
    pub kind: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct History {
    pub max_entries: Option<usize>,
}

impl Raw {
    pub(super) fn deserialize_value(v: toml::Value) -> Result<Raw, toml::de::Error> {
        v.try_into()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Server {
    pub listen: Option<String>,
    pub allow_unauthenticated: Option<bool>,
    pub max_body_bytes: Option<usize>,
    pub instance: Option<String>,
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    pub allowed_registries: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Store {
    pub kind: Option<String>,
    pub path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Nats {
    pub url: Option<String>,
    pub subject_prefix: Option<String>,
    pub jetstream: Option<bool>,
    pub stream: Option<String>,
    pub max_age: Option<String>,
    pub replicas: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Schedule {
    pub interval: Option<String>,
    pub max_import_all: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HookSource {
    pub token_env: Option<String>,
    pub token_file: Option<String>,
    pub registry: Option<String>,
    pub subdomain: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Hooks {
    pub token_env: Option<String>,
    pub token_file: Option<String>,
    pub max_concurrency: Option<usize>,
    pub registry: Option<HookSource>,
    pub dockerhub: Option<HookSource>,
    pub harbor: Option<HookSource>,
    pub quay: Option<HookSource>,
    pub ghcr: Option<HookSource>,
    pub gitea: Option<HookSource>,
    pub artifactory: Option<HookSource>,
    pub nexus: Option<HookSource>,
    pub acr: Option<HookSource>,
    pub ecr: Option<HookSource>,
    pub gar: Option<HookSource>,
}

impl Hooks {
    pub(super) fn sources(&self) -> Vec<(&'static str, &HookSource)> {
        [
            ("registry", &self.registry),
            ("dockerhub", &self.dockerhub),
            ("harbor", &self.harbor),
            ("quay", &self.quay),
            ("ghcr", &self.ghcr),
            ("gitea", &self.gitea),
            ("artifactory", &self.artifactory),
            ("nexus", &self.nexus),
            ("acr", &self.acr),
            ("ecr", &self.ecr),
            ("gar", &self.gar),
        ]
        .into_iter()
        .filter_map(|(n, s)| s.as_ref().map(|s| (n, s)))
        .collect()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Api {
    #[serde(default)]
    pub token: Vec<ApiToken>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ApiToken {
    pub name: String,
    pub token_env: Option<String>,
    pub token_file: Option<String>,
    pub sha256: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Registry {
    pub host: String,
    pub insecure: Option<bool>,
    pub username: Option<String>,
    pub password_env: Option<String>,
    pub password_file: Option<String>,
    pub docker_config: Option<String>,
    pub max_requests_per_second: Option<f64>,
    pub max_concurrency: Option<usize>,
    pub internal: Option<bool>,
    pub timeout: Option<String>,
    pub endpoint: Option<String>,
    pub fetch_details: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Stream {
    pub name: String,
    pub namespace: Option<String>,
    #[serde(default)]
    pub tags: Vec<StreamTag>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct From {
    pub image: Option<String>,
    pub tag: Option<String>,
    pub digest: Option<String>,
    pub policy: Option<Policy>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Policy {
    pub repository: String,
    pub semver: Option<String>,
    pub order: Option<String>,
    pub filter: Option<String>,
    pub extract: Option<String>,
    pub prerelease: Option<bool>,
    pub min_age: Option<String>,
    pub platform: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StreamTag {
    pub name: String,
    pub from: From,
    pub alias: Option<bool>,
    pub scheduled: Option<bool>,
    pub schedule: Option<String>,
    pub insecure: Option<bool>,
    pub platform: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Trigger {
    pub name: String,
    #[serde(default)]
    pub on: Vec<String>,
    pub paused: Option<bool>,
    pub skip_initial: Option<bool>,
    pub max_attempts: Option<u32>,
    pub max_age: Option<String>,
    pub webhook: Option<Webhook>,
    pub github: Option<Github>,
    pub gitlab: Option<Gitlab>,
    pub jenkins: Option<Jenkins>,
    pub buildkite: Option<Buildkite>,
    pub circleci: Option<Circleci>,
    pub azure: Option<Azure>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Buildkite {
    pub org: String,
    pub pipeline: String,
    pub branch: Option<String>,
    pub commit: Option<String>,
    pub token_env: Option<String>,
    pub token_file: Option<String>,
    pub api_url: Option<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Circleci {
    pub project_slug: String,
    pub branch: Option<String>,
    pub token_env: Option<String>,
    pub token_file: Option<String>,
    pub api_url: Option<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Azure {
    pub organization: String,
    pub project: String,
    pub pipeline_id: u64,
    pub branch: Option<String>,
    pub token_env: Option<String>,
    pub token_file: Option<String>,
    pub api_url: Option<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Webhook {
    pub url: String,
    pub secret_env: Option<String>,
    pub secret_file: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub body_template: Option<String>,
    pub signature_header: Option<String>,
    pub timeout: Option<String>,
    pub mode: Option<String>,
    pub signature: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Github {
    pub repo: String,
    pub event_type: Option<String>,
    pub workflow: Option<String>,
    pub r#ref: Option<String>,
    pub token_env: Option<String>,
    pub token_file: Option<String>,
    pub api_url: Option<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Gitlab {
    pub project: String,
    pub r#ref: Option<String>,
    pub token_env: Option<String>,
    pub token_file: Option<String>,
    pub api_url: Option<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Jenkins {
    pub job_url: String,
    pub user: String,
    pub token_env: Option<String>,
    pub token_file: Option<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Delivery {
    pub max_attempts: Option<u32>,
    pub max_age: Option<String>,
    pub initial_backoff: Option<String>,
    pub max_backoff: Option<String>,
    pub timeout: Option<String>,
    pub concurrency: Option<usize>,
    pub retention: Option<String>,
}
