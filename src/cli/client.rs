//! The CLI's HTTP client of the engine: JSON in and out, the engine's error message passed
//! through, and an unreachable engine explained (address tried, how to start one).

use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug)]
pub(super) enum CliError {
    /// Bad usage: exit 2.
    Usage(String),
    /// The operation failed: exit 1.
    Failed(String),
}

pub(super) struct Client {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl Client {
    pub(super) fn new(
        server: &str,
        token: Option<&str>,
        ca: Option<&std::path::Path>,
    ) -> Result<Client, CliError> {
        crate::registry::install_crypto();
        let base = server.trim_end_matches('/').to_string();
        let u = reqwest::Url::parse(&base)
            .map_err(|e| CliError::Usage(format!("--server {server}: {e}")))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err(CliError::Usage(format!(
                "--server {server}: must be an http(s) URL"
            )));
        }
        let mut builder =
            reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(5));
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).map_err(|e| {
                CliError::Usage(format!("--certificate-authority {}: {e}", ca.display()))
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                CliError::Usage(format!("--certificate-authority {}: {e}", ca.display()))
            })?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| CliError::Failed(e.to_string()))?;
        Ok(Client {
            base,
            http,
            token: token.filter(|t| !t.is_empty()).map(str::to_string),
        })
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    fn unreachable(&self, e: &reqwest::Error) -> CliError {
        CliError::Failed(format!(
            "cannot reach the istream engine at {} ({}); start it with `istream serve` or point --server / ISTREAM_SERVER at it",
            self.base,
            crate::registry::describe_reqwest(e)
        ))
    }

    async fn finish(
        &self,
        resp: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<reqwest::Response, CliError> {
        let resp = resp.map_err(|e| self.unreachable(&e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("engine answered HTTP {}", status.as_u16()));
        // Arguments were checked locally; what the engine refuses is a failed operation.
        Err(CliError::Failed(msg))
    }

    pub(super) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        let resp = self
            .finish(self.req(reqwest::Method::GET, path).send().await)
            .await?;
        resp.json()
            .await
            .map_err(|e| CliError::Failed(format!("unreadable answer from the engine: {e}")))
    }

    pub(super) async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CliError> {
        let resp = self
            .finish(
                self.req(reqwest::Method::POST, path)
                    .json(body)
                    .send()
                    .await,
            )
            .await?;
        resp.json()
            .await
            .map_err(|e| CliError::Failed(format!("unreadable answer from the engine: {e}")))
    }

    /// POSTs and reads the answer as JSON lines, handing each to `each` as it arrives.
    pub(super) async fn post_lines<B: Serialize>(
        &self,
        path: &str,
        body: &B,
        mut each: impl FnMut(serde_json::Value),
    ) -> Result<(), CliError> {
        use futures_util::StreamExt as _;
        let resp = self
            .finish(
                self.req(reqwest::Method::POST, path)
                    .header("accept", "application/x-ndjson")
                    .json(body)
                    .send()
                    .await,
            )
            .await?;
        let mut stream = resp.bytes_stream();
        let mut buf = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| CliError::Failed(format!("the engine's answer was cut off: {e}")))?;
            buf.extend_from_slice(&chunk);
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                if let Ok(v) = serde_json::from_slice(&line) {
                    each(v);
                }
            }
        }
        Ok(())
    }

    pub(super) async fn delete(&self, path: &str) -> Result<(), CliError> {
        self.finish(self.req(reqwest::Method::DELETE, path).send().await)
            .await
            .map(|_| ())
    }

    /// Opens a server-sent event stream.
    pub(super) async fn stream(&self, path: &str) -> Result<reqwest::Response, CliError> {
        self.finish(
            self.req(reqwest::Method::GET, path)
                .header("accept", "text/event-stream")
                .send()
                .await,
        )
        .await
    }
}
