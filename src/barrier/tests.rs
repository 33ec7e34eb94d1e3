//! Barrier tests over a real sled folder.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use super::*;
use crate::storage::test_sled::TestSled;
use crate::storage::SledBackend;

struct Vault {
    dir: tempfile::TempDir,
    backend: Arc<SledBackend>,
    barrier: Barrier,
}

fn open_at(path: &Path, options: BarrierOptions) -> (Arc<SledBackend>, Barrier) {
    let backend = Arc::new(SledBackend::open(path).unwrap());
    let barrier = Barrier::new(backend.clone(), options).unwrap();
    (backend, barrier)
}

impl Vault {
    fn new() -> Self {
        Self::with_options(BarrierOptions::default())
    }

    fn with_options(options: BarrierOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (backend, barrier) = open_at(&dir.path().join("db"), options);
        Self {
            dir,
            backend,
            barrier,
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("db")
    }

    /// Drops the barrier and the backend and opens the folder again, sealed.
    fn reopen(self, options: BarrierOptions) -> Self {
        let Self {
            dir,
            backend,
            barrier,
        } = self;
        drop(barrier);
        drop(backend);
        let (backend, barrier) = open_at(&dir.path().join("db"), options);
        Self {
            dir,
            backend,
            barrier,
        }
    }

    fn raw(&self, key: &str) -> Vec<u8> {
        self.backend.get(key.as_bytes()).unwrap().unwrap()
    }
}

fn text(share: &UnsealShare) -> &str {
    share.0.as_str()
}

fn unseal_with(barrier: &Barrier, shares: &[&UnsealShare]) -> SealStatus {
    let mut status = barrier.status();
    for share in shares {
        status = barrier.unseal(text(share)).unwrap();
    }
    status
}

fn term_of(envelope: &[u8]) -> u32 {
    u32::from_be_bytes(envelope[..4].try_into().unwrap())
}

/// Every byte of every file under `dir`.
fn folder_bytes(dir: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        for entry in std::fs::read_dir(&path).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                pending.push(entry.path());
            } else {
                out.push(std::fs::read(entry.path()).unwrap());
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

fn on_disk(dir: &Path, needle: &[u8]) -> bool {
    folder_bytes(dir).iter().any(|file| contains(file, needle))
}

#[test]
fn init_unseal_round_trip() {
    let vault = Vault::new();
    let barrier = &vault.barrier;
    assert_eq!(
        barrier.status(),
        SealStatus {
            initialized: false,
            sealed: true,
            shares: 0,
            threshold: 0,
            progress: 0,
            key_term: 0,
            term_encryptions: 0
        }
    );
    assert!(matches!(
        barrier.unseal("kwu1_x"),
        Err(BarrierError::NotInitialized)
    ));
    assert!(matches!(barrier.get("a"), Err(BarrierError::Sealed)));

    let shares = barrier.init(1, 1).unwrap();
    assert_eq!(shares.len(), 1);
    assert!(text(&shares[0]).starts_with("kwu1_"));
    // init leaves the vault unsealed.
    let status = barrier.status();
    assert!(status.initialized && !status.sealed);
    assert_eq!(
        (status.shares, status.threshold, status.key_term),
        (1, 1, 1)
    );
    barrier.put("app/a", b"value a").unwrap();
    assert_eq!(status.term_encryptions, 0);
    assert_eq!(barrier.status().term_encryptions, 1);

    barrier.seal();
    assert!(barrier.status().sealed);
    assert!(matches!(barrier.get("app/a"), Err(BarrierError::Sealed)));
    let status = barrier.unseal(text(&shares[0])).unwrap();
    assert!(!status.sealed);
    assert_eq!(
        barrier.get("app/a").unwrap().unwrap().as_slice(),
        b"value a"
    );
    assert_eq!(barrier.get("app/missing").unwrap(), None);
    // A share given to an unsealed vault is ignored.
    assert!(!barrier.unseal("anything").unwrap().sealed);
    assert!(matches!(
        barrier.init(1, 1),
        Err(BarrierError::AlreadyInitialized)
    ));
}

#[test]
fn init_refuses_bad_parameters() {
    let vault = Vault::new();
    for (shares, threshold) in [(0, 0), (3, 0), (3, 4), (5, 1), (2, 1)] {
        assert!(
            matches!(
                vault.barrier.init(shares, threshold),
                Err(BarrierError::InvalidSealParameters(_))
            ),
            "{shares}/{threshold}"
        );
    }
    let message = vault.barrier.init(5, 1).unwrap_err().to_string();
    assert!(
        message.contains("threshold must be at least 2"),
        "{message}"
    );
    assert!(!vault.barrier.status().initialized);
    assert_eq!(vault.barrier.init(255, 255).unwrap().len(), 255);
}

#[test]
fn three_of_five_every_subset_unseals() {
    let vault = Vault::new();
    let barrier = &vault.barrier;
    let shares = barrier.init(5, 3).unwrap();
    barrier.put("k", b"v").unwrap();
    let mut subsets = 0;
    for a in 0..5 {
        for b in a + 1..5 {
            for c in b + 1..5 {
                barrier.seal();
                // Order does not matter: give them backwards.
                let status = unseal_with(barrier, &[&shares[c], &shares[b], &shares[a]]);
                assert!(!status.sealed, "subset {a} {b} {c}");
                assert_eq!(barrier.get("k").unwrap().unwrap().as_slice(), b"v");
                subsets += 1;
            }
        }
    }
    assert_eq!(subsets, 10);
}

#[test]
fn too_few_shares_stay_sealed_with_progress() {
    let vault = Vault::new();
    let barrier = &vault.barrier;
    let shares = barrier.init(5, 3).unwrap();
    barrier.seal();
    let status = barrier.unseal(text(&shares[4])).unwrap();
    assert_eq!(
        (
            status.sealed,
            status.progress,
            status.threshold,
            status.shares
        ),
        (true, 1, 3, 5)
    );
    let status = barrier.unseal(text(&shares[1])).unwrap();
    assert_eq!((status.sealed, status.progress), (true, 2));
    assert_eq!(barrier.status().progress, 2);
    assert!(matches!(barrier.get("k"), Err(BarrierError::Sealed)));
    assert_eq!(status.key_term, 0);

    barrier.reset_unseal();
    assert_eq!(barrier.status().progress, 0);
    // After the reset, the same shares count again.
    assert_eq!(barrier.unseal(text(&shares[4])).unwrap().progress, 1);
    // Sealing also forgets them.
    barrier.seal();
    assert_eq!(barrier.status().progress, 0);
}

#[test]
fn fabricated_share_gives_wrong_shares_and_resets_progress() {
    let vault = Vault::new();
    let barrier = &vault.barrier;
    let shares = barrier.init(5, 3).unwrap();
    barrier.put("k", b"v").unwrap();
    barrier.seal();

    // Valid format, right vault and threshold, valid checksum: wrong bytes.
    let real = shamir::parse(text(&shares[0])).unwrap();
    let mut bytes = [0x5au8; shamir::SHARE_LEN];
    bytes[0] = 200;
    let forged = shamir::encode(&real.vault_id, 3, &bytes).unwrap();

    assert_eq!(barrier.unseal(text(&shares[0])).unwrap().progress, 1);
    assert_eq!(barrier.unseal(text(&shares[1])).unwrap().progress, 2);
    assert!(matches!(
        barrier.unseal(&forged),
        Err(BarrierError::WrongShares)
    ));
    let status = barrier.status();
    assert_eq!((status.sealed, status.progress), (true, 0));
    assert!(matches!(barrier.get("k"), Err(BarrierError::Sealed)));

    // A real share with a tampered body (and a recomputed checksum) too.
    let mut tampered = *real.share;
    tampered[7] ^= 1;
    let tampered = shamir::encode(&real.vault_id, 3, &tampered).unwrap();
    unseal_with(barrier, &[&shares[3], &shares[4]]);
    assert!(matches!(
        barrier.unseal(&tampered),
        Err(BarrierError::WrongShares)
    ));
    assert_eq!(barrier.status().progress, 0);

    // The right shares still work after the resets.
    assert!(!unseal_with(barrier, &[&shares[0], &shares[1], &shares[2]]).sealed);
    assert_eq!(barrier.get("k").unwrap().unwrap().as_slice(), b"v");
}

#[test]
fn share_of_another_vault_is_refused() {
    let ours = Vault::new();
    let theirs = Vault::new();
    let our_shares = ours.barrier.init(3, 2).unwrap();
    let their_shares = theirs.barrier.init(3, 2).unwrap();
    ours.barrier.seal();
    ours.barrier.unseal(text(&our_shares[0])).unwrap();
    assert!(matches!(
        ours.barrier.unseal(text(&their_shares[1])),
        Err(BarrierError::ShareOfAnotherVault)
    ));
    assert_eq!(ours.barrier.status().progress, 1);
    assert!(!ours.barrier.unseal(text(&our_shares[1])).unwrap().sealed);
}

#[test]
fn duplicate_share_is_not_counted() {
    let vault = Vault::new();
    let barrier = &vault.barrier;
    let shares = barrier.init(5, 3).unwrap();
    barrier.seal();
    barrier.unseal(text(&shares[2])).unwrap();
    // The same share, pasted with a trailing newline.
    let again = format!("{}\n", text(&shares[2]));
    assert!(matches!(
        barrier.unseal(&again),
        Err(BarrierError::DuplicateShare)
    ));
    assert_eq!(barrier.status().progress, 1);
    barrier.unseal(text(&shares[3])).unwrap();
    assert!(matches!(
        barrier.unseal(text(&shares[3])),
        Err(BarrierError::DuplicateShare)
    ));
    assert_eq!(barrier.status().progress, 2);
    assert!(!barrier.unseal(text(&shares[0])).unwrap().sealed);
}

#[test]
fn malformed_share_is_refused_without_echoing_it() {
    let vault = Vault::new();
    let barrier = &vault.barrier;
    let shares = barrier.init(3, 2).unwrap();
    barrier.seal();
    barrier.unseal(text(&shares[0])).unwrap();
    let good = text(&shares[1]);
    let body = &good[5..];
    let mut typo = good.as_bytes().to_vec();
    typo[20] = if typo[20] == b'A' { b'B' } else { b'A' };
    let typo = String::from_utf8(typo).unwrap();
    for bad in [typo.as_str(), &good[..40], body, "", "kwu1_!!!!"] {
        let error = barrier.unseal(bad).unwrap_err();
        assert!(matches!(error, BarrierError::MalformedShare(_)), "{error}");
        let shown = format!("{error} {error:?}");
        assert!(!shown.contains(&body[..12]), "{shown}");
    }
    assert_eq!(barrier.status().progress, 1);

    // A share whose threshold byte disagrees with the seal.
    let parsed = shamir::parse(good).unwrap();
    let other_threshold = shamir::encode(&parsed.vault_id, 3, &parsed.share).unwrap();
    assert!(matches!(
        barrier.unseal(&other_threshold),
        Err(BarrierError::MalformedShare(_))
    ));
    assert_eq!(barrier.status().progress, 1);
}

#[test]
fn reserved_keys_are_refused_and_never_listed() {
    let vault = Vault::new();
    let barrier = &vault.barrier;
    barrier.init(1, 1).unwrap();
    for key in ["sys/seal", "sys/keyring", "sys/sealed", "sys/keyring/x"] {
        assert!(
            matches!(barrier.put(key, b"x"), Err(BarrierError::ReservedKey)),
            "{key}"
        );
        assert!(matches!(barrier.get(key), Err(BarrierError::ReservedKey)));
        assert!(matches!(
            barrier.delete(key),
            Err(BarrierError::ReservedKey)
        ));
        assert!(matches!(
            barrier.scan_prefix(key),
            Err(BarrierError::ReservedKey)
        ));
        assert!(matches!(
            barrier.scan_keys(key),
            Err(BarrierError::ReservedKey)
        ));
        assert!(matches!(
            barrier.batch(&[PlainOp::Put("ok", b"x"), PlainOp::Delete(key)]),
            Err(BarrierError::ReservedKey)
        ));
    }
    // The refused batch wrote nothing.
    assert_eq!(barrier.get("ok").unwrap(), None);
    // The seal records are untouched.
    assert!(vault.raw("sys/seal").starts_with(b"{"));

    barrier.put("sys/other", b"mine").unwrap();
    barrier.put("a", b"1").unwrap();
    barrier.put("z", b"2").unwrap();
    assert_eq!(barrier.scan_keys("sys/").unwrap(), ["sys/other"]);
    assert_eq!(barrier.scan_keys("").unwrap(), ["a", "sys/other", "z"]);
    let all = barrier.scan_prefix("").unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[1].0, "sys/other");
    assert_eq!(all[1].1.as_slice(), b"mine");
    let range = barrier.scan_range("b", "zz", 10).unwrap();
    let keys: Vec<&str> = range.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["sys/other", "z"]);
    let range = barrier.scan_range("b", "zz", 1).unwrap();
    assert_eq!(range.len(), 1);
    assert_eq!(range[0].0, "sys/other");
    assert!(barrier.scan_range("b", "zz", 0).unwrap().is_empty());
}

#[test]
fn every_data_operation_is_sealed_while_sealed() {
    let vault = Vault::new();
    let barrier = &vault.barrier;
    barrier.init(1, 1).unwrap();
    barrier.put("k", b"v").unwrap();
    barrier.seal();
    let sealed = |result: Result<(), BarrierError>| {
        assert!(matches!(result, Err(BarrierError::Sealed)), "{result:?}");
    };
    sealed(barrier.get("k").map(drop));
    sealed(barrier.put("k", b"w"));
    sealed(barrier.delete("k"));
    sealed(barrier.scan_prefix("").map(drop));
    sealed(barrier.scan_keys("").map(drop));
    sealed(barrier.scan_range("a", "z", 5).map(drop));
    sealed(barrier.batch(&[PlainOp::Delete("k")]));
    sealed(barrier.rotate_key().map(drop));
    sealed(barrier.derive_key("audit").map(drop));
    // Nothing was deleted behind the seal.
    assert!(vault.backend.get(b"k").unwrap().is_some());
}

#[test]
fn data_operations_and_batches() {
    let vault = Vault::new();
    let barrier = &vault.barrier;
    barrier.init(1, 1).unwrap();
    barrier.put("p/a", b"1").unwrap();
    barrier.put("p/b", b"").unwrap();
    barrier
        .batch(&[
            PlainOp::Put("p/c", b"3"),
            PlainOp::Delete("p/a"),
            PlainOp::Put("q/d", b"4"),
        ])
        .unwrap();
    let listed = barrier.scan_prefix("p/").unwrap();
    let listed: Vec<(&str, &[u8])> = listed
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    assert_eq!(listed, [("p/b", &b""[..]), ("p/c", &b"3"[..])]);
    barrier.delete("p/b").unwrap();
    assert_eq!(barrier.scan_keys("p/").unwrap(), ["p/c"]);
    assert_eq!(barrier.status().term_encryptions, 4);
}

#[test]
fn ciphertext_moved_to_another_key_fails() {
    let vault = Vault::new();
    let barrier = &vault.barrier;
    barrier.init(1, 1).unwrap();
    barrier.put("secrets/a", b"value of a").unwrap();
    let envelope = vault.raw("secrets/a");
    vault.backend.put(b"secrets/b", &envelope).unwrap();
    assert!(matches!(
        barrier.get("secrets/b"),
        Err(BarrierError::Decrypt)
    ));
    assert!(matches!(
        barrier.scan_prefix("secrets/"),
        Err(BarrierError::Decrypt)
    ));
    assert_eq!(
        barrier.get("secrets/a").unwrap().unwrap().as_slice(),
        b"value of a"
    );

    // A flipped bit, an unknown term, term 0 and a stub all fail too.
    let mut flipped = envelope.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x80;
    let mut future = envelope.clone();
    future[..4].copy_from_slice(&9u32.to_be_bytes());
    let mut root = envelope.clone();
    root[..4].copy_from_slice(&0u32.to_be_bytes());
    for bad in [flipped, future, root, envelope[..10].to_vec()] {
        vault.backend.put(b"secrets/a", &bad).unwrap();
        assert!(matches!(
            barrier.get("secrets/a"),
            Err(BarrierError::Decrypt)
        ));
    }
}

#[test]
fn data_survives_drop_reopen_and_unseal() {
    let vault = Vault::new();
    let shares = vault.barrier.init(3, 2).unwrap();
    vault.barrier.put("app/db", b"hunter2").unwrap();
    vault
        .barrier
        .batch(&[PlainOp::Put("app/api", b"k-123")])
        .unwrap();

    let vault = vault.reopen(BarrierOptions::default());
    let status = vault.barrier.status();
    assert!(status.initialized && status.sealed);
    assert_eq!(
        (status.shares, status.threshold, status.progress),
        (3, 2, 0)
    );
    assert!(!unseal_with(&vault.barrier, &[&shares[2], &shares[0]]).sealed);
    assert_eq!(
        vault.barrier.get("app/db").unwrap().unwrap().as_slice(),
        b"hunter2"
    );
    assert_eq!(
        vault.barrier.get("app/api").unwrap().unwrap().as_slice(),
        b"k-123"
    );
    assert!(matches!(
        vault.barrier.init(3, 2),
        Err(BarrierError::AlreadyInitialized)
    ));
}

#[test]
fn rotate_key_keeps_old_values_readable() {
    let vault = Vault::new();
    let shares = vault.barrier.init(1, 1).unwrap();
    vault.barrier.put("old", b"written under term 1").unwrap();
    assert_eq!(vault.barrier.rotate_key().unwrap(), 2);
    let status = vault.barrier.status();
    assert_eq!((status.key_term, status.term_encryptions), (2, 0));
    vault.barrier.put("new", b"written under term 2").unwrap();
    assert_eq!(term_of(&vault.raw("old")), 1);
    assert_eq!(term_of(&vault.raw("new")), 2);
    assert_eq!(vault.barrier.rotate_key().unwrap(), 3);

    let vault = vault.reopen(BarrierOptions::default());
    vault.barrier.unseal(text(&shares[0])).unwrap();
    assert_eq!(vault.barrier.status().key_term, 3);
    assert_eq!(
        vault.barrier.get("old").unwrap().unwrap().as_slice(),
        b"written under term 1"
    );
    assert_eq!(
        vault.barrier.get("new").unwrap().unwrap().as_slice(),
        b"written under term 2"
    );
    vault.barrier.put("newer", b"3").unwrap();
    assert_eq!(term_of(&vault.raw("newer")), 3);
}

#[test]
fn a_new_term_is_made_at_the_encryption_limit() {
    let options = BarrierOptions {
        max_encryptions_per_term: 10,
        ..BarrierOptions::default()
    };
    let vault = Vault::with_options(options.clone());
    let barrier = &vault.barrier;
    barrier.init(1, 1).unwrap();
    for i in 0..9 {
        barrier.put(&format!("k{i}"), b"v").unwrap();
    }
    assert_eq!(
        (barrier.status().key_term, barrier.status().term_encryptions),
        (1, 9)
    );
    barrier.put("k9", b"v").unwrap();
    // The tenth encryption was the last under term 1.
    assert_eq!(term_of(&vault.raw("k9")), 1);
    assert_eq!(
        (barrier.status().key_term, barrier.status().term_encryptions),
        (2, 0)
    );
    // A batch counts each encryption.
    let values: Vec<String> = (10..25).map(|i| format!("k{i}")).collect();
    let ops: Vec<PlainOp<'_>> = values.iter().map(|k| PlainOp::Put(k, b"w")).collect();
    barrier.batch(&ops).unwrap();
    assert_eq!(
        (barrier.status().key_term, barrier.status().term_encryptions),
        (3, 5)
    );
    let terms: Vec<u32> = (0..25)
        .map(|i| term_of(&vault.raw(&format!("k{i}"))))
        .collect();
    assert_eq!(terms.iter().filter(|&&t| t == 1).count(), 10);
    assert_eq!(terms.iter().filter(|&&t| t == 2).count(), 10);
    assert_eq!(terms.iter().filter(|&&t| t == 3).count(), 5);
    for i in 0..25 {
        assert!(barrier.get(&format!("k{i}")).unwrap().is_some());
    }
}

#[test]
fn a_restart_assumes_the_whole_reservation_was_used() {
    // Small limit: the reservation is capped at the limit.
    let options = BarrierOptions {
        max_encryptions_per_term: 10,
        ..BarrierOptions::default()
    };
    let vault = Vault::with_options(options.clone());
    let shares = vault.barrier.init(1, 1).unwrap();
    for i in 0..3 {
        vault.barrier.put(&format!("k{i}"), b"v").unwrap();
    }
    let vault = vault.reopen(options);
    vault.barrier.unseal(text(&shares[0])).unwrap();
    assert_eq!(
        (
            vault.barrier.status().key_term,
            vault.barrier.status().term_encryptions
        ),
        (1, 10)
    );
    vault.barrier.put("after", b"v").unwrap();
    assert_eq!(term_of(&vault.raw("after")), 2);
    assert_eq!(vault.barrier.status().term_encryptions, 1);

    // Default limit: one block of 65,536 is reserved by the first encryption.
    let vault = Vault::new();
    let shares = vault.barrier.init(1, 1).unwrap();
    vault.barrier.put("k", b"v").unwrap();
    let vault = vault.reopen(BarrierOptions::default());
    vault.barrier.unseal(text(&shares[0])).unwrap();
    assert_eq!(
        vault.barrier.status().term_encryptions,
        keyring::RESERVATION_BLOCK
    );
    vault.barrier.put("k2", b"v").unwrap();
    assert_eq!(
        vault.barrier.status().term_encryptions,
        keyring::RESERVATION_BLOCK + 1
    );
    // ... which reserved the next block before encrypting.
    let vault = vault.reopen(BarrierOptions::default());
    vault.barrier.unseal(text(&shares[0])).unwrap();
    assert_eq!(
        vault.barrier.status().term_encryptions,
        2 * keyring::RESERVATION_BLOCK
    );
    assert_eq!(vault.barrier.status().key_term, 1);
}

#[test]
fn concurrent_writers_across_automatic_rotations() {
    let options = BarrierOptions {
        max_encryptions_per_term: 7,
        ..BarrierOptions::default()
    };
    let vault = Vault::with_options(options);
    let barrier = &vault.barrier;
    barrier.init(1, 1).unwrap();
    std::thread::scope(|scope| {
        for t in 0..4 {
            scope.spawn(move || {
                for i in 0..25 {
                    let key = format!("t{t}/{i}");
                    barrier.put(&key, key.as_bytes()).unwrap();
                }
            });
        }
    });
    for t in 0..4 {
        for i in 0..25 {
            let key = format!("t{t}/{i}");
            assert_eq!(
                barrier.get(&key).unwrap().unwrap().as_slice(),
                key.as_bytes()
            );
        }
    }
    // 100 encryptions, at most 7 per term.
    let mut per_term = std::collections::BTreeMap::new();
    for (key, _) in vault.backend.scan_prefix(b"t").unwrap() {
        let key = String::from_utf8(key).unwrap();
        *per_term.entry(term_of(&vault.raw(&key))).or_insert(0) += 1;
    }
    assert!(per_term.values().all(|&n| n <= 7), "{per_term:?}");
    assert!(barrier.status().key_term >= 15);
}

#[test]
fn nothing_secret_reaches_the_disk() {
    let vault = Vault::new();
    let shares = vault.barrier.init(3, 2).unwrap();
    let canary = b"canary-plaintext-7f3a9c1e5b2d";
    vault.barrier.put("secrets/canary", canary).unwrap();
    vault
        .barrier
        .batch(&[PlainOp::Put("secrets/batch", b"canary-batch-0c8e4a")])
        .unwrap();
    vault.barrier.rotate_key().unwrap();
    vault.backend.flush().unwrap();

    // The control: a raw write of the same kind of bytes is found.
    let control = b"control-plaintext-2e6b8d0f4a";
    vault.backend.put(b"control", control).unwrap();
    vault.backend.flush().unwrap();
    assert!(
        on_disk(&vault.path(), control),
        "the scan of the sled folder finds nothing"
    );

    assert!(!on_disk(&vault.path(), canary));
    assert!(!on_disk(&vault.path(), b"canary-batch-0c8e4a"));
    // Nor the root key, a share, or a term key.
    let parsed: Vec<_> = shares
        .iter()
        .map(|s| shamir::parse(text(s)).unwrap().share)
        .collect();
    let root_key = shamir::combine(&parsed[..2]).unwrap();
    assert!(!on_disk(&vault.path(), &root_key[..]));
    assert!(!on_disk(&vault.path(), &parsed[0][1..]));
    assert!(!on_disk(&vault.path(), text(&shares[0]).as_bytes()));
    let term_key = match &*vault.barrier.read() {
        SealState::Unsealed { record, .. } => record.terms[0].key.clone(),
        _ => unreachable!(),
    };
    assert!(!on_disk(&vault.path(), &term_key[..]));
}

#[test]
fn derived_keys_are_stable_across_reopen_and_rotation() {
    let vault = Vault::new();
    let shares = vault.barrier.init(1, 1).unwrap();
    let audit = vault.barrier.derive_key("audit-hmac").unwrap();
    let tokens = vault.barrier.derive_key("token-hash").unwrap();
    assert_ne!(*audit, *tokens);
    assert_eq!(*vault.barrier.derive_key("audit-hmac").unwrap(), *audit);

    vault.barrier.rotate_key().unwrap();
    assert_eq!(*vault.barrier.derive_key("audit-hmac").unwrap(), *audit);

    let vault = vault.reopen(BarrierOptions::default());
    vault.barrier.unseal(text(&shares[0])).unwrap();
    assert_eq!(*vault.barrier.derive_key("audit-hmac").unwrap(), *audit);
    assert_eq!(*vault.barrier.derive_key("token-hash").unwrap(), *tokens);

    // Another vault derives other keys.
    let other = Vault::new();
    other.barrier.init(1, 1).unwrap();
    assert_ne!(*other.barrier.derive_key("audit-hmac").unwrap(), *audit);
}

#[tokio::test]
async fn durable_shares_flushes() {
    let vault = Vault::new();
    let barrier = Arc::new(vault.barrier);
    barrier.init(1, 1).unwrap();
    const CALLERS: u64 = 32;
    let tasks: Vec<_> = (0..CALLERS)
        .map(|i| {
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.put(&format!("k{i}"), b"v").unwrap();
                barrier.durable().await
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let flushes = barrier.flush_count();
    assert!(
        (1..CALLERS / 4).contains(&flushes),
        "{CALLERS} callers ran {flushes} flushes"
    );
}

#[test]
fn debug_output_hides_shares_and_keys() {
    let vault = Vault::new();
    let shares = vault.barrier.init(3, 2).unwrap();
    let body = &text(&shares[0])[5..];
    let shown = format!("{:?} {:?} {:?}", shares[0], shares, vault.barrier);
    assert!(!shown.contains(body), "{shown}");
    assert!(shown.contains("UnsealShare([redacted])"), "{shown}");
    let one = format!("{:?}", shares[1]);
    assert_eq!(one, "UnsealShare([redacted])");
}

#[test]
fn options_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(SledBackend::open(dir.path()).unwrap());
    let error = Barrier::new(
        backend,
        BarrierOptions {
            max_encryptions_per_term: 0,
            ..BarrierOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(error, BarrierError::InvalidOptions(_)));
}

/// A barrier over a store taking batches of at most 3 operations and
/// `max_bytes` (see `TestSled::bounded`), unsealed, its batches so far
/// forgotten.
fn bounded(
    max_bytes: usize,
    fail_at: Option<usize>,
) -> (tempfile::TempDir, Arc<TestSled>, Barrier) {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(TestSled::bounded(dir.path(), 3, max_bytes, fail_at));
    let barrier = Barrier::new(backend.clone(), BarrierOptions::default()).unwrap();
    let shares = barrier.init(1, 1).unwrap();
    barrier.unseal(&shares[0].0).unwrap();
    backend.sizes.lock().unwrap().clear();
    (dir, backend, barrier)
}

#[test]
fn batches_in_chunks_fit_the_store_and_keep_their_order() {
    let (_d, backend, barrier) = bounded(1 << 20, None);
    let keys: Vec<String> = (0..8).map(|i| format!("t/k{i}")).collect();
    let ops: Vec<PlainOp<'_>> = keys.iter().map(|k| PlainOp::Put(k, b"v")).collect();
    barrier.batch_in_chunks(&ops).unwrap();
    assert_eq!(*backend.sizes.lock().unwrap(), [3, 3, 2]);
    assert_eq!(barrier.scan_keys("t/").unwrap().len(), 8);
    // Large values: split by bytes as well.
    backend.sizes.lock().unwrap().clear();
    let value = vec![b'x'; 1000];
    let ops: Vec<PlainOp<'_>> = keys.iter().map(|k| PlainOp::Put(k, &value)).collect();
    let (_d2, small, barrier2) = bounded(4000, None);
    barrier2.batch_in_chunks(&ops).unwrap();
    assert_eq!(*small.sizes.lock().unwrap(), [2, 2, 2, 2]);
}

#[test]
fn batches_in_chunks_cut_short_keep_the_chunks_before() {
    let (_d, backend, barrier) = bounded(1 << 20, Some(2));
    let keys: Vec<String> = (0..8).map(|i| format!("t/k{i}")).collect();
    let ops: Vec<PlainOp<'_>> = keys.iter().map(|k| PlainOp::Put(k, b"v")).collect();
    assert!(barrier.batch_in_chunks(&ops).is_err());
    assert_eq!(*backend.sizes.lock().unwrap(), [3, 3]);
    assert_eq!(barrier.scan_keys("t/").unwrap(), ["t/k0", "t/k1", "t/k2"]);
}

/// A conditional batch in chunks: the chunks before the last are written
/// as they come, the last only if the expected record is still the one
/// stamped; each chunk leaves room for the comparison's bytes.
#[test]
fn batches_in_chunks_if_check_the_last_chunk_only() {
    let (_d, backend, barrier) = bounded(1 << 20, None);
    barrier.put("t/anchor", b"v1").unwrap();
    let (_, stamp) = barrier.get_stamped("t/anchor").unwrap().unwrap();
    let keys: Vec<String> = (0..8).map(|i| format!("t/k{i}")).collect();
    let ops: Vec<PlainOp<'_>> = keys.iter().map(|k| PlainOp::Put(k, b"v")).collect();
    backend.sizes.lock().unwrap().clear();
    assert!(barrier
        .batch_in_chunks_if(&[("t/anchor", Some(&stamp))], &ops)
        .unwrap());
    assert_eq!(*backend.sizes.lock().unwrap(), [3, 3, 2]);
    assert_eq!(barrier.scan_keys("t/k").unwrap().len(), 8);

    // The anchor written again since: the last chunk is not written.
    barrier.put("t/anchor", b"v1").unwrap();
    let others: Vec<String> = (0..8).map(|i| format!("t/j{i}")).collect();
    let ops: Vec<PlainOp<'_>> = others.iter().map(|k| PlainOp::Put(k, b"v")).collect();
    assert!(!barrier
        .batch_in_chunks_if(&[("t/anchor", Some(&stamp))], &ops)
        .unwrap());
    assert_eq!(
        barrier.scan_keys("t/j").unwrap(),
        ["t/j0", "t/j1", "t/j2", "t/j3", "t/j4", "t/j5"]
    );
    // Nothing to write: only the check.
    assert!(!barrier
        .batch_in_chunks_if(&[("t/anchor", Some(&stamp))], &[])
        .unwrap());

    // The comparison's bytes count against each chunk.
    let value = vec![b'x'; 1000];
    let (_d2, small, barrier2) = bounded(4000, None);
    barrier2.put("t/anchor", &value).unwrap();
    let (_, stamp) = barrier2.get_stamped("t/anchor").unwrap().unwrap();
    let ops: Vec<PlainOp<'_>> = keys.iter().map(|k| PlainOp::Put(k, &value)).collect();
    small.sizes.lock().unwrap().clear();
    assert!(barrier2
        .batch_in_chunks_if(&[("t/anchor", Some(&stamp))], &ops)
        .unwrap());
    assert_eq!(*small.sizes.lock().unwrap(), [1; 8]);
}
