//! `describe is/NAME | istag/NAME:TAG | isimage/NAME@DIGEST`, in `oc describe`'s layout.

use chrono::{DateTime, Utc};

use super::client::{CliError, Client};
use crate::core::view::{StreamView, TagView};
use crate::model::{StreamImageRef, StreamName, StreamTagRef, TagFrom};

pub(super) fn ago(t: DateTime<Utc>) -> String {
    let secs = (Utc::now() - t).num_seconds();
    let (n, unit) = match secs {
        s if s < 0 => return "just now".into(),
        s if s < 60 => (s, "second"),
        s if s < 3600 => (s / 60, "minute"),
        s if s < 86400 => (s / 3600, "hour"),
        s => (s / 86400, "day"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

fn until(t: DateTime<Utc>) -> String {
    let secs = (t - Utc::now()).num_seconds().max(0);
    match secs {
        s if s < 60 => format!("in {s}s"),
        s if s < 3600 => format!("in {}m{}s", s / 60, s % 60),
        s => format!("in {}h{}m", s / 3600, (s % 3600) / 60),
    }
}

pub(super) fn source_line(t: &TagView) -> String {
    match &t.spec.from {
        TagFrom::Image(r) if t.spec.scheduled && !r.contains('@') => {
            format!("updates automatically from registry {r}")
        }
        TagFrom::Image(r) => format!("tagged from {r}"),
        TagFrom::Tag(s) if t.spec.alias => format!("tagged from {s} (alias: follows every change)"),
        TagFrom::Tag(s) => format!("tagged from {s}"),
        TagFrom::Digest(d) => format!("tagged from {d} (pinned)"),
        TagFrom::Policy(p) => format!(
            "follows the newest tag of {} matching {}{}",
            p.repository,
            p.describe(),
            t.source_tag
                .as_ref()
                .map(|s| format!(" (now {s})"))
                .unwrap_or_default()
        ),
    }
}

pub(super) async fn run(c: &Client, ns: &str, what: &str) -> Result<(), CliError> {
    let usage = |m: String| CliError::Usage(m);
    let (kind, name) = what.split_once('/').ok_or_else(|| {
        usage(format!(
            "\"{what}\": expected is/NAME, istag/NAME:TAG or isimage/NAME@DIGEST"
        ))
    })?;
    match kind {
        "is" | "imagestream" | "imagestreams" => {
            let n = StreamName::parse(name, ns).map_err(|e| usage(e.to_string()))?;
            let s: StreamView = c
                .get(&format!(
                    "/api/v1/namespaces/{}/imagestreams/{}",
                    n.namespace, n.name
                ))
                .await?;
            print!("{}", stream_text(&s));
            Ok(())
        }
        "istag" | "imagestreamtag" | "imagestreamtags" => {
            let t = StreamTagRef::parse(name, ns).map_err(|e| usage(e.to_string()))?;
            let v: TagView = c
                .get(&format!(
                    "/api/v1/namespaces/{}/imagestreamtags/{}:{}",
                    t.stream.namespace, t.stream.name, t.tag
                ))
                .await?;
            print!("{}", tag_text(&v));
            Ok(())
        }
        "isimage" | "imagestreamimage" | "imagestreamimages" => {
            let r = StreamImageRef::parse(name, ns).map_err(|e| usage(e.to_string()))?;
            let v: serde_json::Value = c
                .get(&format!(
                    "/api/v1/namespaces/{}/imagestreamimages/{}@{}",
                    r.stream.namespace, r.stream.name, r.digest_prefix
                ))
                .await?;
            println!(
                "Name:\t\t{}@{}",
                v["stream"].as_str().unwrap_or(""),
                v["digest"].as_str().unwrap_or("")
            );
            println!("Namespace:\t{}", v["namespace"].as_str().unwrap_or(""));
            println!("Image Name:\t{}", v["digest"].as_str().unwrap_or(""));
            println!("Docker Image:\t{}", v["image"].as_str().unwrap_or(""));
            if let Some(c) = v["created"]
                .as_str()
                .and_then(|s| s.parse::<DateTime<Utc>>().ok())
            {
                println!("Created:\t{} ({})", ago(c), c.to_rfc3339());
            }
            if let Some(m) = v["media_type"].as_str() {
                println!("Media Type:\t{m}");
            }
            let platforms: Vec<&str> = v["platforms"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            if !platforms.is_empty() {
                println!("Platforms:\t{}", platforms.join(", "));
            }
            let tags: Vec<String> = v["tags"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|t| {
                            format!(
                                "{}{}",
                                t["tag"].as_str().unwrap_or(""),
                                if t["current"].as_bool() == Some(true) {
                                    " (current)"
                                } else {
                                    ""
                                }
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            println!(
                "Tags:\t\t{}",
                if tags.is_empty() {
                    "<none>".into()
                } else {
                    tags.join(", ")
                }
            );
            Ok(())
        }
        other => Err(usage(format!(
            "unknown kind \"{other}\": use is, istag or isimage"
        ))),
    }
}

pub(super) fn stream_text(s: &StreamView) -> String {
    let mut o = String::new();
    o += &format!("Name:\t\t\t{}\n", s.name);
    o += &format!("Namespace:\t\t{}\n", s.namespace);
    o += &format!("Created:\t\t{}\n", ago(s.created));
    o += &format!("Generation:\t\t{}\n", s.generation);
    let updated = s
        .tags
        .iter()
        .filter_map(|t| t.history.first().map(|h| h.created))
        .max();
    if let Some(u) = updated {
        o += &format!("Image Updated:\t\t{}\n", ago(u));
    }
    o += &format!("Tags:\t\t\t{}\n", s.tags.len());
    for t in &s.tags {
        o += &format!("\n{}\n", t.tag);
        o += &format!("  {}\n", source_line(t));
        if let (Some(c), Some(n)) = (t.last_checked, t.next_due) {
            o += &format!("  last checked {}, next check {}\n", ago(c), until(n));
        } else if let Some(n) = t.next_due {
            o += &format!("  next check {}\n", until(n));
        }
        if let Some(p) = &t.spec.platform {
            o += &format!("  platform {p}\n");
        }
        if t.history.is_empty() {
            o += "  no image yet\n";
        }
        for (i, h) in t.history.iter().enumerate() {
            o += &format!("  {} {}\n", if i == 0 { "*" } else { " " }, h.image);
            o += &format!("      {} ({})\n", ago(h.created), h.cause.as_str());
        }
        if let Some(c) = t
            .conditions
            .iter()
            .find(|c| c.kind == "ImportSuccess" && c.status == "False")
        {
            o += &format!(
                "  ! error: Import failed ({}): {}\n      {}\n",
                c.reason,
                c.message,
                ago(c.time)
            );
        }
    }
    o
}

pub(super) fn tag_text(v: &TagView) -> String {
    let mut o = String::new();
    o += &format!("Name:\t\t{}:{}\n", v.stream, v.tag);
    o += &format!("Namespace:\t{}\n", v.namespace);
    o += &format!("Source:\t\t{}\n", source_line(v));
    match v.history.first() {
        Some(h) => {
            o += &format!(
                "Created:\t{} ({})\n",
                ago(h.created),
                h.created.to_rfc3339()
            );
            o += &format!("Image Name:\t{}\n", h.digest);
            o += &format!("Docker Image:\t{}\n", h.image);
            if let Some(m) = &h.media_type {
                o += &format!("Media Type:\t{m}\n");
            }
            let platforms = match (&v.spec.platform, h.platforms.is_empty()) {
                (Some(p), _) => p.clone(),
                (None, false) => h.platforms.join(", "),
                (None, true) => "(single manifest)".into(),
            };
            o += &format!("Platform(s):\t{platforms}\n");
            o += &format!("Cause:\t\t{}\n", h.cause.as_str());
        }
        None => o += "Image Name:\t<none yet>\n",
    }
    if let TagFrom::Policy(p) = &v.spec.from
        && !v.held_back.is_empty()
    {
        let age = p
            .min_age
            .as_deref()
            .and_then(|a| humantime::parse_duration(a).ok())
            .and_then(|d| chrono::Duration::from_std(d).ok())
            .unwrap_or_default();
        o += "Held back:\n";
        for (tag, seen) in &v.held_back {
            o += &format!(
                "  {tag} ({}) seen {}, eligible at {}\n",
                seen.digest.short(),
                ago(seen.first_seen),
                (seen.first_seen + age).to_rfc3339()
            );
        }
    }
    o += &format!("Generation:\t{}\n", v.spec_generation);
    if v.spec.scheduled {
        o += &format!(
            "Scheduled:\tyes{}\n",
            v.spec
                .schedule
                .as_ref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default()
        );
        o += &format!(
            "Last Checked:\t{}\n",
            v.last_checked.map(ago).unwrap_or_else(|| "not yet".into())
        );
        o += &format!(
            "Next Check:\t{}\n",
            v.next_due
                .map(|n| format!("{} ({})", until(n), n.to_rfc3339()))
                .unwrap_or_else(|| "unknown".into())
        );
    }
    if let Some(p) = v.last_push {
        o += &format!("Last Push:\t{}\n", ago(p));
    }
    if v.history.len() > 1 {
        o += &format!("History:\t{} images\n", v.history.len());
    }
    for c in &v.conditions {
        o += &format!(
            "Condition:\t{}={} {}: {} ({})\n",
            c.kind,
            c.status,
            c.reason,
            c.message,
            ago(c.time)
        );
    }
    o
}
