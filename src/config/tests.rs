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
