//! Attacks on the governance dashboard (`/ui/`) from an outsider's side:
//! an unauthenticated client, a low-privileged token, a page of another
//! origin, an identity whose owner and description the attacker wrote.
//! Each test names the attack; the ones that found a hole failed before
//! the fix that came with them.

use super::harness::{unique, TestServer};
use super::ident_kit::{create, put_policy};
use super::ui::{assert_hardened, Browserless};
use keyward::client::IssueOptions;

/// More sign-ins than the server keeps sessions (`MAX_SESSIONS`, 1024).
const FLOOD: usize = 1024 + 16;

/// An answer of the listener under `/ui/` that no handler made (no such
/// page, a wrong method) still carries every dashboard header: no cache,
/// no framing, the strict CSP.
#[tokio::test]
async fn every_answer_under_ui_is_hardened_even_404_and_405() {
    let server = TestServer::dev().await;
    let ui = Browserless::new(server.http_addr, &server.ca);
    for (method, path, status) in [
        ("GET", "/ui/nope", 404),
        ("GET", "/ui/identity/a/b", 404),
        ("GET", "/ui/identity/", 404),
        ("GET", "/ui/sign-out", 405),
        ("PUT", "/ui/", 405),
        ("DELETE", "/ui/sign-in", 405),
    ] {
        let p = ui.send(method, path, &[], Vec::new()).await;
        assert_eq!(p.status, status, "{method} {path}: {}", p.text);
        assert_hardened(&p);
    }
    server.stop().await;
}

/// A flood of sign-ins with bad tokens makes no session, so it signs no
/// one out; a flood of sign-ins with one valid, low-privileged token
/// evicts only that token's own older sessions, never another user's.
#[tokio::test]
async fn a_sign_in_flood_evicts_no_other_users_session() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let ui = Browserless::new(server.http_addr, &server.ca);
    let victim = ui.session_of(&server.root_token).await;

    for i in 0..FLOOD {
        let a = ui.sign_in(&format!("kwt_guess-{i}")).await;
        assert_eq!(a.status, 403, "{}", a.text);
        assert!(a.session().is_none());
    }
    assert_eq!(ui.get("/ui/", Some(&victim)).await.status, 200);

    let nothing = unique("uinothing");
    put_policy(
        &server,
        &nothing,
        &format!("[[rule]]\npath = \"secret/{nothing}/x\"\ncapabilities = [\"read\"]\n"),
    )
    .await;
    let attacker = root
        .issue_token(IssueOptions {
            policies: vec![nothing],
            ..IssueOptions::default()
        })
        .await
        .unwrap()
        .token;
    let mut last = String::new();
    for _ in 0..FLOOD {
        last = ui.session_of(&attacker).await;
    }
    let page = ui.get("/ui/", Some(&victim)).await;
    assert_eq!(page.status, 200, "the victim was signed out: {}", page.text);
    // The attacker's newest session still works (and is refused the page).
    assert_eq!(ui.get("/ui/", Some(&last)).await.status, 403);
    server.stop().await;
}

/// A session lives no longer than its token: once the token is revoked,
/// the next page sends to sign-in and clears the cookie.
#[tokio::test]
async fn a_revoked_tokens_session_ends_at_the_next_page() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let ui = Browserless::new(server.http_addr, &server.ca);
    let token = root
        .issue_token(IssueOptions {
            policies: vec!["root".to_owned()],
            ..IssueOptions::default()
        })
        .await
        .unwrap()
        .token;
    let id = ui.session_of(&token).await;
    assert_eq!(ui.get("/ui/", Some(&id)).await.status, 200);
    root.revoke_token(&token).await.unwrap();
    let p = ui.get("/ui/", Some(&id)).await;
    assert_eq!(p.status, 303, "{}", p.text);
    assert_eq!(p.header("location"), "/ui/sign-in");
    assert!(p.header("set-cookie").contains("Max-Age=0"));
    assert_hardened(&p);
    server.stop().await;
}

/// Stored markup: an identity whose owner and description hold HTML, an
/// SVG-breaking label and attribute breakers shows them as text only, in
/// the overview's owner chart and on its own page.
#[tokio::test]
async fn markup_in_an_owner_or_description_is_shown_as_text() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let ui = Browserless::new(server.http_addr, &server.ca);
    let name = unique("uixss");
    let owner = "\"><form action=//evil.example><button>go</button></form></svg><a x='";
    let mut req = create(&name, "bot", owner, &[]);
    req.description = "<img src=x onerror=alert(1)><style>*{}</style>".to_owned();
    match root.identity_create(req).await {
        Ok(_) => {}
        Err(e) => panic!("the vault refused the markup owner ({e}); nothing to render"),
    }
    let id = ui.session_of(&server.root_token).await;
    for path in ["/ui/".to_owned(), format!("/ui/identity/{name}")] {
        let p = ui.get(&path, Some(&id)).await;
        assert_eq!(p.status, 200, "{path}: {}", p.text);
        assert_hardened(&p);
        for raw in [
            "<form action",
            "<img",
            "<style>",
            "</svg><a",
            "<button>go",
            "<a x='",
        ] {
            assert!(!p.text.contains(raw), "{path} has raw {raw}");
        }
    }
    server.stop().await;
}
