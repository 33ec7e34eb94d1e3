//! The discovery scan attacked from outside (task atkscan): a caller with
//! `scan` and nothing else, tokens of one identity, and someone who controls
//! the scanned files or a secret's owner field and wants to forge the
//! scan's table or SARIF output in another team's CI.

use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::Value;
use tonic::Code;

use crate::harness::{cli, data, unique, TestServer};
use crate::ident_kit::{approle_identity, login, put_policy};
use keyward::client::{Client, IssueOptions, PutOptions};

const SCAN_ONLY: &str = "[[rule]]\npath = \"sys/scan\"\ncapabilities = [\"scan\"]\n";

fn strong(prefix: &str) -> String {
    let mut bytes = [0u8; 18];
    SystemRandom::new().fill(&mut bytes).unwrap();
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

async fn holder(server: &TestServer, root: &Client, toml: &str) -> Client {
    let policy = unique("atkpol");
    put_policy(server, &policy, toml).await;
    let name = unique("atkscanner");
    let (role_id, secret_id) = approle_identity(root, &name, &[policy]).await;
    login(server, &role_id, &secret_id).await.1
}

fn owned(owner: &str) -> PutOptions {
    PutOptions {
        owner: Some(owner.into()),
        ..PutOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blind_match_names_each_owner_once_and_counts_nothing() {
    // The value sits in two versions of one secret and in a second secret of
    // the same owner. A caller without `read` must learn "a secret of owner
    // X holds it", not how many secrets or versions do.
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("atkblind");
    let value = strong("blind-");
    let first = format!("{prefix}/a");
    root.put(&first, &data(&[("k", &value)]), owned("team-b"))
        .await
        .unwrap();
    root.put(&first, &data(&[("k", &value), ("x", "1")]), owned("team-b"))
        .await
        .unwrap();
    root.put(
        &format!("{prefix}/b"),
        &data(&[("k", &value), ("copy", &value)]),
        owned("team-b"),
    )
    .await
    .unwrap();
    root.put(
        &format!("{prefix}/c"),
        &data(&[("k", &value)]),
        owned("team-c"),
    )
    .await
    .unwrap();
    let blind = holder(&server, &root, SCAN_ONLY).await;
    let answer = blind.scan_match(vec![value.clone()]).await.unwrap();
    let mut owners: Vec<&str> = answer.matches.iter().map(|m| m.owner.as_str()).collect();
    owners.sort_unstable();
    assert_eq!(owners, ["team-b", "team-c"], "one answer per owner");
    for m in &answer.matches {
        assert!(!m.readable);
        assert!(m.path.is_empty() && m.fields.is_empty() && m.version == 0 && m.stage.is_empty());
    }
    // With read, every version and secret is named.
    let reader = holder(
        &server,
        &root,
        &format!("{SCAN_ONLY}[[rule]]\npath = \"secret/{prefix}/**\"\ncapabilities = [\"read\"]\n"),
    )
    .await;
    let answer = reader.scan_match(vec![value.clone()]).await.unwrap();
    assert_eq!(answer.matches.len(), 4);
    assert!(answer.matches.iter().all(|m| m.readable));
}

#[tokio::test(flavor = "multi_thread")]
async fn child_tokens_share_their_identitys_allowance_and_weak_candidates_are_free() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let policy = unique("atkchild");
    put_policy(
        &server,
        &policy,
        &format!("{SCAN_ONLY}[[rule]]\npath = \"sys/token\"\ncapabilities = [\"issue\"]\n"),
    )
    .await;
    let (role_id, secret_id) =
        approle_identity(&root, &unique("atkparent"), std::slice::from_ref(&policy)).await;
    let parent = login(&server, &role_id, &secret_id).await.1;
    // A second login of the same identity and a child token: the same
    // bucket, however many tokens the identity holds.
    let sibling = login(&server, &role_id, &secret_id).await.1;
    let child_token = parent
        .issue_token(IssueOptions {
            policies: vec![policy.clone()],
            ..IssueOptions::default()
        })
        .await
        .unwrap()
        .token;
    let child = parent.with_token(&child_token).unwrap();
    let per_call = keyward::api::scan::MAX_CANDIDATES_PER_CALL;
    let calls = keyward::api::scan::CANDIDATES_PER_MINUTE as usize / per_call;
    let batch = || (0..per_call).map(|_| strong("child-")).collect::<Vec<_>>();
    let mut refused = None;
    for i in 0..3 * calls {
        let who = match i % 3 {
            0 => &parent,
            1 => &sibling,
            _ => &child,
        };
        if let Err(e) = who.scan_match(batch()).await {
            assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
            refused = Some(i);
            break;
        }
    }
    // Refused by the time three tokens together passed the allowance
    // (refill while the test runs makes the exact call vary).
    let at = refused.expect("tokens of one identity were never refused");
    assert!(
        at >= calls,
        "refused after {at} calls, before the allowance"
    );
    // Weak candidates are free: they are not checked, so they do not count.
    let weak = blind_weak();
    let answer = child.scan_match(weak).await.unwrap();
    assert_eq!(answer.checked, 0);
}

/// Candidates the server refuses to check (short or low entropy).
fn blind_weak() -> Vec<String> {
    vec![
        "short".into(),
        "aaaaaaaaaaaaaaaaaaaaaaa".into(),
        "abababababababab".into(),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn table_and_sarif_output_cannot_be_forged_by_file_names_or_owners() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let value = strong("forge-");
    // Anyone with `write` on a secret sets its owner, here to terminal
    // escapes and a line of its own.
    let hostile_owner = "team-x\u{1b}[2J\u{1b}]0;pwned\u{7}\nFORGED.rs:1  clean  \u{202e}txt.exe";
    root.put(
        &unique("atkforge"),
        &data(&[("k", &value)]),
        owned(hostile_owner),
    )
    .await
    .unwrap();
    let tree = tempfile::tempdir().unwrap();
    let dir = tree.path();
    let odd = "a\n\u{1b}[1A\u{1b}[2KFORGED.env";
    std::fs::write(dir.join(odd), format!("API_KEY={value}\n")).unwrap();
    std::fs::write(dir.join("x y#z%.yml"), "key: AKIAIOSFODNN7EXAMPLE\n").unwrap();
    let addr = format!("https://{}", server.addr);
    let ca = server.ca.to_str().unwrap().to_owned();
    let env = [
        ("KEYWARD_ADDR", addr.as_str()),
        ("KEYWARD_CACERT", ca.as_str()),
        ("KEYWARD_TOKEN", server.root_token.as_str()),
    ];
    let run = |args: &[&str]| tokio::task::block_in_place(|| cli(args, &env, None));
    let dir_s = dir.to_str().unwrap();

    let (code, out, err) = run(&["scan", dir_s, "--format", "table"]);
    assert_eq!(code, 1, "{err}\n{out}");
    for bad in ['\u{1b}', '\u{7}', '\u{202e}'] {
        assert!(!out.contains(bad), "a raw {bad:?} in the table:\n{out}");
    }
    // Every line is a finding of the tree or the summary: none starts with
    // the forged text.
    assert!(
        !out.lines().any(|l| l.starts_with("FORGED")),
        "a forged line:\n{out}"
    );
    let findings: Vec<&str> = out.lines().filter(|l| l.starts_with(dir_s)).collect();
    assert_eq!(findings.len(), 2, "{out}");
    assert!(findings.iter().any(|l| l.contains("keyward-stored-secret")
        && l.contains("team-x\\u{1b}[2J")
        && l.contains("\\u{a}FORGED")));

    let (code, out, err) = run(&["scan", dir_s, "--format", "sarif"]);
    assert_eq!(code, 1, "{err}\n{out}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    let uris: Vec<&str> = doc["runs"][0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
                .as_str()
                .unwrap()
        })
        .collect();
    // A URI: reserved and control characters percent-encoded.
    for uri in &uris {
        assert!(
            uri.chars()
                .all(|c| c.is_ascii_graphic() && !"# ?[]\"<>\\^`{|}".contains(c)),
            "not a URI: {uri:?}"
        );
    }
    assert!(
        uris.iter().any(|u| u.ends_with("/x%20y%23z%25.yml")),
        "{uris:?}"
    );
    assert!(
        uris.iter()
            .any(|u| u.ends_with("/a%0A%1B%5B1A%1B%5B2KFORGED.env")),
        "{uris:?}"
    );
}
