//! Attacks on the detector from an outsider's side (task atkanom): each
//! test is an attack; it passes when the attack is refused or seen.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;

use super::tests::failed;
use super::*;

/// 2026-01-05 00:00 UTC.
const T0: u64 = 1_767_571_200_000;

fn no_owner(_: &str) -> Option<String> {
    None
}

/// Evasion: a guesser who changes address after each failure (any IPv6
/// host has a /64 to pick from) must still be seen as one burst.
#[test]
fn failed_logins_from_rotating_addresses_of_one_network_are_one_burst() {
    for (base, step) in [("2001:db8:7:1::", 1u128), ("203.0.113.0", 1u128)] {
        let mut d = Detector::new(AnomalyConfig::default());
        let mut found = Vec::new();
        for i in 0..40u128 {
            let source = match base.parse::<IpAddr>().unwrap() {
                IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) + i * step).into()),
                IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) + i as u32).into()),
            };
            found.extend(d.observe(&failed(T0 + i as u64 * 100, source), &mut no_owner));
        }
        assert_eq!(found.len(), 1, "{base}: {found:?}");
        assert_eq!(found[0].kind, Kind::FailedLogins);
        assert_eq!(found[0].identity, None, "a burst names no identity");
        let (_, _, sources) = d.sizes();
        assert_eq!(sources, 1, "{base}: one network held");
    }
}

/// Evasion without a credential: a flood of bad tokens fills the queue so
/// that the calls of identities (an insider's exfiltration) are dropped
/// unseen. Failed authentications may use only part of the queue.
#[test]
fn an_unauthenticated_flood_cannot_crowd_out_the_calls_of_identities() {
    let anomalies = Anomalies::new(&crate::metrics::Metrics::new());
    // No worker runs: nothing is taken from the queue.
    let ip: IpAddr = "198.51.100.9".parse().unwrap();
    for i in 0..(2 * CHANNEL_CAPACITY as u64) {
        anomalies.observe(failed(T0 + i, ip));
    }
    let flooded = anomalies.queued();
    assert!(flooded < CHANNEL_CAPACITY as u64, "{flooded} queued");
    for i in 0..100u64 {
        anomalies.observe(Observation {
            at_ms: T0 + i,
            identity: Some("insider".into()),
            accessor: Some("acc".into()),
            source: Some(ip),
            method: "keyward.v1.Secrets/Get",
            resource: Some(format!("secret/x/{i}")),
            capability: Some("read"),
            code: "OK",
        });
    }
    assert_eq!(
        anomalies.queued(),
        flooded + 100,
        "an identity's call dropped"
    );
}

/// Lockout: whatever the configuration struct holds (it is public; a
/// caller may build it without `parse_config`), an event an outsider can
/// cause without a credential only alerts.
#[test]
fn failed_logins_only_alert_even_if_the_config_struct_says_otherwise() {
    let cfg = AnomalyConfig {
        responses: [Response::DisableIdentity; 8],
        ..AnomalyConfig::default()
    };
    assert_eq!(cfg.response(Kind::FailedLogins), Response::Alert);
    assert_eq!(cfg.response(Kind::TokenReuse), Response::DisableIdentity);
}

/// Lockout: failed logins that name a victim (the login module knows
/// whose role was tried) only ever make an alert naming the victim; no
/// finding of another kind is made for it, and its baseline is untouched.
#[test]
fn failed_logins_naming_a_victim_make_only_a_failed_logins_finding() {
    let cfg = AnomalyConfig {
        responses: [Response::DisableIdentity; 8],
        ..AnomalyConfig::default()
    };
    let mut d = Detector::new(cfg);
    let mut found = Vec::new();
    for i in 0..100u64 {
        found.extend(d.count_identity_failures("victim", 5, T0 + i * 1000));
        found.extend(d.observe(
            &failed(T0 + i * 1000, "192.0.2.1".parse().unwrap()),
            &mut no_owner,
        ));
    }
    assert!(
        found.iter().all(|f| f.kind == Kind::FailedLogins),
        "{found:?}"
    );
    assert!(
        d.baseline("victim").is_none(),
        "a failure taught the baseline"
    );
    assert!(found
        .iter()
        .all(|f| d.config().response(f.kind) == Response::Alert));
}

/// Lockout through a denied call: a low-privileged identity whose calls are
/// refused teaches nothing and raises nothing (another identity's state is
/// never touched by them).
#[test]
fn denied_calls_of_an_identity_raise_nothing() {
    let cfg = AnomalyConfig {
        warmup_requests: 0,
        warmup_age: std::time::Duration::ZERO,
        ..AnomalyConfig::default()
    };
    let mut d = Detector::new(cfg);
    for i in 0..1_000u64 {
        let f = d.observe(
            &Observation {
                at_ms: T0 + i,
                identity: Some("low".into()),
                accessor: Some("acc-low".into()),
                source: Some(IpAddr::from([10, (i % 250) as u8, 0, 1])),
                method: "keyward.v1.Secrets/Get",
                resource: Some(format!("secret/victim/{i}")),
                capability: Some("read"),
                code: "PERMISSION_DENIED",
            },
            &mut no_owner,
        );
        assert!(f.is_empty(), "{f:?}");
    }
    assert_eq!(d.sizes(), (0, 0, 0));
}

/// Evasion: after its first `new_path` event, an identity reads a hundred
/// more secrets it never read within the minute, then goes quiet. The one
/// event per kind and minute must not hide them: the count is told once
/// the cooldown is over, and with the next event of the kind.
#[test]
fn the_cooldown_does_not_hide_the_rest_of_a_burst() {
    let cfg = AnomalyConfig {
        warmup_requests: 0,
        warmup_age: std::time::Duration::ZERO,
        ..AnomalyConfig::default()
    };
    let mut d = Detector::new(cfg);
    let read = |at_ms: u64, path: String| Observation {
        at_ms,
        identity: Some("insider".into()),
        accessor: Some("acc".into()),
        source: Some("10.1.2.3".parse().unwrap()),
        method: "keyward.v1.Secrets/Get",
        resource: Some(path),
        capability: Some("read"),
        code: "OK",
    };
    d.observe(
        &read(T0 - 5 * detector::COOLDOWN_MS, "secret/mine".into()),
        &mut no_owner,
    );
    let mut found = Vec::new();
    for i in 0..101u64 {
        found.extend(d.observe(
            &read(T0 + 1000 + i, format!("secret/other/{i}")),
            &mut no_owner,
        ));
    }
    let paths: Vec<&Finding> = found.iter().filter(|f| f.kind == Kind::NewPath).collect();
    assert_eq!(paths.len(), 1, "{found:?}");
    // Within the cooldown nothing more is told...
    assert!(d.held_back(T0 + 30_000).is_empty());
    // ...after it, the hundred held back are.
    let told = d.held_back(T0 + 1000 + detector::COOLDOWN_MS);
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0].kind, Kind::NewPath);
    assert_eq!(told[0].identity.as_deref(), Some("insider"));
    assert!(
        told[0].detail.contains("100 more new_path"),
        "{}",
        told[0].detail
    );
    // Told once.
    assert!(d.held_back(T0 + 10 * detector::COOLDOWN_MS).is_empty());
    // With another event of the kind, the count rides along instead.
    for i in 0..5u64 {
        d.observe(
            &read(
                T0 + 20 * detector::COOLDOWN_MS + i,
                format!("secret/more/{i}"),
            ),
            &mut no_owner,
        );
    }
    let next = d.observe(
        &read(T0 + 30 * detector::COOLDOWN_MS, "secret/last".into()),
        &mut no_owner,
    );
    let last: Vec<&Finding> = next.iter().filter(|f| f.kind == Kind::NewPath).collect();
    assert_eq!(last.len(), 1, "{next:?}");
    assert!(
        last[0].detail.contains("and 4 more of this kind held back"),
        "{}",
        last[0].detail
    );
}
