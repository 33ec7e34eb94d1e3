//! OIDC/JWT login for CI runners and workloads (GitHub Actions-style tokens).
//!
//! A runner presents a JWT its platform signed; keyward checks it against a
//! configured issuer: the signature with a key of the issuer's JWK Set, then
//! `iss`, `aud`, `exp`, `nbf`, and finally the identity's bound claims.
//!
//! - `jwks` parses a JWK Set into RS256, ES256 and EdDSA keys.
//! - `jwt` verifies one token ([`verify`]) and mints a [`VerifiedJwt`].
//! - `issuer` holds an [`IssuerConfig`] and its [`JwksSource`].
//! - `fetch` loads key sets from a file or over HTTPS, cached ([`JwksCache`]),
//!   with failures backed off, files confined to `oidc.jwks_dir`
//!   ([`confine_jwks_file`]) and fetches to public addresses (`hosts`).
//!
//! Signatures are checked with ring (not jsonwebtoken, whose pure-Rust
//! backend brings the `rsa` crate and RUSTSEC-2023-0071). Time is a
//! parameter: nothing here reads the clock to judge a token.
//!
//! This module owns no storage prefix and touches no storage: the identity
//! module stores issuers and bindings and calls in here. It must not log or
//! return the token or claim values.

mod error;
mod fetch;
mod hosts;
mod issuer;
mod jwks;
mod jwt;

#[cfg(test)]
mod tests;

pub use error::{JwksError, OidcError};
pub use fetch::{
    confine_jwks_file, JwksCache, DEFAULT_MAX_BYTES, DEFAULT_MIN_REFETCH, DEFAULT_TIMEOUT,
    DEFAULT_TTL, FIRST_FAILURE_BACKOFF, MAX_FAILURE_BACKOFF,
};
pub use issuer::{HttpsUrl, IssuerConfig, JwksSource};
pub use jwks::{Algorithm, Jwk, Jwks};
pub use jwt::{verify, VerifiedJwt, MAX_JWT_LEN};
