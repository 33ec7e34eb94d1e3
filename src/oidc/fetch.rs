//! Loading key sets: from a file, or by one HTTP/1.1 GET over TLS, cached.
//!
//! The HTTP client is deliberately tiny (no redirects, no compression, no
//! keep-alive): one request, `Connection: close`, a deadline over the whole
//! exchange and a cap on the bytes read. Trust roots come only from the CA
//! file given to [`JwksCache::new`]; system roots are not loaded (point it at
//! the system bundle, e.g. `/etc/ssl/certs/ca-certificates.crt`, for a
//! public issuer). A refresh that fails is an error: a stale set is not
//! served past its TTL, so a key the issuer withdrew stops working.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::error::JwksError;
use super::issuer::{HttpsUrl, IssuerConfig, JwksSource};
use super::jwks::Jwks;
use super::jwt::{verify, VerifiedJwt};
use super::OidcError;

/// How long a fetched key set is used before it is fetched again.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5 * 60);
/// A token with an unknown `kid` makes the cache fetch again (the issuer may
/// have rotated its keys), but not more often than this, so forged `kid`s
/// cannot turn keyward into a flood against the issuer.
pub const DEFAULT_MIN_REFETCH: Duration = Duration::from_secs(30);
/// Deadline for connect, TLS handshake, request and response together.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes read for one key set: the whole HTTP response (status line,
/// headers, chunk framing and body), or the file.
pub const DEFAULT_MAX_BYTES: usize = 1024 * 1024;

const MAX_HEADERS: usize = 100;

struct Entry {
    jwks: Arc<Jwks>,
    fetched_at: Instant,
}

/// Key sets by source, each kept for a TTL.
///
/// Two concurrent misses for one source may both fetch; the later result
/// wins. That costs one extra request and keeps the lock out of any await.
pub struct JwksCache {
    tls: Option<Arc<rustls::ClientConfig>>,
    ttl: Duration,
    min_refetch: Duration,
    timeout: Duration,
    max_bytes: usize,
    entries: Mutex<HashMap<JwksSource, Entry>>,
}

impl JwksCache {
    /// A cache trusting the certificates of `ca` (PEM) for HTTPS sources.
    /// Without a CA file only file sources can be loaded.
    pub fn new(ca: Option<&Path>) -> Result<Self, OidcError> {
        let tls = ca.map(client_config).transpose()?.map(Arc::new);
        Ok(Self {
            tls,
            ttl: DEFAULT_TTL,
            min_refetch: DEFAULT_MIN_REFETCH,
            timeout: DEFAULT_TIMEOUT,
            max_bytes: DEFAULT_MAX_BYTES,
            entries: Mutex::new(HashMap::new()),
        })
    }

    /// A cache for file sources only (no trust roots; URL sources fail).
    pub fn files_only() -> Self {
        Self {
            tls: None,
            ttl: DEFAULT_TTL,
            min_refetch: DEFAULT_MIN_REFETCH,
            timeout: DEFAULT_TIMEOUT,
            max_bytes: DEFAULT_MAX_BYTES,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn with_min_refetch_interval(mut self, interval: Duration) -> Self {
        self.min_refetch = interval;
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn with_max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// The key set of `source`, from the cache while younger than the TTL.
    pub async fn jwks(&self, source: &JwksSource) -> Result<Arc<Jwks>, OidcError> {
        if let Some((jwks, _)) = self.cached(source, self.ttl) {
            return Ok(jwks);
        }
        self.refresh(source).await
    }

    /// Loads `source` again, whatever the cache holds.
    pub async fn refresh(&self, source: &JwksSource) -> Result<Arc<Jwks>, OidcError> {
        let bytes = match source {
            JwksSource::File(path) => read_file(path, self.max_bytes).await?,
            JwksSource::Url(url) => self.fetch(url).await?,
        };
        let jwks = Arc::new(Jwks::parse(&bytes)?);
        tracing::debug!(keys = jwks.keys().len(), "JWKS loaded");
        self.lock().insert(
            source.clone(),
            Entry {
                jwks: Arc::clone(&jwks),
                fetched_at: Instant::now(),
            },
        );
        Ok(jwks)
    }

    /// [`verify`] with the issuer's cached key set; on an unknown `kid` the
    /// set is loaded once more (at most once per minimum refetch interval)
    /// and the token tried again.
    pub async fn verify(
        &self,
        jwt: &str,
        issuer: &IssuerConfig,
        now_unix: i64,
        leeway_secs: i64,
    ) -> Result<VerifiedJwt, OidcError> {
        let source = issuer.jwks();
        let (jwks, fetched_at) = match self.cached(source, self.ttl) {
            Some(hit) => hit,
            None => (self.refresh(source).await?, Instant::now()),
        };
        match verify(jwt, issuer, &jwks, now_unix, leeway_secs) {
            Err(OidcError::UnknownKey) if fetched_at.elapsed() >= self.min_refetch => {
                let jwks = self.refresh(source).await?;
                verify(jwt, issuer, &jwks, now_unix, leeway_secs)
            }
            result => result,
        }
    }

    fn cached(&self, source: &JwksSource, max_age: Duration) -> Option<(Arc<Jwks>, Instant)> {
        let entries = self.lock();
        let entry = entries.get(source)?;
        (entry.fetched_at.elapsed() < max_age).then(|| (Arc::clone(&entry.jwks), entry.fetched_at))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JwksSource, Entry>> {
        // Every write is a single insert, so the map is whole even after a
        // panic elsewhere poisoned the lock.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn fetch(&self, url: &HttpsUrl) -> Result<Vec<u8>, JwksError> {
        let tls = self
            .tls
            .clone()
            .ok_or_else(|| JwksError::NoTrustRoots(url.to_string()))?;
        tracing::info!(%url, "fetching JWKS");
        match tokio::time::timeout(self.timeout, get(tls, url, self.max_bytes)).await {
            Err(_elapsed) => Err(JwksError::Timeout {
                url: url.to_string(),
                timeout: self.timeout,
            }),
            Ok(Ok(body)) => Ok(body),
            Ok(Err(failure)) => Err(failure.into_error(url)),
        }
    }
}

fn client_config(ca: &Path) -> Result<rustls::ClientConfig, JwksError> {
    let ca_error = |reason: String| JwksError::Ca {
        path: ca.to_owned(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).map_err(|e| ca_error(e.to_string()))?;
    for cert in certs {
        let cert = cert.map_err(|e| ca_error(e.to_string()))?;
        roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ca_error("no certificate in the file".into()));
    }
    // The ring provider explicitly: no reliance on a process default (see
    // DEPENDENCIES.md §5).
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ca_error(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

async fn read_file(path: &PathBuf, max_bytes: usize) -> Result<Vec<u8>, JwksError> {
    let read_error = |source| JwksError::Read {
        path: path.clone(),
        source,
    };
    let file = tokio::fs::File::open(path).await.map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(read_error)?;
    if bytes.len() > max_bytes {
        return Err(JwksError::TooLarge(max_bytes));
    }
    Ok(bytes)
}

/// Why one GET failed, before the URL is attached.
#[derive(Debug)]
pub(crate) enum HttpFailure {
    Io(io::Error),
    Tls(io::Error),
    Status(u16),
    TooLarge(usize),
    Protocol(&'static str),
}

impl HttpFailure {
    fn into_error(self, url: &HttpsUrl) -> JwksError {
        let url = url.to_string();
        match self {
            Self::Io(e) => JwksError::Fetch {
                url,
                reason: e.to_string(),
            },
            Self::Tls(e) => JwksError::Fetch {
                url,
                reason: format!("TLS: {e}"),
            },
            Self::Status(status) => JwksError::Status { url, status },
            Self::TooLarge(max) => JwksError::TooLarge(max),
            Self::Protocol(reason) => JwksError::Fetch {
                url,
                reason: reason.to_owned(),
            },
        }
    }
}

async fn get(
    tls: Arc<rustls::ClientConfig>,
    url: &HttpsUrl,
    max_bytes: usize,
) -> Result<Vec<u8>, HttpFailure> {
    let server_name = ServerName::try_from(url.host().to_owned())
        .map_err(|_| HttpFailure::Protocol("host is not a valid TLS server name"))?;
    let tcp = TcpStream::connect((url.host(), url.port()))
        .await
        .map_err(HttpFailure::Io)?;
    tcp.set_nodelay(true).map_err(HttpFailure::Io)?;
    let mut stream = tokio_rustls::TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .map_err(HttpFailure::Tls)?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nUser-Agent: keyward\r\nConnection: close\r\n\r\n",
        url.target(),
        url.host_header(),
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(HttpFailure::Io)?;
    stream.flush().await.map_err(HttpFailure::Io)?;
    read_response(stream, max_bytes).await
}

/// Reads one HTTP/1.1 response and returns the body of a 200. At most
/// `max_bytes` are read in all; Content-Length, chunked and read-to-close
/// bodies are understood.
pub(crate) async fn read_response<R: AsyncRead + Unpin>(
    stream: R,
    max_bytes: usize,
) -> Result<Vec<u8>, HttpFailure> {
    let mut reader = BufReader::new(stream.take(max_bytes as u64));
    let too_large = HttpFailure::TooLarge(max_bytes);

    let status_line = read_line(&mut reader, max_bytes).await?;
    let mut fields = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (fields.next(), fields.next()) else {
        return Err(HttpFailure::Protocol("malformed status line"));
    };
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(HttpFailure::Protocol("malformed status line"));
    }
    let status: u16 = code
        .parse()
        .map_err(|_| HttpFailure::Protocol("malformed status line"))?;
    if status != 200 {
        return Err(HttpFailure::Status(status));
    }

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut headers = 0;
    loop {
        let line = read_line(&mut reader, max_bytes).await?;
        if line.is_empty() {
            break;
        }
        headers += 1;
        if headers > MAX_HEADERS {
            return Err(HttpFailure::Protocol("too many response headers"));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpFailure::Protocol("malformed response header"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let length = value
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| value.parse::<u64>().ok())
                .flatten()
                .ok_or(HttpFailure::Protocol("malformed Content-Length"))?;
            if content_length.is_some_and(|seen| seen != length) {
                return Err(HttpFailure::Protocol("conflicting Content-Length headers"));
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("chunked") || chunked {
                return Err(HttpFailure::Protocol("unsupported Transfer-Encoding"));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-encoding")
            && !value.eq_ignore_ascii_case("identity")
        {
            return Err(HttpFailure::Protocol("unsupported Content-Encoding"));
        }
    }

    let mut body = Vec::new();
    match (chunked, content_length) {
        (true, Some(_)) => {
            return Err(HttpFailure::Protocol(
                "both Content-Length and Transfer-Encoding",
            ))
        }
        (false, Some(length)) => {
            if length > max_bytes as u64 {
                return Err(too_large);
            }
            body.resize(length as usize, 0);
            read_exact(&mut reader, &mut body, max_bytes).await?;
        }
        (true, None) => loop {
            let line = read_line(&mut reader, max_bytes).await?;
            let size = line.split(';').next().unwrap_or_default().trim();
            if size.is_empty() || size.len() > 8 {
                return Err(HttpFailure::Protocol("malformed chunk size"));
            }
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| HttpFailure::Protocol("malformed chunk size"))?;
            if size == 0 {
                // Trailers, if any, up to the blank line.
                while !read_line(&mut reader, max_bytes).await?.is_empty() {}
                break;
            }
            if body.len() + size > max_bytes {
                return Err(too_large);
            }
            let start = body.len();
            body.resize(start + size, 0);
            read_exact(&mut reader, &mut body[start..], max_bytes).await?;
            if !read_line(&mut reader, max_bytes).await?.is_empty() {
                return Err(HttpFailure::Protocol("chunk is longer than its size"));
            }
        },
        (false, None) => {
            reader
                .read_to_end(&mut body)
                .await
                .map_err(HttpFailure::Io)?;
            if reader.get_ref().limit() == 0 {
                return Err(too_large);
            }
        }
    }
    Ok(body)
}

/// One line without its CRLF (a bare LF is tolerated).
async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<tokio::io::Take<R>>,
    max_bytes: usize,
) -> Result<String, HttpFailure> {
    let mut line = Vec::new();
    reader
        .read_until(b'\n', &mut line)
        .await
        .map_err(HttpFailure::Io)?;
    if line.pop() != Some(b'\n') {
        return Err(if reader.get_ref().limit() == 0 {
            HttpFailure::TooLarge(max_bytes)
        } else {
            HttpFailure::Protocol("response ended early")
        });
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| HttpFailure::Protocol("response header is not UTF-8"))
}

async fn read_exact<R: AsyncRead + Unpin>(
    reader: &mut BufReader<tokio::io::Take<R>>,
    buf: &mut [u8],
    max_bytes: usize,
) -> Result<(), HttpFailure> {
    match reader.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Err(if reader.get_ref().limit() == 0 {
                HttpFailure::TooLarge(max_bytes)
            } else {
                HttpFailure::Protocol("response ended early")
            })
        }
        Err(e) => Err(HttpFailure::Io(e)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    async fn parse(response: &str, max: usize) -> Result<Vec<u8>, HttpFailure> {
        read_response(response.as_bytes(), max).await
    }

    #[tokio::test]
    async fn bodies_by_length_chunks_and_close() {
        let body = parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 1024)
            .await
            .unwrap();
        assert_eq!(body, b"hello");

        let body = parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nhel\r\n2\r\nlo\r\n0\r\nX-Trailer: 1\r\n\r\n",
            1024,
        )
        .await
        .unwrap();
        assert_eq!(body, b"hello");

        let body = parse("HTTP/1.0 200 OK\nContent-Type: x\n\nhello", 1024)
            .await
            .unwrap();
        assert_eq!(body, b"hello");
    }

    #[tokio::test]
    async fn bad_responses_are_refused() {
        type Expected = fn(&HttpFailure) -> bool;
        let cases: [(&str, Expected); 9] = [
            ("HTTP/1.1 302 Found\r\nLocation: /x\r\n\r\n", |f| {
                matches!(f, HttpFailure::Status(302))
            }),
            ("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", |f| {
                matches!(f, HttpFailure::Protocol(_))
            }),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
                |f| matches!(f, HttpFailure::Protocol(_)),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                |f| matches!(f, HttpFailure::Protocol(_)),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                |f| matches!(f, HttpFailure::Protocol(_)),
            ),
            ("HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n", |f| {
                matches!(f, HttpFailure::Protocol(_))
            }),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello world\r\n0\r\n\r\n",
                |f| matches!(f, HttpFailure::Protocol(_)),
            ),
            ("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", |f| {
                matches!(f, HttpFailure::Protocol(_))
            }),
            ("garbage", |f| matches!(f, HttpFailure::Protocol(_))),
        ];
        for (response, expected) in cases {
            let failure = parse(response, 1024).await.unwrap_err();
            assert!(expected(&failure), "{response:?} gave {failure:?}");
        }
    }

    #[tokio::test]
    async fn the_byte_limit_covers_every_body_kind() {
        let big = "x".repeat(200);
        for response in [
            format!("HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n{big}"),
            format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nc8\r\n{big}\r\n0\r\n\r\n"
            ),
            format!("HTTP/1.1 200 OK\r\n\r\n{big}"),
            format!("HTTP/1.1 200 OK\r\nX-Long: {big}\r\n\r\n"),
        ] {
            let failure = parse(&response, 100).await.unwrap_err();
            assert!(matches!(failure, HttpFailure::TooLarge(100)), "{failure:?}");
        }
    }
}
