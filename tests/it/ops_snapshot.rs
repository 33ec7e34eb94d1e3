//! Snapshots (issue 16): a snapshot taken while six writers run restores into
//! a new folder with every write acknowledged before it began; a damaged
//! file writes nothing; an altered and re-hashed one is refused at unseal;
//! a token without `admin` on `sys/snapshot` gets nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use keyward::client::{Client, IssueOptions, PutOptions};
use tonic::Code;

use crate::harness::{cli, contains, data, private_tempdir, unique, TestServer};

/// Saves a snapshot through the API into `file`; returns (bytes, keys).
async fn save(client: &Client, file: &Path) -> (u64, u64) {
    let mut stream = client.snapshot_save().await.unwrap();
    let mut bytes = Vec::new();
    let mut keys = 0;
    while let Some(chunk) = stream.next_chunk().await.unwrap() {
        if chunk.total_bytes > 0 {
            keys = chunk.keys;
        }
        bytes.extend_from_slice(&chunk.data);
    }
    std::fs::write(file, &bytes).unwrap();
    (bytes.len() as u64, keys)
}

/// Restores `file` into a new private dev folder that holds `source`'s dev
/// credentials, and serves it.
async fn restore_into_new_folder(source: &TestServer, file: &Path) -> TestServer {
    let dir = private_tempdir();
    keyward::snapshot::restore(file, &dir.path().join("data"), false).unwrap();
    std::fs::copy(
        source.dir.path().join(keyward::dev::CREDENTIALS_FILE),
        dir.path().join(keyward::dev::CREDENTIALS_FILE),
    )
    .unwrap();
    TestServer::open_dev(dir).await.unwrap()
}

fn audit_files(path: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = keyward::audit::rotated_files(path)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    files.push(path.to_owned());
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_under_six_writers_restores_every_write_acknowledged_before_it() {
    let source = TestServer::dev().await;
    let root = source.root().await;
    let marker = unique("plain-snapshot-value");
    // Some data before the writers start.
    for i in 0..50 {
        root.put(
            &format!("ops/before/{i}"),
            &data(&[("v", &format!("{marker}-before-{i}"))]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    }

    let started = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let during = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..6 {
        let client = source.root().await;
        let (started, stop, during) = (started.clone(), stop.clone(), during.clone());
        let total = total.clone();
        let marker = marker.clone();
        writers.push(tokio::spawn(async move {
            // path -> (value, acknowledged before the snapshot began)
            let mut acked = HashMap::new();
            let mut after_start = 0u32;
            let mut n = 0u64;
            // Each writer keeps writing until told to stop and until it has
            // had a few writes acknowledged after the snapshot began.
            while !stop.load(Ordering::SeqCst) || after_start < 3 {
                let path = format!("ops/w{w}/{n}");
                let value = format!("{marker}-{w}-{n}");
                let begun_after = started.load(Ordering::SeqCst);
                client
                    .put(&path, &data(&[("v", &value)]), PutOptions::default())
                    .await
                    .unwrap();
                let before = !started.load(Ordering::SeqCst);
                if begun_after {
                    after_start += 1;
                    during.fetch_add(1, Ordering::SeqCst);
                }
                acked.insert(path, (value, before));
                total.fetch_add(1, Ordering::SeqCst);
                n += 1;
            }
            acked
        }));
    }
    // Let every writer get going.
    let written = total.clone();
    crate::harness::eventually("the writers have written", || {
        let written = written.clone();
        async move { written.load(Ordering::SeqCst) >= 12 }
    })
    .await;

    let folder = private_tempdir();
    let file = folder.path().join("vault.snap");
    started.store(true, Ordering::SeqCst);
    let (bytes, keys) = save(&root, &file).await;
    stop.store(true, Ordering::SeqCst);
    let mut acked = HashMap::new();
    for writer in writers {
        acked.extend(writer.await.unwrap());
    }
    let before: Vec<_> = acked.iter().filter(|(_, (_, b))| *b).collect();
    assert!(!before.is_empty());
    eprintln!(
        "snapshot: {bytes} bytes, {keys} keys; {} writes acknowledged before it began, {} \
         acknowledged after it began",
        before.len(),
        during.load(Ordering::SeqCst)
    );
    assert!(
        during.load(Ordering::SeqCst) >= 18,
        "the server kept acknowledging writes"
    );

    // Ciphertext only: no stored value in clear.
    let snapshot = std::fs::read(&file).unwrap();
    assert!(
        !contains(&snapshot, marker.as_bytes()),
        "a secret value is in the snapshot in clear"
    );

    // The source's audit log records the save and still verifies.
    let source_audit = std::fs::read_to_string(&source.audit_path).unwrap();
    assert!(source_audit.contains("\"method\":\"keyward.v1.Sys/SnapshotSave\""));
    assert!(
        keyward::audit::verify_files(&audit_files(&source.audit_path))
            .unwrap()
            .ok
    );

    let restored = restore_into_new_folder(&source, &file).await;
    let client = restored.root().await;
    for (path, (value, _)) in before {
        let secret = client
            .get(path)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(
            secret.data.get("v").unwrap().expose(),
            value.as_bytes(),
            "{path}"
        );
    }
    // Writes acknowledged after it began: there with their value, or absent.
    for (path, (value, b)) in &acked {
        if !b {
            match client.get(path).await {
                Ok(secret) => assert_eq!(secret.data.get("v").unwrap().expose(), value.as_bytes()),
                Err(e) => assert_eq!(e.code(), Some(Code::NotFound), "{path}: {e}"),
            }
        }
    }
    let secret = client.get("ops/before/7").await.unwrap();
    assert_eq!(
        secret.data.get("v").unwrap().expose(),
        format!("{marker}-before-7").as_bytes()
    );

    // The restored vault's new audit file begins with where it came from,
    // and verifies.
    let restored_audit = std::fs::read_to_string(&restored.audit_path).unwrap();
    let first = restored_audit.lines().next().unwrap();
    assert!(
        first.contains("\"method\":\"keyward.v1.Sys/SnapshotRestore\""),
        "{first}"
    );
    assert!(first.contains("\"snapshot\":\"vault.snap\""), "{first}");
    assert!(
        keyward::audit::verify_files(&audit_files(&restored.audit_path))
            .unwrap()
            .ok
    );
}

#[tokio::test]
async fn a_flipped_byte_is_refused_by_restore_and_nothing_is_written() {
    let source = TestServer::dev().await;
    let root = source.root().await;
    root.put("ops/flip", &data(&[("v", "x")]), PutOptions::default())
        .await
        .unwrap();
    let folder = private_tempdir();
    let file = folder.path().join("vault.snap");
    save(&root, &file).await;
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    std::fs::write(&file, &bytes).unwrap();

    let target = folder.path().join("restored");
    let (code, _, stderr) = cli(
        &[
            "snapshot",
            "restore",
            file.to_str().unwrap(),
            "--storage-path",
            target.to_str().unwrap(),
        ],
        &[],
        None,
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("damaged"), "{stderr}");
    assert!(!target.exists(), "a damaged snapshot wrote to the target");

    // An intact file restores through the CLI; a second time needs --force.
    let good = folder.path().join("good.snap");
    save(&root, &good).await;
    let args = |force: bool| {
        let mut a = vec![
            "--format".to_owned(),
            "json".to_owned(),
            "snapshot".to_owned(),
            "restore".to_owned(),
            good.display().to_string(),
            "--storage-path".to_owned(),
            target.display().to_string(),
        ];
        if force {
            a.push("--force".into());
        }
        a
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        cli(&a, &[], None)
    };
    let (code, stdout, stderr) = run(args(false));
    assert_eq!(code, 0, "{stderr}");
    let out: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["sealed"], true);
    let (code, _, stderr) = run(args(false));
    assert_eq!(code, 1);
    assert!(stderr.contains("not empty"), "{stderr}");
    let (code, _, stderr) = run(args(true));
    assert_eq!(code, 0, "{stderr}");
}

#[tokio::test]
async fn a_snapshot_altered_and_rehashed_is_refused_at_unseal() {
    use ring::digest;
    let source = TestServer::dev().await;
    let root = source.root().await;
    root.put("ops/keep", &data(&[("v", "x")]), PutOptions::default())
        .await
        .unwrap();
    let folder = private_tempdir();
    let file = folder.path().join("vault.snap");
    save(&root, &file).await;
    // Someone without the vault's keys edits the header (an older creation
    // time) and fixes the SHA-256 of the content: only the HMAC tells.
    let bytes = std::fs::read(&file).unwrap();
    let magic = keyward::snapshot::MAGIC.len();
    let end = magic + bytes[magic..].iter().position(|&b| b == b'\n').unwrap();
    let mut header: keyward::snapshot::Header = serde_json::from_slice(&bytes[magic..end]).unwrap();
    let mut content = bytes[end + 1..].to_vec();
    // Drop the last pair of the content and re-hash.
    let mut at = 0;
    let mut last = 0;
    while at < content.len() {
        last = at;
        for _ in 0..2 {
            let n = u32::from_be_bytes(content[at..at + 4].try_into().unwrap()) as usize;
            at += 4 + n;
        }
    }
    content.truncate(last);
    header.keys -= 1;
    header.content_bytes = content.len() as u64;
    header.sha256 = hex::encode(digest::digest(&digest::SHA256, &content).as_ref());
    let mut altered = keyward::snapshot::MAGIC.to_vec();
    altered.extend(serde_json::to_vec(&header).unwrap());
    altered.push(b'\n');
    altered.extend(content);
    std::fs::write(&file, altered).unwrap();

    let dir = private_tempdir();
    // The SHA-256 matches: restore writes it...
    keyward::snapshot::restore(&file, &dir.path().join("data"), false).unwrap();
    std::fs::copy(
        source.dir.path().join(keyward::dev::CREDENTIALS_FILE),
        dir.path().join(keyward::dev::CREDENTIALS_FILE),
    )
    .unwrap();
    // ... and the first unseal refuses it.
    let error = TestServer::open_dev(dir)
        .await
        .err()
        .expect("the altered snapshot opened");
    let message = error.to_string();
    assert!(message.contains("HMAC"), "{message}");
    assert!(message.contains("vault.snap"), "{message}");
}

#[tokio::test]
async fn snapshot_save_needs_admin_on_sys_snapshot() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let policy = unique("ops-reader");
    // Everything but admin on sys/snapshot: read on it, admin elsewhere.
    root.policy_put(
        &policy,
        "[[rule]]\npath = \"sys/snapshot\"\ncapabilities = [\"read\", \"list\"]\n\
         [[rule]]\npath = \"secret/**\"\ncapabilities = [\"admin\", \"read\", \"write\"]\n\
         [[rule]]\npath = \"sys/snapshots\"\ncapabilities = [\"admin\"]\n",
    )
    .await
    .unwrap();
    let issued = root
        .issue_token(IssueOptions {
            policies: vec![policy],
            ttl: None,
            max_ttl: None,
            uses: 0,
            cidrs: vec![],
        })
        .await
        .unwrap();
    let user = root.with_token(&issued.token).unwrap();
    let refused = user
        .snapshot_save()
        .await
        .expect_err("a low-privileged token got a snapshot");
    assert_eq!(refused.code(), Some(Code::PermissionDenied), "{refused}");
    let anonymous = server.anonymous().await;
    let refused = anonymous
        .snapshot_save()
        .await
        .expect_err("no token got a snapshot");
    assert_eq!(refused.code(), Some(Code::Unauthenticated), "{refused}");
    // The denial is audited.
    let audit = std::fs::read_to_string(&server.audit_path).unwrap();
    assert!(audit
        .lines()
        .any(|l| l.contains("Sys/SnapshotSave") && l.contains("\"outcome\":\"denied\"")));
}

/// The commands end to end, with the real binary: `operator snapshot save`
/// against a `keyward dev` process, `snapshot restore` into a new dev
/// folder, and a dev server on it that unseals with the source's
/// credentials and serves the data.
#[tokio::test]
async fn the_save_and_restore_commands_round_trip_through_the_binary() {
    let dir = private_tempdir();
    let source_dir = dir.path().join("source");
    let child = crate::harness::ChildServer::start(&source_dir, &dir.path().join("source.log"));
    let value = unique("cli-snapshot-value");
    child
        .client()
        .await
        .put("ops/cli", &data(&[("v", &value)]), PutOptions::default())
        .await
        .unwrap();
    let file = dir.path().join("cli.snap");
    let ca = child.ca.display().to_string();
    let env = [
        ("KEYWARD_ADDR", child.addr.as_str()),
        ("KEYWARD_TOKEN", child.token.as_str()),
        ("KEYWARD_CACERT", ca.as_str()),
    ];
    let (code, stdout, stderr) = cli(
        &[
            "--format",
            "json",
            "operator",
            "snapshot",
            "save",
            file.to_str().unwrap(),
        ],
        &env,
        None,
    );
    assert_eq!(code, 0, "{stderr}");
    let out: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["bytes"], std::fs::metadata(&file).unwrap().len());
    assert!(!file.with_file_name("cli.snap.partial").exists());
    assert!(!contains(&std::fs::read(&file).unwrap(), value.as_bytes()));

    let target = private_tempdir();
    let (code, _, stderr) = cli(
        &[
            "snapshot",
            "restore",
            file.to_str().unwrap(),
            "--storage-path",
            target.path().join("data").to_str().unwrap(),
        ],
        &[],
        None,
    );
    assert_eq!(code, 0, "{stderr}");
    std::fs::copy(
        source_dir.join(keyward::dev::CREDENTIALS_FILE),
        target.path().join(keyward::dev::CREDENTIALS_FILE),
    )
    .unwrap();
    let restored = TestServer::open_dev(target).await.unwrap();
    let secret = restored.root().await.get("ops/cli").await.unwrap();
    assert_eq!(secret.data.get("v").unwrap().expose(), value.as_bytes());
}
