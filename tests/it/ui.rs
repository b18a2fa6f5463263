//! The web UI in a real browser (headless Chromium over WebDriver): the pages show streams,
//! tags, timeline marks and deliveries; the retry button, pressed from the keyboard,
//! re-queues a dead delivery that then reaches the receiver; a tag change and a settled
//! delivery appear on an open page without a navigation; names are escaped; pages render
//! with JavaScript off; with API tokens, the cookie login, scopes and CSRF checks hold. The
//! README's screenshot is taken here.

use std::path::PathBuf;

use crate::support::browser::Browser;
use crate::support::receiver::Receiver;
use crate::support::*;

const TAB: &str = "\u{E004}";
const ENTER: &str = "\u{E007}";

fn screenshot_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/ui-stream.png")
}

async fn dead_count(e: &Engine, trigger: &str) -> i64 {
    let v: serde_json::Value = e
        .get(&format!("/api/v1/triggers/{trigger}"))
        .await
        .json()
        .await
        .unwrap();
    v["dead"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_timeline_live_updates_and_retry_in_a_browser() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    let d1 = push.image("team/app", "latest", "1").await;
    push.annotated_image(
        "team/evil",
        "latest",
        serde_json::json!({}),
        serde_json::json!({"org.opencontainers.image.title": "<script>window.__xss = 1</script>"}),
        &["annotated layer"],
    )
    .await;
    let rx = Receiver::start().await;
    // The first delivery is refused for good (400): it is dead until retried.
    rx.script(&[(400, &[])]);
    let e = Engine::start(&format!(
        "[[trigger]]\nname = \"build\"\non = [\"app:latest\"]\nwebhook = {{ url = \"{}/build\" }}\n",
        rx.url
    ));
    e.import_new("app", &format!("{}/team/app", reg.host));
    e.import_new("evil", &format!("{}/team/evil", reg.host));
    wait_for("the first delivery to be dead", || async {
        (dead_count(&e, "build").await == 1).then_some(())
    })
    .await;

    let b = Browser::start(true).await;
    b.goto(&format!("{}/ui/", e.url)).await;
    assert_eq!(b.count("tr.stream").await, 2, "{}", b.source().await);
    assert!(
        b.text("tr[data-stream='default/app']")
            .await
            .contains("app")
    );
    b.wait("the page's live connection", || async {
        b.text("#live-status").await == "live"
    })
    .await;

    // Streams list → stream page by its link.
    b.click("tr[data-stream='default/app'] a").await;
    b.wait("the stream page", || async {
        b.url().await.ends_with("/ui/streams/default/app")
    })
    .await;
    assert_eq!(b.count("#tag-latest svg .mark").await, 1);
    assert_eq!(b.count("#tag-latest svg .mark.current").await, 1);
    assert_eq!(
        b.attribute("#tag-latest svg .mark.current", "data-digest")
            .await
            .as_deref(),
        Some(d1.as_str())
    );

    // A tag change shows up on the open page without a navigation.
    b.script("window.__probe = 42;").await;
    let d2 = push.image("team/app", "latest", "2").await;
    expect_code(&e.cli(&["import-image", "app"]), 0);
    b.wait("the new image on the open page", || async {
        b.count("#tag-latest svg .mark").await == 2
    })
    .await;
    assert_eq!(
        b.script("return window.__probe;").await,
        42,
        "the page was reloaded"
    );
    assert_eq!(
        b.attribute("#tag-latest svg .mark.current", "data-digest")
            .await
            .as_deref(),
        Some(d2.as_str())
    );
    // A rollback to the first image: a third mark, drawn as a return to the first.
    let short = &d1["sha256:".len().."sha256:".len() + 12];
    expect_code(
        &e.cli(&["tag", &format!("app@sha256:{short}"), "app:latest"]),
        0,
    );
    b.wait("the rollback on the open page", || async {
        b.count("#tag-latest svg .mark.cause-rollback.return").await == 1
    })
    .await;
    assert_eq!(b.count("#tag-latest svg .return-arc").await, 1);
    let title = b.text("#tag-latest h2").await;
    assert_eq!(title, "latest");
    // A tag whose import fails: its condition on the page, and counted on the streams list.
    let o = e.cli(&[
        "import-image",
        "app:next",
        &format!("--from={}/team/app:missing", reg.host),
        "--confirm",
    ]);
    assert_ne!(o.status.code(), Some(0));
    b.wait("the failing tag on the open page", || async {
        b.count("#tag-next dd.condition.bad").await == 1
    })
    .await;
    b.click("#tag-latest details summary").await;
    b.screenshot(&screenshot_path()).await;

    b.goto(&format!("{}/ui/", e.url)).await;
    assert!(
        b.text("tr[data-stream='default/app'] td.failing")
            .await
            .starts_with("1: next"),
        "{}",
        b.source().await
    );

    // Triggers: the dead delivery, and the retry button reached and pressed by keyboard.
    b.goto(&format!("{}/ui/triggers", e.url)).await;
    assert!(
        b.text("tr[data-trigger='build'] td.dead")
            .await
            .contains('1')
    );
    b.click("tr[data-trigger='build'] a").await;
    b.wait("the trigger page", || async {
        b.url().await.ends_with("/ui/triggers/build")
    })
    .await;
    assert!(b.count("tr.delivery[data-state='dead']").await >= 1);
    let before = rx.count("/build");
    let mut reached = false;
    for _ in 0..30 {
        b.key(TAB).await;
        if b.script("return document.activeElement && document.activeElement.id;")
            .await
            == "retry"
        {
            reached = true;
            break;
        }
    }
    assert!(reached, "the retry button cannot be reached with Tab");
    b.key(ENTER).await;
    b.wait("the re-queue notice", || async {
        b.url().await.contains("requeued=1")
    })
    .await;
    assert!(
        b.text("p.notice")
            .await
            .contains("Re-queued 1 dead delivery")
    );
    b.script("window.__probe = 7;").await;
    wait_for("the re-queued delivery at the receiver", || async {
        (rx.count("/build") > before).then_some(())
    })
    .await;
    b.wait("the settled delivery on the open page", || async {
        b.count("tr.delivery[data-state='dead']").await == 0
            && b.text("span.dead").await.starts_with('0')
    })
    .await;
    assert_eq!(
        b.script("return window.__probe;").await,
        7,
        "the page was reloaded"
    );

    // Names and annotations are text, never markup.
    b.goto(&format!("{}/ui/streams/default/evil", e.url)).await;
    let src = b.source().await;
    assert!(
        src.contains("&lt;script&gt;window.__xss = 1&lt;/script&gt;"),
        "{src}"
    );
    assert_eq!(b.count("main script").await, 0);
    assert!(b.script("return window.__xss;").await.is_null());

    // A missing stream is a 404 page.
    let r = e.get("/ui/streams/default/missing").await;
    assert_eq!(r.status().as_u16(), 404);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("image stream default/missing not found")
    );
    b.goto(&format!("{}/ui/streams/default/missing", e.url))
        .await;
    assert!(b.text("h1").await.starts_with("404"));

    // Without JavaScript the same pages are complete (and the live script did not run).
    let plain = Browser::start(false).await;
    plain.goto(&format!("{}/ui/", e.url)).await;
    assert_eq!(plain.count("tr.stream").await, 2);
    plain.click("tr[data-stream='default/app'] a").await;
    plain
        .wait("the stream page", || async {
            plain.url().await.ends_with("/ui/streams/default/app")
        })
        .await;
    assert_eq!(plain.count("#tag-latest svg .mark").await, 3);
    assert_eq!(plain.text("#live-status").await, "");
    plain.goto(&format!("{}/ui/triggers/build", e.url)).await;
    assert!(plain.count("tr.delivery").await >= 1);
    assert_eq!(plain.count("form.retry button").await, 1);
}

fn cookie_client() -> reqwest::Client {
    istream::registry::install_crypto();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The value of the hidden `csrf` input of a page.
fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    html[at..].split('"').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_cookie_scopes_and_csrf() {
    let reg = Registry::start();
    Pusher::new(&reg.host)
        .image("team/app", "latest", "1")
        .await;
    let rx = Receiver::start().await;
    rx.script(&[(400, &[])]);
    let e = Engine::start_env(
        &format!(
            "[[api.token]]\nname = \"ops\"\ntoken_env = \"T_OPS\"\nscopes = [\"*:admin\"]\n\n\
             [[api.token]]\nname = \"viewer\"\ntoken_env = \"T_VIEWER\"\nscopes = [\"*:read\"]\n\n\
             [[trigger]]\nname = \"build\"\non = [\"app:latest\"]\nwebhook = {{ url = \"{}/build\" }}\n",
            rx.url
        ),
        &[
            ("T_OPS", "ops-secret-token"),
            ("T_VIEWER", "viewer token; with=odd chars"),
        ],
    );
    let api = cookie_client();
    let import = serde_json::json!({"name": "app", "from": format!("{}/team/app", reg.host), "confirm": true});
    let r = api
        .post(format!("{}/api/v1/namespaces/default/import", e.url))
        .bearer_auth("ops-secret-token")
        .json(&import)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let dead = || async {
        let v: serde_json::Value = api
            .get(format!("{}/api/v1/triggers/build", e.url))
            .bearer_auth("ops-secret-token")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["dead"].as_i64().unwrap()
    };
    wait_for("a dead delivery", || async {
        (dead().await == 1).then_some(())
    })
    .await;

    // No cookie: the login page, which keeps where the viewer was going.
    let r = api.get(format!("{}/ui/", e.url)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(r.headers()["location"], "/ui/login?next=%2Fui%2F");
    let r = api
        .get(format!("{}/ui/events", e.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // The viewer logs in in the browser: an HttpOnly, SameSite=Strict cookie, no retry button.
    let b = Browser::start(true).await;
    b.goto(&format!("{}/ui/triggers/build", e.url)).await;
    assert!(b.url().await.contains("/ui/login"), "{}", b.url().await);
    b.type_into("#token", "not a token").await;
    b.click("form.login button").await;
    b.wait("the refusal", || async {
        b.source().await.contains("not one of this engine")
    })
    .await;
    b.type_into("#token", "viewer token; with=odd chars").await;
    b.click("form.login button").await;
    b.wait("the trigger page after the login", || async {
        b.url().await.ends_with("/ui/triggers/build")
    })
    .await;
    let cookies = b.cookies().await;
    let c = cookies
        .iter()
        .find(|c| c["name"] == "istream_token")
        .unwrap_or_else(|| panic!("no token cookie: {cookies:?}"));
    assert_eq!(c["httpOnly"], true, "{c}");
    assert_eq!(c["sameSite"], "Strict", "{c}");
    assert_eq!(
        b.script("return document.cookie.includes('istream_token');")
            .await,
        false
    );
    assert!(b.text("span.who").await.contains("viewer"));
    assert_eq!(b.count("tr.delivery[data-state='dead']").await, 1);
    assert_eq!(
        b.count("form.retry").await,
        0,
        "a read-only token sees no retry button"
    );
    b.goto(&format!("{}/ui/", e.url)).await;
    assert_eq!(b.count("tr.stream").await, 1);

    // The same cookie from a script: the viewer's own CSRF token does not lift its scopes.
    let viewer_cookie = {
        use base64::Engine as _;
        format!(
            "istream_token={}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("viewer token; with=odd chars")
        )
    };
    let page = api
        .get(format!("{}/ui/triggers/build", e.url))
        .header("cookie", &viewer_cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let viewer_csrf = csrf_of(&page);
    let retry = format!("{}/ui/triggers/build/retry", e.url);
    let r = api
        .post(&retry)
        .header("cookie", &viewer_cookie)
        .form(&[("csrf", viewer_csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(dead().await, 1);

    // The admin: forged posts (no token, a wrong one, the viewer's) are 403 and change nothing.
    let ops = "ops-secret-token";
    let ops_page = api
        .get(format!("{}/ui/triggers/build", e.url))
        .bearer_auth(ops)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(ops_page.contains("form class=\"retry\""), "{ops_page}");
    let ops_csrf = csrf_of(&ops_page);
    assert_ne!(ops_csrf, viewer_csrf);
    for form in [
        vec![],
        vec![("csrf", "0000")],
        vec![("csrf", viewer_csrf.as_str())],
    ] {
        let r = api
            .post(&retry)
            .bearer_auth(ops)
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "{form:?}");
        assert!(r.text().await.unwrap().contains("CSRF"));
    }
    assert_eq!(dead().await, 1);
    assert_eq!(rx.count("/build"), 1);
    // With its CSRF token the admin's post re-queues, and the delivery arrives.
    let r = api
        .post(&retry)
        .bearer_auth(ops)
        .form(&[("csrf", ops_csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(r.headers()["location"], "/ui/triggers/build?requeued=1");
    rx.wait_requests(2).await;

    // A login posted without the login page's nonce (from another site) is refused.
    let r = api
        .post(format!("{}/ui/login", e.url))
        .form(&[("token", ops), ("next", "/ui/")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    // Log out clears the cookie.
    b.goto(&format!("{}/ui/", e.url)).await;
    b.click("form.logout button").await;
    b.wait("the login page after logging out", || async {
        b.url().await.contains("/ui/login")
    })
    .await;
    assert!(
        !b.cookies()
            .await
            .iter()
            .any(|c| c["name"] == "istream_token")
    );
}
