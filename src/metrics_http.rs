//! The `/metrics` HTTP listener: a small HTTP/1.1 server that answers `GET /metrics` with the
//! OpenMetrics text of a [`Metrics`] registry, and nothing else.
//!
//! It runs the registry's refreshers (see [`Metrics::on_scrape`]) before each encode and knows
//! nothing of what they read. One request per connection; bounded head, connections and time.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::clock::Shutdown;
use crate::metrics::{Metrics, CONTENT_TYPE};

/// The longest request head `/metrics` reads.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a client has to send its request head, and then to take the response.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at the same time; more connections are closed at once.
pub const MAX_CONNECTIONS: usize = 16;

/// Serves `GET /metrics` on `listener` until `shutdown` resolves; any other path is 404.
///
/// One request per connection (`Connection: close`); the head may be at most
/// [`MAX_REQUEST_HEAD`] bytes (else 431) and must arrive within [`IO_TIMEOUT`] (else 408).
/// The registry's refreshers run on a blocking thread before each encode. At shutdown the
/// listener closes and scrapes still in flight are dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: Shutdown) {
    serve_with_timeout(listener, metrics, shutdown, IO_TIMEOUT).await;
}

/// [`serve`] with the I/O timeout as a parameter (tests shorten it).
async fn serve_with_timeout(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    io_timeout: Duration,
) {
    let shutdown = shutdown.wait();
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
                connections.spawn(async move {
                    if let Err(error) = handle(stream, metrics, io_timeout).await {
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
                metrics.refresh();
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::clock::ShutdownTrigger;
    use crate::metrics::Refresh;

    fn sample() -> Metrics {
        let metrics = Metrics::new();
        metrics.observe_request("keyward.v1.Secrets/Get", "OK", Duration::from_micros(300));
        metrics.observe_request("keyward.v1.Secrets/Get", "OK", Duration::from_millis(2));
        metrics.observe_request(
            "keyward.v1.Secrets/Get",
            "NOT_FOUND",
            Duration::from_millis(1),
        );
        metrics
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
        stop: ShutdownTrigger,
        task: tokio::task::JoinHandle<()>,
    }

    /// Counts scrapes and sets the sealed gauge.
    struct Hook(Arc<AtomicUsize>);

    impl Refresh for Hook {
        fn refresh(&self, metrics: &Metrics) {
            self.0.fetch_add(1, Ordering::SeqCst);
            metrics.set_sealed(true);
        }
    }

    /// A server on 127.0.0.1:0 with a short I/O timeout; its hook counts scrapes and
    /// sets the sealed gauge.
    async fn start(metrics: Arc<Metrics>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scrapes = Arc::new(AtomicUsize::new(0));
        metrics.on_scrape(Arc::new(Hook(Arc::clone(&scrapes))));
        let stop = ShutdownTrigger::new();
        let timeout = Duration::from_millis(200);
        let task = tokio::spawn(serve_with_timeout(
            listener,
            metrics,
            stop.signal(),
            timeout,
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
            self.stop.trigger();
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
