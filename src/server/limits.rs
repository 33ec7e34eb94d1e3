//! What the transport bounds before a call reaches a handler: open
//! connections, and the code an oversized request is answered with. The
//! per-connection stream limit is HTTP/2's own setting and the request size
//! tonic's decoder limit (both set in `Server::router`); the Watch limit per
//! identity is the Secrets service's (`api::secrets`).
//!
//! A connection is counted from accept, before TLS, so a client that never
//! finishes its handshake holds a slot only until the handshake deadline.
//! Over `limits.max_connections` a new connection is closed at once: a
//! client sees its TLS handshake fail (a gRPC client: `UNAVAILABLE`), and
//! can try again when a slot is free.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::http;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The slots of `limits.max_connections`.
pub(super) struct ConnectionGate {
    slots: Arc<Semaphore>,
    limit: usize,
    /// Set while new connections are being refused, so the log says so once
    /// per episode rather than once per connection.
    full: AtomicBool,
}

impl ConnectionGate {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limit)),
            limit,
            full: AtomicBool::new(false),
        }
    }

    /// Admits `stream` if a slot is free; it holds the slot until it is
    /// closed. Over the limit the stream is dropped here, which closes it.
    pub(super) fn admit(&self, stream: TcpStream) -> Option<Admitted> {
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => {
                self.full.store(false, Ordering::Relaxed);
                Some(Admitted {
                    stream,
                    slot,
                    _seat: None,
                })
            }
            Err(_) => {
                if !self.full.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        limit = self.limit,
                        "connection limit reached (limits.max_connections): closing new connections"
                    );
                }
                None
            }
        }
    }
}

/// An accepted connection holding one of the gate's slots.
pub(super) struct Admitted {
    stream: TcpStream,
    slot: OwnedSemaphorePermit,
    /// The lane serving it, if one does (`lanes`).
    _seat: Option<Seat>,
}

/// An admitted connection on its way to a lane (`lanes`): its socket
/// belongs to no runtime, and it still holds its slot.
pub(super) struct Departed {
    stream: std::net::TcpStream,
    slot: OwnedSemaphorePermit,
    seat: Seat,
}

/// One of a lane's open connections: counted while it lives.
struct Seat(Gauge);

impl Drop for Seat {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Admitted {
    /// Takes the socket off this runtime, counted in `open` (a lane's
    /// connections) until the connection closes.
    pub(super) fn leave_runtime(self, open: Gauge) -> io::Result<Departed> {
        let stream = self.stream.into_std()?;
        open.inc();
        Ok(Departed {
            stream,
            slot: self.slot,
            seat: Seat(open),
        })
    }
}

impl Departed {
    /// Registers the socket with the runtime this is called on.
    pub(super) fn join_runtime(self) -> io::Result<Admitted> {
        Ok(Admitted {
            stream: TcpStream::from_std(self.stream)?,
            slot: self.slot,
            _seat: Some(self.seat),
        })
    }
}

impl Connected for Admitted {
    // The plain TCP info, so `Request::remote_addr` and the peer
    // certificates are found as for an unwrapped `TcpStream`.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A response of the gRPC router.
pub(super) type GrpcResponse = http::Response<tonic::body::Body>;

/// tonic answers a request message over the decoder limit
/// (`limits.max_request_bytes`) with `OUT_OF_RANGE`; gRPC's own
/// implementations answer `RESOURCE_EXHAUSTED`, as keyward does for every
/// other limit. keyward's handlers never answer `OUT_OF_RANGE` (no failure
/// kind maps to it), so a trailers-only answer carrying it is the decoder's
/// and is renamed here; its message (the size and the limit) is kept.
pub(super) fn oversized_is_exhausted(mut response: GrpcResponse) -> GrpcResponse {
    const OUT_OF_RANGE: &[u8] = b"11";
    const RESOURCE_EXHAUSTED: http::HeaderValue = http::HeaderValue::from_static("8");
    let headers = response.headers_mut();
    if headers
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == OUT_OF_RANGE)
    {
        headers.insert("grpc-status", RESOURCE_EXHAUSTED);
    }
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn only_out_of_range_is_renamed() {
        let answer = |code: &'static str| {
            let mut response = GrpcResponse::new(tonic::body::Body::empty());
            response
                .headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static(code));
            oversized_is_exhausted(response).headers()["grpc-status"].clone()
        };
        assert_eq!(answer("11"), "8");
        for code in ["0", "3", "7", "8", "14"] {
            assert_eq!(answer(code), code);
        }
        let plain = oversized_is_exhausted(GrpcResponse::new(tonic::body::Body::empty()));
        assert!(plain.headers().get("grpc-status").is_none());
    }
}
