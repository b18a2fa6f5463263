//! A webhook receiver that verifies istream's signature before acting, as a CI receiver should.
//!
//! `HOOK_SECRET=... cargo run --example receiver -- 127.0.0.1:9000`, then a trigger with
//! `webhook = { url = "http://127.0.0.1:9000/hooks/app", secret_env = "HOOK_SECRET" }`.
#![allow(clippy::unwrap_used)]

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use subtle::ConstantTimeEq;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".into());
    let secret =
        std::env::var("HOOK_SECRET").map_err(|_| "set HOOK_SECRET to the trigger's secret")?;
    let app = axum::Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
        let secret = secret.clone();
        async move {
            let mut mac =
                Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
            mac.update(&body);
            let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
            let got = headers
                .get("x-istream-signature-256")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !bool::from(expected.as_bytes().ct_eq(got.as_bytes())) {
                eprintln!("rejected: bad or missing signature");
                return StatusCode::UNAUTHORIZED;
            }
            let key = headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(ev) => {
                    // Deliveries are at least once: a real receiver skips keys it has seen.
                    println!("{key}: {} -> {}", ev["subject"], ev["data"]["image"]);
                    StatusCode::NO_CONTENT
                }
                Err(_) => StatusCode::BAD_REQUEST,
            }
        }
    });
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{addr}");
    axum::serve(listener, app).await?;
    Ok(())
}
