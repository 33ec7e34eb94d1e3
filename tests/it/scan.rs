//! The discovery scan (issue 13): `keyward scan` over a fixture tree made
//! here, with planted keyward tokens, a stored secret's value in a `.env`,
//! a stored value only in an old git commit, a well-known cloud key and a
//! thousand decoys; every planted one is found with its path and owner and
//! no decoy is. `Scan.Match` from low-privileged callers: without `scan`
//! denied, without `read` only the owner; weak values are not checked; a
//! flood is refused; no candidate value reaches a file of the server.

use std::path::Path;

use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::Value;
use tonic::Code;

use crate::harness::{cli, contains, data, files_under, unique, ChildServer, TestServer};
use crate::ident_kit::{approle_identity, login, put_policy};
use keyward::client::{Client, IssueOptions, PutOptions, RotationPolicySpec, ScheduleSpec};

/// A random value that passes the scanner's strength rule.
fn strong(prefix: &str) -> String {
    let mut bytes = [0u8; 18];
    SystemRandom::new().fill(&mut bytes).unwrap();
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

fn git(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=scan test",
            "-c",
            "user.email=scan@test.invalid",
            "-c",
            "commit.gpgsign=false",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A token with a wrong checksum: the last character changed.
fn broken_token(token: &str) -> String {
    let mut t = token.to_owned();
    let last = t.pop().unwrap();
    t.push(if last == 'A' { 'B' } else { 'A' });
    t
}

/// Writes 1000 decoy lines over 100 files: random base64, hashes, git
/// object ids, UUIDs, a token with a wrong CRC, AWS-like ids of the wrong
/// length, strong values stored nowhere, and a base64 PNG. Returns the
/// strong values (they are sent to the server as candidates).
fn write_decoys(root: &Path, token_like: &str) -> Vec<String> {
    let rng = SystemRandom::new();
    let mut sent = Vec::new();
    std::fs::create_dir_all(root.join("decoys")).unwrap();
    for f in 0..100 {
        let mut text = String::new();
        for i in 0..10 {
            let mut bytes = [0u8; 32];
            rng.fill(&mut bytes).unwrap();
            let hex = hex::encode(bytes);
            let line = match i {
                0 => format!(
                    "blob = \"{}\"",
                    base64::engine::general_purpose::STANDARD.encode(bytes)
                ),
                1 => format!("sha256: {hex}"),
                2 => format!("commit {}", &hex[..40]),
                3 => format!("id = {}", uuid::Uuid::new_v4()),
                4 => format!("old_token = {}", broken_token(token_like)),
                5 => format!("AWS_KEY=AKIA{}", &hex[..15].to_uppercase()),
                6 => {
                    let v = strong("nv-");
                    sent.push(v.clone());
                    format!("UNSTORED_SECRET={v}")
                }
                7 => format!("digest: \"sha512-{}\"", hex),
                8 => format!("ghp_{}", &hex[..35]),
                _ => format!(
                    "<img src=\"data:image/png;base64,{}\">",
                    base64::engine::general_purpose::STANDARD
                        .encode([&[0x89u8, b'P', b'N', b'G'][..], &bytes[..]].concat())
                ),
            };
            text.push_str(&line);
            text.push('\n');
        }
        std::fs::write(root.join(format!("decoys/d{f:03}.txt")), text).unwrap();
    }
    sent
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scan_finds_every_planted_credential_and_no_decoy() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("scan");
    let db_path = format!("{prefix}/db");
    let old_path = format!("{prefix}/legacy");
    let db_value = strong("db-");
    let old_value = strong("old-");
    let owned = |owner: &str| PutOptions {
        owner: Some(owner.to_owned()),
        ..PutOptions::default()
    };
    root.put(
        &db_path,
        &data(&[("password", &db_value)]),
        owned("team-db"),
    )
    .await
    .unwrap();
    root.put(
        &old_path,
        &data(&[("api_key", &old_value)]),
        owned("team-legacy"),
    )
    .await
    .unwrap();
    let t1 = root
        .issue_token(IssueOptions::default())
        .await
        .unwrap()
        .token;
    let t2 = root
        .issue_token(IssueOptions::default())
        .await
        .unwrap()
        .token;

    let tree = tempfile::tempdir().unwrap();
    let dir = tree.path();
    // The stored value only in an old commit: added, then removed.
    git(dir, &["init", "-q"]);
    std::fs::create_dir_all(dir.join("config")).unwrap();
    std::fs::write(
        dir.join("config/legacy.env"),
        format!("# legacy\nLEGACY_API_KEY={old_value}\n"),
    )
    .unwrap();
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "legacy config"]);
    std::fs::remove_file(dir.join("config/legacy.env")).unwrap();
    std::fs::write(dir.join("config/app.toml"), "name = \"app\"\n").unwrap();
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "drop legacy config"]);
    // The working tree: .env, a Kubernetes manifest, a CI configuration.
    std::fs::write(
        dir.join(".env"),
        format!("DB_PASSWORD={db_value}\nKEYWARD_TOKEN={t1}\n"),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("k8s")).unwrap();
    std::fs::write(
        dir.join("k8s/deploy.yaml"),
        format!("apiVersion: v1\nkind: Secret\nstringData:\n  token: \"{t2}\"\n"),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join(".github/workflows")).unwrap();
    std::fs::write(
        dir.join(".github/workflows/ci.yml"),
        "env:\n  AWS_ACCESS_KEY_ID: AKIAIOSFODNN7EXAMPLE\n",
    )
    .unwrap();
    let unstored = write_decoys(dir, &t1);

    let addr = format!("https://{}", server.addr);
    let ca = server.ca.to_str().unwrap().to_owned();
    let env = [
        ("KEYWARD_ADDR", addr.as_str()),
        ("KEYWARD_CACERT", ca.as_str()),
        ("KEYWARD_TOKEN", server.root_token.as_str()),
    ];
    let run = |args: &[&str]| tokio::task::block_in_place(|| cli(args, &env, None));
    let dir_s = dir.to_str().unwrap();

    let (code, out, err) = run(&["scan", dir_s, "--git-history", "--format", "json"]);
    assert_eq!(code, 1, "{err}\n{out}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    let findings = doc["findings"].as_array().unwrap();
    let rel = |f: &Value| {
        let file = f["file"].as_str().unwrap();
        file.strip_prefix(dir_s)
            .unwrap_or(file)
            .trim_start_matches('/')
            .to_owned()
    };
    let mut got: Vec<(String, u64, String)> = findings
        .iter()
        .map(|f| {
            (
                rel(f),
                f["line"].as_u64().unwrap(),
                f["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (".env".to_owned(), 1, "keyward-stored-secret".to_owned()),
            (".env".to_owned(), 2, "keyward-token".to_owned()),
            (
                ".github/workflows/ci.yml".to_owned(),
                2,
                "aws-access-key-id".to_owned()
            ),
            (
                "config/legacy.env".to_owned(),
                2,
                "keyward-stored-secret".to_owned()
            ),
            ("k8s/deploy.yaml".to_owned(), 4, "keyward-token".to_owned()),
        ],
        "{out}"
    );
    let stored = |file: &str| {
        findings
            .iter()
            .find(|f| rel(f) == file && f["kind"] == "keyward-stored-secret")
            .unwrap()
            .clone()
    };
    let env_hit = stored(".env");
    assert_eq!(env_hit["secret"]["path"], db_path.as_str());
    assert_eq!(env_hit["secret"]["fields"][0], "password");
    assert_eq!(env_hit["secret"]["stage"], "current");
    assert_eq!(env_hit["owner"], "team-db");
    assert!(env_hit["commit"].is_null());
    let old_hit = stored("config/legacy.env");
    assert_eq!(old_hit["secret"]["path"], old_path.as_str());
    assert_eq!(old_hit["owner"], "team-legacy");
    assert_eq!(old_hit["commit"].as_str().unwrap().len(), 40);
    // The output never carries a found value.
    for secret in [&db_value, &old_value, &t1, &t2] {
        assert!(!out.contains(secret.as_str()), "a found value was printed");
    }
    assert!(doc["summary"]["candidates_checked"].as_u64().unwrap() >= 100);

    // SARIF 2.1.0: the rule table, one result per finding, physical locations.
    let (code, out, err) = run(&["scan", dir_s, "--git-history", "--format", "sarif"]);
    assert_eq!(code, 1, "{err}");
    let sarif: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(sarif["version"], "2.1.0");
    let run0 = &sarif["runs"][0];
    let rules = run0["tool"]["driver"]["rules"].as_array().unwrap();
    let results = run0["results"].as_array().unwrap();
    assert_eq!(results.len(), 5);
    for r in results {
        let id = r["ruleId"].as_str().unwrap();
        let index = r["ruleIndex"].as_u64().unwrap() as usize;
        assert_eq!(rules[index]["id"], id);
        let loc = &r["locations"][0]["physicalLocation"];
        assert!(loc["artifactLocation"]["uri"].as_str().is_some());
        assert!(loc["region"]["startLine"].as_u64().unwrap() >= 1);
        assert!(r["message"]["text"].as_str().is_some());
    }

    // Decoys only: clean, exit 0.
    let decoys = dir.join("decoys");
    let (code, out, err) = run(&["scan", decoys.to_str().unwrap(), "--format", "json"]);
    assert_eq!(code, 0, "{err}\n{out}");

    // --revoke: the tokens found stop working; --rotate: the stored secret
    // found in the working tree (it has a rotation policy) rotates.
    root.set_rotation_policy(
        &db_path,
        &RotationPolicySpec {
            provider: "random".into(),
            schedule: ScheduleSpec::Every(std::time::Duration::from_secs(86_400)),
            grace: std::time::Duration::from_secs(1),
            settings: [("fields".to_owned(), "password".to_owned())]
                .into_iter()
                .collect(),
        },
    )
    .await
    .unwrap();
    let (code, out, err) = run(&["scan", dir_s, "--revoke", "--rotate", "--format", "json"]);
    assert_eq!(code, 1, "{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["revoked"].as_array().unwrap().len(), 2, "{out}");
    let rotated = doc["rotated"].as_array().unwrap();
    assert_eq!(rotated.len(), 1, "{out}");
    assert_eq!(rotated[0]["path"], db_path.as_str());
    assert!(!rotated[0]["run_id"].as_str().unwrap().is_empty(), "{out}");
    crate::harness::eventually("the found secret rotated", || async {
        root.get(&db_path).await.unwrap().version >= 2
    })
    .await;
    for t in [&t1, &t2] {
        let e = server
            .anonymous()
            .await
            .with_token(t)
            .unwrap()
            .lookup_self()
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::Unauthenticated));
    }

    // No value sent or found is in any file of the server (audit log,
    // store), in plain text.
    let files = files_under(server.dir.path());
    assert!(!files.is_empty());
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        for v in [&db_value, &old_value].into_iter().chain(unstored.iter()) {
            assert!(
                !contains(&bytes, v.as_bytes()),
                "a candidate value is in {}",
                file.display()
            );
        }
    }
}

/// A client whose identity holds exactly the policy `toml`.
async fn holder(server: &TestServer, root: &Client, toml: &str) -> Client {
    let policy = unique("scanpol");
    put_policy(server, &policy, toml).await;
    let name = unique("scanner");
    let (role_id, secret_id) = approle_identity(root, &name, &[policy]).await;
    login(server, &role_id, &secret_id).await.1
}

#[tokio::test(flavor = "multi_thread")]
async fn match_needs_scan_and_names_only_the_owner_without_read() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("scanacl");
    let path = format!("{prefix}/svc");
    let value = strong("svc-");
    root.put(
        &path,
        &data(&[("token", &value), ("pin", "short1234")]),
        PutOptions {
            owner: Some("team-svc".into()),
            ..PutOptions::default()
        },
    )
    .await
    .unwrap();

    // Read on the secret but no scan, or scan on a look-alike resource.
    let no_scan = holder(
        &server,
        &root,
        &format!(
            "[[rule]]\npath = \"secret/{prefix}/**\"\ncapabilities = [\"read\", \"list\"]\n\
             [[rule]]\npath = \"sys/scanner\"\ncapabilities = [\"scan\"]\n\
             [[rule]]\npath = \"sys/scan\"\ncapabilities = [\"read\", \"admin\"]\n"
        ),
    )
    .await;
    let e = no_scan.scan_match(vec![value.clone()]).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied));

    // Scan without read: the owner only.
    let blind = holder(
        &server,
        &root,
        "[[rule]]\npath = \"sys/scan\"\ncapabilities = [\"scan\"]\n",
    )
    .await;
    let answer = blind.scan_match(vec![value.clone()]).await.unwrap();
    assert_eq!(answer.matches.len(), 1);
    let m = &answer.matches[0];
    assert_eq!(m.owner, "team-svc");
    assert!(!m.readable);
    assert!(m.path.is_empty() && m.fields.is_empty() && m.version == 0 && m.stage.is_empty());

    // Scan and read: path, field, version, stage and owner.
    let reader = holder(
        &server,
        &root,
        &format!(
            "[[rule]]\npath = \"sys/scan\"\ncapabilities = [\"scan\"]\n\
             [[rule]]\npath = \"secret/{prefix}/**\"\ncapabilities = [\"read\"]\n"
        ),
    )
    .await;
    let answer = reader
        .scan_match(vec!["nothing-stored-here-123".into(), value.clone()])
        .await
        .unwrap();
    assert_eq!(answer.matches.len(), 1);
    let m = &answer.matches[0];
    assert_eq!((m.candidate, m.readable), (1, true));
    assert_eq!(
        (m.path.as_str(), m.fields.as_slice()),
        (path.as_str(), &["token".to_owned()][..])
    );
    assert_eq!(
        (m.version, m.stage.as_str(), m.owner.as_str()),
        (1, "current", "team-svc")
    );

    // A short stored value is never checked, even if the caller asks.
    let answer = reader.scan_match(vec!["short1234".into()]).await.unwrap();
    assert!(answer.matches.is_empty());
    assert_eq!((answer.checked, answer.skipped_weak), (0, 1));
    // After a new value, the old one matches as previous.
    let newer = strong("svc2-");
    root.put(&path, &data(&[("token", &newer)]), PutOptions::default())
        .await
        .unwrap();
    let answer = reader.scan_match(vec![value.clone()]).await.unwrap();
    assert_eq!(answer.matches[0].stage, "previous");

    // The audit log holds the calls, never a candidate.
    let audit = std::fs::read(&server.audit_path).unwrap();
    assert!(contains(&audit, b"keyward.v1.Scan/Match"));
    assert!(contains(&audit, b"sys/scan"));
    for v in [&value, &newer] {
        assert!(!contains(&audit, v.as_bytes()));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_candidates_is_refused() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let scanner = holder(
        &server,
        &root,
        "[[rule]]\npath = \"sys/scan\"\ncapabilities = [\"scan\"]\n",
    )
    .await;
    let per_call = keyward::api::scan::MAX_CANDIDATES_PER_CALL;
    let calls = keyward::api::scan::CANDIDATES_PER_MINUTE as usize / per_call;
    let batch = || (0..per_call).map(|_| strong("flood-")).collect::<Vec<_>>();
    // More than a call may carry.
    let mut too_many = batch();
    too_many.push(strong("one-more-"));
    let e = scanner.scan_match(too_many).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument));
    // The bucket starts full: a minute's allowance goes through at once.
    for _ in 0..calls {
        scanner.scan_match(batch()).await.unwrap();
    }
    // Then a flood is refused. The bucket refills as time passes, so the
    // refusal is polled for over a generous bound (up to three times the
    // allowance), not expected at an exact call.
    let mut refused = false;
    for _ in 0..2 * calls {
        match scanner.scan_match(batch()).await {
            Ok(_) => continue,
            Err(e) => {
                assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
                refused = true;
                break;
            }
        }
    }
    assert!(refused, "a flood of candidates was never refused");
    // Another identity has its own allowance.
    let other = holder(
        &server,
        &root,
        "[[rule]]\npath = \"sys/scan\"\ncapabilities = [\"scan\"]\n",
    )
    .await;
    other.scan_match(batch()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn candidates_reach_neither_the_server_log_nor_the_audit_log() {
    let dir = crate::harness::private_tempdir();
    let log = dir.path().join("server.log");
    let server = ChildServer::start(&dir.path().join("vault"), &log);
    let root = server.client().await;
    let value = strong("logged-");
    let path = unique("scanlog") + "/k";
    root.put(&path, &data(&[("v", &value)]), PutOptions::default())
        .await
        .unwrap();
    let unstored = strong("never-");
    let answer = root
        .scan_match(vec![value.clone(), unstored.clone()])
        .await
        .unwrap();
    assert_eq!((answer.matches.len(), answer.checked), (1, 2));
    drop(server);
    let text = std::fs::read(&log).unwrap();
    assert!(contains(&text, b"scan match"), "the count line is logged");
    for file in files_under(dir.path()) {
        let bytes = std::fs::read(&file).unwrap();
        for v in [&value, &unstored] {
            assert!(
                !contains(&bytes, v.as_bytes()),
                "a candidate is in {}",
                file.display()
            );
        }
    }
}
