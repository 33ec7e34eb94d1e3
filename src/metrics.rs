//! Metrics: Prometheus families, every name prefixed `keyward_`, and the `/metrics` listener.
//!
//! No storage prefix: this module holds counters in memory only and must not read the store
//! or the barrier; the server refreshes store-derived gauges in the `before_scrape` hook of
//! [`serve`]. Labels never carry secrets, paths or identities: only method names and codes.
//!
//! Later modules add their families with one call, [`Metrics::register`] (or
//! [`Metrics::register_collector`] for values computed at scrape time); the registry adds the
//! `keyward_` prefix, and counters get `_total`.

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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

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

/// The longest request head `/metrics` reads.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a client has to send its request head, and then to take the response.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at the same time; more connections are closed at once.
pub const MAX_CONNECTIONS: usize = 16;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

/// The governance report's figures as gauges, set from a fresh report at
/// each scrape (`Core::refresh_governance_gauges`). Counts only: no label
/// names an identity or a source address.
#[derive(Debug, Default)]
pub struct GovernanceGauges {
    identities: Family<KindLabels, Gauge>,
    unowned: Gauge,
    dormant: Gauge,
    unused_grants: Gauge,
    identities_with_unused_grants: Gauge,
    long_lived_tokens: Gauge,
    expiring: Family<KindLabels, Gauge>,
    failed_logins: Gauge,
    failed_login_sources: Gauge,
    rotations_overdue: Gauge,
    rotation_failed: Gauge,
    /// Per mille, so an integer gauge carries three decimals.
    rotation_compliance_permille: Gauge,
    /// When the gauges were last set: the report scans every identity and
    /// token, so scrapes reuse it for a while.
    last_set: Mutex<Option<std::time::Instant>>,
}

impl GovernanceGauges {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "identities",
            "Identities in the inventory by kind",
            self.identities.clone(),
        );
        registry.register(
            "identities_unowned",
            "Identities with no owner",
            self.unowned.clone(),
        );
        registry.register(
            "identities_dormant",
            "Identities unused for 30 days or more",
            self.dormant.clone(),
        );
        registry.register(
            "unused_grants",
            "Granting policy rules that their identity never exercised",
            self.unused_grants.clone(),
        );
        registry.register(
            "identities_with_unused_grants",
            "Identities holding at least one grant they never used",
            self.identities_with_unused_grants.clone(),
        );
        registry.register(
            "long_lived_tokens",
            "Live tokens whose allowed life exceeds 24 hours",
            self.long_lived_tokens.clone(),
        );
        registry.register(
            "credentials_expiring_soon",
            "Identities and secret-ids expiring within 7 days, by kind",
            self.expiring.clone(),
        );
        registry.register(
            "failed_logins",
            "Failed logins since the server started",
            self.failed_logins.clone(),
        );
        registry.register(
            "failed_login_sources",
            "Distinct (identity, source address) pairs with failed logins",
            self.failed_login_sources.clone(),
        );
        registry.register(
            "rotations_overdue",
            "Secrets whose scheduled rotation is overdue",
            self.rotations_overdue.clone(),
        );
        registry.register(
            "rotation_failed",
            "Secrets whose last rotation failed",
            self.rotation_failed.clone(),
        );
        registry.register(
            "rotation_compliance_permille",
            "Share of rotation policies that ran on schedule, in thousandths",
            self.rotation_compliance_permille.clone(),
        );
    }

    /// Sets the rotation gauges from the broker's summary.
    pub fn set_rotation(&self, summary: &crate::rotation::RotationSummary) {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.rotations_overdue.set(n(summary.overdue.len()));
        self.rotation_failed.set(n(summary.last_failures.len()));
        self.rotation_compliance_permille
            .set((summary.compliance * 1000.0).round() as i64);
    }

    /// Whether the gauges are older than `every` (or were never set); if so,
    /// the caller refreshes them now.
    pub fn due(&self, every: Duration) -> bool {
        let mut last = self.last_set.lock().unwrap_or_else(PoisonError::into_inner);
        let due = last.is_none_or(|t| t.elapsed() >= every);
        if due {
            *last = Some(std::time::Instant::now());
        }
        due
    }

    /// Sets every gauge from `report`.
    pub fn set(&self, report: &crate::governance::Report) {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        let u = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (kind, count) in &report.by_kind {
            self.identities
                .get_or_create(&KindLabels { kind: kind.clone() })
                .set(u(*count));
        }
        self.unowned.set(n(report.unowned.len()));
        self.dormant.set(n(report.dormant.len()));
        self.unused_grants.set(u(report.unused_grant_count()));
        self.identities_with_unused_grants
            .set(n(report.unused_grants.len()));
        self.long_lived_tokens.set(n(report.long_lived.len()));
        for kind in ["identity", "secret-id"] {
            let count = report
                .expiring_soon
                .iter()
                .filter(|e| e.kind == kind)
                .count();
            self.expiring
                .get_or_create(&KindLabels {
                    kind: kind.to_owned(),
                })
                .set(n(count));
        }
        self.failed_logins.set(u(report.failed_login_count()));
        self.failed_login_sources.set(n(report.failed_logins.len()));
    }
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
    /// The governance report's figures.
    pub governance: GovernanceGauges,
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
        let governance = GovernanceGauges::default();
        governance.register(&mut registry);
        Self {
            governance,
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
    pub fn observe_request(&self, method: &str, code: &str, elapsed: Duration) {
        let mut labels = RequestLabels {
            method: method.to_owned(),
            code: code.to_owned(),
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
                labels.method = "other".to_owned();
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

    fn try_encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut text, &self.lock())?;
        Ok(text)
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A registry only gains entries; one left by a panicking thread is still whole.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves; any other path is 404.
///
/// One request per connection (`Connection: close`); the head may be at most
/// [`MAX_REQUEST_HEAD`] bytes (else 431) and must arrive within [`IO_TIMEOUT`] (else 408).
/// `before_scrape` runs on a blocking thread before each encode. At shutdown the listener
/// closes and scrapes still in flight are dropped.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    before_scrape: Arc<dyn Fn() + Send + Sync>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_with_timeout(listener, metrics, before_scrape, shutdown, IO_TIMEOUT).await;
}

/// [`serve`] with the I/O timeout as a parameter (tests shorten it).
async fn serve_with_timeout(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    before_scrape: Arc<dyn Fn() + Send + Sync>,
    shutdown: impl std::future::Future<Output = ()>,
    io_timeout: Duration,
) {
    tokio::pin!(shutdown);
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => {
                if connections.len() >= MAX_CONNECTIONS {
                    drop(stream);
                    continue;
                }
                let metrics = Arc::clone(&metrics);
                let before_scrape = Arc::clone(&before_scrape);
                connections.spawn(async move {
                    if let Err(error) = handle(stream, metrics, before_scrape, io_timeout).await {
                        tracing::debug!(%error, "metrics connection ended with an error");
                    }
                });
            }
            Err(error) => {
                // Out of file descriptors and the like: do not spin.
                tracing::warn!(%error, "metrics listener accept failed");
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    connections.shutdown().await;
}

/// What the request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Metrics,
    NotFound,
    Bad,
}

/// Parses the request line of a complete head.
fn parse_request(head: &[u8]) -> Request {
    let line_end = head
        .windows(2)
        .position(|pair| pair == b"\r\n")
        .unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Request::Bad;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Request::Bad;
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    if method == "GET" && path == "/metrics" {
        Request::Metrics
    } else {
        Request::NotFound
    }
}

/// Reads the head up to the blank line. `Ok(None)`: too long.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        // Look for the end across the chunk boundary too.
        let search_from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..read]);
        if head[search_from..]
            .windows(4)
            .any(|window| window == b"\r\n\r\n")
        {
            return Ok(Some(head));
        }
        if head.len() > MAX_REQUEST_HEAD {
            return Ok(None);
        }
    }
}

async fn handle(
    mut stream: TcpStream,
    metrics: Arc<Metrics>,
    before_scrape: Arc<dyn Fn() + Send + Sync>,
    io_timeout: Duration,
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(io_timeout, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => {
            return respond(
                &mut stream,
                io_timeout,
                "408 Request Timeout",
                "text/plain",
                b"",
            )
            .await;
        }
    };
    let Some(head) = head else {
        return respond(
            &mut stream,
            io_timeout,
            "431 Request Header Fields Too Large",
            "text/plain",
            b"request head too large\n",
        )
        .await;
    };
    match parse_request(&head) {
        Request::Metrics => {
            let scraped = tokio::task::spawn_blocking(move || {
                before_scrape();
                metrics.try_encode()
            })
            .await;
            match scraped {
                Ok(Ok(text)) => {
                    respond(
                        &mut stream,
                        io_timeout,
                        "200 OK",
                        CONTENT_TYPE,
                        text.as_bytes(),
                    )
                    .await
                }
                _ => {
                    tracing::error!("encoding metrics failed");
                    respond(
                        &mut stream,
                        io_timeout,
                        "500 Internal Server Error",
                        "text/plain",
                        b"encoding metrics failed\n",
                    )
                    .await
                }
            }
        }
        Request::NotFound => {
            respond(
                &mut stream,
                io_timeout,
                "404 Not Found",
                "text/plain",
                b"not found\n",
            )
            .await
        }
        Request::Bad => {
            respond(
                &mut stream,
                io_timeout,
                "400 Bad Request",
                "text/plain",
                b"bad request\n",
            )
            .await
        }
    }
}

/// Writes a whole response, then closes: our side first, then waits briefly for the client,
/// so unread request bytes do not turn the close into a reset that loses the response.
async fn respond(
    stream: &mut TcpStream,
    io_timeout: Duration,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(io_timeout, write)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let mut sink = [0u8; 1024];
    let drain = async {
        let mut left = 64 * 1024usize;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(read) => left = left.saturating_sub(read),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

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
            metrics.observe_request(&format!("made.up/M{i}"), "UNIMPLEMENTED", Duration::ZERO);
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
    fn parses_request_lines() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\n\r\n"),
            Request::Metrics
        );
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.0\r\nHost: a\r\n\r\n"),
            Request::Metrics
        );
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Request::NotFound
        );
        assert_eq!(
            parse_request(b"GET /metricsx HTTP/1.1\r\n\r\n"),
            Request::NotFound
        );
        assert_eq!(parse_request(b"GET /metrics\r\n\r\n"), Request::Bad);
        assert_eq!(parse_request(b"GET /metrics SPDY/3\r\n\r\n"), Request::Bad);
        assert_eq!(parse_request(b"\xff\xfe\r\n\r\n"), Request::Bad);
    }

    struct Server {
        addr: std::net::SocketAddr,
        scrapes: Arc<AtomicUsize>,
        stop: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
    }

    /// A server on 127.0.0.1:0 with a short I/O timeout; its hook counts scrapes and
    /// sets the sealed gauge.
    async fn start(metrics: Arc<Metrics>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scrapes = Arc::new(AtomicUsize::new(0));
        let hook = {
            let scrapes = Arc::clone(&scrapes);
            let metrics = Arc::clone(&metrics);
            Arc::new(move || {
                scrapes.fetch_add(1, Ordering::SeqCst);
                metrics.set_sealed(true);
            }) as Arc<dyn Fn() + Send + Sync>
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let timeout = Duration::from_millis(200);
        let task = tokio::spawn(serve_with_timeout(
            listener, metrics, hook, shutdown, timeout,
        ));
        Server {
            addr,
            scrapes,
            stop,
            task,
        }
    }

    impl Server {
        async fn shut_down(self) {
            self.stop.send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .unwrap()
                .unwrap();
        }
    }

    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8(response).unwrap()
    }

    #[tokio::test]
    async fn serves_metrics() {
        let metrics = Arc::new(sample());
        let server = start(Arc::clone(&metrics)).await;

        let response = exchange(
            server.addr,
            b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
        )
        .await;
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{head}"
        );
        assert!(head.contains("Connection: close"), "{head}");
        assert!(
            body.contains(
                "keyward_requests_total{method=\"keyward.v1.Secrets/Get\",code=\"OK\"} 2\n"
            ),
            "{body}"
        );
        // The hook ran before the encode.
        assert!(body.contains("keyward_sealed 1\n"), "{body}");
        assert_eq!(server.scrapes.load(Ordering::SeqCst), 1);
        assert!(body.ends_with("# EOF\n"));

        server.shut_down().await;
    }

    #[tokio::test]
    async fn other_paths_are_not_found() {
        let server = start(Arc::new(Metrics::new())).await;
        let response = exchange(server.addr, b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            response.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{response}"
        );
        let response = exchange(server.addr, b"nonsense\r\n\r\n").await;
        assert!(
            response.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{response}"
        );
        assert_eq!(server.scrapes.load(Ordering::SeqCst), 0);
        server.shut_down().await;
    }

    #[tokio::test]
    async fn oversize_head_is_refused() {
        let server = start(Arc::new(Metrics::new())).await;
        let mut request = b"GET /metrics HTTP/1.1\r\n".to_vec();
        while request.len() <= MAX_REQUEST_HEAD + 100 {
            request.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let response = exchange(server.addr, &request).await;
        assert!(
            response.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{response}"
        );
        assert_eq!(server.scrapes.load(Ordering::SeqCst), 0);
        server.shut_down().await;
    }

    #[tokio::test]
    async fn slow_client_times_out() {
        let server = start(Arc::new(Metrics::new())).await;
        let response = exchange(server.addr, b"GET /metrics HTTP/1.1\r\n").await;
        assert!(
            response.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{response}"
        );
        assert_eq!(server.scrapes.load(Ordering::SeqCst), 0);
        server.shut_down().await;
    }

    #[tokio::test]
    async fn shutdown_stops_the_listener() {
        let server = start(Arc::new(Metrics::new())).await;
        let addr = server.addr;
        // A connection that never sends anything does not hold up shutdown.
        let _idle = TcpStream::connect(addr).await.unwrap();
        // Accepted in order: once this one is answered, the idle one is being served.
        let response = exchange(addr, b"GET /other HTTP/1.1\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 404"), "{response}");
        server.shut_down().await;
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
