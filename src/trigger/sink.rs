//! The requests a CI receiver sees, one function per sink (SPEC section 5). Every request
//! carries `Idempotency-Key: <event id>`; webhook bodies are signed with HMAC-SHA256 when a
//! secret is set. Errors say whether a retry can help.

use std::time::Duration;

use hmac::{Hmac, Mac};
use reqwest::{StatusCode, header};
use sha2::Sha256;

use crate::config::{Sink, TriggerConfig};
use crate::model::Event;

/// Why a delivery attempt failed. Retryable: connect errors, timeouts, 429 and 5xx.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{url}: {detail}")]
    Network { url: String, detail: String },
    #[error("{url} answered HTTP {status}{}", body_hint(.body))]
    Status {
        url: String,
        status: u16,
        body: String,
        retry_after: Option<Duration>,
    },
    #[error("cannot build request: {0}")]
    Build(String),
}

fn body_hint(b: &str) -> String {
    if b.is_empty() {
        String::new()
    } else {
        format!(": {b}")
    }
}

impl SinkError {
    pub fn retryable(&self) -> bool {
        match self {
            SinkError::Network { .. } => true,
            SinkError::Status { status, .. } => *status == 429 || *status >= 500,
            SinkError::Build(_) => false,
        }
    }
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SinkError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The address of a URL without credentials or query, for errors and logs.
fn show(u: &reqwest::Url) -> String {
    format!(
        "{}://{}{}",
        u.scheme(),
        u.host_str().unwrap_or(""),
        u.port().map(|p| format!(":{p}")).unwrap_or_default()
    ) + u.path()
}

fn join(base: &reqwest::Url, path: &str) -> Result<reqwest::Url, SinkError> {
    let mut s = base.as_str().trim_end_matches('/').to_string();
    s.push_str(path);
    reqwest::Url::parse(&s).map_err(|e| SinkError::Build(format!("{s}: {e}")))
}

/// The key of a Standard Webhooks secret: `whsec_<base64>` or the bare base64, as the
/// Standard Webhooks libraries read it.
pub(crate) fn standard_key(secret: &str) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| format!("not base64 (whsec_<base64>): {e}"))
}

/// Standard Webhooks: `webhook-id`, `webhook-timestamp` (Unix seconds) and
/// `webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`.
fn standard_headers(
    secret: &str,
    id: &str,
    body: &[u8],
) -> Result<[(&'static str, String); 3], SinkError> {
    use base64::Engine as _;
    use hmac::Mac;
    let key = standard_key(secret).map_err(SinkError::Build)?;
    let ts = chrono::Utc::now().timestamp().to_string();
    let mut m =
        Hmac::<Sha256>::new_from_slice(&key).map_err(|e| SinkError::Build(e.to_string()))?;
    m.update(format!("{id}.{ts}.").as_bytes());
    m.update(body);
    let sig = base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes());
    Ok([
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", ts),
        ("webhook-signature", format!("v1,{sig}")),
    ])
}

/// The event's attributes as binary-mode headers, values percent-encoded as the binding says
/// (space, `"`, `%` and anything outside printable ASCII).
fn ce_headers(e: &Event) -> [(&'static str, String); 6] {
    use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
    const CE: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%').add(0x7f);
    let enc = |s: &str| utf8_percent_encode(s, CE).to_string();
    [
        ("ce-specversion", enc(&e.specversion)),
        ("ce-id", enc(&e.id)),
        ("ce-source", enc(&e.source)),
        ("ce-type", enc(&e.kind)),
        ("ce-subject", enc(&e.subject)),
        (
            "ce-time",
            e.time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        ),
    ]
}

/// Sends one delivery; `test` adds `X-Istream-Test: true`. Ok is the receiver's 2xx status.
pub async fn send(
    http: &reqwest::Client,
    t: &TriggerConfig,
    e: &Event,
    test: bool,
) -> Result<u16, SinkError> {
    let d = &e.data;
    let digest = d.digest.clone().unwrap_or_default();
    let image = d.image.clone().unwrap_or_default();
    let tag = e.subject.clone();
    let (url, req) = match &t.sink {
        Sink::Webhook {
            url,
            secret,
            headers,
            body_template,
            signature_header,
            binary,
            standard,
        } => {
            // The CloudEvents HTTP binding: structured mode is `application/cloudevents+json`;
            // binary mode sends the data as the body and the attributes as `ce-*` headers.
            let json =
                |r: serde_json::Result<String>| r.map_err(|x| SinkError::Build(x.to_string()));
            let (body, ctype) = match (body_template, binary) {
                (Some(tpl), _) => (
                    super::template::render(tpl, e).map_err(SinkError::Build)?,
                    "application/json",
                ),
                (None, true) => (
                    json(serde_json::to_string(&e.data))?,
                    e.datacontenttype.as_str(),
                ),
                (None, false) => (
                    json(serde_json::to_string(e))?,
                    "application/cloudevents+json",
                ),
            };
            let mut req = http.post(url.clone());
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            {
                req = req.header(header::CONTENT_TYPE, ctype);
            }
            if *binary && body_template.is_none() {
                for (k, v) in ce_headers(e) {
                    req = req.header(k, v);
                }
            }
            for (k, v) in headers {
                req = req.header(k.as_str(), v.as_str());
            }
            match (secret, standard) {
                (Some(s), true) => {
                    for (k, v) in standard_headers(s.expose(), &e.id, body.as_bytes())? {
                        req = req.header(k, v);
                    }
                }
                (Some(s), false) => {
                    req = req.header(
                        signature_header.as_str(),
                        sign(s.expose().as_bytes(), body.as_bytes()),
                    );
                }
                (None, _) => {}
            }
            (url.clone(), req.body(body))
        }
        Sink::GithubDispatch {
            api,
            repo,
            event_type,
            token,
        } => {
            let url = join(api, &format!("/repos/{repo}/dispatches"))?;
            let body = serde_json::json!({ "event_type": event_type, "client_payload": d });
            (
                url.clone(),
                github(http.post(url), token.expose()).json(&body),
            )
        }
        Sink::GithubWorkflow {
            api,
            repo,
            workflow,
            git_ref,
            token,
        } => {
            let url = join(
                api,
                &format!("/repos/{repo}/actions/workflows/{workflow}/dispatches"),
            )?;
            let body = serde_json::json!({
                "ref": git_ref,
                "inputs": { "digest": digest, "image": image, "tag": tag },
            });
            (
                url.clone(),
                github(http.post(url), token.expose()).json(&body),
            )
        }
        Sink::Gitlab {
            api,
            project,
            git_ref,
            token,
        } => {
            let encoded =
                percent_encoding::utf8_percent_encode(project, percent_encoding::NON_ALPHANUMERIC)
                    .to_string();
            let url = join(api, &format!("/api/v4/projects/{encoded}/trigger/pipeline"))?;
            let form = [
                ("token", token.expose().to_string()),
                ("ref", git_ref.clone()),
                ("variables[ISTREAM_DIGEST]", digest),
                ("variables[ISTREAM_IMAGE]", image),
                ("variables[ISTREAM_TAG]", tag),
            ];
            (url.clone(), http.post(url).form(&form))
        }
        Sink::Jenkins {
            job_url,
            user,
            token,
        } => {
            let url = join(job_url, "/buildWithParameters")?;
            let form = [
                ("ISTREAM_DIGEST", digest),
                ("ISTREAM_IMAGE", image),
                ("ISTREAM_TAG", tag),
            ];
            (
                url.clone(),
                http.post(url)
                    .basic_auth(user, Some(token.expose()))
                    .form(&form),
            )
        }
        Sink::Buildkite {
            api,
            org,
            pipeline,
            branch,
            commit,
            token,
        } => {
            let url = join(
                api,
                &format!("/v2/organizations/{org}/pipelines/{pipeline}/builds"),
            )?;
            let body = serde_json::json!({
                "commit": commit,
                "branch": branch,
                "message": format!("{tag} now points at {digest}"),
                "env": { "ISTREAM_DIGEST": digest, "ISTREAM_IMAGE": image, "ISTREAM_TAG": tag },
            });
            (
                url.clone(),
                http.post(url).bearer_auth(token.expose()).json(&body),
            )
        }
        Sink::Circleci {
            api,
            project_slug,
            branch,
            token,
        } => {
            // The slug's `/` stay as they are (CircleCI's documented form).
            let url = join(api, &format!("/api/v2/project/{project_slug}/pipeline"))?;
            let body = serde_json::json!({
                "branch": branch,
                "parameters": { "istream_digest": digest, "istream_image": image, "istream_tag": tag },
            });
            (
                url.clone(),
                http.post(url)
                    .header("Circle-Token", token.expose())
                    .json(&body),
            )
        }
        Sink::Azure {
            api,
            organization,
            project,
            pipeline_id,
            branch,
            token,
        } => {
            let url = join(
                api,
                &format!(
                    "/{organization}/{project}/_apis/pipelines/{pipeline_id}/runs?api-version=7.1"
                ),
            )?;
            let body = serde_json::json!({
                "resources": { "repositories": { "self": { "refName": format!("refs/heads/{branch}") } } },
                "templateParameters": { "istream_digest": digest, "istream_image": image, "istream_tag": tag },
            });
            (
                url.clone(),
                http.post(url)
                    .basic_auth("", Some(token.expose()))
                    .json(&body),
            )
        }
    };
    let req = if test {
        req.header("X-Istream-Test", "true")
    } else {
        req
    };
    let resp = req
        .header("Idempotency-Key", &e.id)
        .timeout(t.timeout)
        .send()
        .await
        .map_err(|x| SinkError::Network {
            url: show(&url),
            detail: crate::registry::describe_reqwest(&x),
        })?;
    let status = resp.status();
    if status.is_success() {
        return Ok(status.as_u16());
    }
    let retry_after = if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        crate::registry::parse_retry_after(resp.headers())
    } else {
        None
    };
    // A short excerpt of the receiver's answer helps; more would fill the store.
    let body = crate::registry::read_limited(resp, 64 << 10)
        .await
        .unwrap_or_default();
    let body: String = String::from_utf8_lossy(&body)
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    Err(SinkError::Status {
        url: show(&url),
        status: status.as_u16(),
        body,
        retry_after,
    })
}

fn github(req: reqwest::RequestBuilder, token: &str) -> reqwest::RequestBuilder {
    req.bearer_auth(token)
        .header(header::ACCEPT, "application/vnd.github+json")
        .header("X-GitHub-Api-Version", "2022-11-28")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_known_vector() {
        // RFC 4231-style check computed independently with `openssl dgst -sha256 -hmac key`.
        assert_eq!(
            sign(b"key", b"The quick brown fox jumps over the lazy dog"),
            "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }
}
