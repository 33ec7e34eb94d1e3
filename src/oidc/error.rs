//! The errors of OIDC login: one variant per broken rule.
//!
//! No message carries the token, a claim value or the payload; the only
//! token-derived text ever shown is the `alg` name, and only when it is a
//! short run of ASCII letters and digits.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Why a JWT was refused, or why the issuer's key set could not be had.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// Not a compact JWS, bad base64url, or a header or claim set that is
    /// not a JSON object (the reason is fixed text, never token content).
    #[error("malformed token: {0}")]
    MalformedToken(&'static str),
    /// `alg` is not RS256, ES256 or EdDSA (`none`, HS*, PS*, ...).
    #[error("unsupported signing algorithm {0}")]
    UnsupportedAlgorithm(String),
    /// No key of the issuer's set has the token's `kid`, or the token has no
    /// `kid` and the set has more than one key.
    #[error("no key of the issuer's key set matches the token's key id")]
    UnknownKey,
    /// The key the token names is of a type that cannot verify its `alg`.
    #[error("the token's key cannot verify {0} signatures")]
    WrongKeyType(&'static str),
    #[error("bad signature")]
    BadSignature,
    #[error("token issuer (iss) does not match the configured issuer")]
    WrongIssuer,
    #[error("token audience (aud) does not contain the configured audience")]
    WrongAudience,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    /// A registered claim keyward requires (`iss`, `aud`, `exp`, `sub`).
    #[error("token lacks the required claim {0}")]
    MissingClaim(&'static str),
    /// A bound claim is missing or differs. Holds the claim's key, which
    /// comes from the operator's binding, never its value.
    #[error("bound claim {0} does not match")]
    ClaimMismatch(String),
    /// An `IssuerConfig` or JWKS URL refused at construction.
    #[error("invalid issuer configuration: {0}")]
    InvalidConfig(&'static str),
    #[error(transparent)]
    Jwks(#[from] JwksError),
}

/// Why a key set could not be read, fetched or trusted.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// Not a JSON object with a `keys` array. Key sets are public, so the
    /// parser's message is kept.
    #[error("key set is not a JWK Set: {0}")]
    Syntax(String),
    /// A key of a supported type that is broken or too weak. A set that
    /// cannot be read whole is not trusted in part.
    #[error("key {kid}: {reason}")]
    InvalidKey { kid: String, reason: &'static str },
    #[error("key set has two keys with id {0} for the same algorithm")]
    DuplicateKey(String),
    #[error("key set has no usable signing key (RS256, ES256 or EdDSA)")]
    NoUsableKeys,
    #[error("key set is larger than {0} bytes")]
    TooLarge(usize),
    #[error("cannot read key set file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot load CA file {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("no trust roots to fetch {0}: configure a CA file")]
    NoTrustRoots(String),
    #[error("fetching {url} failed: {reason}")]
    Fetch { url: String, reason: String },
    #[error("fetching {url} timed out after {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("fetching {url}: HTTP status {status}")]
    Status { url: String, status: u16 },
    /// A key set file was named but the server has no `oidc.jwks_dir`.
    #[error("key set files are refused: the server has no oidc.jwks_dir")]
    NoJwksDir,
    /// The path climbs with `..`, or leads (perhaps through a symbolic link)
    /// out of `oidc.jwks_dir`. The path is not named: it came from the caller.
    #[error("the key set file must be under oidc.jwks_dir (no '..', no link out of it)")]
    OutsideJwksDir,
    #[error("key set file {0} is not a regular file")]
    NotRegularFile(PathBuf),
    #[error("reading key set file {path} timed out after {timeout:?}")]
    ReadTimeout { path: PathBuf, timeout: Duration },
    /// The host resolved to an address keyward does not fetch from unless
    /// `oidc.allow_private_hosts` is set (loopback, private, link-local...).
    #[error("fetching {url}: refused to connect to {addr}, a {kind} address (oidc.allow_private_hosts is off)")]
    PrivateAddress {
        url: String,
        addr: IpAddr,
        kind: &'static str,
    },
    /// An earlier load of this key set failed; no new attempt is made until
    /// the back-off has passed.
    #[error("an earlier load failed; the next attempt is in {0:?}")]
    BackingOff(Duration),
    /// What a login is told when the key set could not be had, whatever the
    /// cause: the cause (a URL, an address, a TLS or file error) is in the
    /// server log only, so a caller cannot use logins to probe the network
    /// or the file system. Shown after "the issuer's key set is unavailable: ".
    #[error("the reason is in the server log")]
    Unavailable,
}

/// The `alg` name as it may appear in an error: short ASCII letters and
/// digits only, so a hostile header cannot put text into logs.
pub(crate) fn printable_alg(alg: &str) -> String {
    if !alg.is_empty() && alg.len() <= 16 && alg.bytes().all(|b| b.is_ascii_alphanumeric()) {
        alg.to_owned()
    } else {
        "(unprintable)".to_owned()
    }
}

/// A key id from a key set, cut short and escaped for messages.
pub(crate) fn printable_kid(kid: Option<&str>) -> String {
    match kid {
        None => "(no kid)".to_owned(),
        Some(kid) => kid.chars().take(64).flat_map(char::escape_debug).collect(),
    }
}
