//! Upgrades (issue 16): a store of a newer format version is refused with a
//! message naming both versions; the fixture store of this release opens
//! and reads back its known secret.
//!
//! The fixture (`tests/fixtures/store-format-3/`: the sled folder `data/`
//! and its `dev-credentials.json`, ciphertext only) is made by
//! `KEYWARD_WRITE_FIXTURE=1 cargo test --test it ops_upgrade::write_fixture -- --ignored`.
//! Keep each release's fixture: later releases must open them all.

use std::path::Path;

use keyward::client::PutOptions;

use crate::harness::{data, private_tempdir, TestServer};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/store-format-3");
const KNOWN_PATH: &str = "fixture/app/db";
const KNOWN_VALUE: &str = "fixture-password-0.3";

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[tokio::test]
async fn the_fixture_store_of_this_release_opens_and_reads_its_secret() {
    let dir = private_tempdir();
    copy_dir(Path::new(FIXTURE), dir.path());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.path().join(keyward::dev::CREDENTIALS_FILE),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::set_permissions(
        dir.path().join("data"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let server = TestServer::open_dev(dir).await.unwrap();
    let secret = server.root().await.get(KNOWN_PATH).await.unwrap();
    assert_eq!(
        secret.data.get("password").unwrap().expose(),
        KNOWN_VALUE.as_bytes()
    );
}

#[tokio::test]
async fn a_store_of_a_newer_format_is_refused_naming_both_versions() {
    let server = TestServer::dev().await;
    let dir = server.stop().await;
    {
        let db = sled::open(dir.path().join("data")).unwrap();
        let meta = db.open_tree("keyward-meta").unwrap();
        let newer = keyward::storage::format::CURRENT + 1;
        meta.insert("format", &newer.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let error = TestServer::open_dev(dir)
        .await
        .err()
        .expect("a newer store opened");
    let message = error.to_string();
    let current = keyward::storage::format::CURRENT;
    assert!(
        message.contains(&format!("format version {}", current + 1))
            && message.contains(&format!("version {current}")),
        "{message}"
    );
}

/// Writes the fixture of this release (run by hand; see the module doc).
#[tokio::test]
#[ignore = "writes tests/fixtures; run by hand for a new release"]
async fn write_fixture() {
    if std::env::var("KEYWARD_WRITE_FIXTURE").as_deref() != Ok("1") {
        return;
    }
    let server = TestServer::dev().await;
    server
        .root()
        .await
        .put(
            KNOWN_PATH,
            &data(&[("password", KNOWN_VALUE)]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    let dir = server.stop().await;
    let target = Path::new(FIXTURE);
    let _ = std::fs::remove_dir_all(target);
    copy_dir(&dir.path().join("data"), &target.join("data"));
    std::fs::copy(
        dir.path().join(keyward::dev::CREDENTIALS_FILE),
        target.join(keyward::dev::CREDENTIALS_FILE),
    )
    .unwrap();
}
