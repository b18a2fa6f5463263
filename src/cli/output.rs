//! Printing: operation results, `get` tables and `-o json|yaml|wide`, `watch` lines and the
//! `triggers` report. JSON shapes are the API's own (SPEC section 2).

use futures_util::StreamExt as _;

use super::client::{CliError, Client};
use super::describe::{ago, source_line, tag_text};
use crate::api::OperationView;
use crate::core::view::{StreamView, TagView};
use crate::model::{Event, StreamName, StreamTagRef};
use crate::trigger::TriggerView;

pub(super) fn print_value<T: serde::Serialize>(
    v: &T,
    format: Option<&str>,
) -> Result<(), CliError> {
    let json = serde_json::to_value(v).map_err(|e| CliError::Failed(e.to_string()))?;
    match format {
        Some("yaml") => print!("{}", to_yaml(&json)),
        _ => println!(
            "{}",
            serde_json::to_string_pretty(&json).unwrap_or_default()
        ),
    }
    Ok(())
}

/// A small YAML emitter for JSON values: block style, strings JSON-quoted (valid YAML).
pub(super) fn to_yaml(v: &serde_json::Value) -> String {
    fn scalar(v: &serde_json::Value) -> String {
        match v {
            serde_json::Value::String(s) => serde_json::to_string(s).unwrap_or_default(),
            other => other.to_string(),
        }
    }
    fn emit(v: &serde_json::Value, indent: usize, out: &mut String) {
        let pad = " ".repeat(indent);
        match v {
            serde_json::Value::Object(m) if !m.is_empty() => {
                for (k, x) in m {
                    match x {
                        serde_json::Value::Object(o) if !o.is_empty() => {
                            out.push_str(&format!("{pad}{k}:\n"));
                            emit(x, indent + 2, out);
                        }
                        serde_json::Value::Array(a) if !a.is_empty() => {
                            out.push_str(&format!("{pad}{k}:\n"));
                            emit(x, indent, out);
                        }
                        _ => out.push_str(&format!("{pad}{k}: {}\n", scalar_or_empty(x))),
                    }
                }
            }
            serde_json::Value::Array(a) if !a.is_empty() => {
                for x in a {
                    let mut inner = String::new();
                    emit(x, indent + 2, &mut inner);
                    let trimmed = inner.trim_start();
                    out.push_str(&format!("{pad}- {trimmed}"));
                    if !trimmed.ends_with('\n') {
                        out.push('\n');
                    }
                }
            }
            other => out.push_str(&format!("{pad}{}\n", scalar_or_empty(other))),
        }
    }
    fn scalar_or_empty(v: &serde_json::Value) -> String {
        match v {
            serde_json::Value::Object(_) => "{}".into(),
            serde_json::Value::Array(_) => "[]".into(),
            x => scalar(x),
        }
    }
    let mut out = String::new();
    emit(v, 0, &mut out);
    out
}

/// Prints import/tag results; exit 1 when any tag's import failed.
pub(super) fn operation(
    op: &OperationView,
    format: Option<&str>,
    ns: &str,
    verb: &str,
) -> Result<(), CliError> {
    let failed: Vec<String> = op
        .results
        .iter()
        .filter(|r| r.status != "Success")
        .map(|r| {
            let name = StreamTagRef::parse(&r.tag, ns)
                .map(|t| t.display_in(ns))
                .unwrap_or(r.tag.clone());
            format!(
                "{name}: {} ({})",
                r.message.clone().unwrap_or_default(),
                r.reason.clone().unwrap_or_default()
            )
        })
        .collect();
    match format {
        Some("json") | Some("yaml") => {
            let views: Vec<&TagView> = op.results.iter().filter_map(|r| r.view.as_ref()).collect();
            if views.len() == 1 {
                print_value(views[0], format)?;
            } else {
                print_value(&views, format)?;
            }
        }
        _ => {
            for r in &op.results {
                let Some(v) = &r.view else { continue };
                if r.status == "Success" {
                    println!(
                        "{verb}: {}:{} now points at {}",
                        v.stream,
                        v.tag,
                        v.image.clone().unwrap_or_default()
                    );
                }
                if op.results.len() == 1 {
                    println!();
                    print!("{}", tag_text(v));
                }
            }
            if op.results.len() > 1 {
                let ok = op.results.len() - failed.len();
                println!("{ok} of {} tags imported", op.results.len());
            }
        }
    }
    failures(verb, &failed)
}

/// `import-image --all`: a line per tag as it is imported, then a summary; exit 1 when any
/// tag failed.
pub(super) async fn import_all_progress(
    c: &Client,
    ns: &str,
    body: &serde_json::Value,
) -> Result<(), CliError> {
    use std::io::Write;
    let (mut total, mut done, mut failed, mut error) = (0usize, 0usize, Vec::new(), None);
    c.post_lines(&format!("/api/v1/namespaces/{ns}/import"), body, |v| {
        if let Some(n) = v["total"].as_u64() {
            total = n as usize;
            println!("importing {total} tags");
        } else if let Some(e) = v["error"].as_str() {
            error = Some(e.to_string());
        } else if let Some(tag) = v["tag"].as_str() {
            done += 1;
            let name = StreamTagRef::parse(tag, ns)
                .map(|t| t.display_in(ns))
                .unwrap_or(tag.to_string());
            if v["status"] == "Success" {
                println!(
                    "[{done}/{total}] {name} {}",
                    v["view"]["digest"].as_str().unwrap_or("")
                );
            } else {
                let why = format!(
                    "{} ({})",
                    v["message"].as_str().unwrap_or(""),
                    v["reason"].as_str().unwrap_or("")
                );
                println!("[{done}/{total}] {name} failed: {why}");
                failed.push(format!("{name}: {why}"));
            }
            let _ = std::io::stdout().flush();
        }
    })
    .await?;
    if let Some(e) = error {
        return Err(CliError::Failed(e));
    }
    println!("{} of {total} tags imported", done - failed.len());
    failures("import", &failed)
}

/// Exit 0 when nothing failed, else exit 1 naming each failure.
pub(super) fn failures(verb: &str, failed: &[String]) -> Result<(), CliError> {
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "{verb} failed for {}",
            failed.join("; ")
        )))
    }
}

pub(super) async fn get(
    c: &Client,
    ns: &str,
    kind: &str,
    name: Option<&str>,
    format: Option<&str>,
) -> Result<(), CliError> {
    let usage = |m: String| CliError::Usage(m);
    match kind {
        "is" | "imagestream" | "imagestreams" => {
            let streams: Vec<StreamView> = match name {
                Some(n) => {
                    let sn = StreamName::parse(n, ns).map_err(|e| usage(e.to_string()))?;
                    let s: StreamView = c
                        .get(&format!(
                            "/api/v1/namespaces/{}/imagestreams/{}",
                            sn.namespace, sn.name
                        ))
                        .await?;
                    if matches!(format, Some("json") | Some("yaml")) {
                        return print_value(&s, format);
                    }
                    vec![s]
                }
                None => {
                    c.get(&format!("/api/v1/namespaces/{ns}/imagestreams"))
                        .await?
                }
            };
            if matches!(format, Some("json") | Some("yaml")) {
                return print_value(&streams, format);
            }
            let wide = format == Some("wide");
            let mut rows = vec![vec!["NAME".to_string(), "TAGS".into(), "UPDATED".into()]];
            if wide {
                rows[0].push("GENERATION".into());
            }
            for s in &streams {
                let updated = s
                    .tags
                    .iter()
                    .filter_map(|t| t.history.first().map(|h| h.created))
                    .max();
                let mut row = vec![
                    s.name.clone(),
                    s.tags
                        .iter()
                        .map(|t| t.tag.clone())
                        .collect::<Vec<_>>()
                        .join(","),
                    updated.map(ago).unwrap_or_default(),
                ];
                if wide {
                    row.push(s.generation.to_string());
                }
                rows.push(row);
            }
            print_table(&rows);
            Ok(())
        }
        "istag" | "imagestreamtag" | "imagestreamtags" => {
            let tags: Vec<TagView> = match name {
                Some(n) => {
                    let t = StreamTagRef::parse(n, ns).map_err(|e| usage(e.to_string()))?;
                    let v: TagView = c
                        .get(&format!(
                            "/api/v1/namespaces/{}/imagestreamtags/{}:{}",
                            t.stream.namespace, t.stream.name, t.tag
                        ))
                        .await?;
                    if matches!(format, Some("json") | Some("yaml")) {
                        return print_value(&v, format);
                    }
                    vec![v]
                }
                None => {
                    c.get(&format!("/api/v1/namespaces/{ns}/imagestreamtags"))
                        .await?
                }
            };
            if matches!(format, Some("json") | Some("yaml")) {
                return print_value(&tags, format);
            }
            let wide = format == Some("wide");
            let mut rows = vec![vec![
                "NAME".to_string(),
                "IMAGE REFERENCE".into(),
                "UPDATED".into(),
            ]];
            if wide {
                rows[0].extend(["SOURCE".to_string(), "STATUS".into()]);
            }
            for t in &tags {
                let mut row = vec![
                    format!("{}:{}", t.stream, t.tag),
                    t.image.clone().unwrap_or_else(|| "<none>".into()),
                    t.history
                        .first()
                        .map(|h| ago(h.created))
                        .unwrap_or_default(),
                ];
                if wide {
                    row.push(source_line(t));
                    row.push(
                        t.conditions
                            .iter()
                            .find(|c| c.status == "False")
                            .map(|c| format!("{}: {}", c.kind, c.reason))
                            .unwrap_or_else(|| "ok".into()),
                    );
                }
                rows.push(row);
            }
            print_table(&rows);
            Ok(())
        }
        other => Err(usage(format!("unknown kind \"{other}\": use is or istag"))),
    }
}

pub(super) fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
}

pub(super) async fn watch(
    c: &Client,
    ns: &str,
    name: Option<&str>,
    format: Option<&str>,
) -> Result<(), CliError> {
    let mut q = format!("/api/v1/watch?namespace={ns}");
    if let Some(n) = name {
        let (stream, tag) = match n.split_once(':') {
            Some((s, t)) => (s, Some(t)),
            None => (n, None),
        };
        let sn = StreamName::parse(stream, ns).map_err(|e| CliError::Usage(e.to_string()))?;
        q = format!(
            "/api/v1/watch?namespace={}&stream={}",
            sn.namespace, sn.name
        );
        if let Some(t) = tag {
            crate::model::reference::check_tag("stream tag", n, t)
                .map_err(|e| CliError::Usage(e.to_string()))?;
            q.push_str(&format!("&tag={t}"));
        }
    }
    let resp = c.stream(&q).await?;
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    use std::io::Write;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| CliError::Failed(format!("watch stream ended: {e}")))?;
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = buf.find('\n') {
            let line: String = buf.drain(..=i).collect();
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let Ok(e) = serde_json::from_str::<Event>(data.trim()) else {
                continue;
            };
            if format == Some("json") {
                println!("{}", serde_json::to_string(&e).unwrap_or_default());
            } else {
                println!("{}", watch_line(&e));
            }
            let _ = std::io::stdout().flush();
        }
    }
    Ok(())
}

fn watch_line(e: &Event) -> String {
    let d = &e.data;
    let what = e.kind.trim_start_matches("io.istream.");
    match what {
        "tag.changed" => format!(
            "{} {} {} {} -> {} ({})",
            e.time.format("%Y-%m-%dT%H:%M:%SZ"),
            e.subject,
            what,
            d.previous.as_deref().unwrap_or("<none>"),
            d.digest.as_deref().unwrap_or(""),
            d.cause.as_deref().unwrap_or("")
        ),
        "import.failed" => format!(
            "{} {} {} {}: {}",
            e.time.format("%Y-%m-%dT%H:%M:%SZ"),
            e.subject,
            what,
            d.reason.as_deref().unwrap_or(""),
            d.message.as_deref().unwrap_or("")
        ),
        _ => format!(
            "{} {} {}",
            e.time.format("%Y-%m-%dT%H:%M:%SZ"),
            e.subject,
            what
        ),
    }
}

pub(super) async fn triggers(
    c: &Client,
    args: &[String],
    tag: Option<String>,
    format: Option<&str>,
) -> Result<(), CliError> {
    if tag.is_some() && args.first().map(String::as_str) != Some("test") {
        return Err(CliError::Usage(
            "--tag goes with `triggers test NAME`".into(),
        ));
    }
    match args {
        [retry, name] if retry == "retry" => {
            let v: serde_json::Value = c
                .post(
                    &format!("/api/v1/triggers/{name}/retry"),
                    &serde_json::json!({}),
                )
                .await?;
            if matches!(format, Some("json") | Some("yaml")) {
                return print_value(&v, format);
            }
            println!(
                "Re-queued {} dead deliveries of trigger {name}.",
                v["requeued"].as_u64().unwrap_or(0)
            );
            Ok(())
        }
        [retry] if retry == "retry" => Err(CliError::Usage(
            "triggers retry needs the trigger's NAME".into(),
        )),
        [test, rest @ ..] if test == "test" => {
            let name = match rest {
                [name] => name,
                _ => {
                    return Err(CliError::Usage(
                        "usage: istream triggers test NAME [--tag NS/STREAM:TAG]".into(),
                    ));
                }
            };
            if let Some(t) = &tag {
                StreamTagRef::parse(t, "default").map_err(|e| CliError::Usage(e.to_string()))?;
            }
            let v: serde_json::Value = c
                .post(
                    &format!("/api/v1/triggers/{name}/test"),
                    &serde_json::json!({ "tag": tag }),
                )
                .await?;
            if matches!(format, Some("json") | Some("yaml")) {
                print_value(&v, format)?;
            } else {
                match (v["status"].as_u64(), v["error"].as_str()) {
                    (Some(st), _) => println!(
                        "Test delivery of trigger {name} for {}: HTTP {st}",
                        v["tag"].as_str().unwrap_or("")
                    ),
                    (None, err) => println!(
                        "Test delivery of trigger {name} for {} failed: {}",
                        v["tag"].as_str().unwrap_or(""),
                        err.unwrap_or("no answer")
                    ),
                }
            }
            match v["status"].as_u64() {
                Some(st) if (200..300).contains(&st) => Ok(()),
                Some(st) => Err(CliError::Failed(format!(
                    "trigger {name}: the receiver answered HTTP {st}"
                ))),
                None => Err(CliError::Failed(format!(
                    "trigger {name}: {}",
                    v["error"].as_str().unwrap_or("no answer")
                ))),
            }
        }
        [] | [_] => {
            let list: Vec<TriggerView> = match args.first() {
                Some(n) => vec![c.get(&format!("/api/v1/triggers/{n}")).await?],
                None => c.get("/api/v1/triggers").await?,
            };
            if matches!(format, Some("json") | Some("yaml")) {
                return print_value(&list, format);
            }
            if args.is_empty() {
                let mut rows = vec![vec![
                    "NAME".to_string(),
                    "SINK".into(),
                    "ON".into(),
                    "PENDING".into(),
                    "DEAD".into(),
                    "DELIVERED".into(),
                    "LAST FIRED".into(),
                ]];
                for t in &list {
                    rows.push(vec![
                        format!("{}{}", t.name, if t.paused { " (paused)" } else { "" }),
                        t.sink.clone(),
                        t.on.join(","),
                        t.pending.to_string(),
                        t.dead.to_string(),
                        t.delivered.to_string(),
                        t.last_fired
                            .iter()
                            .map(|(k, v)| format!("{k}={}", short(v)))
                            .collect::<Vec<_>>()
                            .join(" "),
                    ]);
                }
                print_table(&rows);
                return Ok(());
            }
            for t in &list {
                println!(
                    "Name:\t\t{}{}",
                    t.name,
                    if t.paused { " (paused)" } else { "" }
                );
                println!("Sink:\t\t{}", t.sink);
                println!("On:\t\t{}", t.on.join(", "));
                println!(
                    "Deliveries:\t{} pending, {} dead, {} delivered, {} superseded",
                    t.pending, t.dead, t.delivered, t.superseded
                );
                for (k, v) in &t.last_fired {
                    println!("Last fired:\t{k} -> {v}");
                }
                if !t.deliveries.is_empty() {
                    println!("Recent:");
                    let mut rows = vec![vec![
                        "ID".to_string(),
                        "TAG".into(),
                        "DIGEST".into(),
                        "STATE".into(),
                        "ATTEMPTS".into(),
                        "NEXT".into(),
                        "LAST ERROR".into(),
                    ]];
                    for d in &t.deliveries {
                        rows.push(vec![
                            d.id.to_string(),
                            d.tag.clone(),
                            short(&d.digest),
                            d.state.clone(),
                            d.attempts.to_string(),
                            d.next_attempt
                                .map(|n| n.format("%H:%M:%S").to_string())
                                .unwrap_or_default(),
                            d.last_error.clone().unwrap_or_default(),
                        ]);
                    }
                    print_table(&rows);
                }
            }
            Ok(())
        }
        _ => Err(CliError::Usage(
            "usage: istream triggers [NAME] | istream triggers retry NAME | istream triggers test NAME [--tag NS/STREAM:TAG]".into(),
        )),
    }
}

fn short(d: &str) -> String {
    match d.split_once(':') {
        Some((a, h)) => format!("{a}:{}", &h[..h.len().min(12)]),
        None => d.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn yaml_shape() {
        let v = serde_json::json!({"a": 1, "b": {"c": "x:y"}, "d": [{"e": null}, "f"], "g": []});
        assert_eq!(
            super::to_yaml(&v),
            "a: 1\nb:\n  c: \"x:y\"\nd:\n- e: null\n- \"f\"\ng: []\n"
        );
    }
}
