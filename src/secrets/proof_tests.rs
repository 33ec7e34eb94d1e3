//! A write takes the proof of the check for its own capability and path.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use super::*;
use crate::barrier::BarrierOptions;
use crate::policy::{Policy, PolicySet};
use crate::storage::SledBackend;

fn store() -> (tempfile::TempDir, SecretStore) {
    let dir = tempfile::tempdir().unwrap();
    let backend = SledBackend::open(dir.path()).unwrap();
    let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
    let shares = barrier.init(1, 1).unwrap();
    barrier.unseal(&shares[0].0).unwrap();
    (
        dir,
        SecretStore::new(Arc::new(barrier), DataLimits::default()),
    )
}

/// A proof as a root token's check mints it.
fn proof(capability: Capability, resource: &str) -> Authorized {
    PolicySet::compile([&Policy::root()])
        .unwrap()
        .authorize(resource, capability)
        .unwrap()
}

fn put_request(path: &SecretPath) -> PutRequest {
    let mut data = crate::secrecy::SecretData::new();
    data.insert("password".into(), SecretBytes::from("initial"));
    PutRequest {
        path: path.clone(),
        data,
        cas: None,
        max_versions: None,
        owner: None,
        stage: Stage::Current,
    }
}

#[test]
fn writes_refuse_a_proof_for_another_path_or_capability() {
    let (_dir, store) = store();
    let path = SecretPath::parse("app/db").unwrap();
    for wrong in [
        proof(Capability::Read, "secret/app/db"),
        proof(Capability::Write, "secret/app"),
        proof(Capability::Write, "secret/app/db/x"),
        proof(Capability::Write, "secret/app/db2"),
        proof(Capability::Write, "rotation/app/db"),
    ] {
        assert!(matches!(
            store.put(&wrong, put_request(&path), 1),
            Err(SecretsError::WrongProof)
        ));
    }
    assert!(matches!(store.metadata(&path), Err(SecretsError::NotFound)));

    let write = proof(Capability::Write, "secret/app/db");
    assert_eq!(store.put(&write, put_request(&path), 1).unwrap(), 1);

    assert!(matches!(
        store.delete(&write, &path, None, 2),
        Err(SecretsError::WrongProof)
    ));
    let delete = proof(Capability::Delete, "secret/app/db");
    store.delete(&delete, &path, None, 2).unwrap();
    assert!(matches!(
        store.undelete(&delete, &path, 1, 3),
        Err(SecretsError::WrongProof)
    ));
    store.undelete(&write, &path, 1, 3).unwrap();
    assert!(matches!(
        store.destroy(&delete, &path, 1, 4),
        Err(SecretsError::WrongProof)
    ));
    store
        .destroy(&proof(Capability::Destroy, "secret/app/db"), &path, 1, 4)
        .unwrap();
    assert!(matches!(
        store.get(&path, Selector::Version(1)),
        Err(SecretsError::Destroyed(1))
    ));
}
