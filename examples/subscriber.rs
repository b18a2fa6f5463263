//! A durable JetStream subscriber: prints every tag change istream publishes, resuming where it
//! left off after a restart (the consumer `istream-example` remembers its position).
//!
//! `cargo run --example subscriber -- [nats://127.0.0.1:4222] [istream]`
#![allow(clippy::unwrap_used)]

use futures_util::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let prefix = args.next().unwrap_or_else(|| "istream".into());
    let client = async_nats::connect(&url).await?;
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("ISTREAM").await?;
    let consumer = stream
        .get_or_create_consumer(
            "istream-example",
            async_nats::jetstream::consumer::pull::Config {
                durable_name: Some("istream-example".into()),
                // tag changes only; status events live under <prefix>._status.>
                filter_subject: format!("{prefix}.*.*.*"),
                ..Default::default()
            },
        )
        .await?;
    println!("waiting for changes on {url} ({prefix}.*.*.*)");
    let mut messages = consumer.messages().await?;
    while let Some(msg) = messages.next().await {
        let msg = msg?;
        match serde_json::from_slice::<serde_json::Value>(&msg.payload) {
            Ok(ev) => {
                let d = &ev["data"];
                println!(
                    "{} {} {} -> {} ({})",
                    ev["time"].as_str().unwrap_or(""),
                    ev["subject"].as_str().unwrap_or(""),
                    d["previous"].as_str().unwrap_or("<none>"),
                    d["digest"].as_str().unwrap_or(""),
                    d["cause"].as_str().unwrap_or("")
                );
            }
            Err(e) => eprintln!("skipping a message that is not a CloudEvent: {e}"),
        }
        msg.ack().await.map_err(|e| e.to_string())?;
    }
    Ok(())
}
