//! Payload parsers, one per source. Each returns the pushed `registry/repo:tag`s it names;
//! pulls, deletes, blob events and digest-only pushes are ignored. Input is untrusted: every
//! shape error is a message naming the field, never a panic.

use serde::Deserialize;

use crate::model::ImageRef;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub registry: String,
    pub repository: String,
    pub tag: String,
    /// The digest the notification names, when it names one (a hint, never recorded as is).
    pub digest: Option<String>,
}

/// What a notification says: the pushes it names, and why any of its events could not be used
/// (one bad event never spoils the others; the sender gets 2xx and the reasons are logged).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub pushes: Vec<Push>,
    pub skipped: Vec<String>,
}

/// What a source's parser needs from `[hooks.<source>]`: the registry host for senders whose
/// payload names none (Gitea, Artifactory, Nexus), and Artifactory's access method.
#[derive(Debug, Clone, Default)]
pub(super) struct Context {
    pub(super) registry: Option<String>,
    pub(super) subdomain: bool,
}

/// Fails only when the body as a whole is not the source's format.
pub(super) fn parse(source: &str, body: &[u8], ctx: &Context) -> Result<Parsed, String> {
    let pushes = match source {
        "registry" => distribution(body)?,
        "harbor" => harbor(body)?,
        "dockerhub" => dockerhub(body)?,
        "quay" => quay(body)?,
        "ghcr" => ghcr(body)?,
        "gitea" => gitea(body, ctx)?,
        "artifactory" => artifactory(body, ctx)?,
        "nexus" => nexus(body, ctx)?,
        "acr" => acr(body)?,
        "ecr" => ecr(body)?,
        "gar" => gar(body)?,
        other => return Err(format!("unknown source {other}")),
    };
    // Validate through the reference parser so a hostile name cannot reach the store.
    let mut out = Parsed::default();
    for p in pushes {
        let p = match p {
            Ok(p) => p,
            Err(why) => {
                out.skipped.push(why);
                continue;
            }
        };
        // An empty tag asks for every tracked tag of the repository (Artifact Registry's
        // digest-only messages); the name is still validated.
        let probe = if p.tag.is_empty() {
            "latest"
        } else {
            p.tag.as_str()
        };
        let r = match ImageRef::parse(&format!("{}/{}:{probe}", p.registry, p.repository)) {
            Ok(r) => r,
            Err(e) => {
                out.skipped.push(e.to_string());
                continue;
            }
        };
        // A malformed digest hint is dropped, not fatal: the re-check decides anyway.
        let digest = p.digest.filter(|d| crate::model::Digest::parse(d).is_ok());
        out.pushes.push(Push {
            registry: r.registry,
            repository: r.repository,
            tag: if p.tag.is_empty() {
                String::new()
            } else {
                r.tag.unwrap_or(p.tag)
            },
            digest,
        });
    }
    Ok(out)
}

/// One event of a notification: a push, or why it cannot be used.
type Item = Result<Push, String>;

/// A pushed tag when it is one: a digest in the tag's place (push by digest) names no tag.
fn tag_of(t: Option<String>) -> Option<String> {
    t.filter(|t| !t.is_empty() && !t.contains(':'))
}

fn host_for(ctx: &Context, source: &str) -> Result<String, String> {
    ctx.registry.clone().ok_or_else(|| {
        format!("the payload names no registry host: set [hooks] {source} = {{ registry = \"host[:port]\" }}")
    })
}

#[derive(Deserialize)]
struct GhPayload {
    action: String,
    #[serde(alias = "registry_package")]
    package: Option<GhPackage>,
}

#[derive(Deserialize)]
struct GhPackage {
    name: String,
    package_type: Option<String>,
    owner: GhOwner,
    package_version: Option<GhVersion>,
}

#[derive(Deserialize)]
struct GhOwner {
    login: String,
}

#[derive(Deserialize)]
struct GhVersion {
    container_metadata: Option<GhContainer>,
}

#[derive(Deserialize)]
struct GhContainer {
    tag: Option<GhTag>,
}

#[derive(Deserialize)]
struct GhTag {
    name: Option<String>,
    digest: Option<String>,
}

/// GitHub's `package` event: `ghcr.io/<owner>/<package>:<tag>`; image names are lower case.
fn ghcr(body: &[u8]) -> Result<Vec<Item>, String> {
    let p: GhPayload = json(body, "GitHub package")?;
    let Some(pkg) = p.package else {
        return Ok(Vec::new());
    };
    let is_container = pkg
        .package_type
        .as_deref()
        .is_some_and(|t| t.eq_ignore_ascii_case("container"));
    if !matches!(p.action.as_str(), "published" | "updated") || !is_container {
        return Ok(Vec::new());
    }
    let tag = pkg
        .package_version
        .and_then(|v| v.container_metadata)
        .and_then(|c| c.tag);
    let digest = tag.as_ref().and_then(|t| t.digest.clone());
    let Some(name) = tag_of(tag.and_then(|t| t.name)) else {
        return Ok(Vec::new());
    };
    Ok(vec![Ok(Push {
        registry: "ghcr.io".into(),
        repository: format!(
            "{}/{}",
            pkg.owner.login.to_ascii_lowercase(),
            pkg.name.to_ascii_lowercase()
        ),
        tag: name,
        digest,
    })])
}

#[derive(Deserialize)]
struct GiteaPayload {
    action: String,
    package: Option<GiteaPackage>,
}

#[derive(Deserialize)]
struct GiteaPackage {
    owner: GiteaOwner,
    name: String,
    #[serde(rename = "type")]
    kind: String,
    version: Option<String>,
}

/// Gitea sends both `login` and `username` (the same value).
#[derive(Deserialize)]
struct GiteaOwner {
    login: Option<String>,
    username: Option<String>,
}

/// Gitea's and Forgejo's `package` event: `<registry>/<owner>/<package>:<version>`.
fn gitea(body: &[u8], ctx: &Context) -> Result<Vec<Item>, String> {
    let p: GiteaPayload = json(body, "Gitea package")?;
    let Some(pkg) = p.package else {
        return Ok(Vec::new());
    };
    if p.action != "created" || !pkg.kind.eq_ignore_ascii_case("container") {
        return Ok(Vec::new());
    }
    let Some(tag) = tag_of(pkg.version) else {
        return Ok(Vec::new());
    };
    let Some(owner) = pkg.owner.login.or(pkg.owner.username) else {
        return Err("Gitea package event names no package.owner.login".into());
    };
    Ok(vec![host_for(ctx, "gitea").map(|registry| Push {
        registry,
        repository: format!(
            "{}/{}",
            owner.to_ascii_lowercase(),
            pkg.name.to_ascii_lowercase()
        ),
        tag,
        digest: None,
    })])
}

#[derive(Deserialize)]
struct JfrogPayload {
    domain: String,
    event_type: String,
    data: Option<JfrogData>,
}

#[derive(Deserialize)]
struct JfrogData {
    repo_key: String,
    image_name: String,
    tag: Option<String>,
    sha256: Option<String>,
}

/// Artifactory's `docker` domain, event `pushed`: `<registry>/<repo_key>/<image>:<tag>`, or
/// `<repo_key>.<registry>/<image>:<tag>` with the subdomain access method.
fn artifactory(body: &[u8], ctx: &Context) -> Result<Vec<Item>, String> {
    let p: JfrogPayload = json(body, "Artifactory")?;
    if p.domain != "docker" || p.event_type != "pushed" {
        return Ok(Vec::new());
    }
    let Some(d) = p.data else {
        return Err("Artifactory docker event without data".into());
    };
    let Some(tag) = tag_of(d.tag) else {
        return Ok(Vec::new());
    };
    // `sha256` is the checksum of the manifest file Artifactory stored: the manifest digest.
    let digest = d.sha256.map(|h| format!("sha256:{h}"));
    Ok(vec![host_for(ctx, "artifactory").map(|host| {
        let (registry, repository) = if ctx.subdomain {
            (format!("{}.{host}", d.repo_key), d.image_name.clone())
        } else {
            (host, format!("{}/{}", d.repo_key, d.image_name))
        };
        Push {
            registry,
            repository,
            tag,
            digest,
        }
    })])
}

#[derive(Deserialize)]
struct NexusPayload {
    action: String,
    component: Option<NexusComponent>,
}

#[derive(Deserialize)]
struct NexusComponent {
    format: Option<String>,
    name: String,
    version: Option<String>,
}

/// Nexus's `rm:repository:component` event, docker format: `<registry>/<name>:<version>`.
fn nexus(body: &[u8], ctx: &Context) -> Result<Vec<Item>, String> {
    let p: NexusPayload = json(body, "Nexus")?;
    let Some(c) = p.component else {
        return Ok(Vec::new());
    };
    let docker = c.format.as_deref().is_some_and(|f| f == "docker");
    if !matches!(p.action.as_str(), "CREATED" | "UPDATED") || !docker {
        return Ok(Vec::new());
    }
    let Some(tag) = tag_of(c.version) else {
        return Ok(Vec::new());
    };
    Ok(vec![host_for(ctx, "nexus").map(|registry| Push {
        registry,
        repository: c.name,
        tag,
        digest: None,
    })])
}

#[derive(Deserialize)]
struct AcrPayload {
    action: String,
    target: Option<DistTarget>,
    request: Option<DistRequest>,
}

/// Azure Container Registry's `push`: `<request.host>/<target.repository>:<target.tag>`.
fn acr(body: &[u8]) -> Result<Vec<Item>, String> {
    let p: AcrPayload = json(body, "ACR")?;
    if p.action != "push" {
        return Ok(Vec::new());
    }
    let Some(t) = p.target else {
        return Err("ACR push without target".into());
    };
    let (Some(repo), Some(tag)) = (t.repository, tag_of(t.tag)) else {
        return Ok(Vec::new());
    };
    Ok(vec![
        match p.request.and_then(|r| r.host).filter(|h| !h.is_empty()) {
            Some(host) => Ok(Push {
                registry: host,
                repository: repo,
                tag,
                digest: t.digest,
            }),
            None => Err(format!("ACR push of {repo}:{tag} names no request.host")),
        },
    ])
}

#[derive(Deserialize)]
struct EcrEvent {
    #[serde(rename = "detail-type")]
    detail_type: String,
    account: Option<String>,
    region: Option<String>,
    detail: Option<EcrDetail>,
}

#[derive(Deserialize)]
struct EcrDetail {
    #[serde(rename = "action-type")]
    action_type: Option<String>,
    result: Option<String>,
    #[serde(rename = "repository-name")]
    repository_name: Option<String>,
    #[serde(rename = "image-tag")]
    image_tag: Option<String>,
    #[serde(rename = "image-digest")]
    image_digest: Option<String>,
}

/// An EventBridge `ECR Image Action` (PUSH, SUCCESS), as an API destination posts it:
/// `<account>.dkr.ecr.<region>.amazonaws.com/<repository-name>:<image-tag>`.
fn ecr(body: &[u8]) -> Result<Vec<Item>, String> {
    let e: EcrEvent = json(body, "EventBridge ECR")?;
    let Some(d) = e.detail else {
        return Ok(Vec::new());
    };
    let push = d.action_type.as_deref() == Some("PUSH") && d.result.as_deref() == Some("SUCCESS");
    if e.detail_type != "ECR Image Action" || !push {
        return Ok(Vec::new());
    }
    let (Some(repo), Some(tag)) = (d.repository_name, tag_of(d.image_tag)) else {
        return Ok(Vec::new());
    };
    let (Some(account), Some(region)) = (e.account, e.region) else {
        return Ok(vec![Err(format!(
            "ECR push of {repo}:{tag} names no account or region"
        ))]);
    };
    Ok(vec![Ok(Push {
        registry: format!("{account}.dkr.ecr.{region}.amazonaws.com"),
        repository: repo,
        tag,
        digest: d.image_digest,
    })])
}

#[derive(Deserialize)]
struct PubSubPush {
    message: PubSubMessage,
}

#[derive(Deserialize)]
struct PubSubMessage {
    data: String,
}

#[derive(Deserialize)]
struct GarMessage {
    action: String,
    digest: Option<String>,
    tag: Option<String>,
}

/// A Pub/Sub push of Artifact Registry's `gcr` topic: `message.data` is base64 JSON with
/// `action` and a full `tag` reference; a message with only `digest` asks for a re-check of
/// the repository's tracked tags (`tag` is then empty).
fn gar(body: &[u8]) -> Result<Vec<Item>, String> {
    use base64::Engine as _;
    let p: PubSubPush = json(body, "Pub/Sub push")?;
    let data = base64::engine::general_purpose::STANDARD
        .decode(p.message.data.trim())
        .map_err(|e| format!("message.data is not base64: {e}"))?;
    let m: GarMessage = json(&data, "Artifact Registry message")?;
    if m.action != "INSERT" {
        return Ok(Vec::new());
    }
    let digest_of = |r: &str| r.split_once('@').map(|(_, d)| d.to_string());
    let reference = match (&m.tag, &m.digest) {
        (Some(t), _) if !t.is_empty() => t.clone(),
        (_, Some(d)) => d.clone(),
        _ => return Ok(Vec::new()),
    };
    Ok(vec![match ImageRef::parse(&reference) {
        Ok(r) => Ok(Push {
            registry: r.registry,
            repository: r.repository,
            // Digest-only: no tag moved that the message names.
            tag: if m.tag.as_deref().is_some_and(|t| !t.is_empty()) {
                r.tag.unwrap_or_default()
            } else {
                String::new()
            },
            digest: m.digest.as_deref().and_then(digest_of),
        }),
        Err(e) => Err(e.to_string()),
    }])
}

fn json<'a, T: Deserialize<'a>>(body: &'a [u8], what: &str) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("not a {what} payload: {e}"))
}

fn host_of_url(u: &str) -> Option<String> {
    let u = reqwest::Url::parse(u).ok()?;
    let host = u.host_str()?;
    Some(match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    })
}

#[derive(Deserialize)]
struct Envelope {
    events: Vec<DistEvent>,
}

#[derive(Deserialize)]
struct DistEvent {
    action: String,
    target: Option<DistTarget>,
    request: Option<DistRequest>,
}

#[derive(Deserialize)]
struct DistTarget {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    repository: Option<String>,
    url: Option<String>,
    tag: Option<String>,
    digest: Option<String>,
}

#[derive(Deserialize)]
struct DistRequest {
    host: Option<String>,
}

fn distribution(body: &[u8]) -> Result<Vec<Item>, String> {
    let env: Envelope = json(body, "distribution notification")?;
    let mut out = Vec::new();
    for e in env.events {
        if e.action != "push" {
            continue;
        }
        let Some(t) = e.target else { continue };
        let is_manifest = t
            .media_type
            .as_deref()
            .is_none_or(|m| m.contains("manifest") || m.contains("index"));
        let (Some(repo), Some(tag)) = (t.repository, t.tag) else {
            continue;
        };
        if !is_manifest || tag.is_empty() {
            continue;
        }
        let host = t
            .url
            .as_deref()
            .and_then(host_of_url)
            .or(e.request.and_then(|r| r.host));
        out.push(match host {
            Some(host) => Ok(Push {
                registry: host,
                repository: repo,
                tag,
                digest: t.digest,
            }),
            None => Err(format!(
                "push of {repo}:{tag} names no registry host (target.url or request.host)"
            )),
        });
    }
    Ok(out)
}

#[derive(Deserialize)]
struct HarborResource {
    digest: Option<String>,
    tag: Option<String>,
    resource_url: Option<String>,
}

#[derive(Deserialize)]
struct HarborData {
    resources: Option<Vec<HarborResource>>,
    repository: Option<HarborRepo>,
}

#[derive(Deserialize)]
struct HarborRepo {
    repo_full_name: Option<String>,
}

#[derive(Deserialize)]
struct HarborDefault {
    #[serde(rename = "type")]
    kind: String,
    event_data: HarborData,
}

#[derive(Deserialize)]
struct HarborCloudEvent {
    #[serde(rename = "type")]
    kind: String,
    data: HarborData,
}

fn harbor(body: &[u8]) -> Result<Vec<Item>, String> {
    let v: serde_json::Value = json(body, "Harbor")?;
    let (kind, data): (String, HarborData) = if v.get("specversion").is_some() {
        let e: HarborCloudEvent = json(body, "Harbor CloudEvents")?;
        (e.kind, e.data)
    } else {
        let e: HarborDefault = json(body, "Harbor")?;
        (e.kind, e.event_data)
    };
    // Harbor 2 says PUSH_ARTIFACT (or harbor.artifact.pushed as a CloudEvent), Harbor 1.x pushImage.
    if !matches!(
        kind.as_str(),
        "PUSH_ARTIFACT" | "harbor.artifact.pushed" | "pushImage"
    ) {
        return Ok(Vec::new());
    }
    let full = data.repository.and_then(|r| r.repo_full_name);
    let mut out = Vec::new();
    for r in data.resources.unwrap_or_default() {
        let tag = r.tag.unwrap_or_default();
        // Pushed by digest: Harbor puts the digest in `tag` and `@digest` in resource_url.
        // No tag was pushed, so there is nothing to re-check.
        let by_digest =
            tag.contains(':') || r.resource_url.as_deref().is_some_and(|u| u.contains('@'));
        if tag.is_empty() || by_digest {
            continue;
        }
        let Some(url) = r.resource_url else {
            out.push(Err(format!("push of tag {tag} has no resource_url")));
            continue;
        };
        // resource_url is "host[:port]/project/repo:tag"
        let Some((host, path)) = url.split_once('/') else {
            out.push(Err(format!("resource_url \"{url}\" has no registry host")));
            continue;
        };
        let repo = full.clone().unwrap_or_else(|| {
            path.rsplit_once(':')
                .map(|(p, _)| p)
                .unwrap_or(path)
                .to_string()
        });
        out.push(Ok(Push {
            registry: host.to_string(),
            repository: repo,
            tag,
            digest: r.digest,
        }));
    }
    Ok(out)
}

#[derive(Deserialize)]
struct HubPayload {
    push_data: HubPush,
    repository: HubRepo,
}

#[derive(Deserialize)]
struct HubPush {
    tag: String,
}

#[derive(Deserialize)]
struct HubRepo {
    repo_name: String,
}

fn dockerhub(body: &[u8]) -> Result<Vec<Item>, String> {
    let p: HubPayload = json(body, "Docker Hub")?;
    Ok(vec![Ok(Push {
        registry: "docker.io".into(),
        repository: p.repository.repo_name,
        tag: p.push_data.tag,
        digest: None,
    })])
}

#[derive(Deserialize)]
struct QuayPayload {
    docker_url: String,
    #[serde(default)]
    updated_tags: Vec<String>,
}

fn quay(body: &[u8]) -> Result<Vec<Item>, String> {
    let p: QuayPayload = json(body, "Quay")?;
    let (host, repo) = p
        .docker_url
        .split_once('/')
        .ok_or_else(|| format!("docker_url \"{}\" has no registry host", p.docker_url))?;
    Ok(p.updated_tags
        .into_iter()
        .map(|tag| {
            Ok(Push {
                registry: host.to_string(),
                repository: repo.to_string(),
                tag,
                digest: None,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distribution_sample_from_a_real_registry() {
        let sample: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/data/distribution-notification.json"
        ))
        .unwrap();
        let body = serde_json::to_vec(&sample["body"]).unwrap();
        let p = parse("registry", &body, &Context::default())
            .unwrap()
            .pushes;
        assert_eq!(
            p,
            vec![Push {
                registry: "127.0.0.1:5002".into(),
                repository: "notif/r0000".into(),
                tag: "latest".into(),
                digest: Some(
                    "sha256:d2278186ef96ef0df6b5987f1ebc61e7b7d54574659cbc0f70d6300f3a6e186d"
                        .into()
                ),
            }]
        );
    }

    #[test]
    fn harbor_both_formats() {
        let default = br#"{"type":"PUSH_ARTIFACT","occur_at":1680000000,"operator":"admin","event_data":{"resources":[{"digest":"sha256:x","tag":"v1","resource_url":"harbor.example.com/library/app:v1"}],"repository":{"date_created":1,"name":"app","namespace":"library","repo_full_name":"library/app","repo_type":"private"}}}"#;
        assert_eq!(
            parse("harbor", default, &Context::default())
                .unwrap()
                .pushes,
            vec![Push {
                registry: "harbor.example.com".into(),
                repository: "library/app".into(),
                tag: "v1".into(),
                digest: None, // "sha256:x" is no digest: the hint is dropped
            }]
        );
        let ce = br#"{"specversion":"1.0","id":"1","source":"/projects/1/webhook/policies/1","type":"harbor.artifact.pushed","datacontenttype":"application/json","data":{"resources":[{"digest":"sha256:x","tag":"v2","resource_url":"harbor.example.com:8443/library/app:v2"}],"repository":{"name":"app","namespace":"library","repo_full_name":"library/app","repo_type":"private"}}}"#;
        assert_eq!(
            parse("harbor", ce, &Context::default()).unwrap().pushes[0].registry,
            "harbor.example.com:8443"
        );
        let pull = br#"{"type":"PULL_ARTIFACT","event_data":{"resources":[]}}"#;
        assert!(
            parse("harbor", pull, &Context::default())
                .unwrap()
                .pushes
                .is_empty()
        );
    }

    /// Harbor 1.x `pushImage` (fixture: zulip/zulip
    /// zerver/webhooks/harbor/fixtures/push_image.json at 256b678, with its type as Harbor 1.x
    /// sends it), and a push by digest as Harbor 2 reports it (goharbor/harbor#20939,
    /// bluebrown/kobold#44): the digest in `tag`, nothing to re-check, no error.
    #[test]
    fn harbor_1x_and_push_by_digest() {
        let v1 = include_bytes!("../../tests/data/harbor-1x-push-image.json");
        let p = parse("harbor", v1, &Context::default()).unwrap();
        assert_eq!(p.pushes.len(), 1);
        assert_eq!(p.pushes[0].registry, "harbor.example.com");
        assert_eq!(p.pushes[0].repository, "example/test");
        assert_eq!(p.pushes[0].tag, "latest");
        let by_digest = br#"{"type":"PUSH_ARTIFACT","occur_at":1680501893,"operator":"harbor-jobservice","event_data":{"resources":[{"digest":"sha256:954b378c375d852eb3c63ab88978f640b4348b01c1b3456a024a81536dafbbf4","tag":"sha256:954b378c375d852eb3c63ab88978f640b4348b01c1b3456a024a81536dafbbf4","resource_url":"localhost/harbor/alpine@sha256:954b378c375d852eb3c63ab88978f640b4348b01c1b3456a024a81536dafbbf4"},{"digest":"sha256:954b378c375d852eb3c63ab88978f640b4348b01c1b3456a024a81536dafbbf4","tag":"3.20","resource_url":"localhost/harbor/alpine:3.20"}],"repository":{"date_created":1680501893,"name":"alpine","namespace":"harbor","repo_full_name":"harbor/alpine","repo_type":"private"}}}"#;
        let p = parse("harbor", by_digest, &Context::default()).unwrap();
        assert_eq!(p.skipped, Vec::<String>::new());
        assert_eq!(p.pushes.len(), 1, "only the tagged resource: {p:?}");
        assert_eq!(p.pushes[0].tag, "3.20");
    }

    /// Each new sender's documented payload (tests/data/hooks/README.md names the sources).
    #[test]
    fn senders_of_section_9() {
        let one = |source: &str, file: &str, ctx: &Context| -> Push {
            let path = format!("{}/tests/data/hooks/{file}", env!("CARGO_MANIFEST_DIR"));
            let body = std::fs::read(path).unwrap();
            let p = parse(source, &body, ctx).unwrap();
            assert_eq!(p.skipped, Vec::<String>::new(), "{source}");
            assert_eq!(p.pushes.len(), 1, "{source}: {p:?}");
            p.pushes[0].clone()
        };
        let none = Context::default();
        let host = Context {
            registry: Some("registry.example.com:5000".into()),
            subdomain: false,
        };
        let r = |p: Push| format!("{}/{}:{}", p.registry, p.repository, p.tag);
        assert_eq!(
            r(one("ghcr", "ghcr-package-published.json", &none)),
            "ghcr.io/octo-org/app:v1"
        );
        assert_eq!(
            r(one("gitea", "gitea-package-created.json", &host)),
            "registry.example.com:5000/team/gitea-app:v1"
        );
        let jf = one("artifactory", "artifactory-docker-pushed.json", &host);
        assert_eq!(
            jf.digest.as_deref(),
            Some("sha256:35c4a2c15539c6c1e4e5fa4e554dac323ad0107d8eb5c582d6ff386b383b7dce")
        );
        assert_eq!(
            r(jf),
            "registry.example.com:5000/docker-local/team/jfrog-app:v1"
        );
        let sub = Context {
            subdomain: true,
            ..host.clone()
        };
        assert_eq!(
            r(one("artifactory", "artifactory-docker-pushed.json", &sub)),
            "docker-local.registry.example.com:5000/team/jfrog-app:v1"
        );
        assert_eq!(
            r(one("nexus", "nexus-component-created.json", &host)),
            "registry.example.com:5000/team/nexus-app:v1"
        );
        assert_eq!(
            r(one("acr", "acr-push.json", &none)),
            "myregistry.azurecr.io/team/acr-app:v1"
        );
        assert_eq!(
            r(one("ecr", "ecr-image-action.json", &none)),
            "123456789012.dkr.ecr.us-west-2.amazonaws.com/team/ecr-app:v1"
        );
        let gar = one("gar", "gar-pubsub-push.json", &none);
        assert!(gar.digest.is_some());
        assert_eq!(r(gar), "us-docker.pkg.dev/my-project/my-repo/gar-app:v1");
        // Not container pushes: acknowledged, nothing to re-check.
        let npm = std::fs::read(format!(
            "{}/tests/data/hooks/ghcr-package-npm.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        assert!(parse("ghcr", &npm, &none).unwrap().pushes.is_empty());
        for (source, body) in [
            ("acr", &br#"{"action":"delete","target":{"repository":"a","tag":"1"},"request":{"host":"r.azurecr.io"}}"#[..]),
            ("acr", br#"{"action":"push","target":{"repository":"a","digest":"sha256:x"},"request":{"host":"r.azurecr.io"}}"#),
            ("ecr", br#"{"detail-type":"ECR Image Action","account":"1","region":"r","detail":{"action-type":"DELETE","result":"SUCCESS","repository-name":"a","image-tag":"1"}}"#),
            ("ecr", br#"{"detail-type":"ECR Image Action","account":"1","region":"r","detail":{"action-type":"PUSH","result":"FAILURE","repository-name":"a","image-tag":"1"}}"#),
            ("nexus", br#"{"action":"DELETED","component":{"format":"docker","name":"a","version":"1"}}"#),
            ("nexus", br#"{"action":"CREATED","component":{"format":"maven2","name":"a","version":"1"}}"#),
            ("gitea", br#"{"action":"deleted","package":{"owner":{"login":"o"},"name":"a","type":"container","version":"1"}}"#),
            ("artifactory", br#"{"domain":"docker","event_type":"deleted","data":{"repo_key":"k","image_name":"a","tag":"1"}}"#),
        ] {
            assert!(parse(source, body, &host).unwrap().pushes.is_empty(), "{source}");
        }
        // A digest-only Artifact Registry message re-checks the repository (empty tag).
        use base64::Engine as _;
        let data = base64::engine::general_purpose::STANDARD.encode(
            br#"{"action":"INSERT","digest":"us-docker.pkg.dev/p/r/img@sha256:6ec128e26cd5d9f1b4b4b8a3b8a36a3e8c1a5c8b0a6d2c1e7b3f9a4d2e8c6b1a"}"#,
        );
        let body = format!(r#"{{"message":{{"data":"{data}"}}}}"#);
        let p = parse("gar", body.as_bytes(), &none).unwrap().pushes;
        assert_eq!(
            (p[0].repository.as_str(), p[0].tag.as_str()),
            ("p/r/img", "")
        );
        // Senders whose payload names no host need [hooks.<source>] registry.
        let body = std::fs::read(format!(
            "{}/tests/data/hooks/nexus-component-created.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let p = parse("nexus", &body, &none).unwrap();
        assert!(
            p.pushes.is_empty() && p.skipped[0].contains("[hooks] nexus"),
            "{p:?}"
        );
    }

    #[test]
    fn dockerhub_and_quay() {
        let hub = br#"{"callback_url":"https://registry.hub.docker.com/u/svendowideit/testhook/hook/2141b5bi5i5b02bec211i4eeih0242eg11000a/","push_data":{"pushed_at":1417566161,"pusher":"trustedbuilder","tag":"latest"},"repository":{"name":"testhook","namespace":"svendowideit","repo_name":"svendowideit/testhook","status":"Active"}}"#;
        assert_eq!(
            parse("dockerhub", hub, &Context::default()).unwrap().pushes[0].repository,
            "svendowideit/testhook"
        );
        let official = br#"{"push_data":{"tag":"3"},"repository":{"repo_name":"python"}}"#;
        assert_eq!(
            parse("dockerhub", official, &Context::default())
                .unwrap()
                .pushes[0]
                .repository,
            "library/python"
        );
        let quay = br#"{"repository":"mynamespace/repository","namespace":"mynamespace","name":"repository","docker_url":"quay.io/mynamespace/repository","homepage":"https://quay.io/repository/mynamespace/repository","updated_tags":["latest","1.0"]}"#;
        let q = parse("quay", quay, &Context::default()).unwrap().pushes;
        assert_eq!(q.len(), 2);
        assert_eq!(
            q[1],
            Push {
                registry: "quay.io".into(),
                repository: "mynamespace/repository".into(),
                tag: "1.0".into(),
                digest: None,
            }
        );
    }

    #[test]
    fn malformed_bodies_are_errors() {
        for src in ["registry", "harbor", "dockerhub", "quay"] {
            assert!(parse(src, b"not json", &Context::default()).is_err());
            assert!(
                parse(src, b"{}", &Context::default()).is_err()
                    || parse(src, b"{}", &Context::default())
                        .unwrap()
                        .pushes
                        .is_empty()
            );
        }
        // One unusable event is skipped with its reason; the others still count.
        let bad_name = br#"{"events":[{"action":"push","target":{"repository":"../../etc","tag":"x","url":"http://r:5000/v2/x"}},{"action":"push","target":{"repository":"ok/app","tag":"1","url":"http://r:5000/v2/ok/app/manifests/1"}}]}"#;
        let p = parse("registry", bad_name, &Context::default()).unwrap();
        assert_eq!(p.skipped.len(), 1, "{p:?}");
        assert!(p.skipped[0].contains("../../etc"), "{p:?}");
        assert_eq!(p.pushes.len(), 1);
        assert_eq!(p.pushes[0].repository, "ok/app");
    }
}
