//! Attacks on the operations change (issue 16), each a test that failed
//! before its fix: where `operator snapshot save` writes its file, and
//! whether the audit log of a restored vault shows a rollback.

use std::os::unix::fs::PermissionsExt;

use keyward::client::PutOptions;

use crate::harness::{cli, contains, data, private_tempdir, unique, ChildServer, TestServer};

/// A `FILE.partial` that is already there (a symlink someone planted in a
/// shared folder, or a leftover readable by others) is never written
/// through nor reused: the snapshot goes to a new file of mode 0600, and
/// the file the symlink names is untouched.
#[tokio::test]
async fn save_never_writes_through_a_planted_partial_file() {
    let dir = private_tempdir();
    let source_dir = dir.path().join("source");
    let child = ChildServer::start(&source_dir, &dir.path().join("source.log"));
    let ca = child.ca.display().to_string();
    let env = [
        ("KEYWARD_ADDR", child.addr.as_str()),
        ("KEYWARD_TOKEN", child.token.as_str()),
        ("KEYWARD_CACERT", ca.as_str()),
    ];
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();

    // 1. A symlink at FILE.partial pointing at a file readable by others.
    let victim = shared.join("victim");
    std::fs::write(&victim, b"").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    let file = shared.join("vault.snap");
    std::os::unix::fs::symlink(&victim, shared.join("vault.snap.partial")).unwrap();
    let save = |file: &std::path::Path| {
        cli(
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
        )
    };
    let (code, _, stderr) = save(&file);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        std::fs::metadata(&victim).unwrap().len(),
        0,
        "the snapshot was written through a planted symlink"
    );
    let meta = std::fs::symlink_metadata(&file).unwrap();
    assert!(meta.file_type().is_file(), "the snapshot is a symlink");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let bytes = std::fs::read(&file).unwrap();
    assert!(bytes.starts_with(keyward::snapshot::MAGIC));
    // Only ciphertext: not even the token that asked for it.
    assert!(!contains(&bytes, child.token.as_bytes()));

    // 2. A leftover FILE.partial readable by others (an earlier save cut short).
    let file = shared.join("second.snap");
    let partial = shared.join("second.snap.partial");
    std::fs::write(&partial, b"left over").unwrap();
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, stderr) = save(&file);
    assert_eq!(code, 0, "{stderr}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the snapshot kept a leftover's mode");
    assert!(!partial.exists());
}

/// A restore of an old snapshot is a rollback (tokens, secret-ids and
/// policies revoked since come back). Its audit record named the snapshot's
/// file name and SHA-256 only, and a file name says nothing of its age: the
/// record now carries when the snapshot was taken and its key term, so the
/// rollback is visible in the restored vault's audit log.
#[tokio::test]
async fn a_restored_vault_audits_when_its_snapshot_was_taken() {
    let source = TestServer::dev().await;
    let root = source.root().await;
    root.put(
        "ops/rollback",
        &data(&[("v", &unique("old"))]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let mut stream = root.snapshot_save().await.unwrap();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next_chunk().await.unwrap() {
        bytes.extend_from_slice(&chunk.data);
    }
    let dir = private_tempdir();
    let file = dir.path().join("old.snap");
    std::fs::write(&file, &bytes).unwrap();
    let header = keyward::snapshot::check(&file).unwrap();

    let target = private_tempdir();
    keyward::snapshot::restore(&file, &target.path().join("data"), false).unwrap();
    std::fs::copy(
        source.dir.path().join(keyward::dev::CREDENTIALS_FILE),
        target.path().join(keyward::dev::CREDENTIALS_FILE),
    )
    .unwrap();
    let restored = TestServer::open_dev(target).await.unwrap();
    let audit = std::fs::read_to_string(&restored.audit_path).unwrap();
    let record = audit
        .lines()
        .find(|l| l.contains("Sys/SnapshotRestore"))
        .expect("no restore record");
    assert!(
        record.contains(&format!(
            "\"snapshot_created_at\":\"{}\"",
            header.created_at
        )),
        "{record}"
    );
    assert!(
        record.contains(&format!("\"snapshot_key_term\":\"{}\"", header.key_term)),
        "{record}"
    );
}
