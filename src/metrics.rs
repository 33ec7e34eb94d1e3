//! Metrics: Prometheus families, every name prefixed `keyward_`.
//!
//! No storage prefix, and no domain module: this module holds counters in memory only, must
//! not read the store or the barrier, and names nothing else in the crate. Each domain
//! publishes its own families through it: [`Metrics::register`] (or
//! [`Metrics::register_collector`] for values computed at scrape time); the registry adds the
//! `keyward_` prefix, and counters get `_total`. Gauges read from the store are set just
//! before a scrape by a [`Refresh`] their owner registers with [`Metrics::on_scrape`].
//! Labels never carry secrets, paths or identities: only method names, codes and kinds.
//!
//! The `/metrics` HTTP listener is `metrics_http`.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry, Unit};

/// The prefix of every metric name (the registry adds the `_`).
pub const PREFIX: &str = "keyward";

/// The `Content-Type` of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the request duration buckets, in seconds: 100 µs to 5 s.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// At most this many `{method, code}` series; further methods are counted as `other`, so a
/// client calling made-up methods cannot grow the registry without bound.
pub const MAX_REQUEST_SERIES: usize = 512;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: Cow<'static, str>,
    code: Cow<'static, str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: Cow<'static, str>,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// The registry and the families every request touches.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    /// `{method, code}` series created so far, against [`MAX_REQUEST_SERIES`].
    request_series: AtomicUsize,
    durations: Family<MethodLabels, Histogram, fn() -> Histogram>,
    sealed: Gauge,
    key_term: Gauge,
    encryptions: Gauge<u64, AtomicU64>,
    /// Run before each scrape, in the order registered.
    refreshers: Mutex<Vec<Arc<dyn Refresh>>>,
}

/// Sets gauges whose values live elsewhere (in the store), just before a scrape. The module
/// that owns the gauges implements it and registers it with [`Metrics::on_scrape`]; it runs
/// on a blocking thread, so it may read the store.
pub trait Refresh: Send + Sync {
    fn refresh(&self, metrics: &Metrics);
}

/// Lets a costly [`Refresh`] run at most once per period: scrapes in between reuse the values
/// it set last. The caller gives the time (this module reads no clock).
#[derive(Debug)]
pub struct RefreshEvery {
    every_ms: u64,
    /// When it last ran (ms); `u64::MAX`: never.
    last_ms: AtomicU64,
}

impl RefreshEvery {
    pub fn new(every: Duration) -> Self {
        Self {
            every_ms: u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
            last_ms: AtomicU64::new(u64::MAX),
        }
    }

    /// Whether a refresh is due at `now_ms`; if so, it counts as done now. Two scrapes at the
    /// same moment may both refresh: harmless.
    pub fn due(&self, now_ms: u64) -> bool {
        let last = self.last_ms.load(Ordering::Acquire);
        let due = last == u64::MAX || now_ms.saturating_sub(last) >= self.every_ms;
        if due {
            self.last_ms.store(now_ms, Ordering::Release);
        }
        due
    }

    /// Makes the next call due (the refresh could not run: try again at the next scrape).
    pub fn reset(&self) {
        self.last_ms.store(u64::MAX, Ordering::Release);
    }
}

impl std::fmt::Debug for dyn Refresh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Refresh")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let durations: Family<MethodLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        let sealed = Gauge::default();
        let key_term = Gauge::default();
        let encryptions = Gauge::<u64, AtomicU64>::default();

        let mut registry = Registry::with_prefix(PREFIX);
        registry.register(
            "requests",
            "gRPC requests by method and status code",
            requests.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "gRPC request duration by method",
            Unit::Seconds,
            durations.clone(),
        );
        registry.register("sealed", "1 while the vault is sealed", sealed.clone());
        registry.register(
            "barrier_key_term",
            "Term of the active barrier key",
            key_term.clone(),
        );
        registry.register(
            "barrier_encryptions",
            "Encryptions under the active barrier key",
            encryptions.clone(),
        );
        Self {
            refreshers: Mutex::new(Vec::new()),
            registry: Mutex::new(registry),
            requests,
            request_series: AtomicUsize::new(0),
            durations,
            sealed,
            key_term,
            encryptions,
        }
    }

    /// Counts one finished request and its duration. `method` should be a known gRPC method
    /// name (past [`MAX_REQUEST_SERIES`] new ones count as `other`); `code` the gRPC code name.
    ///
    /// The labels borrow `'static` names (every gRPC method and code), so
    /// counting a call of a known series allocates nothing.
    pub fn observe_request(
        &self,
        method: impl Into<Cow<'static, str>>,
        code: &'static str,
        elapsed: Duration,
    ) {
        let mut labels = RequestLabels {
            method: method.into(),
            code: Cow::Borrowed(code),
        };
        // One statement, so the family's read guard is gone before `get_or_create` writes.
        let counted = self
            .requests
            .get(&labels)
            .map(|counter| counter.inc())
            .is_some();
        if !counted {
            // Two threads may both count one new series: the bound is approximate, and safe.
            if self.request_series.fetch_add(1, Ordering::Relaxed) >= MAX_REQUEST_SERIES {
                self.request_series.fetch_sub(1, Ordering::Relaxed);
                labels.method = Cow::Borrowed("other");
            }
            self.requests.get_or_create(&labels).inc();
        }
        self.durations
            .get_or_create(&MethodLabels {
                method: labels.method,
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn set_sealed(&self, sealed: bool) {
        self.sealed.set(i64::from(sealed));
    }

    /// The active barrier key term and how many encryptions it has made.
    pub fn set_barrier_encryptions(&self, term: u32, count: u64) {
        self.key_term.set(i64::from(term));
        self.encryptions.set(count);
    }

    /// Registers a metric family as `keyward_<name>`: keep a clone and update that.
    /// Counters get `_total` appended; do not add it to `name`.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.lock().register(name, help, metric);
    }

    /// Like [`Metrics::register`], with a unit appended to the name (`_seconds`, `_bytes`).
    pub fn register_with_unit(&self, name: &str, help: &str, unit: Unit, metric: impl Metric) {
        self.lock().register_with_unit(name, help, unit, metric);
    }

    /// Registers a collector whose values are computed at each scrape.
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.lock().register_collector(collector);
    }

    /// Runs `refresh` before every scrape from now on.
    pub fn on_scrape(&self, refresh: Arc<dyn Refresh>) {
        self.refreshers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(refresh);
    }

    /// Runs every registered [`Refresh`] (blocking: they may read the store).
    pub fn refresh(&self) {
        let refreshers = self
            .refreshers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for refresher in refreshers {
            refresher.refresh(self);
        }
    }

    /// The registry itself, for anything the helpers above do not cover.
    pub fn registry(&self) -> &Mutex<Registry> {
        &self.registry
    }

    /// The OpenMetrics text of every family, ending with `# EOF`.
    pub fn encode(&self) -> String {
        match self.try_encode() {
            Ok(text) => text,
            Err(_) => {
                tracing::error!("encoding metrics failed");
                "# EOF\n".to_owned()
            }
        }
    }

    /// The OpenMetrics text, or the encoder's error.
    pub fn try_encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut text, &self.lock())?;
        Ok(text)
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A registry only gains entries; one left by a panicking thread is still whole.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn sample() -> Metrics {
        let metrics = Metrics::new();
        metrics.observe_request("keyward.v1.Secrets/Get", "OK", Duration::from_micros(300));
        metrics.observe_request("keyward.v1.Secrets/Get", "OK", Duration::from_millis(2));
        metrics.observe_request(
            "keyward.v1.Secrets/Get",
            "NOT_FOUND",
            Duration::from_millis(1),
        );
        metrics.set_sealed(false);
        metrics.set_barrier_encryptions(3, 42);
        metrics
    }

    #[test]
    fn encodes_the_core_families() {
        let text = sample().encode();
        for expected in [
            "# TYPE keyward_requests counter",
            "keyward_requests_total{method=\"keyward.v1.Secrets/Get\",code=\"OK\"} 2\n",
            "keyward_requests_total{method=\"keyward.v1.Secrets/Get\",code=\"NOT_FOUND\"} 1\n",
            "# TYPE keyward_request_duration_seconds histogram",
            "# UNIT keyward_request_duration_seconds seconds",
            "keyward_request_duration_seconds_count{method=\"keyward.v1.Secrets/Get\"} 3\n",
            "keyward_request_duration_seconds_bucket{le=\"0.0001\",method=\"keyward.v1.Secrets/Get\"} 0\n",
            "keyward_request_duration_seconds_bucket{le=\"0.0005\",method=\"keyward.v1.Secrets/Get\"} 1\n",
            "keyward_request_duration_seconds_bucket{le=\"5.0\",method=\"keyward.v1.Secrets/Get\"} 3\n",
            "keyward_sealed 0\n",
            "keyward_barrier_key_term 3\n",
            "keyward_barrier_encryptions 42\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            assert!(line.starts_with("keyward_"), "{line}");
        }
    }

    #[test]
    fn later_modules_register_with_one_call() {
        let metrics = Metrics::new();
        let rotations = Family::<Vec<(String, String)>, Counter>::default();
        metrics.register("rotations", "Rotations by result", rotations.clone());
        let dormant = Gauge::<i64>::default();
        metrics.register("identities_dormant", "Dormant identities", dormant.clone());
        rotations
            .get_or_create(&vec![("result".to_owned(), "ok".to_owned())])
            .inc();
        dormant.set(4);
        let text = metrics.encode();
        assert!(
            text.contains("keyward_rotations_total{result=\"ok\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("keyward_identities_dormant 4\n"), "{text}");
    }

    #[test]
    fn request_series_are_bounded() {
        let metrics = Metrics::new();
        for i in 0..MAX_REQUEST_SERIES + 10 {
            metrics.observe_request(format!("made.up/M{i}"), "UNIMPLEMENTED", Duration::ZERO);
        }
        let text = metrics.encode();
        let series = text
            .lines()
            .filter(|line| line.starts_with("keyward_requests_total{"))
            .count();
        assert_eq!(series, MAX_REQUEST_SERIES + 1);
        assert!(
            text.contains("keyward_requests_total{method=\"other\",code=\"UNIMPLEMENTED\"} 10\n"),
            "{text}"
        );
        // Known series keep counting.
        metrics.observe_request("made.up/M0", "UNIMPLEMENTED", Duration::ZERO);
        assert!(metrics
            .encode()
            .contains("keyward_requests_total{method=\"made.up/M0\",code=\"UNIMPLEMENTED\"} 2\n"));
    }

    #[test]
    fn a_costly_refresh_runs_once_a_period() {
        let every = RefreshEvery::new(Duration::from_secs(30));
        assert!(every.due(1_000));
        assert!(!every.due(30_999));
        assert!(every.due(31_000));
    }

    #[test]
    fn refreshers_run_before_a_scrape() {
        struct Sealed;
        impl Refresh for Sealed {
            fn refresh(&self, metrics: &Metrics) {
                metrics.set_sealed(true);
            }
        }
        let metrics = Metrics::new();
        metrics.on_scrape(Arc::new(Sealed));
        assert!(metrics.encode().contains("keyward_sealed 0\n"));
        metrics.refresh();
        assert!(metrics.encode().contains("keyward_sealed 1\n"));
    }
}
