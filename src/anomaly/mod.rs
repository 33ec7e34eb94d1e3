//! Anomaly detection (issue 13): each identity is compared with a baseline
//! learned from its own use, and what does not fit becomes an event.
//!
//! Storage prefix `anomaly/` (through the barrier only; this module never
//! reads another module's prefix, it calls that module):
//! - `anomaly/baseline/<hex identity>`: a [`detector::Baseline`] (JSON);
//! - `anomaly/events/<20-digit id>`: an [`Event`] (JSON), the newest
//!   [`MAX_EVENTS`] kept.
//!
//! # The hot path
//!
//! The request seam (`core::call`) hands each answered call to
//! [`Anomalies::observe`]: it moves the call's identity, accessor and
//! resource into an [`Observation`] and `try_send`s it on a bounded channel
//! ([`CHANNEL_CAPACITY`]). When the channel is full the observation is
//! dropped and counted (`keyward_anomaly_observations_dropped_total`): a
//! request is never blocked or slowed by the detector.
//!
//! # The worker
//!
//! One background task ([`Anomalies::run`]) owns the [`detector::Detector`]
//! (the baselines); for each finding it writes an audit record, counts
//! `keyward_anomalies_total{kind}`, keeps the event in a bounded ring
//! (persisted), streams it to `Governance.WatchAnomalies` subscribers, and
//! applies the configured response (`alert`, `revoke-token`,
//! `disable-identity`). It takes the handles it uses in [`AnomalyDeps`],
//! never the `Core`.
//!
//! # Persistence
//!
//! Baselines changed since the last write and new events are written every
//! [`FLUSH_EVERY`] and at shutdown, like usage: a kill -9 loses at most the
//! last minute of learning and of events (each event is in the audit log
//! before anything else, so none is lost from there).

pub mod detector;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use crate::audit::AuditLog;
use crate::barrier::{Barrier, PlainOp};
use crate::clock::{Clock, Shutdown};
use crate::identity::login::{Login, UNKNOWN_IDENTITY};
use crate::identity::{IdentityName, IdentityStore};
use crate::metrics::Metrics;
use crate::token::TokenStore;

pub use detector::{Baseline, Detector, Finding};

const BASELINE_PREFIX: &str = "anomaly/baseline/";
const EVENT_PREFIX: &str = "anomaly/events/";
/// Observations waiting for the worker; past it they are dropped and counted.
pub const CHANNEL_CAPACITY: usize = 8_192;
/// Room in the queue kept for the calls of identities: a failed
/// authentication (which anyone can make without a credential) is dropped
/// once less than this is free, so a flood of them cannot crowd out the
/// calls the baselines are about.
pub const RESERVED_FOR_IDENTITIES: usize = CHANNEL_CAPACITY / 2;
/// The most observations the worker takes from the queue at once.
const RECV_BATCH: usize = 1_024;
/// After a batch smaller than [`RECV_BATCH`] the worker lets the queue fill
/// this long before it takes the next, so that it is woken at most about
/// 500 times a second however many calls are made, where it could be woken
/// once per call. After a full batch it takes the next at once, so the pause
/// never caps how fast a backlog drains: the worker's own speed does, as
/// before. An observation waits at most about this long more than before.
const COLLECT_FOR: Duration = Duration::from_millis(2);
/// Events kept (in memory and in storage); the oldest go first.
pub const MAX_EVENTS: usize = 10_000;
/// How often baselines and events are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(60);
/// After a failed login, the login module's counts by identity are read
/// once within this long (not on every failure: a flood stays cheap).
pub const LOGIN_CHECK_AFTER: Duration = Duration::from_secs(1);
/// Events a slow `WatchAnomalies` subscriber may fall behind by.
pub const WATCH_BUFFER: usize = 256;

/// What kind of anomaly an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A source network (IPv4 /24, IPv6 /64) the identity never used.
    NewSource,
    /// A (capability, path) the identity never used.
    NewPath,
    /// Far more requests in a minute than its baseline.
    RateSpike,
    /// Use after long dormancy.
    DormantUse,
    /// Activity at an hour of the day (UTC) it is never active.
    UnusualHour,
    /// A burst of failed logins or bad tokens from one source.
    FailedLogins,
    /// The same token used from two source networks within a short window.
    TokenReuse,
    /// A secret it never read, read right after a sibling's decommission.
    SiblingRead,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::NewSource,
        Kind::NewPath,
        Kind::RateSpike,
        Kind::DormantUse,
        Kind::UnusualHour,
        Kind::FailedLogins,
        Kind::TokenReuse,
        Kind::SiblingRead,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::NewSource => "new_source",
            Kind::NewPath => "new_path",
            Kind::RateSpike => "rate_spike",
            Kind::DormantUse => "dormant_use",
            Kind::UnusualHour => "unusual_hour",
            Kind::FailedLogins => "failed_logins",
            Kind::TokenReuse => "token_reuse",
            Kind::SiblingRead => "sibling_read",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// Whether an outsider can cause it without any credential: such kinds
    /// may only `alert` (a response that disables would hand anyone a
    /// lockout).
    pub const fn needs_no_credential(self) -> bool {
        matches!(self, Kind::FailedLogins)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What keyward does when it sees an anomaly of a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Response {
    /// An event (audit, metric, list, stream); nothing else.
    #[default]
    Alert,
    /// Also revoke the token that made the request.
    RevokeToken,
    /// Also disable the identity (which revokes all its tokens).
    DisableIdentity,
}

impl Response {
    pub fn parse(text: &str) -> Option<Response> {
        match text {
            "alert" => Some(Response::Alert),
            "revoke-token" => Some(Response::RevokeToken),
            "disable-identity" => Some(Response::DisableIdentity),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Response::Alert => "alert",
            Response::RevokeToken => "revoke-token",
            Response::DisableIdentity => "disable-identity",
        }
    }
}

/// `anomaly.*` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyConfig {
    /// `anomaly.response.<kind>`, by [`Kind`] order; default `alert`.
    pub responses: [Response; 8],
    /// `anomaly.warmup_requests` (default 200): requests an identity makes
    /// before anything is flagged for it...
    pub warmup_requests: u64,
    /// `anomaly.warmup_age` (default 1d): ...and how long after its first.
    pub warmup_age: Duration,
    /// `anomaly.dormant_after` (default 30d).
    pub dormant_after: Duration,
    /// `anomaly.rate_factor` (default 10): a minute above this many times
    /// the baseline rate...
    pub rate_factor: u32,
    /// `anomaly.rate_floor` (default 120): ...and above this many requests
    /// is a rate spike.
    pub rate_floor: u32,
    /// `anomaly.failed_login_burst` (default 20) failures from one source
    /// within `anomaly.failed_login_window` (default 5m).
    pub failed_login_burst: u32,
    pub failed_login_window: Duration,
    /// `anomaly.token_reuse_window` (default 5m).
    pub token_reuse_window: Duration,
    /// `anomaly.sibling_window` (default 24h): how long after a
    /// decommission a sibling's first read of a secret is flagged.
    pub sibling_window: Duration,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self {
            responses: [Response::Alert; 8],
            warmup_requests: 200,
            warmup_age: Duration::from_secs(86_400),
            dormant_after: Duration::from_secs(30 * 86_400),
            rate_factor: 10,
            rate_floor: 120,
            failed_login_burst: 20,
            failed_login_window: Duration::from_secs(300),
            token_reuse_window: Duration::from_secs(300),
            sibling_window: Duration::from_secs(86_400),
        }
    }
}

impl AnomalyConfig {
    /// The response of `kind`; always `alert` for kinds an outsider can
    /// cause, whatever `responses` holds (the field is public, so this is
    /// checked where it is read, not only in `set_response`).
    pub fn response(&self, kind: Kind) -> Response {
        if kind.needs_no_credential() {
            return Response::Alert;
        }
        self.responses[kind.index()]
    }

    /// Sets the response of `kind`; refuses anything but `alert` for kinds
    /// an outsider can cause.
    pub fn set_response(&mut self, kind: Kind, response: Response) -> Result<(), &'static str> {
        if kind.needs_no_credential() && response != Response::Alert {
            return Err(
                "failed logins can be caused by anyone without a credential, so \
                        their only allowed response is alert (another would hand anyone a \
                        lockout)",
            );
        }
        self.responses[kind.index()] = response;
        Ok(())
    }
}

/// The `anomaly.*` keys, with their variables (known keys, like `config::KEYS`).
pub const ANOMALY_KEYS: &[(&str, &str)] = &[
    ("anomaly.warmup_requests", "KEYWARD_ANOMALY_WARMUP_REQUESTS"),
    ("anomaly.warmup_age", "KEYWARD_ANOMALY_WARMUP_AGE"),
    ("anomaly.dormant_after", "KEYWARD_ANOMALY_DORMANT_AFTER"),
    ("anomaly.rate_factor", "KEYWARD_ANOMALY_RATE_FACTOR"),
    ("anomaly.rate_floor", "KEYWARD_ANOMALY_RATE_FLOOR"),
    (
        "anomaly.failed_login_burst",
        "KEYWARD_ANOMALY_FAILED_LOGIN_BURST",
    ),
    (
        "anomaly.failed_login_window",
        "KEYWARD_ANOMALY_FAILED_LOGIN_WINDOW",
    ),
    (
        "anomaly.token_reuse_window",
        "KEYWARD_ANOMALY_TOKEN_REUSE_WINDOW",
    ),
    ("anomaly.sibling_window", "KEYWARD_ANOMALY_SIBLING_WINDOW"),
    (
        "anomaly.response.new_source",
        "KEYWARD_ANOMALY_RESPONSE_NEW_SOURCE",
    ),
    (
        "anomaly.response.new_path",
        "KEYWARD_ANOMALY_RESPONSE_NEW_PATH",
    ),
    (
        "anomaly.response.rate_spike",
        "KEYWARD_ANOMALY_RESPONSE_RATE_SPIKE",
    ),
    (
        "anomaly.response.dormant_use",
        "KEYWARD_ANOMALY_RESPONSE_DORMANT_USE",
    ),
    (
        "anomaly.response.unusual_hour",
        "KEYWARD_ANOMALY_RESPONSE_UNUSUAL_HOUR",
    ),
    (
        "anomaly.response.failed_logins",
        "KEYWARD_ANOMALY_RESPONSE_FAILED_LOGINS",
    ),
    (
        "anomaly.response.token_reuse",
        "KEYWARD_ANOMALY_RESPONSE_TOKEN_REUSE",
    ),
    (
        "anomaly.response.sibling_read",
        "KEYWARD_ANOMALY_RESPONSE_SIBLING_READ",
    ),
];

/// Reads the `anomaly.*` keys through `get`; an error names the key and
/// what was wrong (never the value).
pub fn parse_config(
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<AnomalyConfig, (String, &'static str)> {
    let mut cfg = AnomalyConfig::default();
    let duration = |key: &str, default: Duration| match get(key) {
        None => Ok(default),
        Some(v) => crate::duration::parse(&v)
            .map_err(|_| (key.to_owned(), "expected a duration such as 5m or 30d")),
    };
    let number = |key: &str, default: u64| match get(key) {
        None => Ok(default),
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| (key.to_owned(), "expected a whole number")),
    };
    let small = |key: &str, default: u32| {
        number(key, u64::from(default))
            .and_then(|n| u32::try_from(n).map_err(|_| (key.to_owned(), "too large")))
    };
    cfg.warmup_requests = number("anomaly.warmup_requests", cfg.warmup_requests)?;
    cfg.warmup_age = duration("anomaly.warmup_age", cfg.warmup_age)?;
    cfg.dormant_after = duration("anomaly.dormant_after", cfg.dormant_after)?;
    cfg.rate_factor = small("anomaly.rate_factor", cfg.rate_factor)?;
    cfg.rate_floor = small("anomaly.rate_floor", cfg.rate_floor)?;
    cfg.failed_login_burst = small("anomaly.failed_login_burst", cfg.failed_login_burst)?;
    cfg.failed_login_window = duration("anomaly.failed_login_window", cfg.failed_login_window)?;
    cfg.token_reuse_window = duration("anomaly.token_reuse_window", cfg.token_reuse_window)?;
    cfg.sibling_window = duration("anomaly.sibling_window", cfg.sibling_window)?;
    if cfg.dormant_after.is_zero() {
        return Err(("anomaly.dormant_after".into(), "must be at least 1s"));
    }
    if cfg.rate_factor == 0 || cfg.failed_login_burst == 0 {
        return Err((
            "anomaly".into(),
            "rate_factor and failed_login_burst must be at least 1",
        ));
    }
    for kind in Kind::ALL {
        let key = format!("anomaly.response.{}", kind.as_str());
        if let Some(v) = get(&key) {
            let response = Response::parse(&v).ok_or((
                key.clone(),
                "expected alert, revoke-token or disable-identity",
            ))?;
            cfg.set_response(kind, response).map_err(|e| (key, e))?;
        }
    }
    Ok(cfg)
}

/// One answered call, as the seam hands it over (moved, not copied).
#[derive(Debug, Clone)]
pub struct Observation {
    pub at_ms: u64,
    /// Who made it (`None`: nobody authenticated).
    pub identity: Option<String>,
    /// The token's accessor (not the token).
    pub accessor: Option<String>,
    pub source: Option<IpAddr>,
    pub method: &'static str,
    /// The resource the call was authorized on (a path, never a value).
    pub resource: Option<String>,
    /// The capability it was authorized for.
    pub capability: Option<&'static str>,
    /// The answer's code name (`OK`, `UNAUTHENTICATED`, ...).
    pub code: &'static str,
}

impl Observation {
    pub fn is_ok(&self) -> bool {
        self.code == "OK"
    }

    /// A failed login, or a call with a token that did not authenticate.
    pub fn is_failed_auth(&self) -> bool {
        self.identity.is_none()
            && (self.code == "UNAUTHENTICATED"
                || (self.method == LOGIN_METHOD
                    && matches!(self.code, "PERMISSION_DENIED" | "RESOURCE_EXHAUSTED")))
    }

    /// Whether the worker needs to see this call at all.
    pub fn wanted(&self) -> bool {
        self.identity.is_some() || self.is_failed_auth()
    }
}

const LOGIN_METHOD: &str = "keyward.v1.Auth/Login";
const DECOMMISSION_METHOD: &str = "keyward.v1.Lifecycle/Decommission";

/// One anomaly, as listed and streamed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: u64,
    pub at_ms: u64,
    pub kind: Kind,
    pub identity: Option<String>,
    pub accessor: Option<String>,
    pub source: Option<String>,
    pub detail: String,
    /// The response configured, and what it did.
    pub response: String,
}

/// The handles the worker uses, and nothing more.
#[derive(Clone)]
pub struct AnomalyDeps {
    /// The `anomaly/` prefix, the seal state and flushes.
    pub barrier: Arc<Barrier>,
    pub audit: Arc<AuditLog>,
    pub clock: Clock,
    /// Owners (siblings), decommissions, and `disable-identity`.
    pub identities: Arc<IdentityStore>,
    /// `revoke-token`, and the tokens a disable revokes.
    pub tokens: TokenStore,
    /// Whose logins failed (it counts them by identity).
    pub login: Arc<Login>,
}

/// The detector's front: a cheap handle (clones share everything).
#[derive(Clone)]
pub struct Anomalies {
    inner: Arc<Inner>,
}

struct Inner {
    config: Mutex<AnomalyConfig>,
    tx: mpsc::Sender<Observation>,
    rx: Mutex<Option<mpsc::Receiver<Observation>>>,
    dropped: AtomicU64,
    dropped_metric: Counter,
    /// Observations queued, and those the worker has taken in.
    queued: AtomicU64,
    handled: AtomicU64,
    /// What the detector holds: (baselines, tokens followed, failure sources).
    held: Mutex<(usize, usize, usize)>,
    events: Mutex<Ring>,
    watch: broadcast::Sender<Event>,
    counted: Family<Vec<(String, String)>, Counter>,
}

#[derive(Default)]
struct Ring {
    events: VecDeque<Event>,
    next_id: u64,
    /// Ids below this are in storage.
    persisted_below: u64,
    /// Ids below this are deleted from storage (they left the ring).
    deleted_below: u64,
}

impl Anomalies {
    /// A detector with the default settings, its metrics registered.
    pub fn new(metrics: &Metrics) -> Self {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let counted = Family::<Vec<(String, String)>, Counter>::default();
        metrics.register(
            "keyward_anomalies",
            "Anomalies detected, by kind",
            counted.clone(),
        );
        let dropped_metric = Counter::default();
        metrics.register(
            "keyward_anomaly_observations_dropped",
            "Requests the anomaly detector did not see because its queue was full",
            dropped_metric.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                config: Mutex::new(AnomalyConfig::default()),
                tx,
                rx: Mutex::new(Some(rx)),
                dropped: AtomicU64::new(0),
                dropped_metric,
                queued: AtomicU64::new(0),
                handled: AtomicU64::new(0),
                held: Mutex::new((0, 0, 0)),
                events: Mutex::new(Ring {
                    next_id: 1,
                    persisted_below: 1,
                    deleted_below: 1,
                    ..Ring::default()
                }),
                watch: broadcast::channel(WATCH_BUFFER).0,
                counted,
            }),
        }
    }

    /// Sets `anomaly.*` (before the worker starts).
    pub fn configure(&self, config: AnomalyConfig) {
        *self.inner.config.lock().unwrap_or_else(|e| e.into_inner()) = config;
    }

    pub fn config(&self) -> AnomalyConfig {
        self.inner
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The hot path: hands the call to the worker without waiting; a full
    /// queue drops it (counted).
    pub fn observe(&self, observation: Observation) {
        if !observation.wanted() {
            return;
        }
        let crowding =
            observation.identity.is_none() && self.inner.tx.capacity() <= RESERVED_FOR_IDENTITIES;
        if crowding || self.inner.tx.try_send(observation).is_err() {
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
            self.inner.dropped_metric.inc();
        } else {
            self.inner.queued.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Observations dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Observations the worker has taken in so far (tests wait on it).
    pub fn handled(&self) -> u64 {
        self.inner.handled.load(Ordering::Acquire)
    }

    /// Observations queued so far (taken in or waiting).
    pub fn queued(&self) -> u64 {
        self.inner.queued.load(Ordering::Acquire)
    }

    /// What the detector holds: (baselines, tokens followed, failure
    /// sources), as of the last observation handled.
    pub fn held(&self) -> (usize, usize, usize) {
        *self.inner.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Events, oldest first: of `identity` if given, at or after `since_ms`,
    /// at most the newest `limit` (0: all kept).
    pub fn list(&self, identity: Option<&str>, since_ms: u64, limit: usize) -> Vec<Event> {
        let ring = self.inner.events.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Event> = ring
            .events
            .iter()
            .filter(|e| e.at_ms >= since_ms)
            .filter(|e| identity.is_none_or(|i| e.identity.as_deref() == Some(i)))
            .cloned()
            .collect();
        if limit > 0 && out.len() > limit {
            out.drain(..out.len() - limit);
        }
        out
    }

    /// Counts of the events kept, by kind, at or after `since_ms`.
    pub fn counts(&self, since_ms: u64) -> Vec<(Kind, u64)> {
        let ring = self.inner.events.lock().unwrap_or_else(|e| e.into_inner());
        Kind::ALL
            .into_iter()
            .map(|k| {
                let n = ring
                    .events
                    .iter()
                    .filter(|e| e.kind == k && e.at_ms >= since_ms)
                    .count() as u64;
                (k, n)
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// A receiver of the events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.watch.subscribe()
    }

    /// The worker: runs until `shutdown`, then writes what it learned.
    /// Only the first call runs (the queue has one receiver).
    pub async fn run(self, deps: AnomalyDeps, shutdown: Shutdown) {
        let taken = self
            .inner
            .rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(mut rx) = taken else {
            return;
        };
        let mut detector = Detector::new(self.config());
        let mut loaded = false;
        let flush = deps.clock.sleep(FLUSH_EVERY);
        tokio::pin!(flush);
        let login_check = deps.clock.sleep(LOGIN_CHECK_AFTER);
        tokio::pin!(login_check);
        let mut login_pending = false;
        let mut login_seen = LoginCounts::default();
        let mut batch = Vec::with_capacity(RECV_BATCH);
        loop {
            tokio::select! {
                // Everything queued at once: one wake-up and one pass of
                // this `select!` serve a burst of calls, in their order.
                got = rx.recv_many(&mut batch, RECV_BATCH) => {
                    if got == 0 {
                        break;
                    }
                    if !loaded {
                        loaded = self.load(&deps, &mut detector);
                    }
                    for observation in batch.drain(..) {
                        if observation.method == LOGIN_METHOD && observation.is_failed_auth() && !login_pending {
                            login_pending = true;
                            login_check.as_mut().reset(tokio::time::Instant::now() + LOGIN_CHECK_AFTER);
                        }
                        self.handle(&deps, &mut detector, observation).await;
                    }
                    // Let the next batch gather (see `COLLECT_FOR`), unless
                    // this one was full: a backlog is taken at once, so the
                    // pause never limits how fast the queue drains. Shutdown
                    // is looked at again right after.
                    if got < RECV_BATCH {
                        tokio::select! {
                            _ = deps.clock.sleep(COLLECT_FOR) => {}
                            _ = shutdown.wait() => {}
                        }
                    }
                }
                _ = &mut login_check, if login_pending => {
                    login_pending = false;
                    let now = deps.clock.now_ms();
                    for (identity, more) in login_seen.update(&deps.login) {
                        if let Some(finding) = detector.count_identity_failures(&identity, more, now) {
                            let response = detector.config().response(finding.kind);
                            self.raise(&deps, finding, response, now).await;
                        }
                    }
                }
                _ = &mut flush => {
                    if !loaded {
                        loaded = self.load(&deps, &mut detector);
                    }
                    // The tails of bursts the cooldown held back: told, not
                    // acted on again (the first event of each had the response).
                    let now = deps.clock.now_ms();
                    for finding in detector.held_back(now) {
                        self.raise(&deps, finding, Response::Alert, now).await;
                    }
                    self.flush(&deps, &mut detector).await;
                    flush.as_mut().reset(tokio::time::Instant::now() + FLUSH_EVERY);
                }
                _ = shutdown.wait() => {
                    while let Ok(observation) = rx.try_recv() {
                        self.handle(&deps, &mut detector, observation).await;
                    }
                    break;
                }
            }
        }
        self.flush(&deps, &mut detector).await;
    }

    /// Reads stored baselines and events (once unsealed); true once done.
    fn load(&self, deps: &AnomalyDeps, detector: &mut Detector) -> bool {
        if deps.barrier.status().sealed {
            return false;
        }
        let baselines = match deps.barrier.scan_prefix(BASELINE_PREFIX) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "anomaly baselines not loaded");
                return false;
            }
        };
        for (key, raw) in baselines {
            let name = key
                .strip_prefix(BASELINE_PREFIX)
                .and_then(|h| hex::decode(h).ok())
                .and_then(|b| String::from_utf8(b).ok());
            match (name, serde_json::from_slice::<Baseline>(&raw)) {
                (Some(name), Ok(b)) => detector.restore(name, b),
                _ => tracing::warn!("skipping a corrupt anomaly baseline"),
            }
        }
        if let Ok(stored) = deps.barrier.scan_prefix(EVENT_PREFIX) {
            let mut ring = self.inner.events.lock().unwrap_or_else(|e| e.into_inner());
            let mut old: Vec<Event> = stored
                .iter()
                .filter_map(|(_, raw)| serde_json::from_slice::<Event>(raw).ok())
                .collect();
            old.sort_by_key(|e| e.id);
            let top = old.last().map_or(0, |e| e.id);
            let newer: Vec<Event> = ring.events.drain(..).collect();
            ring.next_id = ring.next_id.max(top + 1);
            ring.persisted_below = ring.persisted_below.max(top + 1);
            if let Some(first) = old.first() {
                ring.deleted_below = first.id;
            }
            ring.events.extend(old);
            // Events seen before the load (none, normally) get new ids.
            for mut e in newer {
                e.id = ring.next_id;
                ring.next_id += 1;
                ring.events.push_back(e);
            }
            while ring.events.len() > MAX_EVENTS {
                ring.events.pop_front();
            }
        }
        true
    }

    async fn handle(&self, deps: &AnomalyDeps, detector: &mut Detector, obs: Observation) {
        if obs.method == DECOMMISSION_METHOD && obs.is_ok() {
            self.note_decommission(deps, detector, &obs);
        }
        let identities = deps.identities.clone();
        let mut owner_of = move |name: &str| -> Option<String> {
            identities.get(name).ok().flatten().map(|r| r.owner)
        };
        let findings = detector.observe(&obs, &mut owner_of);
        for finding in findings {
            let response = detector.config().response(finding.kind);
            self.raise(deps, finding, response, obs.at_ms).await;
        }
        *self.inner.held.lock().unwrap_or_else(|e| e.into_inner()) = detector.sizes();
        self.inner.handled.fetch_add(1, Ordering::Release);
    }

    /// A decommission that went through (the identity is now disabled; a
    /// dry run leaves it as it was) starts the sibling window.
    fn note_decommission(&self, deps: &AnomalyDeps, detector: &mut Detector, obs: &Observation) {
        let Some(name) = obs
            .resource
            .as_deref()
            .and_then(|r| r.strip_prefix("identity/"))
        else {
            return;
        };
        if let Ok(Some(record)) = deps.identities.get(name) {
            if record.disabled {
                detector.note_decommission(name, &record.owner, obs.at_ms);
            }
        }
    }

    /// Records one event: audit (before any response acts), metric, ring,
    /// stream, then the response.
    async fn raise(&self, deps: &AnomalyDeps, finding: Finding, response: Response, at_ms: u64) {
        let id = {
            let mut ring = self.inner.events.lock().unwrap_or_else(|e| e.into_inner());
            let id = ring.next_id;
            ring.next_id += 1;
            id
        };
        let source = finding.source.map(|s| s.to_string());
        let kind = finding.kind.as_str();
        let identity = finding.identity.as_deref().unwrap_or("");
        let resource = match &finding.identity {
            Some(name) => format!("identity/{name}"),
            None => "sys/anomalies".to_owned(),
        };
        let id_text = id.to_string();
        let recorded = deps.audit.append_note(
            "keyward.anomaly/Detected",
            &resource,
            &[
                ("anomaly_id", &id_text),
                ("kind", kind),
                ("anomaly_identity", identity),
                (
                    "anomaly_accessor",
                    finding.accessor.as_deref().unwrap_or(""),
                ),
                ("anomaly_source", source.as_deref().unwrap_or("")),
                ("detail", &finding.detail),
                ("response", response.as_str()),
            ],
        );
        let applied = match (recorded, response) {
            (Err(e), Response::Alert) => {
                tracing::error!(error = %e, kind, "anomaly not audited");
                "alert".to_owned()
            }
            (Err(e), _) => {
                tracing::error!(error = %e, kind, "anomaly not audited; response not applied");
                format!("{}: not applied (audit log unavailable)", response.as_str())
            }
            (Ok(()), Response::Alert) => "alert".to_owned(),
            (Ok(()), _) => {
                let done = self.respond(deps, &finding, response, at_ms).await;
                let outcome = match &done {
                    Ok(text) => text.clone(),
                    Err(text) => format!("failed: {text}"),
                };
                if let Err(e) = deps.audit.append_note(
                    "keyward.anomaly/Respond",
                    &resource,
                    &[
                        ("anomaly_id", &id_text),
                        ("response", response.as_str()),
                        // Not `outcome`: every record has one.
                        ("response_outcome", &outcome),
                    ],
                ) {
                    tracing::error!(error = %e, "anomaly response not audited");
                }
                format!("{}: {outcome}", response.as_str())
            }
        };
        tracing::warn!(
            kind,
            identity,
            detail = %finding.detail,
            response = %applied,
            "anomaly"
        );
        self.inner
            .counted
            .get_or_create(&vec![("kind".to_owned(), kind.to_owned())])
            .inc();
        let event = Event {
            id,
            at_ms,
            kind: finding.kind,
            identity: finding.identity,
            accessor: finding.accessor,
            source,
            detail: finding.detail,
            response: applied,
        };
        {
            let mut ring = self.inner.events.lock().unwrap_or_else(|e| e.into_inner());
            ring.events.push_back(event.clone());
            while ring.events.len() > MAX_EVENTS {
                ring.events.pop_front();
            }
        }
        // No subscriber is not an error.
        let _ = self.inner.watch.send(event);
    }

    async fn respond(
        &self,
        deps: &AnomalyDeps,
        finding: &Finding,
        response: Response,
        now_ms: u64,
    ) -> Result<String, String> {
        let done = match response {
            Response::Alert => return Ok("alert".to_owned()),
            Response::RevokeToken => {
                let accessor = finding
                    .accessor
                    .as_deref()
                    .ok_or_else(|| "no token to revoke".to_owned())?;
                deps.tokens
                    .revoke(accessor)
                    .map(|n| format!("revoked {n} token(s)"))
                    .map_err(|e| e.to_string())?
            }
            Response::DisableIdentity => {
                let name = finding
                    .identity
                    .as_deref()
                    .ok_or_else(|| "no identity to disable".to_owned())?;
                let name = IdentityName::parse(name).map_err(|e| e.to_string())?;
                let (_, tokens, _) = deps
                    .identities
                    .set_disabled(&name, true, false, &deps.tokens, now_ms)
                    .map_err(|e| e.to_string())?;
                format!("identity disabled, {tokens} token(s) revoked")
            }
        };
        deps.barrier.durable().await.map_err(|e| e.to_string())?;
        Ok(done)
    }

    /// Writes changed baselines and new events, and forgets events beyond
    /// the ring; nothing while sealed. A failure is logged and retried.
    async fn flush(&self, deps: &AnomalyDeps, detector: &mut Detector) {
        if deps.barrier.status().sealed {
            return;
        }
        let baselines = detector.take_dirty();
        let mut puts: Vec<(String, Vec<u8>)> = Vec::with_capacity(baselines.len());
        for (name, b) in &baselines {
            if let Ok(json) = serde_json::to_vec(b) {
                puts.push((baseline_key(name), json));
            }
        }
        let (new_events, stale, top) = {
            let ring = self.inner.events.lock().unwrap_or_else(|e| e.into_inner());
            let new: Vec<Event> = ring
                .events
                .iter()
                .filter(|e| e.id >= ring.persisted_below)
                .cloned()
                .collect();
            let oldest_kept = ring.events.front().map_or(ring.next_id, |e| e.id);
            let stale: Vec<String> = (ring.deleted_below..oldest_kept.min(ring.persisted_below))
                .map(event_key)
                .collect();
            (
                new,
                stale,
                (ring.next_id, oldest_kept.min(ring.persisted_below)),
            )
        };
        for e in &new_events {
            if let Ok(json) = serde_json::to_vec(e) {
                puts.push((event_key(e.id), json));
            }
        }
        let mut ops: Vec<PlainOp<'_>> = puts
            .iter()
            .map(|(k, v)| PlainOp::Put(k, v.as_slice()))
            .collect();
        ops.extend(stale.iter().map(|k| PlainOp::Delete(k)));
        if ops.is_empty() {
            return;
        }
        // Each write stands alone (written again on a failure): in batches
        // that fit the store.
        let written = match deps.barrier.batch_in_chunks(&ops) {
            Ok(()) => deps.barrier.durable().await,
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => {
                let mut ring = self.inner.events.lock().unwrap_or_else(|e| e.into_inner());
                ring.persisted_below = ring.persisted_below.max(top.0);
                ring.deleted_below = ring.deleted_below.max(top.1);
            }
            Err(e) => {
                tracing::warn!(error = %e, "anomaly baselines and events not written; retrying");
                for (name, _) in baselines {
                    detector.mark_dirty(name);
                }
            }
        }
    }
}

/// The login module's failure counts by identity, as last read.
#[derive(Default)]
struct LoginCounts {
    seen: std::collections::HashMap<String, u64>,
}

impl LoginCounts {
    /// Reads the counts again; answers the identities with more failures
    /// than last time, and how many more. The map is as bounded as the
    /// login module's (past its bound, failures count as unknown, which is
    /// left out here).
    fn update(&mut self, login: &Login) -> Vec<(String, u64)> {
        let mut totals: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        for f in login.failed_logins() {
            if f.identity != UNKNOWN_IDENTITY {
                *totals.entry(f.identity).or_insert(0) += f.count;
            }
        }
        let mut more = Vec::new();
        for (identity, total) in &totals {
            let before = self.seen.get(identity).copied().unwrap_or(0);
            if *total > before {
                more.push((identity.clone(), total - before));
            }
        }
        self.seen = totals;
        more
    }
}

fn baseline_key(identity: &str) -> String {
    format!("{BASELINE_PREFIX}{}", hex::encode(identity.as_bytes()))
}

fn event_key(id: u64) -> String {
    format!("{EVENT_PREFIX}{id:020}")
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod attack_tests;
