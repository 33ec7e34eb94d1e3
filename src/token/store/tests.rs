#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::barrier::BarrierOptions;
use crate::clock::{Clock, ShutdownTrigger};
use crate::storage::SledBackend;
use crate::token::format::new_accessor;

struct Names(Vec<&'static str>);

impl PolicyNames for Names {
    fn policy_exists(&self, name: &str) -> Result<bool, TokenError> {
        Ok(self.0.contains(&name))
    }
}

const T0: u64 = 1_000_000;

fn store() -> (tempfile::TempDir, TokenStore) {
    let dir = tempfile::tempdir().unwrap();
    let backend = SledBackend::open(dir.path()).unwrap();
    let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
    let shares = barrier.init(1, 1).unwrap();
    barrier.unseal(&shares[0].0).unwrap();
    let store = TokenStore::new(
        Arc::new(barrier),
        Arc::new(Names(vec!["a", "b", "c"])),
        Clock::starting_at(T0),
    );
    store.on_unseal(T0).unwrap();
    (dir, store)
}

fn req(identity: &str, policies: &[&str], ttl_s: u64) -> TokenRequest {
    TokenRequest {
        identity: identity.into(),
        policies: policies.iter().map(|p| p.to_string()).collect(),
        ttl: Duration::from_secs(ttl_s),
        max_ttl: Duration::ZERO,
        hard_expiry_ms: None,
        uses: 0,
        cidrs: vec![],
        parent_accessor: None,
        method: "token",
    }
}

fn root(store: &TokenStore) -> IssuedToken {
    let mut r = req("root", &["root"], 0);
    r.method = "root";
    store.issue(r, T0).unwrap()
}

fn local() -> Option<IpAddr> {
    Some("127.0.0.1".parse().unwrap())
}

#[test]
fn issue_then_use_until_expiry() {
    let (_d, s) = store();
    let t = s.issue(req("svc", &["a"], 10), T0).unwrap();
    assert_eq!(t.expires_at_ms, T0 + 10_000);
    assert_eq!(t.identity, "svc");
    let used = s.use_token(t.token.expose(), local(), T0 + 9_999).unwrap();
    assert_eq!(used.record.accessor, t.accessor);
    assert!(!used.counted);
    assert!(matches!(
        s.use_token(t.token.expose(), local(), T0 + 10_000),
        Err(TokenError::Invalid)
    ));
    // Expired use revoked it: gone even for an earlier clock.
    assert!(s.lookup_accessor(&t.accessor, T0).unwrap().is_none());
}

#[test]
fn unknown_and_malformed_tokens_are_invalid() {
    let (_d, s) = store();
    assert!(matches!(
        s.use_token("kwt_nope", local(), T0),
        Err(TokenError::Invalid)
    ));
    let other = TokenSecret::generate().unwrap();
    assert!(matches!(
        s.use_token(other.expose(), local(), T0),
        Err(TokenError::Invalid)
    ));
}

#[test]
fn root_never_expires() {
    let (_d, s) = store();
    let r = root(&s);
    assert_eq!(r.expires_at_ms, 0);
    s.use_token(r.token.expose(), None, u64::MAX - 1).unwrap();
    let info = s.renew(&r.accessor, None, T0).unwrap();
    assert_eq!(info.expires_at_ms, 0);
}

#[test]
fn zero_ttl_refused_for_non_root() {
    let (_d, s) = store();
    assert!(matches!(
        s.issue(req("svc", &["a"], 0), T0),
        Err(TokenError::InvalidRequest(_))
    ));
}

#[test]
fn unknown_policy_refused() {
    let (_d, s) = store();
    assert!(matches!(
        s.issue(req("svc", &["nope"], 10), T0),
        Err(TokenError::UnknownPolicy(p)) if p == "nope"
    ));
}

#[test]
fn renew_is_capped_by_max_ttl() {
    let (_d, s) = store();
    let mut r = req("svc", &["a"], 10);
    r.max_ttl = Duration::from_secs(25);
    let t = s.issue(r, T0).unwrap();
    let info = s.renew(&t.accessor, None, T0 + 5_000).unwrap();
    assert_eq!(info.expires_at_ms, T0 + 15_000);
    let info = s
        .renew(&t.accessor, Some(Duration::from_secs(100)), T0 + 6_000)
        .unwrap();
    assert_eq!(info.expires_at_ms, T0 + 25_000);
    // The sweeper sees only the new expiry.
    let out = s.sweep(T0 + 20_000).unwrap();
    assert_eq!(out.revoked, 0);
    assert_eq!(out.next_ms, Some(T0 + 25_000));
    assert_eq!(s.sweep(T0 + 25_000).unwrap().revoked, 1);
}

#[test]
fn ttl_is_clamped_to_max_ttl_and_hard_expiry() {
    let (_d, s) = store();
    let mut r = req("svc", &["a"], 100);
    r.max_ttl = Duration::from_secs(50);
    assert_eq!(s.issue(r, T0).unwrap().expires_at_ms, T0 + 50_000);
    let mut r = req("svc", &["a"], 100);
    r.hard_expiry_ms = Some(T0 + 7_000);
    assert_eq!(s.issue(r, T0).unwrap().expires_at_ms, T0 + 7_000);
    let mut r = req("svc", &["a"], 100);
    r.hard_expiry_ms = Some(T0);
    assert!(s.issue(r, T0).is_err());
}

#[test]
fn uses_are_counted_and_the_last_revokes() {
    let (_d, s) = store();
    let mut r = req("svc", &["a"], 100);
    r.uses = 2;
    let t = s.issue(r, T0).unwrap();
    let first = s.use_token(t.token.expose(), local(), T0).unwrap();
    assert!(first.counted);
    assert!(!first.last_use);
    assert_eq!(first.record.uses_remaining, 1);
    let second = s.use_token(t.token.expose(), local(), T0).unwrap();
    assert!(second.counted);
    assert!(second.last_use, "the second of two uses is the last");
    assert!(matches!(
        s.use_token(t.token.expose(), local(), T0),
        Err(TokenError::Invalid)
    ));
    // An unlimited token counts no use and has no last one, read from
    // storage or from the verified-token cache.
    let unlimited = s.issue(req("svc", &["a"], 100), T0).unwrap();
    for _ in 0..2 {
        let used = s.use_token(unlimited.token.expose(), local(), T0).unwrap();
        assert!(!used.counted && !used.last_use);
    }
}

#[test]
fn cidr_binding() {
    let (_d, s) = store();
    let mut r = req("svc", &["a"], 100);
    r.cidrs = vec!["127.0.0.1/32".parse().unwrap()];
    let t = s.issue(r, T0).unwrap();
    s.use_token(t.token.expose(), local(), T0).unwrap();
    assert!(matches!(
        s.use_token(t.token.expose(), Some("10.1.2.3".parse().unwrap()), T0),
        Err(TokenError::SourceNotAllowed)
    ));
    assert!(matches!(
        s.use_token(t.token.expose(), None, T0),
        Err(TokenError::SourceNotAllowed)
    ));
}

#[test]
fn child_policies_must_be_a_subset() {
    let (_d, s) = store();
    let parent = s.issue(req("svc", &["a", "b"], 100), T0).unwrap();
    let mut child = req("svc", &["a"], 10);
    child.parent_accessor = Some(parent.accessor.clone());
    s.issue(child.clone(), T0).unwrap();
    child.policies = vec!["c".into()];
    assert!(matches!(s.issue(child.clone(), T0), Err(TokenError::NotSubset(p)) if p == "c"));
    child.policies = vec!["root".into()];
    assert!(matches!(s.issue(child, T0), Err(TokenError::NotSubset(_))));
    // Root may issue anything.
    let r = root(&s);
    let mut child = req("svc", &["c", "root"], 10);
    child.parent_accessor = Some(r.accessor);
    s.issue(child, T0).unwrap();
}

#[test]
fn child_never_outlives_parent_max_life() {
    let (_d, s) = store();
    let parent = s.issue(req("svc", &["a"], 10), T0).unwrap();
    let mut child = req("svc", &["a"], 100);
    child.max_ttl = Duration::from_secs(1000);
    child.parent_accessor = Some(parent.accessor);
    assert_eq!(s.issue(child, T0).unwrap().expires_at_ms, T0 + 10_000);
}

#[test]
fn revoke_cascades_to_children() {
    let (_d, s) = store();
    let a = s.issue(req("svc", &["a"], 100), T0).unwrap();
    let mut r = req("svc", &["a"], 100);
    r.parent_accessor = Some(a.accessor.clone());
    let b = s.issue(r.clone(), T0).unwrap();
    r.parent_accessor = Some(b.accessor.clone());
    let c = s.issue(r, T0).unwrap();
    let other = s.issue(req("svc", &["a"], 100), T0).unwrap();
    assert_eq!(s.revoke(&a.accessor).unwrap(), 3);
    for t in [&a, &b, &c] {
        assert!(s.use_token(t.token.expose(), local(), T0).is_err());
    }
    s.use_token(other.token.expose(), local(), T0).unwrap();
    assert_eq!(s.revoke(&a.accessor).unwrap(), 0);
}

#[test]
fn revoke_identity_takes_every_token_of_it() {
    let (_d, s) = store();
    let a = s.issue(req("svc", &["a"], 100), T0).unwrap();
    let b = s.issue(req("svc", &["b"], 100), T0).unwrap();
    let mut child = req("bot", &["b"], 100);
    child.parent_accessor = Some(b.accessor.clone());
    let c = s.issue(child, T0).unwrap();
    let keep = s.issue(req("svc2", &["a"], 100), T0).unwrap();
    assert_eq!(s.revoke_identity("svc", T0).unwrap(), 3);
    for t in [&a, &b, &c] {
        assert!(s.use_token(t.token.expose(), local(), T0).is_err());
    }
    s.use_token(keep.token.expose(), local(), T0).unwrap();
    assert_eq!(s.revoke_identity("nobody", T0).unwrap(), 0);
}

#[test]
fn sweep_revokes_in_expiry_order() {
    let (_d, s) = store();
    let late = s.issue(req("svc", &["a"], 30), T0).unwrap();
    let early = s.issue(req("svc", &["a"], 10), T0).unwrap();
    let out = s.sweep(T0 + 5_000).unwrap();
    assert_eq!((out.revoked, out.next_ms), (0, Some(T0 + 10_000)));
    let out = s.sweep(T0 + 10_000).unwrap();
    assert_eq!((out.revoked, out.next_ms), (1, Some(T0 + 30_000)));
    assert!(s.lookup_accessor(&early.accessor, T0).unwrap().is_none());
    assert!(s.lookup_accessor(&late.accessor, T0).unwrap().is_some());
    let out = s.sweep(T0 + 40_000).unwrap();
    assert_eq!((out.revoked, out.next_ms), (1, None));
}

#[test]
fn long_lived_lists_tokens_over_the_threshold() {
    let (_d, s) = store();
    let r = root(&s);
    let mut long = req("svc", &["a"], 3600);
    long.max_ttl = Duration::from_secs(86_400 * 30);
    let long = s.issue(long, T0).unwrap();
    s.issue(req("svc", &["a"], 60), T0).unwrap();
    let mut found = s.long_lived(Duration::from_secs(86_400), T0).unwrap();
    found.sort_by_key(|l| l.ttl_seconds);
    assert_eq!(
        found,
        vec![
            LongLived {
                accessor: long.accessor,
                identity: "svc".into(),
                ttl_seconds: 86_400 * 30
            },
            LongLived {
                accessor: r.accessor,
                identity: "root".into(),
                ttl_seconds: u64::MAX
            },
        ]
    );
}

#[test]
fn lookup_by_token_and_accessor() {
    let (_d, s) = store();
    let t = s.issue(req("svc", &["a", "a", "b"], 100), T0).unwrap();
    assert_eq!(t.policies, vec!["a", "b"]);
    let by_token = s.lookup_token(t.token.expose(), T0).unwrap().unwrap();
    let by_acc = s.lookup_accessor(&t.accessor, T0).unwrap().unwrap();
    assert_eq!(by_token, by_acc);
    assert_eq!(by_acc.identity, "svc");
    assert_eq!(by_acc.method, "token");
}

#[test]
fn legacy_root_token_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let backend = SledBackend::open(dir.path()).unwrap();
    let barrier = Arc::new(Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap());
    let shares = barrier.init(1, 1).unwrap();
    barrier.unseal(&shares[0].0).unwrap();
    // As the foundation wrote it.
    let token = TokenSecret::generate().unwrap();
    let key = barrier.derive_key(HASH_PURPOSE).unwrap();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_slice());
    let hash = hex::encode(ring::hmac::sign(&key, token.expose().as_bytes()).as_ref());
    let old = TokenRecord {
        accessor: new_accessor().unwrap(),
        identity: "root".into(),
        policies: vec!["root".into()],
        created_at_ms: 5,
        ..Default::default()
    };
    barrier
        .put(&format!("{LEGACY_PREFIX}{hash}"), &old.encode_to_vec())
        .unwrap();
    let s = TokenStore::new(
        barrier.clone(),
        Arc::new(Names(vec![])),
        Clock::starting_at(T0),
    );
    s.on_unseal(T0).unwrap();
    let used = s.use_token(token.expose(), None, T0).unwrap();
    assert_eq!(used.record.policies, vec!["root"]);
    assert_eq!(used.record.method, "root");
    assert!(barrier.scan_keys(LEGACY_PREFIX).unwrap().is_empty());
    assert_eq!(s.revoke_identity("root", T0).unwrap(), 1);
}

#[test]
fn children_inherit_cidrs_and_limited_parents_cannot_issue() {
    let (_d, s) = store();
    let mut p = req("svc", &["a"], 100);
    p.cidrs = vec!["10.0.0.0/8".parse().unwrap()];
    let parent = s.issue(p, T0).unwrap();
    let mut c = req("svc", &["a"], 10);
    c.parent_accessor = Some(parent.accessor.clone());
    let child = s.issue(c.clone(), T0).unwrap();
    assert!(matches!(
        s.use_token(child.token.expose(), local(), T0),
        Err(TokenError::SourceNotAllowed)
    ));
    c.cidrs = vec!["10.1.0.0/16".parse().unwrap()];
    s.issue(c.clone(), T0).unwrap();
    c.cidrs = vec!["127.0.0.1/32".parse().unwrap()];
    assert!(matches!(s.issue(c, T0), Err(TokenError::CidrNotSubset)));

    let mut limited = req("svc", &["a"], 100);
    limited.uses = 5;
    let limited = s.issue(limited, T0).unwrap();
    let mut c = req("svc", &["a"], 10);
    c.parent_accessor = Some(limited.accessor);
    assert!(matches!(s.issue(c, T0), Err(TokenError::InvalidRequest(_))));
}

#[test]
fn descendants_are_found_upwards() {
    let (_d, s) = store();
    let a = s.issue(req("svc", &["a"], 100), T0).unwrap();
    let mut r = req("svc", &["a"], 100);
    r.parent_accessor = Some(a.accessor.clone());
    let b = s.issue(r.clone(), T0).unwrap();
    r.parent_accessor = Some(b.accessor.clone());
    let c = s.issue(r, T0).unwrap();
    assert!(s.is_descendant(&c.accessor, &a.accessor).unwrap());
    assert!(s.is_descendant(&b.accessor, &a.accessor).unwrap());
    assert!(!s.is_descendant(&a.accessor, &c.accessor).unwrap());
    assert!(!s.is_descendant(&a.accessor, &a.accessor).unwrap());
}

#[test]
fn revoke_counts_each_token_once() {
    let (_d, s) = store();
    let r = root(&s);
    let mut c = req("root", &["a"], 900);
    c.max_ttl = Duration::from_secs(3600);
    c.uses = 5;
    c.cidrs = vec!["127.0.0.1/32".parse().unwrap()];
    c.parent_accessor = Some(r.accessor.clone());
    let t = s.issue(c, T0).unwrap();
    s.use_token(t.token.expose(), local(), T0).unwrap();
    s.use_token(t.token.expose(), local(), T0).unwrap();
    s.renew(&t.accessor, Some(Duration::from_secs(1800)), T0)
        .unwrap();
    assert_eq!(s.revoke(&t.accessor).unwrap(), 1);
}

/// p -> a; a -> b, c; b -> d, e. Returns (p, [a, b, c, d, e]) and each
/// tree token's parent index (None for a, whose parent p stays).
fn revoke_tree(s: &TokenStore) -> (IssuedToken, Vec<IssuedToken>, Vec<Option<usize>>) {
    let p = s.issue(req("svc", &["a"], 100), T0).unwrap();
    let parents: Vec<Option<usize>> = vec![None, Some(0), Some(0), Some(1), Some(1)];
    let mut tree: Vec<IssuedToken> = Vec::new();
    for parent in &parents {
        let mut r = req("svc", &["a"], 100);
        r.parent_accessor = Some(match parent {
            None => p.accessor.clone(),
            Some(i) => tree[*i].accessor.clone(),
        });
        tree.push(s.issue(r, T0).unwrap());
    }
    (p, tree, parents)
}

#[test]
fn revoke_plan_deletes_children_first_with_their_links() {
    for max_ops in [1, 5, 12, 1024] {
        let (_d, s) = store();
        let (p, tree, parents) = revoke_tree(&s);
        let RevokePlan { count, batches, .. } = s.revoke_plan(&tree[0].accessor, max_ops).unwrap();
        assert_eq!(count, 5);
        let batch_of = |key: &str| {
            let found: Vec<usize> = (0..batches.len())
                .filter(|&i| batches[i].iter().any(|k| k == key))
                .collect();
            assert_eq!(found.len(), 1, "{key} in one batch, max_ops {max_ops}");
            found[0]
        };
        let mut at = Vec::new();
        for (i, t) in tree.iter().enumerate() {
            let record = s.record(&t.accessor).unwrap().unwrap();
            let parent = match parents[i] {
                None => &p.accessor,
                Some(j) => &tree[j].accessor,
            };
            let link = batch_of(&format!("{CHILDREN_PREFIX}{parent}/{}", t.accessor));
            // The token's records go in the same batch as the link to it.
            for key in [
                format!("{ACCESSOR_PREFIX}{}", t.accessor),
                ttl_key("svc", record.expires_at_ms, &t.accessor),
            ] {
                assert_eq!(batch_of(&key), link, "max_ops {max_ops}");
            }
            at.push(link);
        }
        // Children no later than their parents.
        for (i, parent) in parents.iter().enumerate() {
            if let Some(j) = parent {
                assert!(at[i] <= at[*j], "max_ops {max_ops}");
            }
        }
        if max_ops == 1 {
            assert_eq!(batches.len(), 5);
        }
        if max_ops == 1024 {
            assert_eq!(batches.len(), 1);
        }
    }
}

#[test]
fn revoke_cut_short_leaves_every_live_token_reachable() {
    // One token per batch: stop after each number of batches, as a storage
    // error part-way would.
    let (_d, s) = store();
    let (_, tree, _) = revoke_tree(&s);
    let batches = s.revoke_plan(&tree[0].accessor, 1).unwrap().batches.len();
    for applied in 0..=batches {
        let (_d, s) = store();
        let (p, tree, parents) = revoke_tree(&s);
        let plan = s.revoke_plan(&tree[0].accessor, 1).unwrap().batches;
        for batch in &plan[..applied] {
            let ops: Vec<PlainOp<'_>> = batch.iter().map(|k| PlainOp::Delete(k)).collect();
            s.barrier().batch(&ops).unwrap();
        }
        let mut live = 0u32;
        for (i, t) in tree.iter().enumerate() {
            let usable = s.use_token(t.token.expose(), local(), T0).is_ok();
            let parent = match parents[i] {
                None => &p.accessor,
                Some(j) => &tree[j].accessor,
            };
            let link = format!("{CHILDREN_PREFIX}{parent}/{}", t.accessor);
            let linked = s.barrier().get(&link).unwrap().is_some();
            // Usable exactly while linked; and then its parent is usable too.
            assert_eq!(usable, linked, "after {applied} batches");
            if usable {
                live += 1;
                assert!(s
                    .use_token(
                        match parents[i] {
                            None => p.token.expose(),
                            Some(j) => tree[j].token.expose(),
                        },
                        local(),
                        T0
                    )
                    .is_ok());
            } else {
                assert!(s.lookup_accessor(&t.accessor, T0).unwrap().is_none());
            }
        }
        assert_eq!(live, 5 - applied as u32);
        // Revoking the parent again finds every token left.
        assert_eq!(s.revoke(&tree[0].accessor).unwrap(), live);
        for t in &tree {
            assert!(s.use_token(t.token.expose(), local(), T0).is_err());
        }
        assert!(s.barrier().scan_keys(CHILDREN_PREFIX).unwrap().is_empty());
        s.use_token(p.token.expose(), local(), T0).unwrap();
    }
}

#[test]
fn accessors_are_derived_and_no_hash_record_is_written() {
    let (_d, s) = store();
    let t = s.issue(req("svc", &["a"], 100), T0).unwrap();
    assert!(s.barrier().scan_keys(HASH_PREFIX).unwrap().is_empty());
    assert_eq!(s.derive_accessor(t.token.expose()).unwrap(), t.accessor);
    assert!(crate::token::format::looks_like_accessor(&t.accessor));
    let record = s.record(&t.accessor).unwrap().unwrap();
    assert!(record.derived);
    assert_ne!(record.hash, "", "the keyed hash is kept and checked");
    assert_eq!(
        s.accessor_for(t.token.expose()).unwrap(),
        Some(t.accessor.clone())
    );

    // A well-formed token that was never issued finds nothing.
    let other = TokenSecret::generate().unwrap();
    assert_eq!(s.accessor_for(other.expose()).unwrap(), None);

    // The record must carry the token's own hash: one under a derived
    // accessor with another hash is refused.
    let mut forged = record.clone();
    forged.hash = s.hash(other.expose()).unwrap();
    s.barrier()
        .put(
            &format!("{ACCESSOR_PREFIX}{}", t.accessor),
            &forged.encode_to_vec(),
        )
        .unwrap();
    assert!(matches!(
        s.use_token(t.token.expose(), local(), T0),
        Err(TokenError::Invalid)
    ));
}

#[test]
fn tokens_stored_before_derived_accessors_still_work_and_revoke() {
    let (_d, s) = store();
    // As the store wrote a token before accessors were derived: a random
    // accessor, a `tokens/hash/` record, an empty expiry entry.
    let token = TokenSecret::generate().unwrap();
    let hash = s.hash(token.expose()).unwrap();
    let accessor = new_accessor().unwrap();
    let old = TokenRecord {
        accessor: accessor.clone(),
        identity: "svc".into(),
        policies: vec!["a".into()],
        created_at_ms: T0,
        expires_at_ms: T0 + 10_000,
        ttl_ms: 10_000,
        max_expiry_ms: T0 + 10_000,
        method: "token".into(),
        hash: hash.clone(),
        ..Default::default()
    };
    let hash_key = format!("{HASH_PREFIX}{hash}");
    let acc_key = format!("{ACCESSOR_PREFIX}{accessor}");
    let id_key = format!("{}{accessor}", identity_prefix("svc"));
    let exp_key = expiry_key(T0 + 10_000, &accessor);
    s.barrier()
        .batch(&[
            PlainOp::Put(&hash_key, accessor.as_bytes()),
            PlainOp::Put(&acc_key, &old.encode_to_vec()),
            PlainOp::Put(&id_key, b""),
            PlainOp::Put(&exp_key, b""),
        ])
        .unwrap();

    let used = s.use_token(token.expose(), local(), T0).unwrap();
    assert_eq!(used.record.accessor, accessor);
    // Revoking the identity reaches it through the old index, beside a new token.
    let new = s.issue(req("svc", &["a"], 100), T0).unwrap();
    assert_eq!(s.revoke_identity("svc", T0).unwrap(), 2);
    assert!(s.lookup_accessor(&new.accessor, T0).unwrap().is_none());
    for key in [&hash_key, &acc_key, &id_key, &exp_key] {
        assert!(s.barrier().get(key).unwrap().is_none(), "{key} left behind");
    }
    assert!(matches!(
        s.use_token(token.expose(), local(), T0),
        Err(TokenError::Invalid)
    ));
}

/// An issue writes its keys one by one; a crash may keep any prefix of
/// them. Each prefix short of the record is unusable, and the sweeper
/// removes it when its expiry comes.
#[test]
fn every_prefix_of_a_cut_issue_is_swept() {
    let (_d, s) = store();
    let parent = s.issue(req("svc", &["a"], 1000), T0).unwrap();
    let mut r = req("svc", &["a"], 10);
    r.parent_accessor = Some(parent.accessor.clone());
    let full = s.issue(r, T0).unwrap();
    let record = s.record(&full.accessor).unwrap().unwrap();
    let acc = &full.accessor;
    let keys = [
        ttl_key("svc", record.expires_at_ms, acc),
        format!("{CHILDREN_PREFIX}{}/{acc}", parent.accessor),
        format!("{ACCESSOR_PREFIX}{acc}"),
    ];
    let values: Vec<Vec<u8>> = keys
        .iter()
        .map(|k| s.barrier().get(k).unwrap().unwrap().to_vec())
        .collect();
    assert_eq!(
        values[0],
        parent.accessor.clone().into_bytes(),
        "the index entry names the children link"
    );
    for kept in 1..keys.len() {
        for key in &keys {
            s.barrier().delete(key).unwrap();
        }
        for (key, value) in keys.iter().zip(&values).take(kept) {
            s.barrier().put(key, value).unwrap();
        }
        assert!(
            s.use_token(full.token.expose(), local(), T0).is_err(),
            "usable with only {kept} of its keys"
        );
        // The process that restarts after the crash knows nothing in memory.
        let restarted = TokenStore::new(
            s.inner.barrier.clone(),
            Arc::new(Names(vec!["a"])),
            s.clock().clone(),
        );
        restarted.on_unseal(T0).unwrap();
        // Within the grace period an entry without a record is left alone
        // (its issue may still be writing); after it, the leftovers go.
        restarted.sweep(record.expires_at_ms).unwrap();
        assert!(
            s.barrier().get(&keys[0]).unwrap().is_some(),
            "dropped in the grace period"
        );
        restarted
            .sweep(record.expires_at_ms + ORPHAN_GRACE_MS)
            .unwrap();
        for key in &keys {
            assert!(
                s.barrier().get(key).unwrap().is_none(),
                "{key} left after a cut at {kept}"
            );
        }
    }
    // The parent was not touched.
    assert!(s.use_token(parent.token.expose(), local(), T0).is_ok());
}

#[tokio::test]
async fn an_issue_wakes_the_sweeper_only_for_an_earlier_expiry() {
    let (_d, s) = store();
    async fn woken(s: &TokenStore) -> bool {
        tokio::time::timeout(Duration::from_millis(50), s.inner.wake.notified())
            .await
            .is_ok()
    }
    assert!(woken(&s).await, "the unseal woke the sweeper");
    s.inner
        .sweep_planned_ms
        .store(T0 + 50_000, Ordering::Release);
    s.issue(req("svc", &["a"], 100), T0).unwrap();
    assert!(!woken(&s).await, "an expiry after the planned wake-up");
    s.issue(req("svc", &["a"], 10), T0).unwrap();
    assert!(woken(&s).await, "an expiry before the planned wake-up");
    // With nothing planned (it sleeps until woken), any expiry wakes it.
    s.inner.sweep_planned_ms.store(u64::MAX, Ordering::Release);
    s.issue(req("svc", &["a"], 100_000), T0).unwrap();
    assert!(woken(&s).await, "an expiry while nothing is planned");
}

/// A new store over the same data knows no heads: the sweeper finds every
/// identity's due tokens from storage, one read per identity to start.
#[test]
fn the_sweeper_finds_every_identity_after_a_restart() {
    let (_d, s) = store();
    let mut issued = Vec::new();
    for (identity, ttl_s) in [("a-svc", 10), ("b-svc", 30), ("c-svc", 20), ("a-svc", 50)] {
        issued.push((ttl_s, s.issue(req(identity, &["a"], ttl_s), T0).unwrap()));
    }
    let restarted = TokenStore::new(
        s.inner.barrier.clone(),
        Arc::new(Names(vec!["a"])),
        s.clock().clone(),
    );
    restarted.on_unseal(T0).unwrap();
    let outcome = restarted.sweep(T0 + 25_000).unwrap();
    assert_eq!(
        outcome.revoked, 2,
        "the 10 s and 20 s tokens of two identities"
    );
    assert_eq!(outcome.next_ms, Some(T0 + 30_000));
    for (ttl_s, t) in &issued {
        let live = restarted
            .lookup_accessor(&t.accessor, T0)
            .unwrap()
            .is_some();
        assert_eq!(live, *ttl_s > 25, "{ttl_s} s token");
    }
    let outcome = restarted.sweep(T0 + 60_000).unwrap();
    assert_eq!(outcome.revoked, 2);
    assert_eq!(outcome.next_ms, None);
    assert!(restarted
        .barrier()
        .scan_keys(TTL_PREFIX)
        .unwrap()
        .is_empty());
}

/// An expiry issued while the sweeper scans that identity is kept as its
/// head even when the scan found nothing.
#[test]
fn an_issue_during_a_sweep_of_its_identity_is_not_lost() {
    let mut heads = Heads::default();
    heads.set("x", T0);
    heads.set("y", T0 + 9_000);
    // The sweeper takes x ...
    assert_eq!(heads.start_sweep(T0), Some((T0, "x".to_owned())));
    assert_eq!(heads.start_sweep(T0), None, "y is not due");
    // ... an issue lands behind its scan, later than the old head ...
    heads.lower("x", T0 + 5_000);
    // ... and the scan found nothing left.
    heads.finish_sweep("x", NEVER);
    assert_eq!(heads.earliest(), Some(T0 + 5_000));
    assert_eq!(heads.order.len(), 2);
    // Without an issue meanwhile, an identity with nothing left drops out.
    assert_eq!(
        heads.start_sweep(T0 + 5_000),
        Some((T0 + 5_000, "x".to_owned()))
    );
    heads.finish_sweep("x", NEVER);
    assert_eq!(heads.earliest(), Some(T0 + 9_000));
}

/// An index entry without a record may be an issue still writing: revoking
/// the identity must not take it away (the record would then be found by
/// nothing); the sweeper drops it once its grace period is over.
#[test]
fn revoking_an_identity_leaves_an_entry_without_record_to_the_sweeper() {
    let (_d, s) = store();
    let t = s.issue(req("svc", &["a"], 100), T0).unwrap();
    let orphan = new_accessor().unwrap();
    let key = ttl_key("svc", T0 + 100_000, &orphan);
    s.barrier().put(&key, b"").unwrap();
    assert_eq!(s.revoke_identity("svc", T0).unwrap(), 1);
    assert!(s.lookup_accessor(&t.accessor, T0).unwrap().is_none());
    assert!(s.barrier().get(&key).unwrap().is_some());
    let restarted = TokenStore::new(
        s.inner.barrier.clone(),
        Arc::new(Names(vec!["a"])),
        s.clock().clone(),
    );
    restarted.on_unseal(T0).unwrap();
    restarted.sweep(T0 + 100_000 + ORPHAN_GRACE_MS).unwrap();
    assert!(s.barrier().scan_keys(TTL_PREFIX).unwrap().is_empty());
}

#[test]
fn ttl_keys_parse_and_prefixes_end_where_they_should() {
    let key = ttl_key("svc", T0, "kwa_x");
    let hex_id = hex::encode("svc");
    assert_eq!(parse_ttl_key(&key), Some((hex_id.as_str(), T0, "kwa_x")));
    assert_eq!(parse_ttl_key(&ttl_key("svc", 0, "kwa_x")).unwrap().1, NEVER);
    assert_eq!(parse_ttl_key("tokens/ttl//0000000000000001/kwa_x"), None);
    // "ab" ends before "ab0c" (both are hex of some name) begins.
    let end = prefix_end(&ttl_prefix_hex("ab"));
    assert!(ttl_prefix_hex("ab") < end && end < ttl_prefix_hex("ab0c"));
}

/// Neither an entry its parent's cascade already removed nor one in its
/// grace period holds up the due tokens behind it.
#[test]
fn a_sweep_goes_past_cascaded_and_in_grace_entries() {
    let (_d, s) = store();
    let parent = s.issue(req("svc", &["a"], 10), T0).unwrap();
    let mut child = req("svc", &["a"], 20);
    child.parent_accessor = Some(parent.accessor.clone());
    let child = s.issue(child, T0).unwrap();
    // An entry without a record, due before the later token.
    let orphan = new_accessor().unwrap();
    s.barrier()
        .put(&ttl_key("svc", T0 + 15_000, &orphan), b"")
        .unwrap();
    let later = s.issue(req("svc", &["a"], 30), T0).unwrap();

    let outcome = s.sweep(T0 + 40_000).unwrap();
    // The parent's cascade took the child; the later token is not held up.
    assert_eq!(outcome.revoked, 3);
    for t in [&parent, &child, &later] {
        assert!(s.lookup_accessor(&t.accessor, T0).unwrap().is_none());
    }
    // The orphan waits for its grace period, and the sweeper knows when.
    assert_eq!(outcome.next_ms, Some(T0 + 15_000 + ORPHAN_GRACE_MS));
    s.sweep(T0 + 15_000 + ORPHAN_GRACE_MS).unwrap();
    assert!(s.barrier().scan_keys(TTL_PREFIX).unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_running_sweeper_revokes_a_token_once_it_expires() {
    let (_d, s) = store();
    let t = s.issue(req("svc", &["a"], 10), T0).unwrap();
    let stop = ShutdownTrigger::new();
    let sweeper = tokio::spawn(s.clone().run_sweeper(stop.signal()));
    let gone = |s: &TokenStore| s.lookup_accessor(&t.accessor, T0).unwrap().is_none();
    // Nothing is due before the expiry, however long the sweeper runs.
    tokio::time::advance(Duration::from_secs(9)).await;
    tokio::task::yield_now().await;
    assert!(!gone(&s));
    // Past it, the sweeper wakes and revokes it (waiting on the event, with
    // paused time: each poll advances the clock a little).
    tokio::time::advance(Duration::from_secs(2)).await;
    let mut polls = 0;
    while !gone(&s) {
        polls += 1;
        assert!(polls < 1000, "the sweeper did not revoke the expired token");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Soon after (a sweep that began before the advance sleeps the rest of
    // its wait from when it ends: about a second more).
    assert!(s.clock().now_ms() <= T0 + 15_000, "revoked late");
    stop.trigger();
    sweeper.await.unwrap();
}

/// The state a crash leaves between the last use's `spent` mark and the
/// revocation: the spent token is refused, its child still works (nothing
/// revoked it), and the sweeper of a store started afresh on the same data
/// (a restart: nothing of the first store's memory) revokes both at its first
/// pass, long before the parent's old expiry. A token with a use limit
/// issues no child tokens, and since 0.6.13 acts for nobody either; the
/// child here is a delegated token linked under its actor the way one made
/// by an earlier release under a use-limited actor is (the test marks the
/// actor spent itself).
#[test]
fn a_spent_mark_cut_short_by_a_crash_is_finished_by_the_next_sweep() {
    let (_d, s) = store();
    let year = 365 * 24 * 3600;
    let parent = s.issue(req("agent", &["a"], year), T0).unwrap();
    let child = s
        .issue_with(
            req("svc", &["a"], year),
            Delegation {
                may_act: None,
                actor_accessor: Some(parent.accessor.clone()),
            },
            T0,
        )
        .unwrap();
    // What an earlier release stored: an actor with one use left.
    let key = format!("{ACCESSOR_PREFIX}{}", parent.accessor);
    let raw = s.inner.barrier.get(&key).unwrap().unwrap();
    let mut record = TokenRecord::decode(raw.as_slice()).unwrap();
    (record.uses_total, record.uses_remaining) = (1, 1);
    s.inner.barrier.put(&key, &record.encode_to_vec()).unwrap();
    s.use_token(child.token.expose(), local(), T0).unwrap();

    let crashed_at = T0 + 1_000;
    s.danger_test_mark_spent_without_revoking(&parent.accessor, crashed_at)
        .unwrap();
    assert!(s
        .lookup_accessor(&parent.accessor, crashed_at)
        .unwrap()
        .is_none());
    s.use_token(child.token.expose(), local(), crashed_at)
        .unwrap();

    let restarted = TokenStore::new(
        s.inner.barrier.clone(),
        Arc::new(Names(vec!["a", "b", "c"])),
        Clock::starting_at(crashed_at),
    );
    restarted.on_unseal(crashed_at).unwrap();
    let after = crashed_at + 1_000;
    let out = restarted.sweep(after).unwrap();
    assert_eq!(out.revoked, 2, "{out:?}");
    assert!(matches!(
        restarted.use_token(child.token.expose(), local(), after),
        Err(TokenError::Invalid)
    ));
    assert!(restarted
        .lookup_accessor(&child.accessor, after)
        .unwrap()
        .is_none());
    // Nothing of either token is left in the index.
    let keys = s.inner.barrier.scan_keys(TTL_PREFIX).unwrap();
    assert!(
        !keys
            .iter()
            .any(|k| k.ends_with(&parent.accessor) || k.ends_with(&child.accessor)),
        "{keys:?}"
    );
}

/// A last use that is not cut short leaves the token's use as it was (its
/// expiry unchanged) and no index entry behind.
#[test]
fn the_last_use_reports_the_token_as_it_was_and_cleans_the_index() {
    let (_d, s) = store();
    let mut r = req("svc", &["a"], 100);
    r.uses = 1;
    let t = s.issue(r, T0).unwrap();
    let used = s.use_token(t.token.expose(), local(), T0 + 10).unwrap();
    assert_eq!(used.record.expires_at_ms, T0 + 100_000);
    assert_eq!(used.record.uses_remaining, 0);
    assert!(s.inner.barrier.scan_keys(TTL_PREFIX).unwrap().is_empty());
}

/// Children issued from many tasks on a 2-worker runtime while their parent
/// is revoked: every child made is revoked with it (the revocation counts
/// each), none is made after it, and each task ends on `ParentInvalid`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_issued_on_the_runtime_never_outlive_a_racing_revoke() {
    let (_d, s) = store();
    let s = Arc::new(s);
    let parent = s.issue(req("svc", &["a"], 100), T0).unwrap();
    let made = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (s, made, acc) = (s.clone(), made.clone(), parent.accessor.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let mut r = req("svc", &["a"], 100);
                r.parent_accessor = Some(acc.clone());
                match s.issue_on_runtime(r, Delegation::default()).await {
                    Ok(child) => made.lock().unwrap().push(child),
                    Err(e) => return e,
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    // Revoke once children are being made, while the tasks go on.
    tokio::time::timeout(Duration::from_secs(60), async {
        while made.lock().unwrap().len() < 20 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("children are made");
    let revoker = s.clone();
    let acc = parent.accessor.clone();
    let revoked = tokio::task::spawn_blocking(move || revoker.revoke(&acc))
        .await
        .unwrap()
        .unwrap();
    for task in tasks {
        assert!(matches!(task.await.unwrap(), TokenError::ParentInvalid));
    }
    let made = made.lock().unwrap();
    assert_eq!(
        revoked as usize,
        made.len() + 1,
        "the parent and every child"
    );
    for child in made.iter() {
        assert!(matches!(
            s.use_token(child.token.expose(), local(), T0),
            Err(TokenError::Invalid)
        ));
    }
}

/// A child issue waits for its turn without holding a runtime worker: on a
/// one-thread runtime, while the turn is taken, the waiting child lets
/// another task run (an issue without a parent takes no turn). While the
/// store's write lock is held (as a revocation holds it), an issue on
/// another thread's runtime waits for it, and completes once it is free.
#[tokio::test(flavor = "current_thread")]
async fn a_child_issue_waits_for_its_turn_without_blocking_the_runtime() {
    let bound = Duration::from_secs(60);
    let (_d, s) = store();
    let s = Arc::new(s);
    let parent = s.issue(req("svc", &["a"], 100), T0).unwrap();
    let child_of_parent = || {
        let mut r = req("svc", &["a"], 100);
        r.parent_accessor = Some(parent.accessor.clone());
        r
    };
    let turn = s.inner.child_turn.lock().await;
    let waiting = tokio::spawn({
        let (s, r) = (s.clone(), child_of_parent());
        async move { s.issue_on_runtime(r, Delegation::default()).await }
    });
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished(), "the child waits for the turn");
    let free = tokio::time::timeout(
        bound,
        s.issue_on_runtime(req("other", &["a"], 100), Delegation::default()),
    )
    .await
    .expect("an issue without a parent takes no turn")
    .unwrap();
    s.use_token(free.token.expose(), local(), T0).unwrap();
    drop(turn);
    let child = tokio::time::timeout(bound, waiting)
        .await
        .expect("the child gets its turn")
        .unwrap()
        .unwrap();
    s.use_token(child.token.expose(), local(), T0).unwrap();

    // The write lock held on another thread: the turn's holder waits for it.
    let held = s.inner.writes.lock().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let other = std::thread::spawn({
        let (s, r) = (s.clone(), child_of_parent());
        move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let issued = rt.block_on(s.issue_on_runtime(r, Delegation::default()));
            tx.send(issued).unwrap();
        }
    });
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    drop(held);
    let second = rx
        .recv_timeout(bound)
        .expect("issued once the lock is free");
    s.use_token(second.unwrap().token.expose(), local(), T0)
        .unwrap();
    other.join().unwrap();
}

/// Two token stores ("nodes") over one shared store, both unsealed.
fn two_nodes() -> (tempfile::TempDir, TokenStore, TokenStore) {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = crate::storage::test_sled::two_barriers(dir.path());
    let node = |barrier: Barrier| {
        let store = TokenStore::new(
            Arc::new(barrier),
            Arc::new(Names(vec!["a", "b", "c"])),
            Clock::starting_at(T0),
        );
        store.on_unseal(T0).unwrap();
        store
    };
    (dir, node(one), node(two))
}

fn child_of(parent_accessor: &str, identity: &str) -> TokenRequest {
    let mut r = req(identity, &["a"], 60);
    r.parent_accessor = Some(parent_accessor.to_owned());
    r
}

/// Every key a token has under `tokens/` (its record, index entry and
/// links), by its accessor.
fn keys_of(store: &TokenStore, accessor: &str) -> Vec<String> {
    store
        .barrier()
        .scan_keys("tokens/")
        .unwrap()
        .into_iter()
        .filter(|k| k.contains(accessor))
        .collect()
}

#[test]
fn a_child_whose_parent_is_revoked_on_another_node_before_its_record_is_not_issued() {
    let (_d, one, two) = two_nodes();
    let parent = one.issue(req("svc", &["a"], 600), T0).unwrap();
    // Node one has written the child's index entry and link, not its
    // record, when node two revokes the parent.
    let (two_, parent_acc) = (two.clone(), parent.accessor.clone());
    let revoked = Arc::new(std::sync::Mutex::new(None));
    let seen = revoked.clone();
    one.inner.hooks.before_anchored_write.set(move || {
        *seen.lock().unwrap() = Some(two_.revoke(&parent_acc).unwrap());
    });
    let issued = one.issue(child_of(&parent.accessor, "svc"), T0 + 1);
    assert!(
        matches!(issued, Err(TokenError::ParentInvalid)),
        "the child must be refused, got {:?}",
        issued.map(|t| t.accessor)
    );
    assert_eq!(
        *revoked.lock().unwrap(),
        Some(1),
        "the hook ran the revocation"
    );
    // Nothing of the child, or of the parent, is left.
    let left = one.barrier().scan_keys("tokens/").unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(two
        .lookup_accessor(&parent.accessor, T0 + 2)
        .unwrap()
        .is_none());
}

/// Node two has marked the parent (and read its children: none) when node
/// one issues a child: the child is refused, and the revocation removes the
/// parent alone. (Before the marks, this child was issued, then found by
/// the revocation's second scan.)
#[test]
fn a_child_issued_after_a_revocation_on_another_node_marked_its_parent_is_refused() {
    let (_d, one, two) = two_nodes();
    let parent = one.issue(req("svc", &["a"], 600), T0).unwrap();
    let (one_, parent_acc) = (one.clone(), parent.accessor.clone());
    let issued = Arc::new(std::sync::Mutex::new(None));
    let seen = issued.clone();
    two.inner.hooks.after_revoke_plan.set(move || {
        *seen.lock().unwrap() = Some(
            one_.issue(child_of(&parent_acc, "svc"), T0 + 1)
                .map(|t| t.accessor),
        );
    });
    let count = two.revoke(&parent.accessor).unwrap();
    let issued = issued.lock().unwrap().take().expect("the hook issued");
    assert!(
        matches!(issued, Err(TokenError::ParentInvalid)),
        "{issued:?}"
    );
    assert_eq!(count, 1, "the parent");
    let left = one.barrier().scan_keys("tokens/").unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Arms `one`'s hook before the child's record: each run renews `parent` on
/// `two` and counts itself; it arms itself again until it has run `times`.
fn renew_before_each_try(
    one: &TokenStore,
    two: &TokenStore,
    parent: &str,
    times: usize,
    runs: Arc<std::sync::atomic::AtomicUsize>,
) {
    let (one_, two_, parent_) = (one.clone(), two.clone(), parent.to_owned());
    one.inner.hooks.before_anchored_write.set(move || {
        let run = runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        two_.renew(&parent_, Some(Duration::from_secs(60 + run as u64)), T0 + 1)
            .unwrap();
        if run < times {
            renew_before_each_try(&one_, &two_, &parent_, times, runs);
        }
    });
}

#[test]
fn a_child_issue_reads_a_parent_renewed_on_another_node_again() {
    let (_d, one, two) = two_nodes();
    let mut r = req("svc", &["a"], 60);
    r.max_ttl = Duration::from_secs(3600);
    let parent = one.issue(r, T0).unwrap();
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    renew_before_each_try(&one, &two, &parent.accessor, 1, runs.clone());
    let child = one
        .issue(child_of(&parent.accessor, "svc"), T0 + 1)
        .unwrap();
    // The first try found the parent renewed; the second wrote the child.
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    let renewed = one
        .lookup_accessor(&parent.accessor, T0 + 2)
        .unwrap()
        .unwrap();
    assert_eq!(
        renewed.expires_at_ms,
        T0 + 1 + 61_000,
        "the hook renewed the parent"
    );
    let used = two
        .use_token(child.token.expose(), local(), T0 + 2)
        .unwrap();
    assert_eq!(used.record.parent_accessor, parent.accessor);
    assert_eq!(
        keys_of(&one, &child.accessor).len(),
        3,
        "record, index entry, link"
    );
    assert_eq!(two.revoke(&parent.accessor).unwrap(), 2);
}

#[test]
fn a_child_issue_gives_up_after_three_renewals_and_leaves_nothing() {
    let (_d, one, two) = two_nodes();
    let mut r = req("svc", &["a"], 60);
    r.max_ttl = Duration::from_secs(3600);
    let parent = one.issue(r, T0).unwrap();
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    renew_before_each_try(&one, &two, &parent.accessor, 10, runs.clone());
    let refused = one.issue(child_of(&parent.accessor, "svc"), T0 + 1);
    assert!(
        matches!(refused, Err(TokenError::Contended)),
        "{:?}",
        refused.map(|t| t.accessor)
    );
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), ANCHOR_TRIES);
    // Only the parent's record and index entry are stored.
    let left = one.barrier().scan_keys("tokens/").unwrap();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        left.iter().all(|k| k.contains(&parent.accessor)),
        "{left:?}"
    );
}

/// Node one has written the child's link, not its record, when node two
/// marks the parent and reads its children (the link, without a record).
/// Node one's record write then fails its anchor (the parent's record
/// changed) and its next read finds the parent marked: the child is refused,
/// and nothing of it stays. (Before the marks, this child was issued, and
/// found by reading it again after the delete.)
#[test]
fn a_child_linked_before_a_mark_on_another_node_and_written_after_is_refused() {
    let (_d, one, two) = two_nodes();
    let parent = one.issue(req("svc", &["a"], 600), T0).unwrap();
    let (linked_tx, linked_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    one.inner.hooks.before_anchored_write.set(move || {
        linked_tx.send(()).unwrap();
        go_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the revocation marked");
    });
    let (one_, parent_acc) = (one.clone(), parent.accessor.clone());
    let issuer = std::thread::spawn(move || {
        one_.issue(child_of(&parent_acc, "svc"), T0 + 1)
            .map(|t| t.accessor)
    });
    linked_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the child's link is written");
    let issued = Arc::new(std::sync::Mutex::new(None));
    let (issued_, planned_links) = (issued.clone(), Arc::new(std::sync::Mutex::new(0)));
    let (two_, parent_acc, seen) = (two.clone(), parent.accessor.clone(), planned_links.clone());
    two.inner.hooks.after_revoke_plan.set(move || {
        // The parent was marked with the link there and no record.
        *seen.lock().unwrap() = two_
            .barrier()
            .scan_keys(&format!("{CHILDREN_PREFIX}{parent_acc}/"))
            .unwrap()
            .len();
        go_tx.send(()).unwrap();
        *issued_.lock().unwrap() = Some(issuer.join().unwrap());
    });
    let count = two.revoke(&parent.accessor).unwrap();
    let issued = issued.lock().unwrap().take().expect("the issue ended");
    assert_eq!(*planned_links.lock().unwrap(), 1);
    assert!(
        matches!(issued, Err(TokenError::ParentInvalid)),
        "{issued:?}"
    );
    assert_eq!(count, 1, "the parent");
    let left = one.barrier().scan_keys("tokens/").unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A tree: `parent` (a login token) -> a -> b, and parent -> c; all issued
/// on `node`. Returns (parent, [a, b, c]).
fn marked_tree(node: &TokenStore) -> (IssuedToken, Vec<IssuedToken>) {
    let parent = node.issue(req("svc", &["a"], 600), T0).unwrap();
    let a = node.issue(child_of(&parent.accessor, "svc"), T0).unwrap();
    let b = node.issue(child_of(&a.accessor, "svc"), T0).unwrap();
    let c = node.issue(child_of(&parent.accessor, "svc"), T0).unwrap();
    (parent, vec![a, b, c])
}

/// Every way a token is accepted, on `node`: each must refuse it.
fn assert_refused(node: &TokenStore, token: &IssuedToken, now_ms: u64, what: &str) {
    assert!(
        matches!(
            node.use_token(token.token.expose(), local(), now_ms),
            Err(TokenError::Invalid)
        ),
        "{what}: used"
    );
    assert!(
        node.lookup_token(token.token.expose(), now_ms)
            .unwrap()
            .is_none(),
        "{what}: found by its text"
    );
    assert!(
        node.lookup_accessor(&token.accessor, now_ms)
            .unwrap()
            .is_none(),
        "{what}: found by its accessor"
    );
    assert!(
        matches!(
            node.renew(&token.accessor, None, now_ms),
            Err(TokenError::NotFound)
        ),
        "{what}: renewed"
    );
    let child = node.issue(child_of(&token.accessor, "svc"), now_ms);
    assert!(
        matches!(child, Err(TokenError::ParentInvalid)),
        "{what}: issued a child: {:?}",
        child.map(|t| t.accessor)
    );
    let delegated = node.issue_with(
        req("svc", &["a"], 60),
        Delegation {
            may_act: None,
            actor_accessor: Some(token.accessor.clone()),
        },
        now_ms,
    );
    assert!(
        matches!(delegated, Err(TokenError::ActorInvalid)),
        "{what}: acted for: {:?}",
        delegated.map(|t| t.accessor)
    );
}

/// A revocation cut short right after its marks (a crash of its node
/// before any delete): every marked token is refused at once by both
/// nodes, whatever the way in. The other node's sweep leaves the marks to
/// the revocation while it may still run (`REVOKING_GRACE_MS`), then
/// finishes it: every record, index entry, link and mark gone, each token
/// counted once.
#[test]
fn a_revocation_cut_short_after_its_marks_leaves_nothing_usable_and_is_swept() {
    let (_d, one, two) = two_nodes();
    let (parent, tree) = marked_tree(&one);
    let outside = one.issue(req("svc", &["a"], 600), T0).unwrap();
    // Node two's revocation writes its marks, and stops (the crash).
    let plan = two.mark_tree(&parent.accessor, T0, false, 127).unwrap();
    assert_eq!(plan.count, 4);
    drop(plan);
    let marks = one.barrier().scan_keys(REVOKING_PREFIX).unwrap();
    assert_eq!(marks.len(), 4, "{marks:?}");
    let now = T0 + 1_000;
    for node in [&one, &two] {
        for (i, token) in std::iter::once(&parent).chain(&tree).enumerate() {
            assert_refused(node, token, now, &format!("token {i}"));
        }
        node.use_token(outside.token.expose(), local(), now)
            .unwrap();
    }
    // The marks are young: a revocation may still be running on node two.
    let early = one.sweep(now).unwrap();
    assert_eq!(
        (early.revoked, early.next_ms),
        (0, Some(T0 + REVOKING_GRACE_MS))
    );
    // Once they are old, node one's sweep finishes the revocation.
    let later = T0 + REVOKING_GRACE_MS;
    let swept = one.sweep(later).unwrap();
    assert_eq!(swept.revoked, 4, "{swept:?}");
    for token in std::iter::once(&parent).chain(&tree) {
        assert!(keys_of(&one, &token.accessor).is_empty());
    }
    let left = one.barrier().scan_keys("tokens/").unwrap();
    assert_eq!(left.len(), 2, "the outside token alone: {left:?}");
    assert_eq!(one.sweep(later).unwrap().revoked, 0);
}

/// The time of the latest `tokens/revoking/` mark.
fn latest_mark(node: &TokenStore) -> u64 {
    let end = prefix_end(REVOKING_PREFIX);
    node.barrier()
        .scan_range(REVOKING_PREFIX, &end, 1024)
        .unwrap()
        .iter()
        .map(|(_, at)| u64::from_be_bytes(<[u8; 8]>::try_from(at.as_slice()).unwrap()))
        .max()
        .expect("a mark")
}

/// A crash in the middle of the marks (here: right after the root's):
/// the root is refused at once; the tokens below it, not marked yet, are not
/// (the one window left), until the sweep finishes the revocation, which
/// marks and removes them too.
#[test]
fn a_revocation_cut_short_between_its_marks_is_finished_by_the_sweep() {
    let (_d, one, two) = two_nodes();
    let (parent, tree) = marked_tree(&one);
    two.inner
        .hooks
        .after_mark
        .set(|| panic!("test: the revoking node stops after its first mark"));
    let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        two.revoke(&parent.accessor)
    }));
    assert!(crashed.is_err());
    let now = T0 + 1_000;
    assert_refused(&one, &parent, now, "the root");
    for token in &tree {
        one.use_token(token.token.expose(), local(), now).unwrap();
    }
    // No child is issued below the root any more, however deep.
    let below = one.issue(child_of(&tree[1].accessor, "svc"), now);
    assert!(
        matches!(below, Err(TokenError::ParentInvalid)),
        "{:?}",
        below.map(|t| t.accessor)
    );
    let marked_at = latest_mark(&one);
    assert_eq!(one.sweep(marked_at).unwrap().revoked, 0);
    let swept = one.sweep(marked_at + REVOKING_GRACE_MS).unwrap();
    assert_eq!(swept.revoked, 4, "{swept:?}");
    for token in std::iter::once(&parent).chain(&tree) {
        assert_refused(&two, token, now, "after the sweep");
    }
    let left = one.barrier().scan_keys("tokens/").unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A link to a token that never got a record, under a token a revocation
/// marks, goes with the tree: no record can be written under a marked token.
#[test]
fn a_link_without_a_record_under_a_marked_token_goes_with_the_tree() {
    let (_d, one, _two) = two_nodes();
    let parent = one.issue(req("svc", &["a"], 600), T0).unwrap();
    let link = format!("{CHILDREN_PREFIX}{}/kwa_neverwritten", parent.accessor);
    one.barrier().put(&link, b"").unwrap();
    assert_eq!(one.revoke(&parent.accessor).unwrap(), 1);
    assert!(one.barrier().get(&link).unwrap().is_none());
    assert!(one.barrier().scan_keys("tokens/").unwrap().is_empty());
}

/// The chase: a chain issued on node one (parent -> a -> b -> c); node two
/// revokes the parent; each time node two's revocation reaches `point`, the
/// holder issues a child of its newest token on node one (and arms the hook
/// again, at most `CHASE_ROUNDS` times). Returns (tokens in the chain at the
/// end, times the holder tried, times it was refused, the count revoked),
/// once every token of the chain is checked refused on both nodes and
/// nothing of the tree is left.
fn chase(point: fn(&TestHooks) -> &crate::test_hook::Hook) -> (usize, usize, usize, u32) {
    const CHASE_ROUNDS: usize = 12;
    type Chain = Arc<std::sync::Mutex<Vec<IssuedToken>>>;
    type Counter = Arc<std::sync::atomic::AtomicUsize>;
    fn arm(
        point: fn(&TestHooks) -> &crate::test_hook::Hook,
        one: TokenStore,
        two: TokenStore,
        chain: Chain,
        tries: Counter,
        refused: Counter,
    ) {
        let hooks = two.clone();
        point(&hooks.inner.hooks).set(move || {
            let round = tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let newest = chain.lock().unwrap().last().unwrap().accessor.clone();
            match one.issue(child_of(&newest, "svc"), T0 + 1) {
                Ok(child) => chain.lock().unwrap().push(child),
                Err(TokenError::ParentInvalid) => {
                    refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                Err(e) => panic!("round {round}: {e}"),
            }
            if round < CHASE_ROUNDS {
                arm(point, one, two, chain, tries, refused);
            }
        });
    }
    let (_d, one, two) = two_nodes();
    let parent = one.issue(req("svc", &["a"], 600), T0).unwrap();
    let root = parent.accessor.clone();
    let mut tokens = vec![parent];
    for _ in 0..3 {
        let next = one
            .issue(child_of(&tokens[tokens.len() - 1].accessor, "svc"), T0)
            .unwrap();
        tokens.push(next);
    }
    let chain: Chain = Arc::new(std::sync::Mutex::new(tokens));
    let (tries, refused): (Counter, Counter) = Default::default();
    arm(
        point,
        one.clone(),
        two.clone(),
        chain.clone(),
        tries.clone(),
        refused.clone(),
    );
    let count = two.revoke(&root).unwrap();
    // The hook, if still armed, holds both stores: let it go.
    point(&two.inner.hooks).set(|| {});
    let chain = chain.lock().unwrap();
    for node in [&one, &two] {
        for (i, token) in chain.iter().enumerate() {
            assert_refused(node, token, T0 + 2, &format!("token {i}"));
        }
    }
    let left = one.barrier().scan_keys("tokens/").unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
    (
        chain.len(),
        tries.load(std::sync::atomic::Ordering::SeqCst),
        refused.load(std::sync::atomic::Ordering::SeqCst),
        count,
    )
}

/// The chase as it ran before the marks: after each plan of node two's
/// revocation, before its delete. Then every round found the holder's new
/// child and planned once more, for as long as the holder kept going (the
/// test's 12 rounds: 16 tokens). Now the plan comes after the marks: the
/// holder's one try is refused, and the revocation ends with the four
/// tokens it started with.
#[test]
fn a_chase_between_a_revocations_plan_and_its_delete_ends_at_once() {
    assert_eq!(
        chase(|hooks| &hooks.after_revoke_plan),
        (4, 1, 1, 4),
        "(tokens in the chain, tries, refused, revoked)"
    );
}

/// The chase inside the marks: after each of node two's marks (before it
/// reads that token's children), the holder issues a child of its newest
/// token, which is below the marks so far. Each such issue is refused from
/// the root's mark on (the lineage check), so the revocation marks the four
/// tokens it started with, in four steps, and ends. (Marks without the
/// lineage check do not end it: the holder stays one level ahead, and the
/// test's 12 rounds end with 16 tokens.)
#[test]
fn a_chase_below_a_tree_being_marked_ends_at_the_roots_mark() {
    assert_eq!(
        chase(|hooks| &hooks.after_mark),
        (4, 4, 4, 4),
        "(tokens in the chain, tries, refused, revoked)"
    );
}

/// A child issue racing the marks: node two marks a token two levels
/// above the child's parent (the parent itself is not marked yet) between
/// node one's link and record. The record write fails on the lineage's
/// mark, and the issue is refused as under a revoked parent, not retried
/// into `Contended`; nothing of the child stays.
#[test]
fn a_child_issue_racing_a_mark_above_its_parent_is_refused_and_leaves_nothing() {
    let (_d, one, two) = two_nodes();
    let (parent, tree) = marked_tree(&one);
    let (two_, root) = (two.clone(), parent.accessor.clone());
    one.inner.hooks.before_anchored_write.set(move || {
        assert!(matches!(two_.mark(&root, T0).unwrap(), Mark::Written(_)));
    });
    let before = one.barrier().scan_keys("tokens/").unwrap();
    // b's parent is a, whose parent is the root.
    let refused = one.issue(child_of(&tree[1].accessor, "svc"), T0 + 1);
    assert!(
        matches!(refused, Err(TokenError::ParentInvalid)),
        "{:?}",
        refused.map(|t| t.accessor)
    );
    assert!(!one.inner.hooks.before_anchored_write.is_set());
    let mut after = one.barrier().scan_keys("tokens/").unwrap();
    after.retain(|k| !k.starts_with(REVOKING_PREFIX));
    assert_eq!(after, before, "only the mark was added");
    // The parent itself marked while its child is written: its next read
    // finds the mark and refuses.
    let lone = one.issue(req("svc", &["a"], 600), T0).unwrap();
    let (two_, acc) = (two.clone(), lone.accessor.clone());
    one.inner.hooks.before_anchored_write.set(move || {
        assert!(matches!(two_.mark(&acc, T0).unwrap(), Mark::Written(_)));
    });
    let before = one.barrier().scan_keys("tokens/").unwrap();
    let refused = one.issue(child_of(&lone.accessor, "svc"), T0 + 1);
    assert!(
        matches!(refused, Err(TokenError::ParentInvalid)),
        "{:?}",
        refused.map(|t| t.accessor)
    );
    assert!(!one.inner.hooks.before_anchored_write.is_set());
    let mut after = one.barrier().scan_keys("tokens/").unwrap();
    after.retain(|k| !k.starts_with(REVOKING_PREFIX));
    let mut before = before;
    before.retain(|k| !k.starts_with(REVOKING_PREFIX));
    assert_eq!(after, before, "nothing of the child");
}

/// A renewal on node one reads the token, then node two marks it, then the
/// renewal writes: its write is conditional on the record it read, so it
/// fails, reads the marked record and refuses; the mark stays.
#[test]
fn a_renewal_racing_a_mark_on_another_node_does_not_unmark() {
    let (_d, one, two) = two_nodes();
    let mut r = req("svc", &["a"], 60);
    r.max_ttl = Duration::from_secs(3600);
    let token = one.issue(r, T0).unwrap();
    let (two_, acc) = (two.clone(), token.accessor.clone());
    one.inner.hooks.before_renew_write.set(move || {
        assert!(matches!(two_.mark(&acc, T0).unwrap(), Mark::Written(_)));
    });
    let renewed = one.renew(&token.accessor, Some(Duration::from_secs(600)), T0 + 1);
    assert!(
        matches!(renewed, Err(TokenError::NotFound)),
        "{:?}",
        renewed.map(|i| i.expires_at_ms)
    );
    assert!(!one.inner.hooks.before_renew_write.is_set());
    let (record, _) = one.record_stamped(&token.accessor).unwrap().unwrap();
    assert!(record.revoking && record.spent);
    assert_eq!(record.expires_at_ms, T0 + 60_000, "not renewed");
    for node in [&one, &two] {
        assert_refused(node, &token, T0 + 2, "the marked token");
    }
}

/// Node two revokes a token; after its first mark, node one revokes that
/// token's parent. Each token is counted by the revocation that marked it:
/// three tokens, three in all (before the marks, five: each counted what
/// its plan found).
#[test]
fn overlapping_revocations_on_two_nodes_count_each_token_once() {
    let (_d, one, two) = two_nodes();
    let (parent, tree) = marked_tree(&one);
    let (one_, root) = (one.clone(), parent.accessor.clone());
    let outer = Arc::new(std::sync::Mutex::new(None));
    let seen = outer.clone();
    two.inner.hooks.after_mark.set(move || {
        *seen.lock().unwrap() = Some(one_.revoke(&root).unwrap());
    });
    // a, with b under it.
    let inner = two.revoke(&tree[0].accessor).unwrap();
    let outer = outer.lock().unwrap().take().expect("the hook revoked");
    assert_eq!((inner, outer), (1, 3), "(a; the parent, b and c)");
    let left = one.barrier().scan_keys("tokens/").unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// On sled nothing of the marks is written: no `revoking` record, no
/// `tokens/revoking/` entry, no lineage; on a shared store a grandchild
/// lists the tokens above its parent.
#[test]
fn marks_and_lineages_are_written_only_on_a_shared_store() {
    let (_d, s) = store();
    let (parent, tree) = marked_tree(&s);
    assert!(s
        .record(&tree[1].accessor)
        .unwrap()
        .unwrap()
        .lineage
        .is_empty());
    let plan = s.revoke_plan(&parent.accessor, 1024).unwrap();
    assert_eq!(plan.count, 4);
    assert!(plan
        .batches
        .iter()
        .flatten()
        .all(|k| !k.starts_with(REVOKING_PREFIX)));
    assert_eq!(s.revoke(&parent.accessor).unwrap(), 4);
    assert!(s.barrier().scan_keys("tokens/").unwrap().is_empty());

    let (_d, one, _two) = two_nodes();
    let (parent, tree) = marked_tree(&one);
    let lineage = |t: &IssuedToken| one.record(&t.accessor).unwrap().unwrap().lineage;
    assert!(
        lineage(&tree[0]).is_empty(),
        "a child of a token without a parent"
    );
    assert_eq!(lineage(&tree[1]), std::slice::from_ref(&parent.accessor));
    let d = one.issue(child_of(&tree[1].accessor, "svc"), T0).unwrap();
    assert_eq!(
        lineage(&d),
        [tree[0].accessor.clone(), parent.accessor.clone()]
    );
}

#[test]
fn a_delegated_token_whose_actor_is_revoked_on_another_node_is_not_issued() {
    let (_d, one, two) = two_nodes();
    let actor = one.issue(req("agent", &["a"], 600), T0).unwrap();
    let (two_, actor_acc) = (two.clone(), actor.accessor.clone());
    one.inner.hooks.before_anchored_write.set(move || {
        assert_eq!(two_.revoke(&actor_acc).unwrap(), 1);
    });
    let refused = one.issue_with(
        req("svc", &["a"], 600),
        Delegation {
            may_act: None,
            actor_accessor: Some(actor.accessor.clone()),
        },
        T0 + 1,
    );
    assert!(
        matches!(refused, Err(TokenError::ActorInvalid)),
        "{:?}",
        refused.map(|t| t.accessor)
    );
    let left = one.barrier().scan_keys("tokens/").unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Arms `two`'s hook before its mark's write: each run renews `token` on
/// `one` and counts itself; it arms itself again until it has run 100 times.
fn renew_before_each_mark(
    one: &TokenStore,
    two: &TokenStore,
    token: &str,
    runs: Arc<std::sync::atomic::AtomicUsize>,
) {
    let (one_, two_, token_) = (one.clone(), two.clone(), token.to_owned());
    two.inner.hooks.before_mark_write.set(move || {
        let run = runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        one_.renew(&token_, Some(Duration::from_secs(60 + run as u64)), T0 + 1)
            .unwrap();
        if run < 100 {
            renew_before_each_mark(&one_, &two_, &token_, runs);
        }
    });
}

/// A holder renewing its token on node one between each read and write of
/// node two's mark, as often as it can: the mark loses `MARK_TRIES` tries,
/// then is written over the latest record read. The revocation does not
/// fail, the token is refused on both nodes, and all that is left is the
/// index entry of the last renewal, which the sweeper drops.
#[test]
fn a_mark_is_written_even_when_renewals_on_another_node_win_every_try() {
    let (_d, one, two) = two_nodes();
    let mut r = req("svc", &["a"], 60);
    r.max_ttl = Duration::from_secs(3600);
    let token = one.issue(r, T0).unwrap();
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    renew_before_each_mark(&one, &two, &token.accessor, runs.clone());
    let count = two.revoke(&token.accessor);
    two.inner.hooks.before_mark_write.set(|| {});
    assert_eq!(count.unwrap(), 1);
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        MARK_TRIES + 1
    );
    for node in [&one, &two] {
        assert_refused(node, &token, T0 + 2, "the revoked token");
    }
    let left = one.barrier().scan_keys("tokens/").unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].starts_with(TTL_PREFIX), "{left:?}");
    let swept = two.sweep(T0 + 200_000 + ORPHAN_GRACE_MS).unwrap();
    assert_eq!(swept.revoked, 0);
    let left = one.barrier().scan_keys("tokens/").unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Every entry under `tokens/` that names `accessor` (its record excluded:
/// its ciphertext changes with each write), with its value.
fn entries_of(store: &TokenStore, accessor: &str) -> Vec<(String, Vec<u8>)> {
    store
        .barrier()
        .scan_prefix("tokens/")
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.contains(accessor) && !k.starts_with(ACCESSOR_PREFIX))
        .map(|(k, v)| (k, v.to_vec()))
        .collect()
}

/// A random generator that repeats itself yields a token whose accessor is
/// taken: the issue is refused on every write path, the first token keeps
/// its record, and its index entries are as they were (those the refused
/// issue wrote are removed, or put back where they were the first's own),
/// with no read of the accessor before the write (the write itself checks).
#[test]
fn a_repeated_token_is_refused_and_the_first_keeps_its_record_and_entries() {
    let (_d, s) = store();
    let (_d2, one, _two) = two_nodes();
    let parent = s.issue(req("svc", &["a", "b"], 600), T0).unwrap();
    let shared_parent = one.issue(req("svc", &["a", "b"], 600), T0).unwrap();
    let mut of_root = req("agent", &["a", "b"], 600);
    of_root.parent_accessor = Some(root(&s).accessor.clone());
    let of_root = s.issue(of_root, T0).unwrap();
    let root_req = || {
        let mut r = req("root", &["root"], 0);
        r.method = "root";
        r
    };
    let intruder = |parent: Option<&str>| {
        let mut r = req("intruder", &["b"], 30);
        r.parent_accessor = parent.map(str::to_owned);
        r
    };
    // (what, store, the first token's request, the repeated one's, the
    // actor the repeated one acts for)
    let cases: Vec<(&str, &TokenStore, TokenRequest, TokenRequest, Option<&str>)> = vec![
        ("a login", &s, req("svc", &["a"], 60), intruder(None), None),
        (
            "a child",
            &s,
            req("svc", &["a"], 60),
            intruder(Some(&parent.accessor)),
            None,
        ),
        (
            "a grandchild",
            &s,
            req("svc", &["a"], 60),
            child_of(&of_root.accessor, "intruder"),
            None,
        ),
        ("a root token", &s, req("svc", &["a"], 60), root_req(), None),
        (
            "the same identity and expiry",
            &s,
            req("svc", &["a"], 60),
            req("svc", &["b"], 60),
            None,
        ),
        (
            "the same identity and expiry, another parent",
            &s,
            child_of(&parent.accessor, "svc"),
            req("svc", &["a"], 60),
            None,
        ),
        (
            "the same parent, identity and expiry",
            &s,
            child_of(&parent.accessor, "svc"),
            child_of(&parent.accessor, "svc"),
            None,
        ),
        (
            "a login on a shared store",
            &one,
            req("svc", &["a"], 60),
            intruder(None),
            None,
        ),
        (
            "a child on a shared store",
            &one,
            req("svc", &["a"], 60),
            intruder(Some(&shared_parent.accessor)),
            None,
        ),
        (
            "a root token on a shared store",
            &one,
            req("svc", &["a"], 60),
            root_req(),
            None,
        ),
        (
            "a delegated token",
            &s,
            req("svc", &["a"], 60),
            req("intruder", &["a"], 30),
            Some(&parent.accessor),
        ),
        (
            "a delegated token on a shared store",
            &one,
            req("svc", &["a"], 60),
            req("intruder", &["a"], 30),
            Some(&shared_parent.accessor),
        ),
    ];
    for (what, store, first, repeated, actor) in cases {
        let first = store.issue(first, T0).unwrap();
        let entries = entries_of(store, &first.accessor);
        assert!(!entries.is_empty(), "{what}");
        let text = first.token.expose().to_owned();
        *store.inner.hooks.replay_mint.lock().unwrap() = Some(text.clone());
        let delegation = Delegation {
            may_act: None,
            actor_accessor: actor.map(str::to_owned),
        };
        let second = store.issue_with(repeated, delegation, T0);
        assert!(
            matches!(second, Err(TokenError::Random)),
            "{what}: {second:?}"
        );
        assert_eq!(entries_of(store, &first.accessor), entries, "{what}");
        let used = store.use_token(&text, local(), T0 + 1).unwrap();
        assert_eq!(used.record.accessor, first.accessor, "{what}");
        assert_eq!(used.record.identity, first.identity, "{what}");
        assert_eq!(used.record.policies, first.policies, "{what}");
    }
}
