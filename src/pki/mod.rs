//! PKI: short-lived workload certificates, and the dev certificates.
//!
//! - [`builder`]: the one certificate builder (RFC 5280 profile) for dev
//!   certificates and issued ones.
//! - [`dev`]: the dev server's CA, server and client certificates in files.
//! - [`names`]: SPIFFE IDs, DNS names and the role patterns over them.
//! - [`store`]: the CA (an internal root or an intermediate signed
//!   outside), roles, issue and sign, the inventory, revocation and the
//!   CRL, under the storage prefix `pki/` through the barrier. It touches
//!   no other module's prefix: who a certificate makes its holder (the
//!   identity bindings) is checked by the caller, in `api`.
//! - [`trust`]: the run-time trust store of client certificates.
//!
//! Resources: `pki/<role>` (`issue` to issue and sign, `admin` to put and
//! delete the role, `read` to get it; `list` on `pki` to list roles),
//! `sys/pki/ca` (`admin`: init, intermediate CSR and set-signed),
//! `sys/pki/certs` (`list`: the inventory) and `sys/pki/certs/<serial>`
//! (`delete`: revoke). The CA chain and the CRL are public knowledge and
//! need only a valid token.

pub mod builder;
pub mod dev;
pub mod names;
pub mod revoker;
pub mod store;
pub mod trust;

pub(crate) use dev::write_file;
pub use dev::{ensure_dev_certs, issue_client_cert, load_issuer, CertPaths};
pub use store::{Built, CertRecord, KeyType, PkiFigures, PkiStore, Role, RoleSpec};

use std::path::PathBuf;

use crate::barrier::BarrierError;

/// The resource of the CA's configuration.
pub const CA_RESOURCE: &str = "sys/pki/ca";
/// The resource of the inventory (`list`); one certificate is
/// `sys/pki/certs/<serial>`.
pub const CERTS_RESOURCE: &str = "sys/pki/certs";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NameNotAllowed(String),
    #[error("no PKI role named {0:?}")]
    NoRole(String),
    /// Neither names the identity nor gives its expiry: a caller may hold
    /// every policy of an identity that has none, and still not `read` it.
    #[error("the certificate would log in as an identity that is disabled or past its expiry")]
    InactiveIdentity,
    #[error("the identity the certificate would log in as changed while it was issued: ask again")]
    HolderChanged,
    #[error("the certificate would outlive the expiry of the identity it logs in as: ask for a shorter ttl")]
    OutlivesIdentity,
    #[error("no certificate with serial {0} in the inventory")]
    NoCert(String),
    #[error(
        "the PKI has no CA yet: run `keyward pki init` or `pki intermediate csr` / `set-signed`"
    )]
    NoCa,
    #[error("the PKI has a CA already; it is not replaced")]
    CaExists,
    #[error("the system random source failed")]
    Random,
    #[error("key generation failed: {0}")]
    NewKey(#[from] builder::NewKeyError),
    #[error("stored PKI record is corrupt")]
    Corrupt,
    #[error("the write's authorization is for another resource or capability")]
    WrongProof,
    #[error(transparent)]
    Barrier(#[from] BarrierError),
}
