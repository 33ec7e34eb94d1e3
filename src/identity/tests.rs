//! Identity store and login logic against a real barrier on a temporary sled.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use super::login::{Login, LoginError, Refusal, SourceNet, Throttle, ThrottleConfig, ThrottleKey};
use super::*;
use crate::barrier::BarrierOptions;
use crate::oidc::JwksCache;
use crate::storage::SledBackend;

const NOW: u64 = 1_700_000_000_000;
const LOCAL: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

struct Fixture {
    _dir: tempfile::TempDir,
    store: IdentityStore,
    login: Login,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let backend = SledBackend::open(dir.path()).unwrap();
    let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
    let shares = barrier.init(1, 1).unwrap();
    barrier.unseal(shares[0].0.as_str()).unwrap();
    let barrier = Arc::new(barrier);
    Fixture {
        _dir: dir,
        store: IdentityStore::new(barrier),
        login: Login::new(JwksCache::files_only(), ThrottleConfig::default()),
    }
}

struct AllPolicies;
impl PolicyCatalog for AllPolicies {
    fn policy_exists(&self, name: &str) -> Result<bool, IdentityError> {
        Ok(name != "missing")
    }
}

/// Records the identities revoked (once per call) and models their tokens:
/// two live ones for an identity until it is revoked, two again after
/// `logged_in`.
#[derive(Default)]
struct Revocations(
    Mutex<Vec<String>>,
    AtomicU32,
    Mutex<std::collections::HashMap<String, u32>>,
);
impl Revocations {
    fn logged_in(&self, identity: &str) {
        self.2.lock().unwrap().insert(identity.to_owned(), 2);
    }
}
/// Records the identities whose certificates were revoked, a list per
/// call; each had one.
#[derive(Default)]
struct CertRevocations(Mutex<Vec<Vec<String>>>);
impl CertRevocations {
    fn calls(&self) -> Vec<Vec<String>> {
        self.0.lock().unwrap().clone()
    }
}
impl CertificateRevoker for CertRevocations {
    fn revoke_issued_for(&self, identities: &[&str], _now_ms: u64) -> Result<u32, IdentityError> {
        let names: Vec<String> = identities.iter().map(|n| n.to_string()).collect();
        self.0.lock().unwrap().push(names);
        Ok(u32::try_from(identities.len()).unwrap())
    }
}

/// Revokes tokens as [`Revocations`] does, but fails for `ci`.
#[derive(Default)]
struct FailsForCi(Revocations);
impl TokenRevoker for FailsForCi {
    fn revoke_identity(&self, identity: &str, now_ms: u64) -> Result<u32, IdentityError> {
        if identity == "ci" {
            return Err(IdentityError::Tokens("refused".into()));
        }
        self.0.revoke_identity(identity, now_ms)
    }
}

impl TokenRevoker for Revocations {
    fn revoke_identity(&self, identity: &str, _now_ms: u64) -> Result<u32, IdentityError> {
        self.0.lock().unwrap().push(identity.to_owned());
        self.1.fetch_add(1, Ordering::SeqCst);
        let mut live = self.2.lock().unwrap();
        Ok(std::mem::take(live.entry(identity.to_owned()).or_insert(2)))
    }
}

fn new(name: &str) -> NewIdentity {
    NewIdentity {
        name: IdentityName::parse(name).unwrap(),
        kind: IdentityKind::CiRunner,
        owner: "platform".into(),
        description: "builds".into(),
        policies: vec!["app-read".into()],
        expires_at_ms: 0,
    }
}

/// An update that sets the expiry and nothing else.
fn expiring_at(ms: u64) -> IdentityUpdate {
    IdentityUpdate {
        expires_at_ms: Some(ms),
        ..Default::default()
    }
}

fn name(text: &str) -> IdentityName {
    IdentityName::parse(text).unwrap()
}

#[test]
fn names_and_kinds_are_parsed() {
    for ok in ["ci", "ci-runner.prod_1", "A1"] {
        assert!(IdentityName::parse(ok).is_ok(), "{ok}");
    }
    for bad in ["", "root", "-x", ".x", "a/b", "a b", &"x".repeat(129)] {
        assert!(IdentityName::parse(bad).is_err(), "{bad:?}");
    }
    for kind in IdentityKind::ALL {
        assert_eq!(IdentityKind::parse(kind.as_str()).unwrap(), kind);
    }
    assert!(matches!(
        IdentityKind::parse("robot"),
        Err(IdentityError::InvalidKind(_))
    ));
}

#[test]
fn subjects_normalise_to_a_sorted_set() {
    let canonical = |t: &str| Dn::parse(t).unwrap().canonical();
    assert_eq!(canonical("CN=ci, o=acme"), "CN=ci,O=acme");
    assert_eq!(canonical("O=acme,CN=ci"), "CN=ci,O=acme");
    assert_eq!(canonical("CN=a\\,b"), "CN=a\\,b");
    for bad in ["", "CN", "CN=", "=x"] {
        assert!(Dn::parse(bad).is_err(), "{bad:?}");
    }
    assert!(check_spiffe_id("spiffe://acme.test/ci").is_ok());
    assert!(check_spiffe_id("https://acme.test/ci").is_err());
    assert!(check_spiffe_id("spiffe://").is_err());
}

#[test]
fn create_get_list_update_and_unknown_policies() {
    let f = fixture();
    let created = f.store.create(new("ci"), &AllPolicies, NOW).unwrap();
    assert_eq!(created.role_id.len(), 32);
    assert!(matches!(
        f.store.create(new("ci"), &AllPolicies, NOW),
        Err(IdentityError::AlreadyExists(_))
    ));
    let mut bad = new("other");
    bad.policies = vec!["missing".into()];
    assert!(matches!(
        f.store.create(bad, &AllPolicies, NOW),
        Err(IdentityError::UnknownPolicy(_))
    ));
    let mut bot = new("bot");
    bot.kind = IdentityKind::Bot;
    bot.owner = String::new();
    f.store.create(bot, &AllPolicies, NOW).unwrap();

    let none = |_: &str| None;
    let all = f.store.list(&ListFilter::default(), &none, NOW).unwrap();
    assert_eq!(all.len(), 2);
    let unowned = ListFilter {
        no_owner: true,
        ..Default::default()
    };
    let names: Vec<String> = f
        .store
        .list(&unowned, &none, NOW)
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, vec!["bot"]);
    let bots = ListFilter {
        kind: Some(IdentityKind::CiRunner),
        ..Default::default()
    };
    assert_eq!(f.store.list(&bots, &none, NOW).unwrap().len(), 1);
    let dormant = ListFilter {
        dormant_ms: 1000,
        ..Default::default()
    };
    let used = |n: &str| (n == "ci").then_some(NOW + 5000);
    let names: Vec<String> = f
        .store
        .list(&dormant, &used, NOW + 5000)
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, vec!["bot"], "ci was used just now");

    let revoked = Revocations::default();
    let updated = f
        .store
        .update(
            &name("ci"),
            IdentityUpdate {
                owner: Some("sre".into()),
                ..Default::default()
            },
            &AllPolicies,
            &revoked,
            NOW,
        )
        .unwrap();
    assert_eq!(
        (updated.owner.as_str(), updated.description.as_str()),
        ("sre", "builds")
    );
    assert!(revoked.0.lock().unwrap().is_empty());
    f.store
        .update(
            &name("ci"),
            IdentityUpdate {
                policies: Some(vec!["narrow".into()]),
                ..Default::default()
            },
            &AllPolicies,
            &revoked,
            NOW,
        )
        .unwrap();
    assert_eq!(
        *revoked.0.lock().unwrap(),
        vec!["ci", "ci"],
        "narrowed policies revoke, before the record is written and after"
    );
}

#[test]
fn disable_expire_and_delete_revoke_tokens() {
    let f = fixture();
    let revoked = Revocations::default();
    f.store.create(new("ci"), &AllPolicies, NOW).unwrap();
    let (rec, n, _) = f
        .store
        .set_disabled(&name("ci"), true, false, &revoked, NOW)
        .unwrap();
    assert!(rec.disabled);
    assert_eq!(n, 2);
    let (rec, n, _) = f
        .store
        .set_disabled(&name("ci"), false, false, &revoked, NOW)
        .unwrap();
    assert!(!rec.disabled);
    assert_eq!(n, 0);

    let mut short = new("short");
    short.expires_at_ms = NOW + 1000;
    f.store.create(short, &AllPolicies, NOW).unwrap();
    let certs = CertRevocations::default();
    let swept = |at| f.store.sweep_expired(&revoked, &certs, at, false).unwrap();
    assert_eq!(swept(NOW), Swept::default());
    assert_eq!(
        swept(NOW + 1000),
        Swept {
            tokens: 2,
            certificates: 1,
            failed: 0
        }
    );
    assert_eq!(swept(NOW + 2000), Swept::default(), "once");
    assert_eq!(certs.calls(), vec![vec!["short"]]);

    let sid = f
        .store
        .create_secret_id(&name("ci"), SecretIdSpec::default(), NOW)
        .unwrap();
    revoked.logged_in("ci");
    assert_eq!(f.store.delete(&name("ci"), &revoked, NOW).unwrap(), 2);
    assert!(f.store.get("ci").unwrap().is_none());
    assert!(f.store.by_role_id(&sid.role_id).unwrap().is_none());
    assert!(f.store.secret_ids().unwrap().is_empty());
    assert_eq!(
        *revoked.0.lock().unwrap(),
        vec!["ci", "ci", "short", "ci", "ci"],
        "disable (before and after), expiry, delete (before and after)"
    );
}

#[test]
fn secret_ids_are_hashed_and_spent() {
    let f = fixture();
    f.store.create(new("ci"), &AllPolicies, NOW).unwrap();
    let sid = f
        .store
        .create_secret_id(
            &name("ci"),
            SecretIdSpec {
                ttl_ms: 60_000,
                uses: 2,
                cidrs: vec!["127.0.0.0/8".parse().unwrap()],
            },
            NOW,
        )
        .unwrap();
    let text = sid.secret_id.expose().to_owned();
    assert!(text.starts_with("kws_") && text.len() == 47);
    assert!(!format!("{:?}", sid.secret_id).contains(&text));
    let stored = f.store.secret_ids().unwrap();
    assert_eq!(stored.len(), 1);
    assert!(!format!("{stored:?}").contains(&text[4..]));

    let other: Option<IpAddr> = Some("10.1.2.3".parse().unwrap());
    assert!(f
        .store
        .spend_secret_id(&sid.role_id, &text, other, NOW)
        .unwrap()
        .is_none());
    assert!(f
        .store
        .spend_secret_id("0".repeat(32).as_str(), &text, LOCAL, NOW)
        .unwrap()
        .is_none());
    assert!(f
        .store
        .spend_secret_id(&sid.role_id, &text, LOCAL, NOW)
        .unwrap()
        .is_some());
    assert!(f
        .store
        .spend_secret_id(&sid.role_id, &text, LOCAL, NOW)
        .unwrap()
        .is_some());
    assert!(
        f.store
            .spend_secret_id(&sid.role_id, &text, LOCAL, NOW)
            .unwrap()
            .is_none(),
        "two uses only"
    );
    assert!(f.store.secret_ids().unwrap().is_empty());

    let sid = f
        .store
        .create_secret_id(
            &name("ci"),
            SecretIdSpec {
                ttl_ms: 1000,
                ..Default::default()
            },
            NOW,
        )
        .unwrap();
    assert!(f
        .store
        .spend_secret_id(&sid.role_id, sid.secret_id.expose(), LOCAL, NOW + 1000)
        .unwrap()
        .is_none());
}

#[test]
fn approle_login_checks_the_identity_and_throttles() {
    let f = fixture();
    let revoked = Revocations::default();
    f.store.create(new("ci"), &AllPolicies, NOW).unwrap();
    let sid = f
        .store
        .create_secret_id(&name("ci"), SecretIdSpec::default(), NOW)
        .unwrap();
    let grant = f
        .login
        .approle(&f.store, &sid.role_id, sid.secret_id.expose(), LOCAL, NOW)
        .unwrap();
    assert_eq!(grant.identity, "ci");
    assert_eq!(grant.policies, vec!["app-read"]);
    assert_eq!(grant.hard_expiry_ms, None);
    assert_eq!(f.store.get("ci").unwrap().unwrap().last_login_ms, NOW);

    f.store
        .set_disabled(&name("ci"), true, true, &revoked, NOW)
        .unwrap();
    assert!(matches!(
        f.login
            .approle(&f.store, &sid.role_id, sid.secret_id.expose(), LOCAL, NOW),
        Err(LoginError::Invalid)
    ));
    f.store
        .set_disabled(&name("ci"), false, false, &revoked, NOW)
        .unwrap();

    let wrong = SecretIdText::generate().unwrap();
    for _ in 0..4 {
        assert!(matches!(
            f.login
                .approle(&f.store, &sid.role_id, wrong.expose(), LOCAL, NOW),
            Err(LoginError::Invalid)
        ));
    }
    assert!(matches!(
        f.login
            .approle(&f.store, &sid.role_id, sid.secret_id.expose(), LOCAL, NOW),
        Err(LoginError::Locked(30))
    ));
    assert!(f
        .login
        .approle(
            &f.store,
            &sid.role_id,
            sid.secret_id.expose(),
            LOCAL,
            NOW + 30_000
        )
        .is_ok());
    let failures = f.login.failed_logins();
    assert_eq!(failures.len(), 1);
    assert_eq!(
        (failures[0].identity.as_str(), failures[0].count),
        ("ci", 6),
        "1 disabled + 4 wrong + 1 locked out"
    );
}

#[test]
fn throttle_backs_off_doubling_and_forgets_old_failures() {
    let t = Throttle::new(ThrottleConfig {
        backoff_ms: 1000,
        max_backoff_ms: 4000,
        window_ms: 10_000,
        ..Default::default()
    });
    let key = || vec![(ThrottleKey::Source(SourceNet::Unknown), 2)];
    let fail = |now| t.admit(key(), now).unwrap().failed(now);
    fail(0);
    assert!(t.admit(key(), 0).is_ok());
    fail(0);
    assert_eq!(t.admit(key(), 0).unwrap_err(), Refusal::Locked(1));
    fail(1000);
    assert_eq!(t.admit(key(), 1000).unwrap_err(), Refusal::Locked(2));
    fail(3000);
    fail(7000);
    assert_eq!(
        t.admit(key(), 7000).unwrap_err(),
        Refusal::Locked(4),
        "capped"
    );
    fail(100_000);
    assert!(
        t.admit(key(), 100_000).is_ok(),
        "window passed: counts afresh"
    );
}

#[test]
fn throttle_admits_no_more_attempts_than_failures_left() {
    let t = Throttle::new(ThrottleConfig::default());
    let a = SourceNet::of(Some("192.0.2.1".parse().unwrap()));
    let key = || vec![(ThrottleKey::role_source("r", a), 3)];
    // Three attempts in flight at once: a fourth is refused before any of
    // them has failed (check and count are one step).
    let held: Vec<_> = (0..3).map(|_| t.admit(key(), NOW).unwrap()).collect();
    // Refused as busy, not as failed: none of them has failed yet.
    assert_eq!(t.admit(key(), NOW).unwrap_err(), Refusal::Busy);
    // One ends without a verdict (a server fault): its place is free again.
    let mut held = held.into_iter();
    drop(held.next());
    let again = t.admit(key(), NOW).unwrap();
    for attempt in held.chain([again]) {
        attempt.failed(NOW);
    }
    assert!(
        matches!(t.admit(key(), NOW), Err(Refusal::Locked(_))),
        "three failures: locked"
    );
    // Another source, and the same address as IPv4-mapped IPv6 is the same.
    let b = SourceNet::of(Some("192.0.2.2".parse().unwrap()));
    assert!(t
        .admit(vec![(ThrottleKey::role_source("r", b), 3)], NOW)
        .is_ok());
    let mapped = SourceNet::of(Some("::ffff:192.0.2.1".parse().unwrap()));
    assert_eq!(mapped, a);
    // IPv6 counts per /64.
    let v6 = |t: &str| SourceNet::of(Some(t.parse().unwrap()));
    assert_eq!(v6("2001:db8:1:2::1"), v6("2001:db8:1:2:ffff::9"));
    assert_ne!(v6("2001:db8:1:2::1"), v6("2001:db8:1:3::1"));
}

#[test]
fn throttle_memory_is_bounded_by_evicting_the_oldest() {
    let t = Throttle::new(ThrottleConfig {
        max_keys: 4,
        ..Default::default()
    });
    let src = |i: u8| SourceNet::of(Some(std::net::Ipv4Addr::new(10, 0, 0, i).into()));
    for i in 0..3 {
        t.admit(vec![(ThrottleKey::Source(src(i)), 1)], NOW + u64::from(i))
            .unwrap()
            .failed(NOW + u64::from(i));
    }
    assert!(t
        .admit(vec![(ThrottleKey::Source(src(0)), 1)], NOW + 5)
        .is_err());
    for i in 10..100 {
        drop(t.admit(vec![(ThrottleKey::Source(src(i)), 1)], NOW + u64::from(i)));
        assert!(t.tracked() <= 4);
    }
    assert!(
        t.admit(vec![(ThrottleKey::Source(src(0)), 1)], NOW + 200)
            .is_ok(),
        "the oldest entry was forgotten"
    );
}

/// A delete cut short after its certificate index went (chunks on etcd)
/// may see the certificate bound to another identity before it is run
/// again: running it again leaves that binding alone.
#[test]
fn a_delete_run_again_leaves_a_certificate_bound_since_to_another() {
    let f = fixture();
    let revoked = Revocations::default();
    f.store.create(new("ci"), &AllPolicies, NOW).unwrap();
    f.store.create(new("web"), &AllPolicies, NOW).unwrap();
    let ci = f
        .store
        .bind_cert(&name("ci"), None, Some("spiffe://acme.test/job"))
        .unwrap();
    // The first run's chunk that deleted the index entry, alone.
    f.store
        .barrier
        .delete(&cert_key(&ci.cert_bindings[0]))
        .unwrap();
    f.store
        .bind_cert(&name("web"), None, Some("spiffe://acme.test/job"))
        .unwrap();
    f.store.delete(&name("ci"), &revoked, NOW).unwrap();
    assert!(f.store.get("ci").unwrap().is_none());
    let found = f
        .store
        .by_cert(None, &["spiffe://acme.test/job".into()])
        .unwrap()
        .expect("still bound");
    assert_eq!(found.name, "web");
}

/// Two identity stores ("nodes") over one shared store, identity `ci`
/// created.
fn two_nodes() -> (tempfile::TempDir, Arc<IdentityStore>, Arc<IdentityStore>) {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = crate::storage::test_sled::two_barriers(dir.path());
    two_nodes_over(dir, one, two)
}

fn two_nodes_over(
    dir: tempfile::TempDir,
    one: Barrier,
    two: Barrier,
) -> (tempfile::TempDir, Arc<IdentityStore>, Arc<IdentityStore>) {
    let (one, two) = (
        Arc::new(IdentityStore::new(Arc::new(one))),
        Arc::new(IdentityStore::new(Arc::new(two))),
    );
    one.create(new("ci"), &AllPolicies, NOW).unwrap();
    (dir, one, two)
}

/// `two` disables `ci` the next time `one` is between its read of a
/// record and its write.
fn disable_in_the_window(one: &IdentityStore, two: &Arc<IdentityStore>) {
    let other = two.clone();
    one.before_record_write.set(move || {
        other
            .set_disabled(&name("ci"), true, false, &Revocations::default(), NOW)
            .unwrap();
    });
}

/// On a shared store a disable on another node lands between a login's
/// read of the record and its write of the login time: the login never
/// writes back the enabled record it read (which re-enabled the identity);
/// it notes the time on the record read again.
#[test]
fn a_login_never_writes_back_a_record_disabled_meanwhile_on_another_node() {
    let (_d, one, two) = two_nodes();
    let seen = one.get("ci").unwrap().unwrap();
    disable_in_the_window(&one, &two);
    one.record_login(&seen, NOW + 5_000).unwrap();
    assert!(!one.before_record_write.is_set(), "the hook ran");
    let record = two.get("ci").unwrap().unwrap();
    assert!(record.disabled);
    assert_eq!(record.last_login_ms, NOW + 5_000);
}

/// An update read before a disable on another node is applied to the
/// disabled record: the identity stays disabled (the kill switch is not
/// undone) and the update is not lost.
#[test]
fn an_update_read_before_a_disable_on_another_node_keeps_it_disabled() {
    let (_d, one, two) = two_nodes();
    disable_in_the_window(&one, &two);
    let revoked = Revocations::default();
    let updated = one
        .update(
            &name("ci"),
            IdentityUpdate {
                owner: Some("sre".into()),
                policies: Some(vec!["narrow".into()]),
                ..Default::default()
            },
            &AllPolicies,
            &revoked,
            NOW,
        )
        .unwrap();
    assert!(!one.before_record_write.is_set(), "the hook ran");
    assert!(updated.disabled);
    let stored = two.get("ci").unwrap().unwrap();
    assert!(stored.disabled, "the disable was undone");
    assert_eq!(
        (stored.owner.as_str(), stored.policies.as_slice()),
        ("sre", ["narrow".to_owned()].as_slice())
    );
    // Narrowed: revoked before the write (each try) and after it.
    assert_eq!(*revoked.0.lock().unwrap(), ["ci", "ci", "ci"]);
}

#[test]
fn metadata_set_after_a_disable_on_another_node_keeps_it_disabled() {
    let (_d, one, two) = two_nodes();
    disable_in_the_window(&one, &two);
    let set = [("team".to_owned(), "payments".to_owned())].into();
    one.set_metadata(&name("ci"), set, &[]).unwrap();
    assert!(!one.before_record_write.is_set(), "the hook ran");
    let stored = two.get("ci").unwrap().unwrap();
    assert!(stored.disabled, "the disable was undone");
    assert_eq!(stored.metadata["team"], "payments");
}

#[test]
fn a_certificate_bound_after_a_disable_on_another_node_keeps_it_disabled() {
    let (_d, one, two) = two_nodes();
    disable_in_the_window(&one, &two);
    one.bind_cert(&name("ci"), None, Some("spiffe://acme.test/job"))
        .unwrap();
    assert!(!one.before_record_write.is_set(), "the hook ran");
    let stored = two.get("ci").unwrap().unwrap();
    assert!(stored.disabled, "the disable was undone");
    assert_eq!(stored.cert_bindings[0].spiffe_id, "spiffe://acme.test/job");
    let holder = two
        .by_cert(None, &["spiffe://acme.test/job".into()])
        .unwrap()
        .unwrap();
    assert_eq!(holder.name, "ci");
}

#[test]
fn a_binding_removed_after_a_disable_on_another_node_keeps_it_disabled() {
    let (_d, one, two) = two_nodes();
    one.bind_cert(&name("ci"), None, Some("spiffe://acme.test/job"))
        .unwrap();
    disable_in_the_window(&one, &two);
    one.unbind(
        &name("ci"),
        &Unbind::CertSpiffe("spiffe://acme.test/job".into()),
    )
    .unwrap();
    assert!(!one.before_record_write.is_set(), "the hook ran");
    let stored = two.get("ci").unwrap().unwrap();
    assert!(stored.disabled, "the disable was undone");
    assert!(stored.cert_bindings.is_empty());
    assert!(two
        .by_cert(None, &["spiffe://acme.test/job".into()])
        .unwrap()
        .is_none());
}

/// A disable whose secret-ids take several batches (as on etcd) meets a
/// change of the record on another node before its last batch: the
/// batches before it are kept, the record is read again and written
/// disabled, with the other node's change and the last secret-id gone.
#[test]
fn a_disable_in_batches_read_before_a_change_on_another_node_is_applied_again() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(crate::storage::test_sled::TestSled::shared_bounded(
        dir.path(),
        3,
        usize::MAX,
    ));
    let (one, two) = crate::storage::test_sled::two_barriers_over(backend.clone());
    let (_d, one, two) = two_nodes_over(dir, one, two);
    let sids: Vec<NewSecretId> = (0..5)
        .map(|i| {
            one.create_secret_id(&name("ci"), SecretIdSpec::default(), NOW + i)
                .unwrap()
        })
        .collect();
    let other = two.clone();
    one.before_record_write.set(move || {
        let set = [("team".to_owned(), "payments".to_owned())].into();
        other.set_metadata(&name("ci"), set, &[]).unwrap();
    });
    backend.sizes.lock().unwrap().clear();
    let (record, _, gone) = one
        .set_disabled(&name("ci"), true, false, &Revocations::default(), NOW)
        .unwrap();
    assert!(!one.before_record_write.is_set(), "the hook ran");
    let stored = two.get("ci").unwrap().unwrap();
    assert_eq!(
        stored.metadata.get("team").map(String::as_str),
        Some("payments"),
        "the change was undone"
    );
    assert!(stored.disabled);
    assert!(record.disabled);
    assert_eq!(gone, 5);
    // The other node's write; 10 keys and the record in batches of 3, the
    // last refused; then the last index entry (and its record's key, gone
    // already) with the record.
    assert_eq!(*backend.sizes.lock().unwrap(), [1, 3, 3, 3, 2, 3]);
    assert!(one
        .barrier
        .scan_keys("identities/sid-of/")
        .unwrap()
        .is_empty());
    for sid in &sids {
        assert!(two
            .spend_secret_id(&sid.role_id, sid.secret_id.expose(), LOCAL, NOW)
            .unwrap()
            .is_none());
    }
}

/// Two nodes bind one certificate to two identities at once: one of them
/// is refused, and the index names the identity whose record holds it.
#[test]
fn a_certificate_bound_on_two_nodes_at_once_goes_to_one_identity() {
    let (_d, one, two) = two_nodes();
    one.create(new("web"), &AllPolicies, NOW).unwrap();
    let other = two.clone();
    one.before_record_write.set(move || {
        other
            .bind_cert(&name("web"), None, Some("spiffe://acme.test/job"))
            .unwrap();
    });
    let refused = one.bind_cert(&name("ci"), None, Some("spiffe://acme.test/job"));
    assert!(!one.before_record_write.is_set(), "the hook ran");
    assert!(
        matches!(&refused, Err(IdentityError::BindingTaken(holder)) if holder == "web"),
        "{:?}",
        refused.map(|r| r.name)
    );
    assert!(two.get("ci").unwrap().unwrap().cert_bindings.is_empty());
    let holder = two
        .by_cert(None, &["spiffe://acme.test/job".into()])
        .unwrap()
        .unwrap();
    assert_eq!(holder.name, "web");
}

/// A delete that read the record before another node bound a certificate
/// to it deletes that binding's index entry too: the certificate is free
/// for another identity.
#[test]
fn a_delete_read_before_a_binding_on_another_node_deletes_it_too() {
    let (_d, one, two) = two_nodes();
    one.create(new("web"), &AllPolicies, NOW).unwrap();
    let other = two.clone();
    one.before_record_write.set(move || {
        other
            .bind_cert(&name("ci"), None, Some("spiffe://acme.test/job"))
            .unwrap();
    });
    one.delete(&name("ci"), &Revocations::default(), NOW)
        .unwrap();
    assert!(!one.before_record_write.is_set(), "the hook ran");
    assert!(two.get("ci").unwrap().is_none());
    assert!(one
        .barrier
        .scan_keys("identities/cert/")
        .unwrap()
        .is_empty());
    two.bind_cert(&name("web"), None, Some("spiffe://acme.test/job"))
        .unwrap();
}

/// Tokens carry their identity's expiry as it was when they were issued: an
/// update that brings it forward (from none, or to sooner) revokes them, so
/// none lives, is renewed or has a child past the new expiry. One that moves
/// it later, or sets it to the same, does not. An expiry set in the past is
/// left unhandled, so that the sweep takes back the certificates too.
#[test]
fn an_expiry_brought_forward_revokes_the_identitys_tokens() {
    let f = fixture();
    f.store.create(new("ci"), &AllPolicies, NOW).unwrap();
    let revocations_after = |update| {
        let revoked = Revocations::default();
        f.store
            .update(&name("ci"), update, &AllPolicies, &revoked, NOW)
            .unwrap();
        revoked.1.load(Ordering::SeqCst)
    };
    assert!(
        revocations_after(expiring_at(NOW + 3_600_000)) > 0,
        "from none"
    );
    assert!(
        revocations_after(expiring_at(NOW + 60_000)) > 0,
        "to sooner"
    );
    assert_eq!(revocations_after(expiring_at(NOW + 60_000)), 0, "the same");
    assert!(
        revocations_after(expiring_at(NOW + 59_500)) > 0,
        "sooner by less than a second (steps must not add up)"
    );
    assert_eq!(revocations_after(expiring_at(NOW + 7_200_000)), 0, "later");
    assert_eq!(revocations_after(expiring_at(0)), 0, "never");
    assert!(revocations_after(expiring_at(NOW - 1)) > 0, "passed");
    let record = f.store.get("ci").unwrap().unwrap();
    assert!(!record.expiry_handled, "left to the sweep");
    let certs = CertRevocations::default();
    f.store
        .sweep_expired(&Revocations::default(), &certs, NOW, false)
        .unwrap();
    assert_eq!(certs.calls(), vec![vec!["ci"]]);
}

/// An identity the sweep fails for is counted and left for the next sweep
/// (not marked handled); the others are swept, their certificates in one
/// call. The first sweep of a process (`catch_up`) also revokes the
/// certificates of identities handled before (versions before 0.6.15 left
/// them valid).
#[test]
fn the_expiry_sweep_goes_on_past_a_failure_and_catches_up_on_certificates() {
    let f = fixture();
    let expiring = |n| {
        let mut short = new(n);
        short.expires_at_ms = NOW + 1000;
        f.store.create(short, &AllPolicies, NOW).unwrap();
    };
    // "old" was handled by an older version: its certificates are valid.
    expiring("old");
    f.store
        .sweep_expired(
            &Revocations::default(),
            &CertRevocations::default(),
            NOW + 1000,
            false,
        )
        .unwrap();
    expiring("ci");
    expiring("web");
    let certs = CertRevocations::default();

    let swept = f
        .store
        .sweep_expired(&FailsForCi::default(), &certs, NOW + 2000, false)
        .unwrap();
    assert_eq!(swept.failed, 1);
    assert_eq!(
        certs.calls(),
        vec![vec!["web"]],
        "one call, without the failed one"
    );
    assert!(
        !f.store.get("ci").unwrap().unwrap().expiry_handled,
        "tried again later"
    );
    assert!(f.store.get("web").unwrap().unwrap().expiry_handled);

    let certs = CertRevocations::default();
    let swept = f
        .store
        .sweep_expired(&Revocations::default(), &certs, NOW + 3000, true)
        .unwrap();
    assert_eq!(swept.failed, 0);
    let mut called = certs.calls().concat();
    called.sort();
    assert_eq!(called, vec!["ci", "old", "web"], "every expired identity");
    assert_eq!(certs.calls().len(), 1);
}

/// The expiry sweep read an expired identity before another node moved
/// its expiry: the move is kept (the sweep marked the old record handled
/// and wrote back the old expiry).
#[test]
fn an_expiry_moved_on_another_node_during_a_sweep_is_kept() {
    let (_d, one, two) = two_nodes();
    let revoked = Revocations::default();
    one.update(
        &name("ci"),
        expiring_at(NOW + 1_000),
        &AllPolicies,
        &revoked,
        NOW,
    )
    .unwrap();
    let other = two.clone();
    one.before_record_write.set(move || {
        other
            .update(
                &name("ci"),
                expiring_at(NOW + 3_600_000),
                &AllPolicies,
                &Revocations::default(),
                NOW + 2_000,
            )
            .unwrap();
    });
    one.sweep_expired(&revoked, &CertRevocations::default(), NOW + 2_000, false)
        .unwrap();
    assert!(!one.before_record_write.is_set(), "the hook ran");
    let stored = two.get("ci").unwrap().unwrap();
    assert_eq!(stored.expires_at_ms, NOW + 3_600_000);
    assert!(!stored.expiry_handled);
}

/// Has `two` change `ci`'s metadata each time `one` is between its read
/// and its write, `times` times; counts the runs.
fn change_before_each_try(
    one: &Arc<IdentityStore>,
    two: &Arc<IdentityStore>,
    times: usize,
    runs: Arc<std::sync::atomic::AtomicUsize>,
) {
    let (one_, two_) = (one.clone(), two.clone());
    one.before_record_write.set(move || {
        let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
        let set = [("run".to_owned(), run.to_string())].into();
        two_.set_metadata(&name("ci"), set, &[]).unwrap();
        if run < times {
            change_before_each_try(&one_, &two_, times, runs);
        }
    });
}

#[test]
fn a_change_read_again_after_each_change_on_another_node_is_applied() {
    let (_d, one, two) = two_nodes();
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    change_before_each_try(&one, &two, RECORD_TRIES - 1, runs.clone());
    let disabled = one.set_disabled(&name("ci"), true, false, &Revocations::default(), NOW);
    assert!(disabled.is_ok());
    assert_eq!(runs.load(Ordering::SeqCst), RECORD_TRIES - 1);
    let stored = two.get("ci").unwrap().unwrap();
    assert!(stored.disabled);
    assert_eq!(stored.metadata["run"], (RECORD_TRIES - 1).to_string());
}

/// The kill switch outlasts a writer: a disable whose record another node
/// changes before each of ten tries (more than any other change would take)
/// is still written. Before, three lost tries refused it, so a caller with
/// `write` on the identity who kept changing its description on another
/// node could keep it enabled.
#[test]
fn a_disable_outlasts_changes_that_would_refuse_another_change() {
    let (_d, one, two) = two_nodes();
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    change_before_each_try(&one, &two, 10, runs.clone());
    let disabled = one.set_disabled(&name("ci"), true, false, &Revocations::default(), NOW);
    assert!(disabled.is_ok(), "{:?}", disabled.map(|r| r.0.name));
    assert_eq!(runs.load(Ordering::SeqCst), 10);
    assert!(two.get("ci").unwrap().unwrap().disabled);
    const { assert!(10 > RECORD_TRIES && 10 < REVOKING_TRIES) };
}

/// An identity past its expiry gets no new secret-id (its logins fail
/// already; the expiry sweep revokes its tokens but leaves the record as
/// it is); one with its expiry moved on gets one again.
#[test]
fn an_expired_identity_gets_no_secret_id() {
    let f = fixture();
    let mut short = new("short");
    short.expires_at_ms = NOW + 1_000;
    f.store.create(short, &AllPolicies, NOW).unwrap();
    assert!(f
        .store
        .create_secret_id(&name("short"), SecretIdSpec::default(), NOW + 999)
        .is_ok());
    let late = f
        .store
        .create_secret_id(&name("short"), SecretIdSpec::default(), NOW + 1_000);
    assert!(
        matches!(late, Err(IdentityError::Expired(ref n)) if n == "short"),
        "{:?}",
        late.map(|m| m.expires_at_ms)
    );
    assert_eq!(
        f.store.list_secret_ids(&name("short"), NOW).unwrap().len(),
        1
    );
    f.store
        .update(
            &name("short"),
            expiring_at(NOW + 60_000),
            &AllPolicies,
            &Revocations::default(),
            NOW + 1_000,
        )
        .unwrap();
    assert!(f
        .store
        .create_secret_id(&name("short"), SecretIdSpec::default(), NOW + 1_000)
        .is_ok());
}

/// Makes a secret-id for `ci` on node one at `now_ms` while node two runs
/// `change` between its write and its second read of the record; the
/// secret-id must be taken back: what is left of `ci`'s secret-ids (none
/// expected) and the refusal.
fn secret_id_made_while(
    now_ms: u64,
    change: impl FnOnce(&IdentityStore) + Send + 'static,
) -> (usize, Result<NewSecretId, IdentityError>) {
    let (_d, one, two) = two_nodes();
    one.before_record_write.set(move || change(&two));
    let made = one.create_secret_id(&name("ci"), SecretIdSpec::default(), now_ms);
    (one.list_secret_ids(&name("ci"), NOW).unwrap().len(), made)
}

/// An expiry moved into the past on another node between the secret-id's
/// check and its write takes the secret-id back.
#[test]
fn a_secret_id_made_while_the_expiry_passes_on_another_node_is_refused() {
    let (left, made) = secret_id_made_while(NOW + 2_000, |two| {
        two.update(
            &name("ci"),
            expiring_at(NOW + 1_500),
            &AllPolicies,
            &Revocations::default(),
            NOW,
        )
        .unwrap();
    });
    assert!(
        matches!(made, Err(IdentityError::Expired(_))),
        "{:?}",
        made.map(|m| m.expires_at_ms)
    );
    assert_eq!(left, 0);
}

/// A secret-id made while another node disables the identity: the disable
/// wins (its write came first), so the secret-id is refused, and none is
/// left. Before, it was written after the disable had deleted the others,
/// and outlived it.
#[test]
fn a_secret_id_made_during_a_disable_on_another_node_is_refused() {
    let (left, made) = secret_id_made_while(NOW, |two| {
        two.set_disabled(&name("ci"), true, false, &Revocations::default(), NOW)
            .unwrap();
    });
    assert!(
        matches!(made, Err(IdentityError::Disabled(_))),
        "{:?}",
        made.map(|m| m.expires_at_ms)
    );
    assert_eq!(left, 0);
}

/// A disable whose record another node changes by making a secret-id in
/// between reads again and deletes that secret-id too.
#[test]
fn a_disable_deletes_a_secret_id_made_on_another_node_meanwhile() {
    let (_d, one, two) = two_nodes();
    let two_ = two.clone();
    one.before_record_write.set(move || {
        two_.create_secret_id(&name("ci"), SecretIdSpec::default(), NOW)
            .unwrap();
    });
    one.set_disabled(&name("ci"), true, false, &Revocations::default(), NOW)
        .unwrap();
    assert!(two.get("ci").unwrap().unwrap().disabled);
    assert!(two.list_secret_ids(&name("ci"), NOW).unwrap().is_empty());
}

/// Two nodes creating one name at once: the second write is refused, and
/// the first one's record stays.
#[test]
fn a_name_created_on_two_nodes_at_once_is_created_once() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = crate::storage::test_sled::two_barriers(dir.path());
    let (one, two) = (
        Arc::new(IdentityStore::new(Arc::new(one))),
        Arc::new(IdentityStore::new(Arc::new(two))),
    );
    let two_ = two.clone();
    one.before_record_write.set(move || {
        two_.create(new("dup"), &AllPolicies, NOW).unwrap();
    });
    let second = one.create(new("dup"), &AllPolicies, NOW);
    assert!(matches!(second, Err(IdentityError::AlreadyExists(_))));
    let stored = one.get("dup").unwrap().unwrap();
    assert_eq!(two.get("dup").unwrap().unwrap().role_id, stored.role_id);
}

/// An update judged to grant nothing (its owner as read, with a new
/// description) is refused when another node changed the owner between
/// that judgement and the write: applied again to the record read again,
/// the stale owner would otherwise land, unchecked.
#[test]
fn an_update_judged_on_an_owner_changed_since_is_refused() {
    let (_d, one, two) = two_nodes();
    let read = one.get("ci").unwrap().unwrap();
    let two_ = two.clone();
    one.before_record_write.set(move || {
        two_.update(
            &name("ci"),
            IdentityUpdate {
                owner: Some("team-prod".into()),
                ..Default::default()
            },
            &AllPolicies,
            &Revocations::default(),
            NOW,
        )
        .unwrap();
    });
    let stale = one.update(
        &name("ci"),
        IdentityUpdate {
            owner: Some(read.owner.clone()),
            description: Some("changed with it".into()),
            judged_on: Some((read.owner.clone(), read.expires_at_ms)),
            ..Default::default()
        },
        &AllPolicies,
        &Revocations::default(),
        NOW,
    );
    assert!(matches!(stale, Err(IdentityError::PoliciesChanged)));
    assert_eq!(two.get("ci").unwrap().unwrap().owner, "team-prod");
}

/// A metadata change checked against the identity's policies is refused
/// when another node changed them between that check and the write.
#[test]
fn a_metadata_change_checked_against_policies_changed_since_is_refused() {
    let (_d, one, two) = two_nodes();
    let read = one.get("ci").unwrap().unwrap();
    let two_ = two.clone();
    one.before_record_write.set(move || {
        two_.update(
            &name("ci"),
            IdentityUpdate {
                policies: Some(vec!["wider".into()]),
                ..Default::default()
            },
            &AllPolicies,
            &Revocations::default(),
            NOW,
        )
        .unwrap();
    });
    let set = [("env".to_owned(), "prod".to_owned())].into();
    let stale = one.set_metadata_checked(&name("ci"), set, &[], Some(&read.policies));
    assert!(matches!(stale, Err(IdentityError::PoliciesChanged)));
    assert!(two.get("ci").unwrap().unwrap().metadata.is_empty());
}

/// A change that changes nothing is not written, so it costs another
/// node's change no try.
#[test]
fn a_change_that_changes_nothing_is_not_written() {
    let (_d, one, _two) = two_nodes();
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = written.clone();
    one.before_record_write.set(move || {
        count.fetch_add(1, Ordering::SeqCst);
    });
    let set = [("env".to_owned(), "prod".to_owned())].into();
    one.set_metadata(&name("ci"), set, &[]).unwrap();
    assert_eq!(written.load(Ordering::SeqCst), 1);
    let count = written.clone();
    one.before_record_write.set(move || {
        count.fetch_add(1, Ordering::SeqCst);
    });
    let same = [("env".to_owned(), "prod".to_owned())].into();
    one.set_metadata(&name("ci"), same, &[]).unwrap();
    assert_eq!(
        written.load(Ordering::SeqCst),
        1,
        "an unchanged record was written"
    );
}

/// A change whose record another node changes before each of its tries
/// gives up with `Contended` (ABORTED) and writes nothing of its own.
#[test]
fn a_change_that_loses_every_try_is_contended() {
    let (_d, one, two) = two_nodes();
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    change_before_each_try(&one, &two, 10, runs.clone());
    let refused = one.update(
        &name("ci"),
        IdentityUpdate {
            owner: Some("sre".into()),
            ..Default::default()
        },
        &AllPolicies,
        &Revocations::default(),
        NOW,
    );
    assert!(
        matches!(refused, Err(IdentityError::Contended)),
        "{:?}",
        refused.map(|r| r.name)
    );
    assert_eq!(runs.load(Ordering::SeqCst), RECORD_TRIES);
    let stored = two.get("ci").unwrap().unwrap();
    assert_eq!(stored.owner, "platform");
    assert_eq!(stored.metadata["run"], RECORD_TRIES.to_string());
    let failure = crate::core::call::Failure::from(IdentityError::Contended);
    assert_eq!(
        failure.kind(),
        crate::core::call::FailureKind::Aborted,
        "{}",
        failure.message()
    );
}

#[test]
fn cert_bindings_find_the_identity() {
    let f = fixture();
    f.store.create(new("ci"), &AllPolicies, NOW).unwrap();
    f.store.create(new("web"), &AllPolicies, NOW).unwrap();
    f.store
        .bind_cert(&name("ci"), Some("CN=ci, O=acme"), None)
        .unwrap();
    f.store
        .bind_cert(&name("web"), None, Some("spiffe://acme.test/web"))
        .unwrap();
    assert!(matches!(
        f.store.bind_cert(&name("web"), Some("O=acme,CN=ci"), None),
        Err(IdentityError::BindingTaken(_))
    ));
    assert!(f.store.bind_cert(&name("web"), None, None).is_err());
    let dn = |t: &str| Dn::parse(t).unwrap();
    let found = f
        .store
        .by_cert(Some(&dn("O=acme,CN=ci")), &[])
        .unwrap()
        .unwrap();
    assert_eq!(found.name, "ci");
    let found = f
        .store
        .by_cert(Some(&dn("CN=other")), &["spiffe://acme.test/web".into()])
        .unwrap()
        .unwrap();
    assert_eq!(found.name, "web");
    assert!(f
        .store
        .by_cert(Some(&dn("CN=nobody")), &[])
        .unwrap()
        .is_none());
    assert!(
        f.store
            .by_cert(Some(&dn("CN=ci\\,O=acme")), &[])
            .unwrap()
            .is_none(),
        "one attribute holding a comma is not two"
    );

    // A real certificate from the dev CA.
    let dir = tempfile::tempdir().unwrap();
    let paths = crate::pki::ensure_dev_certs(dir.path()).unwrap();
    let issuer = crate::pki::load_issuer(&paths).unwrap();
    let (pem, _) =
        crate::pki::issue_client_cert(&issuer, "ci", Some("spiffe://acme.test/x")).unwrap();
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let names = login::cert_names(&der).unwrap();
    assert_eq!(
        names.subject.map(|d| d.canonical()).as_deref(),
        Some("CN=ci,O=keyward dev")
    );
    assert_eq!(names.spiffe_ids, vec!["spiffe://acme.test/x"]);
    let trust = crate::pki::trust::ClientTrust::new();
    trust
        .set_configured_pem(&std::fs::read(&paths.ca).unwrap())
        .unwrap();
    let pki = crate::pki::PkiStore::new(f.store.barrier.clone(), Arc::new(trust));
    let chain = [der.to_vec()];
    assert!(matches!(
        f.login.cert(&f.store, &pki, &chain, LOCAL, NOW),
        Err(LoginError::UnboundCertificate)
    ));
    f.store
        .bind_cert(&name("ci"), None, Some("spiffe://acme.test/x"))
        .unwrap();
    let grant = f.login.cert(&f.store, &pki, &chain, LOCAL, NOW).unwrap();
    assert_eq!((grant.identity.as_str(), grant.method), ("ci", "cert"));
    // The token never outlives the certificate.
    assert_eq!(grant.hard_expiry_ms, names.not_after_ms);
    assert!(names.not_after_ms.is_some());
    assert!(matches!(
        f.login.cert(&f.store, &pki, &[], LOCAL, NOW),
        Err(LoginError::NoCertificate)
    ));
    // Checked again at the login, not only at the handshake: a store that
    // no longer trusts the CA, or a time past the certificate's end.
    let untrusting = crate::pki::PkiStore::new(
        f.store.barrier.clone(),
        Arc::new(crate::pki::trust::ClientTrust::new()),
    );
    assert!(matches!(
        f.login.cert(&f.store, &untrusting, &chain, LOCAL, NOW),
        Err(LoginError::CertificateRefused)
    ));
    let after = names.not_after_ms.unwrap().saturating_add(1000);
    assert!(matches!(
        f.login.cert(&f.store, &pki, &chain, LOCAL, after),
        Err(LoginError::CertificateRefused)
    ));

    // A certificate in the PKI's inventory (shared by every node): one
    // revoked there is refused although this node's CRL does not know it
    // yet, and one issued for another identity is refused.
    let serial = names.serial.clone();
    let inventory = |identity: &str, revoked_at_ms: u64| {
        let record = crate::pki::CertRecord {
            serial: serial.clone(),
            role: "r".into(),
            identity: identity.into(),
            requested_by: "root".into(),
            sans: vec!["spiffe://acme.test/x".into()],
            issued_at_ms: NOW,
            not_after_ms: names.not_after_ms.unwrap(),
            revoked_at_ms,
            origin: "sign".into(),
        };
        f.store
            .barrier
            .put(
                &format!("pki/certs/{serial}"),
                &serde_json::to_vec(&record).unwrap(),
            )
            .unwrap();
    };
    inventory("ci", 0);
    assert!(f.login.cert(&f.store, &pki, &chain, LOCAL, NOW).is_ok());
    inventory("ci", NOW);
    assert!(matches!(
        f.login.cert(&f.store, &pki, &chain, LOCAL, NOW),
        Err(LoginError::CertificateRefused)
    ));
    inventory("", 0);
    assert!(matches!(
        f.login.cert(&f.store, &pki, &chain, LOCAL, NOW),
        Err(LoginError::IssuedForAnother)
    ));
}

#[test]
fn issuers_and_oidc_bindings_are_checked() {
    let f = fixture();
    f.store.create(new("ci"), &AllPolicies, NOW).unwrap();
    let jwks_dir = tempfile::tempdir().unwrap();
    std::fs::write(jwks_dir.path().join("jwks.json"), "{}").unwrap();
    let (dir, anyone) = (Some(jwks_dir.path()), |_: &[String]| {
        Ok::<_, IdentityError>(())
    });
    let issuer = IssuerRecord {
        name: "gh".into(),
        issuer_url: "https://token.actions.example".into(),
        jwks_file: "jwks.json".into(),
        jwks_url: String::new(),
        audience: "keyward".into(),
    };
    let mut both = issuer.clone();
    both.jwks_url = "https://x/jwks".into();
    assert!(f.store.put_issuer(both, dir, anyone).is_err());
    let mut http = issuer.clone();
    http.issuer_url = "http://x".into();
    assert!(f.store.put_issuer(http, dir, anyone).is_err());
    f.store.put_issuer(issuer, dir, anyone).unwrap();
    assert_eq!(f.store.issuers().unwrap().len(), 1);
    assert!(matches!(
        f.store
            .bind_oidc(&name("ci"), "nope", vec![("sub".into(), "x".into())]),
        Err(IdentityError::UnknownIssuer(_))
    ));
    assert!(f.store.bind_oidc(&name("ci"), "gh", vec![]).is_err());
    f.store
        .bind_oidc(
            &name("ci"),
            "gh",
            vec![("repository".into(), "acme/app".into())],
        )
        .unwrap();
    let candidates = f.store.oidc_candidates("gh").unwrap();
    assert_eq!(candidates.len(), 1);
    assert_eq!(
        candidates[0].1,
        vec![vec![("repository".to_owned(), "acme/app".to_owned())]]
    );
}

/// The expiry sweep as the server runs it, on a paused clock: it sleeps until
/// the identity's expiry, revokes its tokens then and not before, and stops
/// at shutdown.
#[tokio::test(start_paused = true)]
async fn the_expiry_sweep_revokes_when_the_clock_passes_the_expiry() {
    use crate::clock::{Clock, ShutdownTrigger};
    use expiry::IdentityExpiry;

    let dir = tempfile::tempdir().unwrap();
    let backend = SledBackend::open(dir.path()).unwrap();
    let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
    let shares = barrier.init(1, 1).unwrap();
    barrier.unseal(shares[0].0.as_str()).unwrap();
    let barrier = Arc::new(barrier);
    let store = Arc::new(IdentityStore::new(barrier.clone()));
    let revoked = Arc::new(Revocations::default());
    let certs = Arc::new(CertRevocations::default());
    let clock = Clock::starting_at(NOW);
    let mut short = new("short");
    short.expires_at_ms = NOW + 60_000;
    store.create(short, &AllPolicies, NOW).unwrap();

    let stop = ShutdownTrigger::new();
    let sweep = tokio::spawn(
        IdentityExpiry {
            identities: store.clone(),
            tokens: revoked.clone(),
            certificates: certs.clone(),
            barrier,
            clock: clock.clone(),
        }
        .run(stop.signal()),
    );
    let revocations = || revoked.1.load(Ordering::SeqCst);
    tokio::time::advance(std::time::Duration::from_secs(59)).await;
    tokio::task::yield_now().await;
    assert_eq!(revocations(), 0, "not before the expiry");
    // Past it: wait for the revocation (each poll moves the paused clock).
    tokio::time::advance(std::time::Duration::from_secs(2)).await;
    let mut polls = 0;
    while revocations() == 0 {
        polls += 1;
        assert!(polls < 1000, "the sweep never revoked the expired identity");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(clock.now_ms() < NOW + 60_000 + expiry::SWEEP_EVERY.as_millis() as u64 + 1_000);
    assert_eq!(*revoked.0.lock().unwrap(), vec!["short"]);
    assert_eq!(certs.calls(), vec![vec!["short"]]);
    // Once: later sweeps (one every SWEEP_EVERY) leave it alone.
    for _ in 0..20 {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    assert_eq!(revocations(), 1);
    stop.trigger();
    sweep.await.unwrap();
}

#[test]
fn an_enable_or_extension_checked_against_old_policies_is_refused() {
    let f = fixture();
    let revoked = Revocations::default();
    f.store.create(new("ci"), &AllPolicies, NOW).unwrap();
    f.store
        .set_disabled(&name("ci"), true, false, &revoked, NOW)
        .unwrap();
    // The caller was checked against policies the identity no longer has
    // (a policy was attached in between): refused.
    let stale = vec!["narrow".to_owned()];
    assert!(matches!(
        f.store
            .set_disabled_checked(&name("ci"), false, false, Some(&stale), &revoked, NOW),
        Err(IdentityError::PoliciesChanged)
    ));
    assert!(f.store.get("ci").unwrap().unwrap().disabled);
    let current = vec!["app-read".to_owned()];
    let (record, _, _) = f
        .store
        .set_disabled_checked(&name("ci"), false, false, Some(&current), &revoked, NOW)
        .unwrap();
    assert!(!record.disabled);
    let extend = |checked: Vec<String>| IdentityUpdate {
        expires_at_ms: Some(0),
        checked_policies: Some(checked),
        ..Default::default()
    };
    assert!(matches!(
        f.store
            .update(&name("ci"), extend(stale), &AllPolicies, &revoked, NOW),
        Err(IdentityError::PoliciesChanged)
    ));
    f.store
        .update(&name("ci"), extend(current), &AllPolicies, &revoked, NOW)
        .unwrap();
}

#[test]
fn secret_ids_are_listed_revoked_and_killed_by_a_disable() {
    let f = fixture();
    let revoked = Revocations::default();
    f.store.create(new("ci"), &AllPolicies, NOW).unwrap();
    let one = f
        .store
        .create_secret_id(&name("ci"), SecretIdSpec::default(), NOW)
        .unwrap();
    let two = f
        .store
        .create_secret_id(&name("ci"), SecretIdSpec::default(), NOW + 1)
        .unwrap();
    let listed = f.store.list_secret_ids(&name("ci"), NOW).unwrap();
    assert_eq!(listed.len(), 2);
    let first = listed[0].handle.clone();
    assert!(matches!(
        f.store.revoke_secret_id(&name("ci"), "sid_000000000000"),
        Err(IdentityError::NoSuchSecretId)
    ));
    f.store
        .revoke_secret_id(
            &name("ci"),
            &first.to_ascii_uppercase().replace("SID_", "sid_"),
        )
        .unwrap();
    assert!(f
        .store
        .spend_secret_id(&one.role_id, one.secret_id.expose(), LOCAL, NOW)
        .unwrap()
        .is_none());
    assert!(f
        .store
        .spend_secret_id(&two.role_id, two.secret_id.expose(), LOCAL, NOW)
        .unwrap()
        .is_some());
    let (_, _, gone) = f
        .store
        .set_disabled(&name("ci"), true, false, &revoked, NOW)
        .unwrap();
    assert_eq!(gone, 1);
    assert!(f
        .store
        .list_secret_ids(&name("ci"), NOW)
        .unwrap()
        .is_empty());
}

/// On a shared store a successful login must forget the role-id's failures
/// from that source as on sled: before the fix the shared record kept them
/// and the next admission read them back, so one more typo after a success
/// locked the role-id out on every node.
#[test]
fn a_success_clears_the_shared_throttle_count() {
    use super::shared_throttle::{SharedThrottle, SharedThrottleConfig};
    let dir = tempfile::tempdir().unwrap();
    let backend = SledBackend::open(dir.path()).unwrap();
    let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
    let shares = barrier.init(1, 1).unwrap();
    barrier.unseal(shares[0].0.as_str()).unwrap();
    let barrier = Arc::new(barrier);
    let f = Fixture {
        _dir: dir,
        store: IdentityStore::new(barrier.clone()),
        login: Login::new(JwksCache::files_only(), ThrottleConfig::default()),
    };
    let shared = Arc::new(SharedThrottle::new(
        barrier,
        ThrottleConfig::default(),
        SharedThrottleConfig::default(),
    ));
    let login =
        Login::new(JwksCache::files_only(), ThrottleConfig::default()).with_shared(shared.clone());
    let other =
        Login::new(JwksCache::files_only(), ThrottleConfig::default()).with_shared(shared.clone());
    f.store.create(new("ci"), &AllPolicies, NOW).unwrap();
    let sid = f
        .store
        .create_secret_id(&name("ci"), SecretIdSpec::default(), NOW)
        .unwrap();
    let wrong = SecretIdText::generate().unwrap();
    for i in 0..4 {
        assert!(matches!(
            login.approle(&f.store, &sid.role_id, wrong.expose(), LOCAL, NOW + i),
            Err(LoginError::Invalid)
        ));
    }
    shared.flush(NOW + 10).unwrap();
    login
        .approle(
            &f.store,
            &sid.role_id,
            sid.secret_id.expose(),
            LOCAL,
            NOW + 20,
        )
        .unwrap();
    shared.flush(NOW + 30).unwrap();
    // One typo after the success, on this node and on another one.
    for (n, node) in [&login, &other].into_iter().enumerate() {
        let at = NOW + 40 + 10 * n as u64;
        assert!(matches!(
            node.approle(&f.store, &sid.role_id, wrong.expose(), LOCAL, at),
            Err(LoginError::Invalid)
        ));
        let result = node.approle(
            &f.store,
            &sid.role_id,
            sid.secret_id.expose(),
            LOCAL,
            at + 1,
        );
        assert!(
            result.is_ok(),
            "node {n}: one failure after a successful login locked the role-id: {result:?}"
        );
    }
}
