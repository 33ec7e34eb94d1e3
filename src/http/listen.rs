//! The one HTTPS listener: accepts connections within
//! `limits.max_connections`, finishes TLS within the handshake deadline,
//! and serves HTTP/1.1 and HTTP/2 (ALPN) with the router of `super::router`
//! until shutdown, then lets in-flight requests finish.
//!
//! The same certificate and key as the gRPC listener; the client CA, when
//! configured, makes a client certificate optional (it is one login among
//! several: `auth/cert/login`). The peer address and the verified leaf
//! certificate reach handlers as a [`Peer`] request extension.
//!
//! Bounds (the gRPC listener's, with the same settings): connections are
//! counted from accept, before TLS, in a pool of their own of
//! `limits.max_connections`; over it a connection is closed at once. A TLS
//! handshake and an HTTP/1 request head must each arrive within
//! [`HANDSHAKE_DEADLINE`]; HTTP/2 streams per connection are
//! `limits.max_concurrent_streams`, and so are the streams a client reset
//! before they were taken (`ServerLimits::max_pending_reset_streams`);
//! the server resets at most `config::MAX_LOCAL_ERROR_RESETS` streams of a
//! connection for the client's protocol errors; a body over `limits.max_request_bytes`
//! is refused by the handlers (`super::reply::read_body`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt as _;

use crate::api::detach::{self, Changes};
use crate::clock::Shutdown;
use crate::config::ServerLimits;

/// How long a new connection may take to finish its TLS handshake, and an
/// HTTP/1 connection to send a request head; it holds a connection slot
/// until then.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// How long a connection may sit with no request in flight and no byte
/// read or written before it is closed, so idle connections (an HTTP/2
/// connection that opened no stream, notably) cannot hold every slot.
/// HTTP/1 connections are closed sooner, by the head deadline.
pub const IDLE_DEADLINE: Duration = Duration::from_secs(30);
/// How often a connection checks whether it has been idle too long.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// How long in-flight requests may take to finish after shutdown begins.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Who is on the other end of a connection, for every request on it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The certificates the client presented (DER, leaf first), verified
    /// against the client CA during the handshake; `None` without one.
    pub client_chain: Option<Arc<Vec<Vec<u8>>>>,
}

/// Serves `router` on `listener` (TLS unless `tls` is `None`, which only
/// `--insecure-plaintext` asks for) until `shutdown` fires, then waits for
/// in-flight requests for at most [`DRAIN_DEADLINE`].
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: axum::Router,
    limits: ServerLimits,
    changes: Changes,
    shutdown: Shutdown,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let full = Arc::new(AtomicBool::new(false));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_DEADLINE)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.max_pending_reset_streams())
        .max_local_error_reset_streams(crate::config::MAX_LOCAL_ERROR_RESETS);
    let builder = Arc::new(builder);
    loop {
        let (stream, addr) = tokio::select! {
            () = shutdown.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: pause, go on.
                    tracing::warn!(error = %e, "HTTPS accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    limit = limits.max_connections,
                    "HTTPS connection limit reached (limits.max_connections): closing new connections"
                );
            }
            drop(stream);
            continue;
        };
        full.store(false, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let changes = changes.clone();
        let builder = builder.clone();
        // Taken now, so the drain also waits for connections mid-handshake.
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            let Some(acceptor) = acceptor else {
                let peer = Peer {
                    addr,
                    client_chain: None,
                };
                serve_connection(&builder, watcher, stream, router, &changes, peer).await;
                return;
            };
            let tls = match tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(stream)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %addr, "TLS handshake deadline passed");
                    return;
                }
            };
            let client_chain = tls.get_ref().1.peer_certificates().map(|chain| {
                Arc::new(
                    chain
                        .iter()
                        .map(|c| c.as_ref().to_vec())
                        .collect::<Vec<_>>(),
                )
            });
            let peer = Peer { addr, client_chain };
            serve_connection(&builder, watcher, tls, router, &changes, peer).await;
        });
    }
    drop(listener);
    tracing::info!("HTTPS listener: draining in-flight requests");
    if tokio::time::timeout(DRAIN_DEADLINE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTPS drain deadline passed; closing remaining connections");
    }
}

/// Serves one connection; every request carries `peer`. A connection
/// with no request in flight and no byte moved for [`IDLE_DEADLINE`] is
/// closed.
async fn serve_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    io: I,
    router: axum::Router,
    changes: &Changes,
    peer: Peer,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked {
        inner: io,
        activity: activity.clone(),
    });
    let in_flight = activity.clone();
    // A change runs to its end if its client leaves (`api::detach`).
    let service = changes
        .detach(router, detach::every_request)
        .map_request(move |mut req: Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer.clone());
            req.map(axum::body::Body::new)
        })
        .map_future(move |answer| {
            // Counted until the answer is made or the request dropped.
            let guard = InFlight::new(in_flight.clone());
            async move {
                let answer = answer.await;
                drop(guard);
                answer
            }
        });
    let connection = builder.serve_connection(io, TowerToHyperService::new(service));
    let connection = watcher.watch(connection.into_owned());
    tokio::pin!(connection);
    loop {
        tokio::select! {
            ended = &mut connection => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "HTTPS connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep(IDLE_CHECK) => {
                if activity.idle_for() >= IDLE_DEADLINE {
                    tracing::debug!("HTTPS connection idle past the deadline: closed");
                    return;
                }
            }
        }
    }
}

/// When a connection last moved a byte, and its requests in flight.
struct Activity {
    start: std::time::Instant,
    /// Milliseconds after `start` of the last byte read or written.
    last_ms: std::sync::atomic::AtomicU64,
    in_flight: std::sync::atomic::AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: std::time::Instant::now(),
            last_ms: std::sync::atomic::AtomicU64::new(0),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// How long nothing has happened; zero while a request is in flight.
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// One request in flight on a connection, for as long as it lives.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// A connection's stream that notes when bytes move.
struct Tracked<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
