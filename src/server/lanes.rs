//! The gRPC listener's connections served on lanes: a lane is one thread
//! with a runtime of its own (tokio's current-thread runtime), and serves
//! every call of the connections handed to it, their TLS handshakes, and
//! the tasks their calls spawn.
//!
//! Why: on the shared multi-thread runtime a connection's task and its
//! calls' tasks run on whichever worker is free, so two workers take turns
//! at one HTTP/2 connection's lock and wake each other; on two cores that
//! cost a Get about a fifth of its CPU (README, "Lanes"). On a lane a
//! connection and its calls stay on one thread. The lanes share the core
//! (the store, the token cache, the audit log) as the workers did.
//!
//! Accepting stays on the shared runtime: the listener admits a connection
//! (`limits::ConnectionGate`), then hands its socket to the open lane with
//! the fewest connections. A lane registers the socket with its own
//! runtime, so its readiness wakes that lane's thread only.
//!
//! Lifetime: a lane serves until the shutdown fires and then drains its
//! calls within the drain deadline; its runtime stays up until the server
//! has stopped (background tasks drained, changes whose clients left
//! settled, the audit log synced) and [`Lanes::release`] lets it go, so a
//! task a call started (a rotation run, a group-commit round, a change
//! whose client left) is not cut off by its lane ending first.
//!
//! What a lane gives up: a call that blocks its thread holds up the other
//! calls of that lane's connections, where a worker's other tasks could move
//! to another worker (`storage::off_worker`); and one connection's calls
//! never use more than one core. On sled nothing a call does blocks for
//! long (a durable write waits asynchronously); on etcd a read's fence and
//! a write's transaction do, so a server on etcd serves on the shared
//! runtime unless told otherwise (`ServerConfig::listen_threads`).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt as _;

use super::limits::{Admitted, Departed};
use super::{serve_connections, GrpcRouter};
use crate::clock::Shutdown;
use crate::metrics::Metrics;

/// Threads each lane's blocking pool may start (tokio's default is 512 a
/// runtime, and a server may have up to 256 lanes).
const LANE_BLOCKING_THREADS: usize = 64;

/// The running lanes of one server.
pub(super) struct Lanes {
    lanes: Vec<Lane>,
    drain: Duration,
}

struct Lane {
    n: usize,
    handoff: mpsc::UnboundedSender<Departed>,
    /// Its open connections (`keyward_listen_lane_connections{lane}`).
    open: Gauge,
    served: Option<oneshot::Receiver<Result<(), tonic::transport::Error>>>,
    release: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

/// What a lane needs to serve: the same for every lane.
pub(super) struct LaneSetup {
    pub(super) router: GrpcRouter,
    pub(super) tls: Option<Arc<rustls::ServerConfig>>,
    pub(super) shutdown: Shutdown,
    pub(super) drain: Duration,
}

impl Lanes {
    /// Starts `count` lanes (at least one), each on a thread named
    /// `keyward-lane-N`, their open connections a gauge in `metrics`.
    pub(super) fn start(
        count: usize,
        setup: &LaneSetup,
        metrics: &Metrics,
    ) -> std::io::Result<Self> {
        let open = Family::<Vec<(String, String)>, Gauge>::default();
        metrics.register(
            "listen_lane_connections",
            "gRPC connections open on each lane (a thread serving the connections handed to it; \
             listen_threads)",
            open.clone(),
        );
        let count = count.max(1);
        let mut lanes = Vec::with_capacity(count);
        for n in 0..count {
            let gauge = open
                .get_or_create(&vec![("lane".to_owned(), n.to_string())])
                .clone();
            lanes.push(Lane::start(n, setup, gauge)?);
        }
        Ok(Self {
            lanes,
            drain: setup.drain,
        })
    }

    /// Hands `conn` to the open lane with the fewest connections. A
    /// connection no lane can take is closed; false when no lane is open.
    pub(super) fn hand_off(&self, conn: Admitted) -> bool {
        let Some(lane) = self
            .lanes
            .iter()
            .filter(|lane| !lane.handoff.is_closed())
            .min_by_key(|lane| lane.open.get())
        else {
            return false;
        };
        match conn.leave_runtime(lane.open.clone()) {
            Ok(conn) => {
                if lane.handoff.send(conn).is_err() {
                    tracing::warn!(
                        lane = lane.n,
                        "a lane stopped serving: closing a connection"
                    );
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot hand a connection to a lane"),
        }
        true
    }

    /// Waits until every lane has stopped serving: the shutdown has fired,
    /// and each drains its calls within the drain deadline. Their runtimes
    /// stay up until [`Lanes::release`].
    pub(super) async fn drain(&mut self) -> Result<(), String> {
        let mut result = Ok(());
        for lane in &mut self.lanes {
            if let Some(served) = lane.served.take() {
                match served.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => result = Err(e.to_string()),
                    // Its thread ended without a word: it panicked.
                    Err(_) => result = Err(format!("lane {} stopped serving", lane.n)),
                }
            }
        }
        result
    }

    /// Lets every lane's runtime end (what still runs on it is dropped)
    /// and waits for their threads, at most about twice the drain deadline
    /// (a lane waits up to one for its blocking tasks).
    pub(super) async fn release(self) {
        let bound = self.drain * 2 + Duration::from_secs(2);
        let threads: Vec<_> = self
            .lanes
            .into_iter()
            .map(|lane| {
                let _ = lane.release.send(());
                lane.thread
            })
            .collect();
        // Joined on a thread of its own, not the blocking pool: a lane
        // stuck past the bound must not hold up the runtime's own end.
        let (joined_tx, joined) = oneshot::channel::<()>();
        let joiner = std::thread::Builder::new()
            .name("keyward-lane-join".into())
            .spawn(move || {
                for thread in threads {
                    if thread.join().is_err() {
                        tracing::error!("a lane's thread panicked");
                    }
                }
                let _ = joined_tx.send(());
            });
        if joiner.is_err() {
            tracing::warn!("cannot wait for the lanes' threads; left to end on their own");
            return;
        }
        if tokio::time::timeout(bound, joined).await.is_err() {
            tracing::warn!("a lane's thread did not end in time; left to end on its own");
        }
    }
}

impl Lane {
    fn start(n: usize, setup: &LaneSetup, open: Gauge) -> std::io::Result<Self> {
        let (handoff, arrivals) = mpsc::unbounded_channel::<Departed>();
        let (served_tx, served) = oneshot::channel();
        let (release, released) = oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(LANE_BLOCKING_THREADS)
            .build()?;
        let router = setup.router.clone();
        let tls = setup.tls.clone();
        let shutdown = setup.shutdown.clone();
        let drain = setup.drain;
        let thread = std::thread::Builder::new()
            .name(format!("keyward-lane-{n}"))
            .spawn(move || {
                let span = tracing::info_span!("lane", n);
                let _entered = span.enter();
                runtime.block_on(async move {
                    let result = serve(router, tls, arrivals, &shutdown, drain).await;
                    let _ = served_tx.send(result);
                    // Up until the server has stopped (or is gone).
                    let _ = released.await;
                });
                // A blocking task still running (a scan, a snapshot) is
                // waited for only this long; it then ends on its own.
                runtime.shutdown_timeout(drain);
            })?;
        Ok(Self {
            n,
            handoff,
            open,
            served: Some(served),
            release,
            thread,
        })
    }
}

/// A lane's serving: the connections that arrive, registered with this
/// lane's runtime, until the shutdown fires and then for at most `drain`.
async fn serve(
    router: GrpcRouter,
    tls: Option<Arc<rustls::ServerConfig>>,
    arrivals: mpsc::UnboundedReceiver<Departed>,
    shutdown: &Shutdown,
    drain: Duration,
) -> Result<(), tonic::transport::Error> {
    let arrivals = tokio_stream::wrappers::UnboundedReceiverStream::new(arrivals).filter_map(
        |conn| match conn.join_runtime() {
            Ok(conn) => Some(Ok::<_, std::io::Error>(conn)),
            Err(e) => {
                tracing::debug!(error = %e, "a lane cannot take a connection");
                None
            }
        },
    );
    serve_connections(router, arrivals, tls, shutdown, drain).await
}
