//! Loading key sets: from a file, or by one HTTP/1.1 GET over TLS, cached.
//!
//! The HTTP client is deliberately tiny (no redirects, no compression, no
//! keep-alive): one request, `Connection: close`, a deadline over the whole
//! exchange and a cap on the bytes read. Trust roots come only from the CA
//! file given to [`JwksCache::new`]; system roots are not loaded (point it at
//! the system bundle, e.g. `/etc/ssl/certs/ca-certificates.crt`, for a
//! public issuer). A refresh that fails is an error: a stale set is not
//! served past its TTL, so a key the issuer withdrew stops working.
//!
//! Logins are unauthenticated, so nothing a caller does may turn into
//! unbounded work or into a probe of the network:
//! - one load per source at a time: concurrent logins wait for it;
//! - a failed load is remembered, and the source is not tried again for a
//!   back-off (5 s, doubling to 5 min); logins meanwhile fail at once;
//! - the host's every resolved address must be public unless
//!   `oidc.allow_private_hosts` (see `hosts.rs`), and the
//!   connection goes to a checked address;
//! - a login is told only [`JwksError::Unavailable`]; the cause goes to the
//!   server log, once per failed load;
//! - a file must be a regular file under `oidc.jwks_dir`
//!   ([`confine_jwks_file`]); it is read with a size cap and a deadline, off
//!   the async threads.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read as _};
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::error::JwksError;
use super::hosts::non_public;
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
/// Deadline for connect, TLS handshake, request and response together; and
/// for reading a key set file.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes read for one key set: the whole HTTP response (status line,
/// headers, chunk framing and body), or the file.
pub const DEFAULT_MAX_BYTES: usize = 1024 * 1024;
/// After a failed load a source is not tried again for this long; each
/// further failure doubles it, up to [`MAX_FAILURE_BACKOFF`].
pub const FIRST_FAILURE_BACKOFF: Duration = Duration::from_secs(5);
pub const MAX_FAILURE_BACKOFF: Duration = Duration::from_secs(5 * 60);

const MAX_HEADERS: usize = 100;

struct Loaded {
    jwks: Arc<Jwks>,
    fetched_at: Instant,
}

/// The last load failed at `at`; the next one may start at `at + backoff`.
struct Failed {
    at: Instant,
    backoff: Duration,
}

/// What the cache knows of one source.
#[derive(Default)]
struct Slot {
    loaded: Option<Loaded>,
    failed: Option<Failed>,
    /// Held for the whole of a load, so one source has one load at a time.
    loading: Arc<tokio::sync::Mutex<()>>,
}

/// Key sets by source, each kept for a TTL; failed loads are remembered with
/// a back-off (see the module doc).
pub struct JwksCache {
    tls: Option<Arc<rustls::ClientConfig>>,
    ttl: Duration,
    min_refetch: Duration,
    timeout: Duration,
    max_bytes: usize,
    first_backoff: Duration,
    max_backoff: Duration,
    jwks_dir: Option<PathBuf>,
    allow_private_hosts: bool,
    entries: Mutex<HashMap<JwksSource, Slot>>,
}

impl JwksCache {
    /// A cache trusting the certificates of `ca` (PEM) for HTTPS sources.
    /// Without a CA file only file sources can be loaded.
    pub fn new(ca: Option<&Path>) -> Result<Self, OidcError> {
        let tls = ca.map(client_config).transpose()?.map(Arc::new);
        Ok(Self {
            tls,
            ..Self::files_only()
        })
    }

    /// A cache for file sources only (no trust roots; URL sources fail).
    /// Files still need [`Self::with_jwks_dir`].
    pub fn files_only() -> Self {
        Self {
            tls: None,
            ttl: DEFAULT_TTL,
            min_refetch: DEFAULT_MIN_REFETCH,
            timeout: DEFAULT_TIMEOUT,
            max_bytes: DEFAULT_MAX_BYTES,
            first_backoff: FIRST_FAILURE_BACKOFF,
            max_backoff: MAX_FAILURE_BACKOFF,
            jwks_dir: None,
            allow_private_hosts: false,
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

    /// The back-off after a failed load, and its ceiling.
    pub fn with_failure_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.first_backoff = first;
        self.max_backoff = max.max(first);
        self
    }

    /// The folder key set files must be under (`oidc.jwks_dir`); `None`
    /// refuses every file source.
    pub fn with_jwks_dir(mut self, dir: Option<&Path>) -> Self {
        self.jwks_dir = dir.map(Path::to_owned);
        self
    }

    /// `oidc.allow_private_hosts`: also fetch from loopback, private,
    /// link-local and other non-public addresses. For tests and for issuers
    /// inside a private network; it lets whoever may configure an issuer make
    /// the server connect into that network.
    pub fn danger_allow_private_hosts(mut self, allow: bool) -> Self {
        self.allow_private_hosts = allow;
        self
    }

    /// The key set of `source`, from the cache while younger than the TTL.
    pub async fn jwks(&self, source: &JwksSource) -> Result<Arc<Jwks>, OidcError> {
        if let Some((jwks, _)) = self.cached(source, self.ttl) {
            return Ok(jwks);
        }
        self.refresh(source).await
    }

    /// Loads `source` again, whatever the cache holds, unless a load failed
    /// less than the back-off ago ([`JwksError::BackingOff`]). A caller that
    /// waited for another's load of the same source gets that load's result.
    pub async fn refresh(&self, source: &JwksSource) -> Result<Arc<Jwks>, OidcError> {
        let loading = Arc::clone(&self.lock().entry(source.clone()).or_default().loading);
        let waited_from = Instant::now();
        let _one_load = loading.lock().await;
        if let Some(earlier) = self.settled_since(source, waited_from) {
            return earlier;
        }
        let loaded = match source {
            JwksSource::File(path) => self.read_file(path).await,
            JwksSource::Url(url) => self.fetch(url).await,
        }
        .and_then(|bytes| Jwks::parse(&bytes));
        let mut entries = self.lock();
        let slot = entries.entry(source.clone()).or_default();
        match loaded {
            Ok(jwks) => {
                let jwks = Arc::new(jwks);
                tracing::debug!(keys = jwks.keys().len(), "JWKS loaded");
                slot.failed = None;
                slot.loaded = Some(Loaded {
                    jwks: Arc::clone(&jwks),
                    fetched_at: Instant::now(),
                });
                Ok(jwks)
            }
            Err(e) => {
                let backoff = match &slot.failed {
                    Some(failed) => (failed.backoff * 2).min(self.max_backoff),
                    None => self.first_backoff,
                };
                slot.failed = Some(Failed {
                    at: Instant::now(),
                    backoff,
                });
                // The one place the cause is told: logins get `Unavailable`.
                tracing::warn!(
                    %source,
                    error = %e,
                    retry_in_secs = backoff.as_secs(),
                    "loading an OIDC key set failed",
                );
                Err(e.into())
            }
        }
    }

    /// [`verify`] with the issuer's cached key set; on an unknown `kid` the
    /// set is loaded once more (at most once per minimum refetch interval)
    /// and the token tried again. A key set that cannot be had is
    /// [`JwksError::Unavailable`], whatever the cause (logged by the load).
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
            None => (self.refresh_for_login(source).await?, Instant::now()),
        };
        match verify(jwt, issuer, &jwks, now_unix, leeway_secs) {
            Err(OidcError::UnknownKey) if fetched_at.elapsed() >= self.min_refetch => {
                let jwks = self.refresh_for_login(source).await?;
                verify(jwt, issuer, &jwks, now_unix, leeway_secs)
            }
            result => result,
        }
    }

    async fn refresh_for_login(&self, source: &JwksSource) -> Result<Arc<Jwks>, OidcError> {
        self.refresh(source).await.map_err(|e| {
            if let OidcError::Jwks(JwksError::BackingOff(retry_in)) = e {
                tracing::debug!(%source, ?retry_in, "OIDC key set backing off after a failure");
            }
            OidcError::Jwks(JwksError::Unavailable)
        })
    }

    fn cached(&self, source: &JwksSource, max_age: Duration) -> Option<(Arc<Jwks>, Instant)> {
        let entries = self.lock();
        let loaded = entries.get(source)?.loaded.as_ref()?;
        (loaded.fetched_at.elapsed() < max_age)
            .then(|| (Arc::clone(&loaded.jwks), loaded.fetched_at))
    }

    /// What a caller that waited for the load lock from `since` gets without
    /// loading: the back-off of a recent failure, or a set loaded meanwhile.
    fn settled_since(
        &self,
        source: &JwksSource,
        since: Instant,
    ) -> Option<Result<Arc<Jwks>, OidcError>> {
        let entries = self.lock();
        let slot = entries.get(source)?;
        if let Some(failed) = &slot.failed {
            let retry_at = failed.at + failed.backoff;
            let now = Instant::now();
            if now < retry_at {
                return Some(Err(JwksError::BackingOff(retry_at - now).into()));
            }
        }
        let loaded = slot.loaded.as_ref()?;
        (loaded.fetched_at >= since).then(|| Ok(Arc::clone(&loaded.jwks)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JwksSource, Slot>> {
        // Every write replaces whole fields, so the map is whole even after
        // a panic elsewhere poisoned the lock.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn read_file(&self, path: &Path) -> Result<Vec<u8>, JwksError> {
        let dir = self.jwks_dir.clone().ok_or(JwksError::NoJwksDir)?;
        let (file, max_bytes) = (path.to_owned(), self.max_bytes);
        // Off the async threads; if the open or read still blocks (the file
        // was swapped for a FIFO after the check), the login does not wait
        // past the deadline, and the back-off keeps later logins from
        // pinning more threads.
        let read = tokio::task::spawn_blocking(move || read_confined(&dir, &file, max_bytes));
        match tokio::time::timeout(self.timeout, read).await {
            Err(_elapsed) => Err(JwksError::ReadTimeout {
                path: path.to_owned(),
                timeout: self.timeout,
            }),
            Ok(Err(join)) => Err(JwksError::Read {
                path: path.to_owned(),
                source: io::Error::other(join.to_string()),
            }),
            Ok(Ok(read)) => read,
        }
    }

    async fn fetch(&self, url: &HttpsUrl) -> Result<Vec<u8>, JwksError> {
        let tls = self
            .tls
            .clone()
            .ok_or_else(|| JwksError::NoTrustRoots(url.to_string()))?;
        tracing::info!(%url, "fetching JWKS");
        let get = get(tls, url, self.max_bytes, self.allow_private_hosts);
        match tokio::time::timeout(self.timeout, get).await {
            Err(_elapsed) => Err(JwksError::Timeout {
                url: url.to_string(),
                timeout: self.timeout,
            }),
            Ok(Ok(body)) => Ok(body),
            Ok(Err(failure)) => Err(failure.into_error(url)),
        }
    }
}

impl fmt::Display for JwksSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Url(url) => write!(f, "{url}"),
        }
    }
}

/// The real path of the key set file `given` names, if it is a regular file
/// under `dir` (`oidc.jwks_dir`); a relative `given` is taken relative to
/// `dir`.
///
/// A path with a `..` component, or one that does not start with `dir`, is
/// refused before anything is looked up, so the answer says nothing about
/// files outside the folder. The path is then resolved (symbolic links
/// included) and must still be under the resolved `dir`, so a link cannot
/// lead out of it. Only a regular file passes: a FIFO, a device or a
/// folder would block a reader or never end.
pub fn confine_jwks_file(dir: &Path, given: &Path) -> Result<PathBuf, JwksError> {
    if given.as_os_str().is_empty()
        || given
            .components()
            .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(JwksError::OutsideJwksDir);
    }
    let real_dir = std::fs::canonicalize(dir).map_err(|source| JwksError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let candidate = if given.is_absolute() {
        given.to_owned()
    } else {
        real_dir.join(given)
    };
    if !(candidate.starts_with(dir) || candidate.starts_with(&real_dir)) {
        return Err(JwksError::OutsideJwksDir);
    }
    let real = std::fs::canonicalize(&candidate).map_err(|source| JwksError::Read {
        path: candidate.clone(),
        source,
    })?;
    if !real.starts_with(&real_dir) || real == real_dir {
        return Err(JwksError::OutsideJwksDir);
    }
    let meta = std::fs::metadata(&real).map_err(|source| JwksError::Read {
        path: real.clone(),
        source,
    })?;
    if !meta.is_file() {
        return Err(JwksError::NotRegularFile(real));
    }
    Ok(real)
}

/// Reads at most `max_bytes` of the file `path` names under `dir`. Blocking.
fn read_confined(dir: &Path, path: &Path, max_bytes: usize) -> Result<Vec<u8>, JwksError> {
    let real = confine_jwks_file(dir, path)?;
    let read_error = |source| JwksError::Read {
        path: real.clone(),
        source,
    };
    let file = std::fs::File::open(&real).map_err(read_error)?;
    // The file opened may not be the one checked: look at what was opened.
    if !file.metadata().map_err(read_error)?.is_file() {
        return Err(JwksError::NotRegularFile(real));
    }
    let mut bytes = Vec::new();
    file.take(max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() > max_bytes {
        return Err(JwksError::TooLarge(max_bytes));
    }
    Ok(bytes)
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

/// Why one GET failed, before the URL is attached.
#[derive(Debug)]
pub(crate) enum HttpFailure {
    Io(io::Error),
    Resolve(io::Error),
    Tls(io::Error),
    NotPublic(std::net::IpAddr, &'static str),
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
            Self::Resolve(e) => JwksError::Fetch {
                url,
                reason: format!("resolving the host: {e}"),
            },
            Self::Tls(e) => JwksError::Fetch {
                url,
                reason: format!("TLS: {e}"),
            },
            Self::NotPublic(addr, kind) => JwksError::PrivateAddress { url, addr, kind },
            Self::Status(status) => JwksError::Status { url, status },
            Self::TooLarge(max) => JwksError::TooLarge(max),
            Self::Protocol(reason) => JwksError::Fetch {
                url,
                reason: reason.to_owned(),
            },
        }
    }
}

/// Resolves the URL's host once, checks every address (see
/// `hosts.rs`), and connects to the checked addresses in turn.
async fn connect(url: &HttpsUrl, allow_private_hosts: bool) -> Result<TcpStream, HttpFailure> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((url.host(), url.port()))
        .await
        .map_err(HttpFailure::Resolve)?
        .collect();
    if !allow_private_hosts {
        if let Some((ip, kind)) = addrs
            .iter()
            .find_map(|a| non_public(a.ip()).map(|kind| (a.ip(), kind)))
        {
            return Err(HttpFailure::NotPublic(ip, kind));
        }
    }
    let mut last = HttpFailure::Protocol("the host name resolved to no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = HttpFailure::Io(e),
        }
    }
    Err(last)
}

async fn get(
    tls: Arc<rustls::ClientConfig>,
    url: &HttpsUrl,
    max_bytes: usize,
    allow_private_hosts: bool,
) -> Result<Vec<u8>, HttpFailure> {
    let server_name = ServerName::try_from(url.host().to_owned())
        .map_err(|_| HttpFailure::Protocol("host is not a valid TLS server name"))?;
    let tcp = connect(url, allow_private_hosts).await?;
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
