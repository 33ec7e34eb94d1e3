use std::sync::Arc;

use super::*;
use crate::barrier::{BarrierOptions, UnsealShare};
use crate::storage::SledBackend;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn vault(dir: &Path) -> (Arc<Barrier>, Vec<UnsealShare>) {
    let backend = SledBackend::open(dir.join("data")).unwrap();
    let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
    let shares = barrier.init(1, 1).unwrap();
    for i in 0..100 {
        barrier
            .put(
                &format!("secrets/app/{i}"),
                format!("plain-value-{i}").as_bytes(),
            )
            .unwrap();
    }
    (Arc::new(barrier), shares)
}

fn write_file(taken: Taken, path: &Path) {
    let mut out = File::create(path).unwrap();
    out.write_all(&taken.head()).unwrap();
    io::copy(&mut taken.content().unwrap(), &mut out).unwrap();
}

#[test]
fn a_snapshot_restores_and_unseals_with_the_original_share() {
    let dir = tempfile::tempdir().unwrap();
    let (barrier, shares) = vault(dir.path());
    let taken = take(&barrier, dir.path(), "2026-12-02T00:00:00Z".into()).unwrap();
    assert_eq!(
        taken.header.keys, 102,
        "100 values, the seal and the keyring"
    );
    let file = dir.path().join("snap");
    write_file(taken, &file);
    let bytes = std::fs::read(&file).unwrap();
    assert!(!contains(&bytes, b"plain-value-7"));

    let target = dir.path().join("restored");
    let restored = restore(&file, &target, false).unwrap();
    assert_eq!(restored.keys, 102);
    let backend = SledBackend::open(&target).unwrap();
    let again = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
    assert!(again.status().sealed);
    again.unseal(shares[0].0.as_str()).unwrap();
    assert_eq!(
        &again.get("secrets/app/7").unwrap().unwrap()[..],
        b"plain-value-7"
    );
    drop(again);
    // A second restore into the same folder needs --force.
    assert!(matches!(
        restore(&file, &target, false),
        Err(SnapshotError::NotEmpty)
    ));
}

#[test]
fn a_flipped_byte_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (barrier, _) = vault(dir.path());
    let file = dir.path().join("snap");
    write_file(take(&barrier, dir.path(), "t".into()).unwrap(), &file);
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let target = dir.path().join("restored");
    let error = restore(&file, &target, false).unwrap_err();
    assert!(error.to_string().contains("SHA-256"), "{error}");
    assert!(
        !target.exists(),
        "a damaged snapshot made the target folder"
    );
}

#[test]
fn a_rehashed_snapshot_is_refused_at_unseal() {
    let dir = tempfile::tempdir().unwrap();
    let (barrier, shares) = vault(dir.path());
    let taken = take(&barrier, dir.path(), "t".into()).unwrap();
    let mut header = taken.header.clone();
    let mut content = Vec::new();
    taken.content().unwrap().read_to_end(&mut content).unwrap();
    // Drop the last pair (a record an attacker wants gone) and re-hash.
    let mut pairs = Vec::new();
    let mut at = 0;
    while at < content.len() {
        let start = at;
        for _ in 0..2 {
            let n = u32::from_be_bytes(content[at..at + 4].try_into().unwrap()) as usize;
            at += 4 + n;
        }
        pairs.push(content[start..at].to_vec());
    }
    let kept: Vec<_> = pairs
        .into_iter()
        .filter(|p| !contains(p, b"secrets/app/42"))
        .collect();
    let altered: Vec<u8> = kept.concat();
    header.keys = kept.len() as u64;
    header.content_bytes = altered.len() as u64;
    header.sha256 = hex::encode(digest::digest(&digest::SHA256, &altered).as_ref());
    let file = dir.path().join("snap");
    let mut out = MAGIC.to_vec();
    out.extend(serde_json::to_vec(&header).unwrap());
    out.push(b'\n');
    out.extend(altered);
    std::fs::write(&file, out).unwrap();

    let target = dir.path().join("restored");
    restore(&file, &target, false).unwrap();
    let backend = SledBackend::open(&target).unwrap();
    let again = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
    let error = again.unseal(shares[0].0.as_str()).unwrap_err();
    assert!(error.to_string().contains("HMAC"), "{error}");
    assert!(again.status().sealed);
    assert!(again.get("secrets/app/1").is_err());
}

#[test]
fn a_folder_holding_other_files_is_never_written_into() {
    let dir = tempfile::tempdir().unwrap();
    let (barrier, _) = vault(dir.path());
    let file = dir.path().join("snap");
    write_file(take(&barrier, dir.path(), "t".into()).unwrap(), &file);
    let target = dir.path().join("elsewhere");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("notes.txt"), b"mine").unwrap();
    assert!(matches!(
        restore(&file, &target, false),
        Err(SnapshotError::NotEmpty)
    ));
    assert!(matches!(
        restore(&file, &target, true),
        Err(SnapshotError::NotAStore(_))
    ));
    let names: Vec<_> = std::fs::read_dir(&target).unwrap().collect();
    assert_eq!(names.len(), 1, "only the file that was there");
}

/// Attack: the header is outside the SHA-256 and its HMAC waits for the
/// first unseal, so an edit of `store_format` to 0 passed `check`, the
/// restore wrote every pair and then failed, leaving a store no binary
/// opens. It is refused before anything is written.
#[test]
fn a_header_naming_store_format_0_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (barrier, _) = vault(dir.path());
    let taken = take(&barrier, dir.path(), "t".into()).unwrap();
    let mut header = taken.header.clone();
    header.store_format = 0;
    let mut out = MAGIC.to_vec();
    out.extend(serde_json::to_vec(&header).unwrap());
    out.push(b'\n');
    taken.content().unwrap().read_to_end(&mut out).unwrap();
    let file = dir.path().join("snap");
    std::fs::write(&file, out).unwrap();
    let target = dir.path().join("restored");
    let error = restore(&file, &target, false).unwrap_err();
    assert!(matches!(error, SnapshotError::Damaged(_)), "{error}");
    assert!(error.to_string().contains("store format 0"), "{error}");
    assert!(
        !target.exists(),
        "a refused snapshot made the target folder"
    );
}
