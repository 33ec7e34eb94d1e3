//! OIDC issuers in the store: who may change one that identities are bound
//! to, and which key set files it may name.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::RefCell;
use std::sync::Arc;

use super::*;
use crate::barrier::BarrierOptions;
use crate::storage::SledBackend;

const NOW: u64 = 1_700_000_000_000;

struct AnyPolicy;
impl PolicyCatalog for AnyPolicy {
    fn policy_exists(&self, _name: &str) -> Result<bool, IdentityError> {
        Ok(true)
    }
}

struct Fixture {
    _data: tempfile::TempDir,
    jwks: tempfile::TempDir,
    store: IdentityStore,
}

fn fixture() -> Fixture {
    let data = tempfile::tempdir().unwrap();
    let backend = SledBackend::open(data.path()).unwrap();
    let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
    let shares = barrier.init(1, 1).unwrap();
    barrier.unseal(shares[0].0.as_str()).unwrap();
    let jwks = tempfile::tempdir().unwrap();
    for file in ["operator.json", "other.json"] {
        std::fs::write(jwks.path().join(file), "{}").unwrap();
    }
    Fixture {
        _data: data,
        jwks,
        store: IdentityStore::new(Arc::new(barrier)),
    }
}

fn issuer(file: &str) -> IssuerRecord {
    IssuerRecord {
        name: "gh".into(),
        issuer_url: "https://token.actions.example".into(),
        jwks_file: file.into(),
        jwks_url: String::new(),
        audience: "keyward".into(),
    }
}

/// A `may_rebind` that records what it was asked and answers `allow`.
fn asked(
    log: &RefCell<Vec<Vec<String>>>,
    allow: bool,
) -> impl FnOnce(&[String]) -> Result<(), IdentityError> + '_ {
    move |policies: &[String]| {
        log.borrow_mut().push(policies.to_vec());
        if allow {
            Ok(())
        } else {
            Err(IdentityError::Invalid("denied".into()))
        }
    }
}

#[test]
fn changing_a_bound_issuer_needs_the_policies_of_its_identities() {
    let f = fixture();
    let dir = Some(f.jwks.path());
    let log = RefCell::new(Vec::new());
    f.store
        .put_issuer(issuer("operator.json"), dir, asked(&log, true))
        .unwrap();
    assert_eq!(
        *log.borrow(),
        vec![Vec::<String>::new()],
        "nobody is bound yet"
    );

    for (name, policies) in [
        ("deploy", vec!["prod-read", "app-read"]),
        ("lint", vec!["ci"]),
    ] {
        let mut new = NewIdentity {
            name: IdentityName::parse(name).unwrap(),
            kind: IdentityKind::CiRunner,
            owner: "platform".into(),
            description: String::new(),
            policies: policies.into_iter().map(str::to_owned).collect(),
            expires_at_ms: 0,
        };
        new.policies.sort();
        f.store.create(new, &AnyPolicy, NOW).unwrap();
        f.store
            .bind_oidc(
                &IdentityName::parse(name).unwrap(),
                "gh",
                vec![("sub".into(), name.into())],
            )
            .unwrap();
    }
    let bound = vec![
        "app-read".to_owned(),
        "ci".to_owned(),
        "prod-read".to_owned(),
    ];

    // Another key set: asked for every bound policy, refused, nothing stored.
    log.borrow_mut().clear();
    assert!(f
        .store
        .put_issuer(issuer("other.json"), dir, asked(&log, false))
        .is_err());
    assert_eq!(*log.borrow(), vec![bound.clone()]);
    let stored = f.store.issuer("gh").unwrap().unwrap();
    assert!(stored.jwks_file.ends_with("operator.json"));

    // Another audience or URL is the same change.
    let mut audience = issuer("operator.json");
    audience.audience = "evil".into();
    assert!(f
        .store
        .put_issuer(audience, dir, asked(&log, false))
        .is_err());
    let mut url = issuer("operator.json");
    url.issuer_url = "https://evil.example".into();
    assert!(f.store.put_issuer(url, dir, asked(&log, false)).is_err());
    assert_eq!(log.borrow().len(), 3);

    // The same issuer again changes nothing and asks nothing.
    log.borrow_mut().clear();
    f.store
        .put_issuer(issuer("operator.json"), dir, asked(&log, false))
        .unwrap();
    assert!(log.borrow().is_empty());

    // An issuer removed while bindings still name it: re-creating it is
    // checked against them just the same.
    f.store
        .barrier
        .delete(&format!("{ISSUER_PREFIX}gh"))
        .unwrap();
    assert!(f
        .store
        .put_issuer(issuer("other.json"), dir, asked(&log, false))
        .is_err());
    assert_eq!(*log.borrow(), vec![bound.clone()]);
    assert!(f.store.issuer("gh").unwrap().is_none());

    // Allowed: stored.
    f.store
        .put_issuer(issuer("other.json"), dir, asked(&log, true))
        .unwrap();
    let stored = f.store.issuer("gh").unwrap().unwrap();
    assert!(stored.jwks_file.ends_with("other.json"));
}

#[test]
fn jwks_files_must_be_regular_files_under_the_jwks_dir() {
    let f = fixture();
    let dir = Some(f.jwks.path());
    let anyone = |_: &[String]| Ok::<_, IdentityError>(());
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("keys.json"), "{}").unwrap();
    std::fs::create_dir(f.jwks.path().join("sub")).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(
        outside.path().join("keys.json"),
        f.jwks.path().join("link-out.json"),
    )
    .unwrap();

    let refused =
        |file: String, dir: Option<&Path>| match f.store.put_issuer(issuer(&file), dir, anyone) {
            Err(IdentityError::Invalid(message)) => message,
            other => panic!("{file} gave {other:?}"),
        };
    // No jwks_dir: every file is refused.
    let message = refused("operator.json".into(), None);
    assert!(message.contains("oidc.jwks_dir"), "{message}");
    for file in [
        "/etc/passwd".to_owned(),
        "../x".to_owned(),
        "sub/../../x".to_owned(),
        format!("{}/../operator.json", f.jwks.path().join("sub").display()),
        outside.path().join("keys.json").display().to_string(),
        "link-out.json".to_owned(),
    ] {
        let message = refused(file.clone(), dir);
        assert!(message.contains("oidc.jwks_dir"), "{file}: {message}");
        assert!(!message.contains("passwd"), "{message}");
    }
    // A folder under it is not a key set file.
    refused("sub".into(), dir);

    // Relative to the folder, or absolute under it; the real path is kept.
    let stored = f
        .store
        .put_issuer(issuer("operator.json"), dir, anyone)
        .unwrap();
    let real = std::fs::canonicalize(f.jwks.path().join("operator.json")).unwrap();
    assert_eq!(Path::new(&stored.jwks_file), real);
    let absolute = f.jwks.path().join("other.json").display().to_string();
    f.store.put_issuer(issuer(&absolute), dir, anyone).unwrap();
}
