use super::*;

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_str(Path::new("triggers.toml"), text)
}

#[test]
fn defaults_without_a_file() {
    let c = load("").unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.store.path, PathBuf::from("istream.db"));
    assert!(matches!(c.schedule.interval, Schedule::Interval(d) if d == Duration::from_secs(900)));
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let e = load("[server]\nlisten = \"127.0.0.1:1\"\nlisten_typo = 1\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("triggers.toml:3:"), "{e}");
    assert!(e.contains("server.listen_typo"), "{e}");
}

#[test]
fn bad_value_names_key_and_line() {
    let e = load("[schedule]\ninterval = \"soon\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("triggers.toml:2:"), "{e}");
    assert!(e.contains("schedule.interval"), "{e}");
    let e = load("\n\n[[trigger]]\nname = \"t\"\non = [\"Bad:tag\"]\nwebhook = { url = \"http://127.0.0.1:9/x\" }\n").unwrap_err().to_string();
    assert!(
        e.starts_with("triggers.toml:5:") && e.contains("trigger[0].on[0]"),
        "{e}"
    );
}

#[test]
fn trigger_needs_exactly_one_sink_and_its_secret() {
    let e = load("[[trigger]]\nname = \"t\"\non = [\"p:latest\"]\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("exactly one sink"), "{e}");
    let e = load("[[trigger]]\nname = \"t\"\non = [\"p:latest\"]\ngithub = { repo = \"a/b\", event_type = \"x\", token_env = \"ISTREAM_TEST_UNSET_VAR\" }\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ISTREAM_TEST_UNSET_VAR is not set")
            && e.contains("trigger[0].github.token_env"),
        "{e}"
    );
    let e =
        load("[[trigger]]\nname = \"t\"\non = [\"p:latest\"]\nwebhook = { url = \"not a url\" }\n")
            .unwrap_err()
            .to_string();
    assert!(e.contains("trigger[0].webhook.url"), "{e}");
}

#[test]
fn declared_streams() {
    let c = load(
        "[[stream]]\nname = \"python\"\ntags = [\n  { name = \"3.6\", from.image = \"docker.io/library/python:3.6\", scheduled = true },\n  { name = \"latest\", from.tag = \"3.6\", alias = true },\n]\n",
    )
    .unwrap();
    assert_eq!(c.streams[0].tags.len(), 2);
    assert_eq!(c.streams[0].tags[1].spec.from, TagFrom::Tag("3.6".into()));
    let e = load("[[stream]]\nname = \"p\"\ntags = [\n { name = \"a\", from.tag = \"b\", alias = true },\n { name = \"b\", from.tag = \"a\", alias = true },\n]\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("cycle"), "{e}");
}

#[test]
fn non_loopback_listen_needs_tokens() {
    let e = load("[server]\nlisten = \"0.0.0.0:8080\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("server.listen") && e.contains("allow_unauthenticated"),
        "{e}"
    );
    assert!(load("[server]\nlisten = \"0.0.0.0:8080\"\nallow_unauthenticated = true\n").is_ok());
}

#[test]
fn the_repository_example_starts_as_it_is() {
    let text = include_str!("../../triggers.toml");
    load(text).unwrap();
}

/// The keys serde accepts in a section, read from its "unknown field" error.
fn keys_of(doc: &str) -> Vec<String> {
    let e = load(doc).unwrap_err().to_string();
    assert!(e.contains("unknown field"), "{doc}: {e}");
    let after = e.split("expected").nth(1).unwrap_or("");
    after
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

#[test]
fn reference_documents_every_key() {
    let reference = include_str!("../../docs/config.md");
    let sections: &[(&str, &str)] = &[
        ("server", "[server]\nzz_unknown = 1\n"),
        ("store", "[store]\nzz_unknown = 1\n"),
        ("nats", "[nats]\nzz_unknown = 1\n"),
        ("schedule", "[schedule]\nzz_unknown = 1\n"),
        ("hooks", "[hooks]\nzz_unknown = 1\n"),
        ("delivery", "[delivery]\nzz_unknown = 1\n"),
        ("api.token", "[[api.token]]\nzz_unknown = 1\n"),
        ("registry", "[[registry]]\nzz_unknown = 1\n"),
        ("stream", "[[stream]]\nzz_unknown = 1\n"),
        (
            "stream.tags",
            "[[stream]]\nname = \"a\"\ntags = [{ zz_unknown = 1 }]\n",
        ),
        (
            "stream.tags.from",
            "[[stream]]\nname = \"a\"\ntags = [{ name = \"a\", from = { zz_unknown = 1 } }]\n",
        ),
        ("trigger", "[[trigger]]\nzz_unknown = 1\n"),
        (
            "trigger.webhook",
            "[[trigger]]\nname = \"a\"\nwebhook = { zz_unknown = 1 }\n",
        ),
        (
            "trigger.github",
            "[[trigger]]\nname = \"a\"\ngithub = { zz_unknown = 1 }\n",
        ),
        (
            "trigger.gitlab",
            "[[trigger]]\nname = \"a\"\ngitlab = { zz_unknown = 1 }\n",
        ),
        (
            "trigger.jenkins",
            "[[trigger]]\nname = \"a\"\njenkins = { zz_unknown = 1 }\n",
        ),
    ];
    let mut missing = Vec::new();
    for (section, doc) in sections {
        let keys = keys_of(doc);
        assert!(!keys.is_empty(), "no keys read for {section}");
        for k in keys {
            let name = format!("`{section}.{k}`");
            if !reference.contains(&name) {
                missing.push(name);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/config.md does not document {missing:?}"
    );
}

#[test]
fn new_keys_of_the_scale_out_and_hardening_reject_bad_values() {
    for (text, key) in [
        (
            "[[registry]]\nhost = \"r.example\"\ntimeout = \"soon\"\n",
            "registry[0].timeout",
        ),
        (
            "[[registry]]\nhost = \"r.example\"\ntimeout = \"0s\"\n",
            "registry[0].timeout",
        ),
        ("[nats]\nurl = \"nats://a:4222,::nonsense\"\n", "nats.url"),
        ("[nats]\nurl = \" , \"\n", "nats.url"),
        ("[store]\nkind = \"nats\"\n", "store.kind"),
    ] {
        let e = load(text).unwrap_err().to_string();
        assert!(
            e.starts_with("triggers.toml:") && e.contains(key),
            "{text:?}: {e}"
        );
    }
    let c = load("[nats]\nurl = \"nats://a:4222, nats://b:4222\"\n").unwrap();
    assert_eq!(
        crate::bus::server_addrs(&c.nats.unwrap().url)
            .unwrap()
            .len(),
        2
    );
}

/// Issue 15: durations and rates that passed validation and then overflowed.
#[test]
fn durations_and_rates_are_bounded_at_load() {
    for (text, key) in [
        ("[schedule]\ninterval = \"1000000y\"\n", "schedule.interval"),
        (
            "[delivery]\nmax_backoff = \"1000000y\"\n",
            "delivery.max_backoff",
        ),
        (
            "[[registry]]\nhost = \"r.example\"\nmax_requests_per_second = 1e-300\n",
            "registry[0].max_requests_per_second",
        ),
        (
            "[[registry]]\nhost = \"r.example\"\nmax_requests_per_second = -1\n",
            "registry[0].max_requests_per_second",
        ),
        (
            "[[stream]]\nname = \"s\"\ntags = [{ name = \"t\", from.image = \"r.example/a:1\", scheduled = true, schedule = \"1000000y\" }]\n",
            "stream[0].tags[0]",
        ),
    ] {
        let e = load(text).unwrap_err().to_string();
        assert!(
            e.starts_with("triggers.toml:") && e.contains(key),
            "{text:?}: {e}"
        );
    }
    assert!(load("[schedule]\ninterval = \"366days\"\n").is_ok());
    assert!(load("[[registry]]\nhost = \"r.example\"\nmax_requests_per_second = 0\n").is_ok());
}

/// Issue 15: an unknown table after another was reported as being inside that other one.
#[test]
fn unknown_tables_are_named_as_themselves() {
    let e = load("[store]\npath = \"x.db\"\n\n[bogus]\nkey = 1\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("triggers.toml:4:"), "{e}");
    assert!(e.contains("bogus") && !e.contains("[store]"), "{e}");
}
