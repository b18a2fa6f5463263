//! The Image Streams article's walk-through, with `istream` instead of `oc`, against a real
//! registry, through the real binary.

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_articles_walk_through() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    let d35 = push
        .image("centos/python-35-centos7", "latest", "3.5")
        .await;
    let d36 = push
        .image("centos/python-36-centos7", "latest", "3.6")
        .await;
    let h = &reg.host;
    let mut e = Engine::start("");

    // import-image without --confirm on a new stream fails and says what to do
    let o = e.cli(&[
        "import-image",
        "python:3.5",
        &format!("--from={h}/centos/python-35-centos7"),
    ]);
    expect_code(&o, 1);
    assert!(stderr(&o).contains("--confirm"), "{}", stderr(&o));
    assert!(
        e.istag("python:3.5").is_none(),
        "nothing created without --confirm"
    );

    let o = e.cli(&[
        "import-image",
        "python:3.5",
        &format!("--from={h}/centos/python-35-centos7"),
        "--confirm",
    ]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains(&d35), "{}", stdout(&o));
    let t = e.istag("python:3.5").unwrap();
    assert_eq!(t["digest"], d35.as_str());
    assert_eq!(
        t["image"],
        format!("{h}/centos/python-35-centos7@{d35}").as_str()
    );
    assert_eq!(t["history"][0]["cause"], "import");
    assert_eq!(t["namespace"], "default");
    assert_eq!(t["stream"], "python");
    assert_eq!(t["tag"], "3.5");

    // re-import without --from keeps the tag where it is
    expect_code(&e.cli(&["import-image", "python:3.5"]), 0);
    assert_eq!(
        e.istag("python:3.5").unwrap()["history"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // tag python:3.5 python:latest
    let o = e.cli(&["tag", "python:3.5", "python:latest"]);
    expect_code(&o, 0);
    let latest = e.istag("python:latest").unwrap();
    assert_eq!(latest["digest"], d35.as_str());
    assert_eq!(latest["spec"]["from"]["tag"], "3.5");

    // tag an external image as python:3.6
    expect_code(
        &e.cli(&[
            "tag",
            &format!("{h}/centos/python-36-centos7"),
            "python:3.6",
        ]),
        0,
    );
    assert_eq!(e.istag("python:3.6").unwrap()["digest"], d36.as_str());

    // tag python:3.6 python:latest moves latest; history keeps the old image
    expect_code(&e.cli(&["tag", "python:3.6", "python:latest"]), 0);
    let latest = e.istag("python:latest").unwrap();
    assert_eq!(latest["digest"], d36.as_str());
    let hist = latest["history"].as_array().unwrap();
    assert_eq!(hist.len(), 2);
    assert_eq!(hist[1]["digest"], d35.as_str());
    assert!(hist[0]["generation"].as_i64().unwrap() > hist[1]["generation"].as_i64().unwrap());

    // --scheduled switches periodic import on; re-running without it switches it off
    expect_code(
        &e.cli(&[
            "tag",
            &format!("{h}/centos/python-36-centos7"),
            "python:3.6",
            "--scheduled",
        ]),
        0,
    );
    assert_eq!(e.istag("python:3.6").unwrap()["spec"]["scheduled"], true);
    let o = e.cli(&["describe", "is/python"]);
    expect_code(&o, 0);
    assert!(
        stdout(&o).contains(&format!(
            "updates automatically from registry {h}/centos/python-36-centos7"
        )),
        "{}",
        stdout(&o)
    );
    expect_code(
        &e.cli(&[
            "tag",
            &format!("{h}/centos/python-36-centos7"),
            "python:3.6",
        ]),
        0,
    );
    assert_eq!(e.istag("python:3.6").unwrap()["spec"]["scheduled"], false);

    // tag -d removes the tag and its history
    let o = e.cli(&["tag", "-d", "python:3.5"]);
    expect_code(&o, 0);
    let o = e.cli(&["get", "istag", "python:3.5", "-o", "json"]);
    expect_code(&o, 1);
    assert!(stderr(&o).contains("python:3.5"), "{}", stderr(&o));

    // rollback by digest prefix: the 3.5 image becomes current again, cause rollback
    let prefix = &d35[..7 + 12];
    let o = e.cli(&["tag", &format!("python@{prefix}"), "python:latest"]);
    expect_code(&o, 0);
    let latest = e.istag("python:latest").unwrap();
    assert_eq!(latest["digest"], d35.as_str());
    assert_eq!(latest["history"][0]["cause"], "rollback");
    assert_eq!(latest["history"].as_array().unwrap().len(), 3);

    // describe shows sources, the current image marked, and details of a tag
    let o = e.cli(&["describe", "is/python"]);
    expect_code(&o, 0);
    let text = stdout(&o);
    assert!(text.contains("Name:\t\t\tpython"), "{text}");
    assert!(
        text.contains(&format!("* {h}/centos/python-35-centos7@{d35}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("tagged from {h}/centos/python-36-centos7")),
        "{text}"
    );
    let o = e.cli(&["describe", "istag/python:latest"]);
    expect_code(&o, 0);
    assert!(
        stdout(&o).contains(&d35) && stdout(&o).contains("Platform(s):"),
        "{}",
        stdout(&o)
    );
    let o = e.cli(&["describe", &format!("isimage/python@{prefix}")]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("latest (current)"), "{}", stdout(&o));

    // get: table, json with tags, yaml
    let o = e.cli(&["get", "is"]);
    expect_code(&o, 0);
    assert!(
        stdout(&o).contains("python") && stdout(&o).contains("3.6,latest"),
        "{}",
        stdout(&o)
    );
    let o = e.cli(&["get", "is", "python", "-o", "json"]);
    let is: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(is["tags"].as_array().unwrap().len(), 2);
    let o = e.cli(&["get", "istag", "python:latest", "-o", "yaml"]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("stream: \"python\""), "{}", stdout(&o));

    // state survives a restart
    let before = e.cli(&["get", "is", "python", "-o", "json"]).stdout;
    e.restart();
    let after = e.cli(&["get", "is", "python", "-o", "json"]).stdout;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&before).unwrap(),
        serde_json::from_slice::<serde_json::Value>(&after).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_and_index_digests() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    let (idx, children) = push
        .index(
            "multi/app",
            "1",
            &[("linux", "amd64", "a"), ("linux", "arm64", "a")],
        )
        .await;
    let e = Engine::start("");
    let h = &reg.host;
    // default: the index digest as published, with its platforms listed
    e.import_new("app:1", &format!("{h}/multi/app:1"));
    let t = e.istag("app:1").unwrap();
    assert_eq!(t["digest"], idx.as_str());
    assert_eq!(
        t["history"][0]["platforms"],
        serde_json::json!(["linux/amd64", "linux/arm64"])
    );
    // a platform: that child's digest
    expect_code(
        &e.cli(&[
            "tag",
            &format!("{h}/multi/app:1"),
            "app:arm",
            "--platform=linux/arm64",
        ]),
        0,
    );
    assert_eq!(e.istag("app:arm").unwrap()["digest"], children[1].as_str());
    // a change to another architecture moves the index tag but not the arm64 one
    let (idx2, _) = push
        .index(
            "multi/app",
            "1",
            &[("linux", "amd64", "b"), ("linux", "arm64", "a")],
        )
        .await;
    expect_code(&e.cli(&["import-image", "app:1"]), 0);
    expect_code(&e.cli(&["import-image", "app:arm"]), 0);
    assert_eq!(e.istag("app:1").unwrap()["digest"], idx2.as_str());
    let arm = e.istag("app:arm").unwrap();
    assert_eq!(arm["digest"], children[1].as_str());
    assert_eq!(arm["history"].as_array().unwrap().len(), 1);
}
