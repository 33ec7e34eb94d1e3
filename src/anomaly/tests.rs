//! Unit tests of the detector's rules, on synthetic observations with their
//! own times (no clock), and of the configuration.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;
use std::time::Duration;

use super::detector::{network_of, Detector, MAX_FAIL_SOURCES, MAX_IDENTITIES, MAX_TOKENS};
use super::*;

const MIN: u64 = 60_000;
const HOUR: u64 = 3_600_000;
const DAY: u64 = 86_400_000;
/// 2026-01-05 00:00 UTC, a Monday.
const T0: u64 = 1_767_571_200_000;

fn cfg() -> AnomalyConfig {
    AnomalyConfig::default()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn obs(identity: &str, at_ms: u64, source: &str, cap: &'static str, path: &str) -> Observation {
    Observation {
        at_ms,
        identity: Some(identity.to_owned()),
        // One token per host, as replicas that each log in.
        accessor: Some(format!("acc-{identity}-{source}")),
        source: Some(ip(source)),
        method: "keyward.v1.Secrets/Get",
        resource: Some(path.to_owned()),
        capability: Some(cap),
        code: "OK",
    }
}

fn no_owner(_: &str) -> Option<String> {
    None
}

/// A failed login (no identity) from `source`.
pub(super) fn failed(at_ms: u64, source: IpAddr) -> Observation {
    Observation {
        at_ms,
        identity: None,
        accessor: None,
        source: Some(source),
        method: "keyward.v1.Auth/Login",
        resource: Some("auth/login/approle".into()),
        capability: None,
        code: "UNAUTHENTICATED",
    }
}

/// A read by identity `app` with a token of its own, `acc-N`.
fn with_new_token(d: &mut Detector, n: u64, at: u64) {
    let mut o = obs("app", at, "10.0.0.1", "read", "secret/a");
    o.accessor = Some(format!("acc-{n}"));
    d.observe(&o, &mut no_owner);
}

/// A deterministic generator (xorshift) so the "varying" traffic is the
/// same on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const PATHS: [&str; 5] = [
    "secret/app/db",
    "secret/app/api",
    "secret/app/cache",
    "secret/app/queue",
    "secret/app/mail",
];
const HOSTS: [&str; 6] = [
    "10.0.1.7",
    "10.0.1.23",
    "10.0.2.9",
    "10.0.2.44",
    "192.168.5.10",
    "192.168.5.11",
];

/// Working-hours traffic (08:00-18:59 UTC) for `days` days from `start`:
/// each hour a few busy minutes of 2 to 30 requests, from any of the hosts,
/// on any of the paths. Returns every finding.
fn steady(d: &mut Detector, identity: &str, start: u64, days: u64, rng: &mut Rng) -> Vec<Finding> {
    let mut found = Vec::new();
    for day in 0..days {
        for hour in 8..19 {
            for _ in 0..3 {
                let minute = rng.below(60);
                let n = 2 + rng.below(29);
                for i in 0..n {
                    let at = start + day * DAY + hour * HOUR + minute * MIN + i * 1000;
                    let host = HOSTS[rng.below(HOSTS.len() as u64) as usize];
                    let path = PATHS[rng.below(PATHS.len() as u64) as usize];
                    found.extend(d.observe(&obs(identity, at, host, "read", path), &mut no_owner));
                }
            }
        }
    }
    found
}

/// A detector that has learned two weeks of `svc`'s steady traffic.
fn trained() -> (Detector, Rng, u64) {
    let mut d = Detector::new(cfg());
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let found = steady(&mut d, "svc", T0, 14, &mut rng);
    assert!(found.is_empty(), "learning raised {found:?}");
    (d, rng, T0 + 14 * DAY)
}

fn kinds(found: &[Finding]) -> Vec<Kind> {
    found.iter().map(|f| f.kind).collect()
}

#[test]
fn steady_traffic_that_varies_within_its_baseline_raises_nothing() {
    let (mut d, mut rng, next) = trained();
    // Two more weeks of the same kind of traffic: rates, hosts, paths and
    // hours all vary, within what was learned.
    let found = steady(&mut d, "svc", next, 14, &mut rng);
    assert_eq!(found, Vec::new());
    let b = d.baseline("svc").unwrap();
    assert!(b.requests > 1000, "{} requests", b.requests);
    assert!(b.peak >= 2.0);
}

#[test]
fn nothing_is_raised_during_warm_up() {
    let mut d = Detector::new(cfg());
    // A young identity does everything odd at once: new networks, paths,
    // hours and a burst; it is learning, so nothing is raised.
    let mut found = Vec::new();
    for i in 0..500u64 {
        let at = T0 + 3 * HOUR + i * 100;
        let host = format!("10.{}.{}.1", i % 200, i % 7);
        found.extend(d.observe(
            &obs("young", at, &host, "read", &format!("secret/x/{i}")),
            &mut no_owner,
        ));
    }
    assert_eq!(found, Vec::new());
}

#[test]
fn a_new_source_network_is_raised_once() {
    let (mut d, _, next) = trained();
    let at = next + 10 * HOUR;
    let f = d.observe(
        &obs("svc", at, "203.0.113.9", "read", PATHS[0]),
        &mut no_owner,
    );
    assert_eq!(kinds(&f), vec![Kind::NewSource]);
    assert!(f[0].detail.contains("203.0.113.0/24"), "{}", f[0].detail);
    assert_eq!(f[0].accessor.as_deref(), Some("acc-svc-203.0.113.9"));
    // Another host of a known /24 is not new; the same new one is learned.
    let f = d.observe(
        &obs("svc", at + 2 * MIN, "10.0.1.250", "read", PATHS[0]),
        &mut no_owner,
    );
    assert_eq!(f, Vec::new());
    let f = d.observe(
        &obs("svc", at + 3 * MIN, "203.0.113.77", "read", PATHS[0]),
        &mut no_owner,
    );
    assert_eq!(f, Vec::new());
}

#[test]
fn ipv6_sources_are_grouped_by_64() {
    assert_eq!(network_of(ip("2001:db8:1:2:aaaa::1")), "2001:db8:1:2::/64");
    assert_eq!(network_of(ip("2001:db8:1:2:ffff::9")), "2001:db8:1:2::/64");
    assert_eq!(network_of(ip("::ffff:10.1.2.3")), "10.1.2.0/24");
    assert_eq!(network_of(ip("10.1.2.3")), "10.1.2.0/24");
    // Written by hand: the same text `format!` gives, for every octet value.
    for octet in 0..=255u8 {
        for (a, b, c) in [(octet, 0, 9), (0, octet, 100), (255, 10, octet)] {
            let addr = IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, octet));
            assert_eq!(network_of(addr), format!("{a}.{b}.{c}.0/24"));
        }
    }
}

#[test]
fn a_path_outside_what_it_used_is_raised() {
    let (mut d, _, next) = trained();
    let at = next + 10 * HOUR;
    let f = d.observe(
        &obs("svc", at, HOSTS[0], "read", "secret/payroll/key"),
        &mut no_owner,
    );
    assert_eq!(kinds(&f), vec![Kind::NewPath]);
    assert!(f[0].detail.contains("secret/payroll/key"));
    // A known path with a capability it never used is new too.
    let f = d.observe(
        &obs("svc", at + 2 * MIN, HOSTS[0], "write", PATHS[0]),
        &mut no_owner,
    );
    assert_eq!(kinds(&f), vec![Kind::NewPath]);
}

#[test]
fn a_rate_far_above_the_baseline_is_raised_once_a_minute() {
    let (mut d, _, next) = trained();
    let at = next + 10 * HOUR;
    let mut found = Vec::new();
    for i in 0..1000 {
        found.extend(d.observe(
            &obs("svc", at + i * 50, HOSTS[1], "read", PATHS[1]),
            &mut no_owner,
        ));
    }
    assert_eq!(kinds(&found), vec![Kind::RateSpike]);
    assert!(
        found[0].detail.contains("requests this minute"),
        "{}",
        found[0].detail
    );
}

#[test]
fn use_after_long_dormancy_is_raised() {
    let (mut d, _, next) = trained();
    let at = next + 45 * DAY + 10 * HOUR;
    let f = d.observe(&obs("svc", at, HOSTS[2], "read", PATHS[2]), &mut no_owner);
    assert_eq!(kinds(&f), vec![Kind::DormantUse]);
    assert!(f[0].detail.contains("45 days"), "{}", f[0].detail);
}

#[test]
fn activity_at_an_hour_it_is_never_active_is_raised() {
    let (mut d, _, next) = trained();
    let f = d.observe(
        &obs("svc", next + 3 * HOUR, HOSTS[2], "read", PATHS[2]),
        &mut no_owner,
    );
    assert_eq!(kinds(&f), vec![Kind::UnusualHour]);
    // Next to a known hour (07:00, beside 08:00) is within the baseline.
    let f = d.observe(
        &obs("svc", next + DAY + 7 * HOUR, HOSTS[2], "read", PATHS[2]),
        &mut no_owner,
    );
    assert_eq!(f, Vec::new());
}

#[test]
fn the_same_token_from_two_sources_at_once_is_raised() {
    let (mut d, _, next) = trained();
    let at = next + 10 * HOUR;
    let shared = |at: u64, source: &str| Observation {
        accessor: Some("acc-shared".into()),
        ..obs("svc", at, source, "read", PATHS[0])
    };
    assert!(d.observe(&shared(at, "10.0.1.7"), &mut no_owner).is_empty());
    // Another host of the same /24 (replicas behind one subnet): no event.
    assert!(d
        .observe(&shared(at + 500, "10.0.1.23"), &mut no_owner)
        .is_empty());
    // Another network it knows, while the token is in use: a copy.
    let f = d.observe(&shared(at + 1000, "10.0.2.9"), &mut no_owner);
    assert_eq!(kinds(&f), vec![Kind::TokenReuse]);
    assert_eq!(f[0].accessor.as_deref(), Some("acc-shared"));
    // Long after, another network is a move, not a copy.
    let f = d.observe(&shared(at + DAY, "192.168.5.10"), &mut no_owner);
    assert_eq!(f, Vec::new());
}

#[test]
fn a_first_read_right_after_a_siblings_decommission_is_raised() {
    let (mut d, mut rng, next) = trained();
    let _ = steady(&mut d, "peer", T0, 14, &mut rng);
    let mut owners = |name: &str| -> Option<String> {
        match name {
            "svc" | "peer" | "gone" => Some("team-a".to_owned()),
            _ => Some("team-b".to_owned()),
        }
    };
    let at = next + 10 * HOUR;
    d.note_decommission("gone", "team-a", at);
    // A path it read before is not flagged.
    let f = d.observe(
        &obs("svc", at + MIN, HOSTS[0], "read", PATHS[0]),
        &mut owners,
    );
    assert_eq!(f, Vec::new());
    let f = d.observe(
        &obs("svc", at + 2 * MIN, HOSTS[0], "read", "secret/gone/db"),
        &mut owners,
    );
    assert_eq!(kinds(&f), vec![Kind::SiblingRead]);
    assert!(f[0].detail.contains("gone"));
    // After the window, a new read is only a new path.
    let later = at + 2 * DAY;
    let f = d.observe(
        &obs("peer", later, HOSTS[0], "read", "secret/gone/api"),
        &mut owners,
    );
    assert_eq!(kinds(&f), vec![Kind::NewPath]);
}

#[test]
fn a_burst_of_failed_logins_is_raised_per_source_and_memory_stays_bounded() {
    let mut d = Detector::new(cfg());
    let mut found = Vec::new();
    for i in 0..50 {
        found.extend(d.observe(&failed(T0 + i * 100, ip("198.51.100.7")), &mut no_owner));
    }
    assert_eq!(kinds(&found), vec![Kind::FailedLogins]);
    assert_eq!(found[0].identity, None);
    // A flood from 100 000 addresses: the state stays bounded, and the
    // flood is still seen (counted together past the bound).
    let mut found = Vec::new();
    for i in 0..100_000u64 {
        let source = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + i as u32));
        found.extend(d.observe(&failed(T0 + MIN + i, source), &mut no_owner));
    }
    let (baselines, tokens, sources) = d.sizes();
    assert_eq!(baselines, 0, "a failed login makes no baseline");
    assert_eq!(tokens, 0);
    assert!(sources <= MAX_FAIL_SOURCES, "{sources} sources held");
    assert!(
        found.iter().all(|f| f.kind == Kind::FailedLogins),
        "{found:?}"
    );
    assert!(!found.is_empty(), "the flood past the bound was not seen");
}

#[test]
fn identities_and_tokens_are_bounded() {
    let mut d = Detector::new(cfg());
    for i in 0..(MAX_IDENTITIES as u64 + 50) {
        let name = format!("id{i}");
        d.observe(
            &obs(&name, T0 + i, "10.0.0.1", "read", "secret/a"),
            &mut no_owner,
        );
    }
    let (baselines, tokens, _) = d.sizes();
    assert_eq!(baselines, MAX_IDENTITIES);
    assert!(tokens <= MAX_TOKENS);
}

/// One identity whose every call comes with a new token (a login per
/// call): once MAX_TOKENS are followed within the window, new tokens are
/// not followed, and the full table is swept once per window, not once per
/// new token (a sweep per login was a pass over 50,000 entries each).
#[test]
fn a_full_token_table_is_swept_once_its_oldest_entry_can_have_left_the_window() {
    let window = cfg().token_reuse_window.as_millis() as u64;
    let mut d = Detector::new(cfg());
    // Fill the table within one second.
    for n in 0..MAX_TOKENS as u64 {
        with_new_token(&mut d, n, T0 + n / 50);
    }
    assert_eq!(d.sizes().1, MAX_TOKENS);
    assert_eq!(d.token_sweeps(), 0);
    // 5,000 more tokens over the next minute: one sweep finds nothing to
    // drop; the rest wait for the oldest entry to leave the window.
    for n in 0..5_000u64 {
        with_new_token(&mut d, MAX_TOKENS as u64 + n, T0 + 1_000 + n * 12);
    }
    assert_eq!((d.token_sweeps(), d.sizes().1), (1, MAX_TOKENS));
    // Past the window of the oldest entries: the next new token sweeps
    // again, drops what left the window and is followed.
    let later = T0 + window + 500;
    with_new_token(&mut d, 9_000_000, later);
    assert_eq!(d.token_sweeps(), 2);
    let followed = d.sizes().1;
    assert!(followed < MAX_TOKENS, "{followed} followed after the sweep");
}

/// A table that rolls over: tokens keep arriving at the rate old ones leave
/// the window, so each new token finds one expired entry. It is swept at
/// most SWEEPS_PER_WINDOW (16) times a window, not once per new token (a
/// reviewer's case: the first version of `Sweep` swept 10,000 times here).
#[test]
fn a_table_that_rolls_over_is_not_swept_per_new_key() {
    let window = cfg().token_reuse_window.as_millis() as u64;
    let mut d = Detector::new(cfg());
    // One token every 6 ms fills the table in exactly one window (300 s).
    for n in 0..MAX_TOKENS as u64 {
        with_new_token(&mut d, n, T0 + 6 * n);
    }
    // Then one new token every 6 ms for another minute.
    let start = T0 + window + 1;
    for k in 0..10_000u64 {
        with_new_token(&mut d, MAX_TOKENS as u64 + k, start + 6 * k);
    }
    // A sweep at most every window / 16 (18.75 s) over 60 s: at most 5.
    let sweeps = d.token_sweeps();
    assert!((1..=5).contains(&sweeps), "{sweeps} sweeps");
    // The table still follows recent tokens: the sweeps made room for them.
    let followed = d.sizes().1;
    assert!(followed > MAX_TOKENS * 9 / 10, "{followed} followed");
}

/// Failed logins from more networks than MAX_FAIL_SOURCES within one
/// window (an outsider with many addresses): the full table of sources is
/// swept once, not once per new network.
#[test]
fn a_flood_from_many_networks_sweeps_the_failure_table_once_per_window() {
    let mut d = Detector::new(cfg());
    for i in 0..(4 * MAX_FAIL_SOURCES as u32) {
        // One address in each of as many /24 networks.
        let source = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + (i << 8)));
        d.observe(&failed(T0 + u64::from(i), source), &mut no_owner);
    }
    assert_eq!(d.sizes().2, MAX_FAIL_SOURCES);
    assert_eq!(d.fail_sweeps(), 1);
}

#[test]
fn config_refuses_anything_but_alert_for_failed_logins() {
    let get = |pairs: &'static [(&'static str, &'static str)]| {
        move |key: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| (*v).to_owned())
        }
    };
    let ok = parse_config(&get(&[
        ("anomaly.response.new_source", "revoke-token"),
        ("anomaly.response.token_reuse", "disable-identity"),
        ("anomaly.response.failed_logins", "alert"),
        ("anomaly.warmup_age", "2h"),
    ]))
    .unwrap();
    assert_eq!(ok.response(Kind::NewSource), Response::RevokeToken);
    assert_eq!(ok.response(Kind::TokenReuse), Response::DisableIdentity);
    assert_eq!(ok.response(Kind::NewPath), Response::Alert);
    assert_eq!(ok.warmup_age, Duration::from_secs(7200));
    for bad in ["revoke-token", "disable-identity"] {
        let pairs: &'static [(&'static str, &'static str)] = if bad == "revoke-token" {
            &[("anomaly.response.failed_logins", "revoke-token")]
        } else {
            &[("anomaly.response.failed_logins", "disable-identity")]
        };
        let (key, why) = parse_config(&get(pairs)).unwrap_err();
        assert_eq!(key, "anomaly.response.failed_logins");
        assert!(why.contains("only allowed response is alert"), "{why}");
    }
    let (key, _) = parse_config(&get(&[("anomaly.response.new_path", "explode")])).unwrap_err();
    assert_eq!(key, "anomaly.response.new_path");
    // Every response key is a known key.
    for kind in Kind::ALL {
        let key = format!("anomaly.response.{}", kind.as_str());
        assert!(ANOMALY_KEYS.iter().any(|(k, _)| *k == key), "{key}");
    }
}

#[test]
fn a_burst_of_failed_logins_as_one_identity_is_raised_once_per_window() {
    let mut d = Detector::new(cfg());
    assert_eq!(d.count_identity_failures("svc", 5, T0), None);
    let f = d.count_identity_failures("svc", 15, T0 + 1000).unwrap();
    assert_eq!(f.kind, Kind::FailedLogins);
    assert_eq!(f.identity.as_deref(), Some("svc"));
    assert_eq!(d.count_identity_failures("svc", 50, T0 + 2000), None);
    // A new window, a new burst.
    assert!(d
        .count_identity_failures("svc", 25, T0 + 10 * MIN)
        .is_some());
    // Bounded: identities past the bound are not followed.
    for i in 0..(MAX_FAIL_SOURCES + 10) {
        d.count_identity_failures(&format!("id{i}"), 1, T0 + 11 * MIN);
    }
}

/// A followed token keeps the network and time of its latest use: the
/// check compares with those, not with where it was first seen.
#[test]
fn a_followed_token_is_compared_with_its_latest_network_and_time() {
    let (mut d, _, next) = trained();
    let at = next + 10 * HOUR;
    let shared = |at: u64, source: &str| Observation {
        accessor: Some("acc-moving".into()),
        ..obs("svc", at, source, "read", PATHS[0])
    };
    assert!(d.observe(&shared(at, "10.0.1.7"), &mut no_owner).is_empty());
    let f = d.observe(&shared(at + 1000, "10.0.2.9"), &mut no_owner);
    assert_eq!(kinds(&f), vec![Kind::TokenReuse]);
    // Used on in the network it moved to: nothing new.
    assert!(d
        .observe(&shared(at + 2000, "10.0.2.10"), &mut no_owner)
        .is_empty());
    // Kept in use there, each use less than the window after the last one,
    // until the first use is long out of the window.
    let window = cfg().token_reuse_window.as_millis() as u64;
    let mut t = at + 2000;
    while t < at + 3 * window {
        t += window / 2;
        assert!(d.observe(&shared(t, "10.0.2.11"), &mut no_owner).is_empty());
    }
    // Back in the first network within the window of the latest use (and
    // past the one-a-minute cooldown): raised, so the time and network
    // compared are the latest ones.
    let f = d.observe(&shared(t + 1000, "10.0.1.7"), &mut no_owner);
    assert_eq!(kinds(&f), vec![Kind::TokenReuse]);
}
