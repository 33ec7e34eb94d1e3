//! The detector: per-identity baselines and the rules that compare a request
//! with them. Pure and synchronous: it is given observations (with their
//! time) and answers findings; the worker in `mod.rs` owns it, feeds it,
//! and persists what it learned. Nothing here reads a clock or the store.
//!
//! # Bounds
//!
//! - identities with a baseline: [`MAX_IDENTITIES`]; past it the identity
//!   seen least recently is forgotten (it warms up again if it returns);
//! - per identity: [`MAX_NETWORKS`] source networks (the least recently seen
//!   is replaced), [`MAX_PATHS`] (capability, path) pairs kept as 64-bit
//!   digests (past it the identity's path set is *saturated*: it is no longer
//!   learned and `new_path` is no longer raised for it), 24 hour counters,
//!   and the rate state (three numbers);
//! - tokens followed for `token_reuse` (the network each was last used
//!   from): [`MAX_TOKENS`] (entries older than the window are pruned; past
//!   it new tokens are not followed);
//! - source networks (IPv4 /24, IPv6 /64) followed for failed logins:
//!   [`MAX_FAIL_SOURCES`]; past it the
//!   failures of further sources are counted together as one source, so a
//!   flood from many addresses is still seen and memory does not grow;
//! - recent decommissions: [`MAX_DECOMMISSIONS`].
//!
//! A baseline is about 2 KiB at its bounds (128 digests, 32 networks), so
//! the worst case is about 20 MiB for 10 000 identities, plus about 5 MiB of
//! token entries.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{AnomalyConfig, Kind, Observation};

pub const MAX_IDENTITIES: usize = 10_000;
pub const MAX_NETWORKS: usize = 32;
pub const MAX_PATHS: usize = 128;
pub const MAX_TOKENS: usize = 50_000;
pub const MAX_FAIL_SOURCES: usize = 4_096;
pub const MAX_DECOMMISSIONS: usize = 256;
/// At most one event of a kind per identity within this long; the rest are
/// learned silently.
pub const COOLDOWN_MS: u64 = 60_000;

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 3_600_000;
/// Weight of the newest active minute in the rate's moving average.
const EWMA_ALPHA: f64 = 0.05;
/// The busiest minute learned decays with a half-life of a week.
const PEAK_HALF_LIFE_MINUTES: f64 = 7.0 * 24.0 * 60.0;

/// A finding: what the worker turns into an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: Kind,
    /// `None` for failed logins, which name no identity.
    pub identity: Option<String>,
    pub accessor: Option<String>,
    pub source: Option<IpAddr>,
    /// What was seen, in words; no secret (paths and addresses only).
    pub detail: String,
}

/// What one identity did, as learned.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Baseline {
    pub first_ms: u64,
    pub last_ms: u64,
    pub requests: u64,
    /// Network (`10.0.1.0/24`, `2001:db8::/64`) and when last seen.
    pub networks: Vec<(String, u64)>,
    /// Digests of `capability path` pairs used.
    pub paths: HashSet<u64>,
    pub paths_saturated: bool,
    /// Requests per UTC hour of day.
    pub hours: [u32; 24],
    /// The minute being counted (minutes since the epoch) and its count.
    pub minute: u64,
    pub minute_count: u32,
    pub rate_flagged: bool,
    /// Moving average of requests per active minute.
    pub ewma: f64,
    /// The busiest minute, decaying.
    pub peak: f64,
    /// Per kind, when it was last raised (for [`COOLDOWN_MS`]).
    #[serde(default)]
    pub raised_ms: Vec<(String, u64)>,
    /// Per kind, findings held back by [`COOLDOWN_MS`] since it was last
    /// raised: told with the next event of the kind, or by
    /// [`Detector::held_back`] once the cooldown is over, so a burst cannot
    /// hide behind its first event.
    #[serde(default)]
    pub held_back: Vec<(String, u32)>,
}

impl Baseline {
    fn warm(&self, cfg: &AnomalyConfig, now_ms: u64) -> bool {
        self.requests >= cfg.warmup_requests
            && now_ms.saturating_sub(self.first_ms) >= cfg.warmup_age.as_millis() as u64
    }

    /// The rate above which a minute is "far above" the baseline.
    pub fn rate_threshold(&self, cfg: &AnomalyConfig) -> f64 {
        f64::from(cfg.rate_floor).max(f64::from(cfg.rate_factor) * self.ewma.max(self.peak))
    }

    /// Closes the counted minute and opens `minute`.
    fn roll(&mut self, minute: u64) {
        if minute <= self.minute {
            return;
        }
        let gap = (minute - self.minute).min(1_000_000) as f64;
        if self.minute_count > 0 {
            let count = f64::from(self.minute_count);
            self.ewma = self.ewma * (1.0 - EWMA_ALPHA) + EWMA_ALPHA * count;
            self.ewma *= (1.0 - EWMA_ALPHA).powf(gap - 1.0);
            let decay = 0.5f64.powf(gap / PEAK_HALF_LIFE_MINUTES);
            self.peak = (self.peak * decay).max(count);
        } else {
            self.ewma *= (1.0 - EWMA_ALPHA).powf(gap);
            self.peak *= 0.5f64.powf(gap / PEAK_HALF_LIFE_MINUTES);
        }
        self.minute = minute;
        self.minute_count = 0;
        self.rate_flagged = false;
    }

    /// Whether `kind` may be raised now (cooldown), noting it if so: then
    /// `Some(findings held back since it was last raised)`; `None` (and
    /// one more held back) within the cooldown.
    fn may_raise(&mut self, kind: Kind, now_ms: u64) -> Option<u32> {
        match self.raised_ms.iter_mut().find(|(k, _)| k == kind.as_str()) {
            Some((_, at)) if now_ms.saturating_sub(*at) < COOLDOWN_MS => {
                match self.held_back.iter_mut().find(|(k, _)| k == kind.as_str()) {
                    Some((_, n)) => *n = n.saturating_add(1),
                    None => self.held_back.push((kind.as_str().to_owned(), 1)),
                }
                None
            }
            Some((_, at)) => {
                *at = now_ms;
                Some(self.take_held_back(kind))
            }
            None => {
                self.raised_ms.push((kind.as_str().to_owned(), now_ms));
                Some(self.take_held_back(kind))
            }
        }
    }

    fn take_held_back(&mut self, kind: Kind) -> u32 {
        match self.held_back.iter().position(|(k, _)| k == kind.as_str()) {
            Some(i) => self.held_back.swap_remove(i).1,
            None => 0,
        }
    }
}

/// The words added to an event's detail for findings held back before it.
fn held_back_note(held: u32) -> String {
    if held == 0 {
        String::new()
    } else {
        format!(" (and {held} more of this kind held back by the one-a-minute limit)")
    }
}

/// The network a source belongs to: IPv4 /24, IPv6 /64.
pub fn network_of(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            // `a.b.c.0/24` by hand: made for every observation, and the
            // formatting machinery costs more than the digits.
            let mut text = String::with_capacity(18);
            for octet in &v4.octets()[..3] {
                let (hundreds, tens, ones) = (octet / 100, octet / 10 % 10, octet % 10);
                if hundreds > 0 {
                    text.push(char::from(b'0' + hundreds));
                }
                if hundreds > 0 || tens > 0 {
                    text.push(char::from(b'0' + tens));
                }
                text.push(char::from(b'0' + ones));
                text.push('.');
            }
            text.push_str("0/24");
            text
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return network_of(IpAddr::V4(v4));
            }
            let s = v6.segments();
            let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
            format!("{net}/64")
        }
    }
}

/// The first address of the network a source belongs to (IPv4 /24, IPv6
/// /64; an IPv4-mapped IPv6 address counts as IPv4).
pub fn network_base(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & 0xffff_ff00).into()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => network_base(IpAddr::V4(v4)),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// A stable 64-bit digest of a (capability, path) pair: the first 8 bytes
/// of its SHA-256, so nobody can pick a path that passes for another.
pub fn path_digest(capability: &str, resource: &str) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(capability.as_bytes());
    ctx.update(b" ");
    ctx.update(resource.as_bytes());
    let d = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(first)
}

#[derive(Debug, Clone, Copy, Default)]
struct FailWindow {
    start_ms: u64,
    count: u32,
    flagged: bool,
}

impl FailWindow {
    /// Counts one failure; true when the burst threshold is first reached
    /// in this window.
    fn count(&mut self, now_ms: u64, window_ms: u64, burst: u32) -> bool {
        self.count_n(1, now_ms, window_ms, burst)
    }

    fn count_n(&mut self, n: u32, now_ms: u64, window_ms: u64, burst: u32) -> bool {
        if now_ms.saturating_sub(self.start_ms) > window_ms || self.count == 0 {
            *self = FailWindow {
                start_ms: now_ms,
                count: 0,
                flagged: false,
            };
        }
        self.count = self.count.saturating_add(n);
        if self.count >= burst && !self.flagged {
            self.flagged = true;
            return true;
        }
        false
    }
}

#[derive(Debug, Clone)]
struct Decommissioned {
    identity: String,
    owner: String,
    at_ms: u64,
}

/// The baselines and the short-lived state of the rules.
pub struct Detector {
    cfg: AnomalyConfig,
    baselines: HashMap<String, Baseline>,
    /// Identities whose baseline changed since the last [`Detector::take_dirty`].
    dirty: HashSet<String>,
    /// Token accessor -> (source network, source, when).
    tokens: HashMap<String, (String, IpAddr, u64)>,
    token_sweep: Sweep,
    fails: HashMap<IpAddr, FailWindow>,
    fail_sweep: Sweep,
    fails_elsewhere: FailWindow,
    /// Failed logins per identity named (by the login module's counts).
    identity_fails: HashMap<String, FailWindow>,
    identity_fail_sweep: Sweep,
    decommissions: VecDeque<Decommissioned>,
}

/// When a full table of windowed entries may next be swept. Sweeping a full
/// table on every new key would cost a pass over the whole table per new
/// key: anyone who can make new keys (mint tokens, send failed logins from
/// many networks) could keep the detector busy that way, both while no
/// entry has left the window and while entries leave it one by one (a table
/// that rolls over at the rate keys arrive). A full table is therefore swept
/// again only once its oldest kept entry can have left the window, and at
/// most [`SWEEPS_PER_WINDOW`] times per window. New keys that find it full
/// in between are not followed, as the bounds say.
#[derive(Debug, Default)]
struct Sweep {
    /// No sweep before this time (ms).
    at_ms: u64,
    /// Sweeps made so far (tests read it).
    count: u64,
}

/// The most sweeps of one full table per window (see [`Sweep`]).
const SWEEPS_PER_WINDOW: u64 = 16;

impl Sweep {
    /// Whether `table` (bounded at `max`, entries of time `at` kept for
    /// `window` ms) has room for one more key at `now`, sweeping it when due.
    fn room<K: Eq + std::hash::Hash, V>(
        &mut self,
        table: &mut HashMap<K, V>,
        max: usize,
        now: u64,
        window: u64,
        at: impl Fn(&V) -> u64,
    ) -> bool {
        if table.len() < max {
            return true;
        }
        if now < self.at_ms {
            return false;
        }
        let mut oldest = now;
        table.retain(|_, v| {
            let t = at(v);
            let kept = now.saturating_sub(t) <= window;
            if kept {
                oldest = oldest.min(t);
            }
            kept
        });
        self.count += 1;
        self.at_ms = oldest
            .saturating_add(window)
            .saturating_add(1)
            .max(now.saturating_add((window / SWEEPS_PER_WINDOW).max(1)));
        table.len() < max
    }
}

impl Detector {
    pub fn new(cfg: AnomalyConfig) -> Self {
        Self {
            cfg,
            baselines: HashMap::new(),
            dirty: HashSet::new(),
            tokens: HashMap::new(),
            token_sweep: Sweep::default(),
            fails: HashMap::new(),
            fail_sweep: Sweep::default(),
            fails_elsewhere: FailWindow::default(),
            identity_fails: HashMap::new(),
            identity_fail_sweep: Sweep::default(),
            decommissions: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &AnomalyConfig {
        &self.cfg
    }

    pub fn baseline(&self, identity: &str) -> Option<&Baseline> {
        self.baselines.get(identity)
    }

    /// How much state is held: (baselines, tokens followed, failure sources).
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.baselines.len(), self.tokens.len(), self.fails.len())
    }

    /// Puts back a stored baseline (after an unseal); the one in memory wins.
    pub fn restore(&mut self, identity: String, baseline: Baseline) {
        if self.baselines.len() < MAX_IDENTITIES {
            self.baselines.entry(identity).or_insert(baseline);
        }
    }

    /// The baselines changed since the last call, to be written.
    pub fn take_dirty(&mut self) -> Vec<(String, Baseline)> {
        let names: Vec<String> = self.dirty.drain().collect();
        names
            .into_iter()
            .filter_map(|n| self.baselines.get(&n).cloned().map(|b| (n, b)))
            .collect()
    }

    /// Marks a baseline to be written again (its write failed).
    pub fn mark_dirty(&mut self, identity: String) {
        self.dirty.insert(identity);
    }

    /// Notes that `identity` (of `owner`) was decommissioned at `at_ms`.
    pub fn note_decommission(&mut self, identity: &str, owner: &str, at_ms: u64) {
        if owner.is_empty() {
            return;
        }
        if self.decommissions.len() >= MAX_DECOMMISSIONS {
            self.decommissions.pop_front();
        }
        self.decommissions.push_back(Decommissioned {
            identity: identity.to_owned(),
            owner: owner.to_owned(),
            at_ms,
        });
    }

    /// A decommissioned sibling of `identity` within the window, if any;
    /// `owner_of` is asked only when a decommission is recent.
    fn sibling_of(
        &mut self,
        identity: &str,
        now_ms: u64,
        owner_of: &mut dyn FnMut(&str) -> Option<String>,
    ) -> Option<String> {
        let window = self.cfg.sibling_window.as_millis() as u64;
        while let Some(front) = self.decommissions.front() {
            if now_ms.saturating_sub(front.at_ms) > window {
                self.decommissions.pop_front();
            } else {
                break;
            }
        }
        if self.decommissions.iter().all(|d| d.identity == identity) {
            return None;
        }
        let owner = owner_of(identity).filter(|o| !o.is_empty())?;
        self.decommissions
            .iter()
            .rev()
            .find(|d| d.identity != identity && d.owner == owner && d.at_ms <= now_ms)
            .map(|d| d.identity.clone())
    }

    /// Compares one request with its identity's baseline, then learns from
    /// it. Returns what does not fit.
    pub fn observe(
        &mut self,
        obs: &Observation,
        owner_of: &mut dyn FnMut(&str) -> Option<String>,
    ) -> Vec<Finding> {
        let mut found = Vec::new();
        let Some(identity) = obs.identity.as_deref() else {
            if obs.is_failed_auth() {
                self.count_failure(obs, &mut found);
            }
            return found;
        };
        if !obs.is_ok() {
            // Denied and failed calls are not behaviour to learn; a denial
            // is in the audit log and the governance report already.
            return found;
        }
        let now = obs.at_ms;
        // Sibling check first: it needs `self` while no baseline is borrowed.
        let new_read = obs.capability == Some("read")
            && obs
                .resource
                .as_deref()
                .is_some_and(|r| r.starts_with("secret/"));
        let digest = match (obs.capability, obs.resource.as_deref()) {
            (Some(cap), Some(resource)) => Some(path_digest(cap, resource)),
            _ => None,
        };
        let (has_baseline, known_path) = match self.baselines.get(identity) {
            Some(b) => (true, digest.is_some_and(|d| b.paths.contains(&d))),
            None => (false, false),
        };
        let sibling = if new_read && !known_path && !self.decommissions.is_empty() {
            self.sibling_of(identity, now, owner_of)
        } else {
            None
        };
        // A known identity's baseline is found without copying its name
        // (an `entry` would take an owned key on every observation).
        if !has_baseline {
            self.make_room(identity);
            self.baselines.insert(
                identity.to_owned(),
                Baseline {
                    first_ms: now,
                    last_ms: now,
                    minute: now / MINUTE_MS,
                    ..Baseline::default()
                },
            );
        }
        let cfg = &self.cfg;
        let Some(b) = self.baselines.get_mut(identity) else {
            return found;
        };
        let warm = b.warm(cfg, now);
        let raise = |found: &mut Vec<Finding>, b: &mut Baseline, kind: Kind, detail: String| {
            if !warm {
                return;
            }
            if let Some(held) = b.may_raise(kind, now) {
                found.push(Finding {
                    kind,
                    identity: Some(identity.to_owned()),
                    accessor: obs.accessor.clone(),
                    source: obs.source,
                    detail: detail + &held_back_note(held),
                });
            }
        };

        // Use after long dormancy.
        let idle = now.saturating_sub(b.last_ms);
        if idle >= cfg.dormant_after.as_millis() as u64 {
            raise(
                &mut found,
                b,
                Kind::DormantUse,
                format!("first use after {} days idle", idle / 86_400_000),
            );
        }
        // Source network: its text is made once per observation and used
        // by the token check below too.
        let net = obs.source.map(network_of);
        if let Some(net) = &net {
            match b.networks.iter_mut().find(|(n, _)| n == net) {
                Some((_, seen)) => *seen = now,
                None => {
                    raise(
                        &mut found,
                        b,
                        Kind::NewSource,
                        format!("source network {net} never seen for this identity"),
                    );
                    if b.networks.len() >= MAX_NETWORKS {
                        if let Some(oldest) = b
                            .networks
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, (_, seen))| *seen)
                            .map(|(i, _)| i)
                        {
                            b.networks.swap_remove(oldest);
                        }
                    }
                    b.networks.push((net.clone(), now));
                }
            }
        }
        // Paths and capabilities.
        if let (Some(d), Some(resource)) = (digest, obs.resource.as_deref()) {
            if !b.paths.contains(&d) {
                let cap = obs.capability.unwrap_or("");
                if let Some(sibling) = &sibling {
                    raise(
                        &mut found,
                        b,
                        Kind::SiblingRead,
                        format!(
                            "first read of {resource} right after the decommission of \
                             {sibling} (same owner)"
                        ),
                    );
                } else if !b.paths_saturated {
                    raise(
                        &mut found,
                        b,
                        Kind::NewPath,
                        format!("{cap} on {resource}, outside what it used"),
                    );
                }
                if b.paths.len() < MAX_PATHS {
                    b.paths.insert(d);
                } else {
                    b.paths_saturated = true;
                }
            }
        }
        // Hours of activity.
        let hour = ((now / HOUR_MS) % 24) as usize;
        if b.hours[hour] == 0 && b.hours[(hour + 23) % 24] == 0 && b.hours[(hour + 1) % 24] == 0 {
            raise(
                &mut found,
                b,
                Kind::UnusualHour,
                format!("active at {hour:02}:00 UTC, an hour it is never active"),
            );
        }
        b.hours[hour] = b.hours[hour].saturating_add(1);
        // Request rate.
        b.roll(now / MINUTE_MS);
        b.minute_count = b.minute_count.saturating_add(1);
        let threshold = b.rate_threshold(cfg);
        if !b.rate_flagged && f64::from(b.minute_count) > threshold {
            raise(
                &mut found,
                b,
                Kind::RateSpike,
                format!(
                    "{} requests this minute; baseline {:.1}/min, threshold {:.0}/min",
                    b.minute_count,
                    b.ewma.max(b.peak),
                    threshold
                ),
            );
            b.rate_flagged = true;
        }
        b.requests = b.requests.saturating_add(1);
        b.last_ms = b.last_ms.max(now);
        // Under load the identity is nearly always marked already: no copy then.
        if !self.dirty.contains(identity) {
            self.dirty.insert(identity.to_owned());
        }
        // The same token from two sources (networks) at once: replicas that
        // share a subnet and a token are common, a token copied elsewhere
        // is not.
        if let (Some(accessor), Some(ip), Some(net)) = (obs.accessor.as_deref(), obs.source, net) {
            let window = self.cfg.token_reuse_window.as_millis() as u64;
            // Only what the check needs, without copying the stored text.
            let previous = self
                .tokens
                .get(accessor)
                .map(|(other_net, other, at)| (*other_net != net, *other, *at));
            if let Some((moved, other, at)) = previous {
                if moved && now.saturating_sub(at) <= window {
                    if let Some(b) = self.baselines.get_mut(identity) {
                        let held = if warm {
                            b.may_raise(Kind::TokenReuse, now)
                        } else {
                            None
                        };
                        if let Some(held) = held {
                            found.push(Finding {
                                kind: Kind::TokenReuse,
                                identity: Some(identity.to_owned()),
                                accessor: Some(accessor.to_owned()),
                                source: Some(ip),
                                detail: format!(
                                    "token used from {ip} and from {other} within {} s{}",
                                    window / 1000,
                                    held_back_note(held)
                                ),
                            });
                        }
                    }
                }
            }
            self.follow_token(accessor, net, ip, now);
        }
        found
    }

    fn follow_token(&mut self, accessor: &str, net: String, ip: IpAddr, now: u64) {
        if let Some(entry) = self.tokens.get_mut(accessor) {
            if entry.0 != net {
                entry.0 = net;
            }
            entry.1 = ip;
            entry.2 = now;
            return;
        }
        let window = self.cfg.token_reuse_window.as_millis() as u64;
        if !self
            .token_sweep
            .room(&mut self.tokens, MAX_TOKENS, now, window, |t| t.2)
        {
            return;
        }
        self.tokens.insert(accessor.to_owned(), (net, ip, now));
    }

    /// Passes made over the full table of followed tokens so far.
    pub fn token_sweeps(&self) -> u64 {
        self.token_sweep.count
    }

    /// Passes made over the full table of failure sources so far.
    pub fn fail_sweeps(&self) -> u64 {
        self.fail_sweep.count
    }

    /// Findings held back by the cooldown whose cooldown is over, one per
    /// identity and kind, counting them (the worker calls it every
    /// [`super::FLUSH_EVERY`]): the tail of a burst is told even when the
    /// identity then goes quiet.
    pub fn held_back(&mut self, now_ms: u64) -> Vec<Finding> {
        let mut found = Vec::new();
        for (identity, b) in &mut self.baselines {
            if b.held_back.is_empty() {
                continue;
            }
            let due: Vec<Kind> = b
                .held_back
                .iter()
                .filter_map(|(k, _)| Kind::parse(k))
                .filter(|k| {
                    b.raised_ms
                        .iter()
                        .any(|(r, at)| r == k.as_str() && now_ms.saturating_sub(*at) >= COOLDOWN_MS)
                })
                .collect();
            for kind in due {
                let held = b.may_raise(kind, now_ms).unwrap_or(0);
                if held > 0 {
                    found.push(Finding {
                        kind,
                        identity: Some(identity.clone()),
                        accessor: None,
                        source: None,
                        detail: format!(
                            "{held} more {} findings held back by the one-a-minute limit",
                            kind.as_str()
                        ),
                    });
                    self.dirty.insert(identity.clone());
                }
            }
        }
        found
    }

    /// Frees a slot for a new identity: forgets the least recently seen.
    fn make_room(&mut self, identity: &str) {
        if self.baselines.len() < MAX_IDENTITIES || self.baselines.contains_key(identity) {
            return;
        }
        if let Some(oldest) = self
            .baselines
            .iter()
            .min_by_key(|(_, b)| b.last_ms)
            .map(|(n, _)| n.clone())
        {
            self.baselines.remove(&oldest);
            self.dirty.remove(&oldest);
        }
    }

    /// `failures` more failed logins of `identity` (the login module knows
    /// whose role or certificate was tried; the seam does not): a burst is
    /// a finding that names the identity. At most [`MAX_FAIL_SOURCES`]
    /// identities are followed.
    pub fn count_identity_failures(
        &mut self,
        identity: &str,
        failures: u64,
        now_ms: u64,
    ) -> Option<Finding> {
        let window = self.cfg.failed_login_window.as_millis() as u64;
        let burst = self.cfg.failed_login_burst;
        if !self.identity_fails.contains_key(identity)
            && !self.identity_fail_sweep.room(
                &mut self.identity_fails,
                MAX_FAIL_SOURCES,
                now_ms,
                window,
                |w| w.start_ms,
            )
        {
            return None;
        }
        let w = self.identity_fails.entry(identity.to_owned()).or_default();
        let n = u32::try_from(failures).unwrap_or(u32::MAX);
        if !w.count_n(n, now_ms, window, burst) {
            return None;
        }
        Some(Finding {
            kind: Kind::FailedLogins,
            identity: Some(identity.to_owned()),
            accessor: None,
            source: None,
            detail: format!(
                "{} failed logins as this identity within {} s",
                w.count,
                window / 1000
            ),
        })
    }

    /// A failed login (or a bad token): counted per source; a burst is a
    /// finding that names no identity.
    fn count_failure(&mut self, obs: &Observation, found: &mut Vec<Finding>) {
        let now = obs.at_ms;
        let window = self.cfg.failed_login_window.as_millis() as u64;
        let burst = self.cfg.failed_login_burst;
        // Counted per network (IPv4 /24, IPv6 /64), like sources in the
        // baselines: an outsider picking a new address for each guess from
        // its own network is still one source.
        let ip = obs.source.map(network_base);
        let slot = match ip {
            Some(ip) if self.fails.contains_key(&ip) => self.fails.get_mut(&ip),
            Some(ip) => {
                if self
                    .fail_sweep
                    .room(&mut self.fails, MAX_FAIL_SOURCES, now, window, |w| {
                        w.start_ms
                    })
                {
                    Some(self.fails.entry(ip).or_default())
                } else {
                    None
                }
            }
            None => None,
        };
        let (hit, from) = match slot {
            Some(w) => (w.count(now, window, burst), obs.source.map(network_of)),
            None => (
                self.fails_elsewhere.count(now, window, burst),
                Some("many sources".to_owned()),
            ),
        };
        if hit {
            found.push(Finding {
                kind: Kind::FailedLogins,
                identity: None,
                accessor: None,
                source: obs.source,
                detail: format!(
                    "{burst} failed logins or bad tokens from {} within {} s",
                    from.unwrap_or_else(|| "an unknown source".to_owned()),
                    window / 1000
                ),
            });
        }
    }
}
