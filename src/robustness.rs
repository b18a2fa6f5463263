//! Randomised robustness checks: every parser that reads untrusted input (references, hook
//! payloads, config files, webhook templates) gets many generated inputs — random bytes and
//! mutations of valid samples — and must answer with a value or an error, never a panic.
//! A cheap, always-on stand-in for the coverage-guided fuzzing the hardening issue asks for.

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::hooks::parse_for_fuzz as hook_parse;
    use crate::model::{ImageRef, StreamImageRef, StreamTagRef};

    const SEEDS: &[&str] = &[
        "docker.io/library/python:3.6",
        "127.0.0.1:5000/a/b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "team/python:latest",
        "python@sha256:0123",
        "[::1]:5000/x/y:z",
        "localhost/a__b-c.d:v1.2_3",
    ];

    /// Mutates a sample: flips, inserts, deletes and duplicates bytes at random.
    fn mutate(rng: &mut fastrand::Rng, s: &[u8]) -> Vec<u8> {
        let mut v = s.to_vec();
        for _ in 0..rng.usize(1..8) {
            match rng.u8(0..5) {
                0 if !v.is_empty() => {
                    let i = rng.usize(..v.len());
                    v[i] = rng.u8(..);
                }
                1 => {
                    let i = rng.usize(..=v.len());
                    let bytes = b":/@._-*>% \n\"[]{}=";
                    v.insert(i, bytes[rng.usize(..bytes.len())]);
                }
                2 if !v.is_empty() => {
                    let i = rng.usize(..v.len());
                    v.remove(i);
                }
                3 if !v.is_empty() => {
                    let i = rng.usize(..v.len());
                    let j = rng.usize(i..v.len());
                    let part = v[i..=j].to_vec();
                    v.splice(i..i, part);
                }
                _ => v.extend((0..rng.usize(0..4)).map(|_| rng.u8(..))),
            }
        }
        v
    }

    fn inputs(seeds: &[&str], n: usize) -> Vec<String> {
        let mut rng = fastrand::Rng::with_seed(0x15_7ea4);
        (0..n)
            .map(|i| {
                let base = seeds[i % seeds.len()].as_bytes();
                String::from_utf8_lossy(&mutate(&mut rng, base)).into_owned()
            })
            .collect()
    }

    #[test]
    fn reference_parsers_never_panic() {
        for s in inputs(SEEDS, 50_000) {
            if let Ok(r) = ImageRef::parse(&s) {
                // whatever parses, re-parses to itself
                assert_eq!(ImageRef::parse(&r.to_string()).as_ref(), Ok(&r), "{s:?}");
            }
            let _ = StreamTagRef::parse(&s, "default");
            let _ = StreamImageRef::parse(&s, "default");
        }
    }

    #[test]
    fn hook_parsers_never_panic() {
        let sample = include_str!("../tests/data/distribution-notification.json");
        let body = serde_json::from_str::<serde_json::Value>(sample).unwrap()["body"].to_string();
        let seeds = [
            body.as_str(),
            r#"{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"digest":"sha256:x","tag":"v1","resource_url":"h.example/p/a:v1"}],"repository":{"repo_full_name":"p/a"}}}"#,
            r#"{"push_data":{"tag":"3"},"repository":{"repo_name":"python"}}"#,
            r#"{"docker_url":"quay.io/a/b","updated_tags":["x"]}"#,
            include_str!("../tests/data/hooks/ghcr-package-published.json"),
            include_str!("../tests/data/hooks/gitea-package-created.json"),
            include_str!("../tests/data/hooks/artifactory-docker-pushed.json"),
            include_str!("../tests/data/hooks/nexus-component-created.json"),
            include_str!("../tests/data/hooks/acr-push.json"),
            include_str!("../tests/data/hooks/ecr-image-action.json"),
            include_str!("../tests/data/hooks/gar-pubsub-push.json"),
        ];
        for s in inputs(&seeds, 12_000) {
            for src in crate::hooks::SOURCES {
                let _ = hook_parse(src, s.as_bytes());
            }
        }
    }

    #[test]
    fn config_loader_never_panics() {
        let seeds = [
            "[server]\nlisten = \"127.0.0.1:8080\"\n[schedule]\ninterval = \"15m\"\n",
            "[[stream]]\nname = \"p\"\ntags = [ { name = \"a\", from.image = \"x/y\", scheduled = true }, { name = \"b\", from.tag = \"a\", alias = true } ]\n",
            "[[trigger]]\nname = \"t\"\non = [\"p:a\"]\nwebhook = { url = \"http://127.0.0.1:1/x\", body_template = \"{{ data.digest }}\" }\n",
            "[[registry]]\nhost = \"r:5000\"\nmax_requests_per_second = 5.5\n[nats]\nsubject_prefix = \"a.b\"\n",
        ];
        for s in inputs(&seeds, 5_000) {
            let _ = Config::from_str(std::path::Path::new("fuzz.toml"), &s);
        }
    }

    #[test]
    fn templates_never_panic() {
        let seeds = [
            "{\"d\": \"{{ data.digest }}\", \"s\": \"{{subject}}\"}",
            "{{ id }}{{",
        ];
        for s in inputs(&seeds, 20_000) {
            let _ = crate::trigger::template::check(&s);
        }
    }

    /// Inputs far past every length limit, with multi-byte characters at every offset: the
    /// 4,096-byte reference limit once sliced inside a character.
    #[test]
    fn long_inputs_never_panic() {
        for ch in ["a", "\u{20ac}", "\u{1f433}", "/", ":", "@"] {
            for n in [63, 64, 65, 1000, 1400, 4097, 20_000] {
                for prefix in ["", "x", "xy", "xyz", "r.example/"] {
                    let s = format!("{prefix}{}", ch.repeat(n));
                    let _ = ImageRef::parse(&s);
                    let _ = StreamTagRef::parse(&s, "default");
                    let _ = StreamImageRef::parse(&s, "default");
                    let _ = crate::config::Schedule::parse(&s);
                }
            }
        }
    }

    /// Durations and schedules from config and the API: huge, negative, malformed.
    #[test]
    fn duration_and_schedule_parsers_never_panic() {
        let seeds = [
            "15m",
            "1s",
            "366days",
            "1000000y",
            "18446744073709551615s",
            "0.5s",
            "-1s",
            "*/5 * * * *",
            "0 0 31 2 *",
            "@hourly",
            "59 23 * * 7 2099",
        ];
        let now = chrono::Utc::now();
        for s in inputs(&seeds, 4_000) {
            if let Ok(sch) = crate::config::Schedule::parse(&s) {
                let next = sch.next_after(now);
                assert!(next > now, "{s:?}");
                let _ = sch.period(now);
            }
            let text = format!("[schedule]\ninterval = {s:?}\n[delivery]\nmax_backoff = {s:?}\n");
            let _ = Config::from_str(std::path::Path::new("fuzz.toml"), &text);
        }
    }
}
