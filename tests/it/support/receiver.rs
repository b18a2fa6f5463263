//! A local HTTP receiver standing in for a CI system: records every request, answers with
//! scripted statuses (default 200) after an optional delay.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
    pub fn form(&self) -> Vec<(String, String)> {
        url::form_urlencoded::parse(&self.body)
            .into_owned()
            .collect()
    }
}

/// A scripted answer: status and headers.
type Answer = (u16, Vec<(String, String)>);

#[derive(Clone, Default)]
struct Inner {
    seen: Arc<Mutex<Vec<Recorded>>>,
    script: Arc<Mutex<VecDeque<Answer>>>,
    delay: Arc<Mutex<Duration>>,
}

pub struct Receiver {
    pub url: String,
    inner: Inner,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let inner = Inner::default();
        let state = inner.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                async move {
                    let delay = *state.delay.lock().unwrap();
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    state.seen.lock().unwrap().push(Recorded {
                        method: method.to_string(),
                        path: uri.path().to_string(),
                        query: uri.query().unwrap_or("").to_string(),
                        headers,
                        body: body.to_vec(),
                    });
                    let (status, hdrs) = state
                        .script
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or((200, vec![]));
                    let mut resp = axum::response::Response::new(axum::body::Body::from("ok"));
                    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                    for (k, v) in hdrs {
                        resp.headers_mut().insert(
                            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                            v.parse().unwrap(),
                        );
                    }
                    resp
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { url, inner, task }
    }

    /// The next answers, in order (status, headers); afterwards 200.
    pub fn script(&self, answers: &[(u16, &[(&str, &str)])]) {
        let mut s = self.inner.script.lock().unwrap();
        for (st, h) in answers {
            s.push_back((
                *st,
                h.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ));
        }
    }

    pub fn set_delay(&self, d: Duration) {
        *self.inner.delay.lock().unwrap() = d;
    }

    /// How many requests arrived (no copy: cheap enough to poll in benchmarks).
    pub fn len(&self) -> usize {
        self.inner.seen.lock().unwrap().len()
    }

    /// How many requests arrived at `path`.
    pub fn count(&self, path: &str) -> usize {
        self.inner
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .count()
    }

    /// Whether a request from the `from`-th on has `needle` in its body.
    pub fn any_since(&self, from: usize, needle: &[u8]) -> bool {
        self.inner
            .seen
            .lock()
            .unwrap()
            .iter()
            .skip(from)
            .any(|r| r.body.windows(needle.len()).any(|w| w == needle))
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.seen.lock().unwrap().clone()
    }

    /// Waits until each of `/t0` … `/t{n-1}` was requested, then checks that repeated
    /// requests of one path (at-least-once duplicates) carry the same `Idempotency-Key`.
    pub async fn wait_each_delivered_once_or_more(&self, n: usize) {
        let reqs = super::wait_for(&format!("a request at each of /t0../t{n}"), || async {
            let r = self.requests();
            let mut paths: Vec<String> = r.iter().map(|x| x.path.clone()).collect();
            paths.sort();
            paths.dedup();
            (paths.len() == n).then_some(r)
        })
        .await;
        for i in 0..n {
            let keys: Vec<_> = reqs
                .iter()
                .filter(|r| r.path == format!("/t{i}"))
                .map(|r| r.header("idempotency-key"))
                .collect();
            assert!(keys.windows(2).all(|w| w[0] == w[1]), "t{i}: {keys:?}");
        }
    }

    pub async fn wait_requests(&self, n: usize) -> Vec<Recorded> {
        super::wait_for(&format!("{n} requests at the receiver"), || async {
            let r = self.requests();
            (r.len() >= n).then_some(r)
        })
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
