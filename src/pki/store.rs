//! The PKI's state, through the barrier under the prefix `pki/` (every value
//! encrypted; no other module reads it):
//!
//! - `pki/ca/key`: the signing CA's private key (PKCS#8 PEM);
//! - `pki/ca/cert`: its certificate, the chain above it and how it was made;
//! - `pki/pending/key`, `pki/pending/csr`: an intermediate waiting for its
//!   outside signature;
//! - `pki/crl-number`: the last CRL number;
//! - `pki/roles/<name>`: a role;
//! - `pki/certs/<serial hex>`: the inventory, one record per certificate
//!   (serial, role, identity, SANs, expiry, revocation; never a private key).
//!
//! Crash order: an issued certificate's inventory record is written (and
//! made durable by the caller) before the certificate leaves, so a crash
//! can leave a record of a certificate nobody received, never a certificate
//! with no record. A new CA's key and certificate are written in one batch.
//! A server-generated private key is never stored.

use std::sync::Arc;

use rcgen::{
    CertificateRevocationListParams, CertificateSigningRequestParams, ExtendedKeyUsagePurpose,
    Issuer, KeyIdMethod, KeyPair, RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::builder::{
    ca_params, leaf_params, name, offset_of_ms, random_serial, set_serial, set_validity, NewKey,
};
use super::names::{DnsName, DnsPattern, SpiffeId, SpiffePattern};
use super::trust::ClientTrust;
use super::PkiError;
use crate::barrier::{Barrier, PlainOp};
use crate::policy::{Authorized, Capability};

const CA_KEY: &str = "pki/ca/key";
const CA_CERT: &str = "pki/ca/cert";
const PENDING_KEY: &str = "pki/pending/key";
const PENDING_CSR: &str = "pki/pending/csr";
const CRL_NUMBER: &str = "pki/crl-number";
const ROLES: &str = "pki/roles/";
const CERTS: &str = "pki/certs/";

/// How far back `notBefore` is set, for clocks a little behind ours.
const BACKDATE_MS: u64 = 30_000;
/// At most this many SANs in one certificate.
const MAX_SANS: usize = 32;
/// How long a CRL is valid (`nextUpdate`); a new one is made on every call.
const CRL_VALIDITY_MS: u64 = 24 * 3600 * 1000;

/// The key type of a role's certificates. RSA is left out: ring cannot
/// generate RSA keys, and the `rsa` crate's open timing advisory
/// (RUSTSEC-2023-0071) concerns private-key operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyType {
    #[serde(rename = "ec-p256")]
    EcP256,
    #[serde(rename = "ed25519")]
    Ed25519,
}

impl KeyType {
    pub fn parse(text: &str) -> Result<Self, PkiError> {
        match text {
            "" | "ec-p256" => Ok(Self::EcP256),
            "ed25519" => Ok(Self::Ed25519),
            other => Err(PkiError::Invalid(format!(
                "key type {other:?}: use ec-p256 or ed25519 (RSA is not offered)"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcP256 => "ec-p256",
            Self::Ed25519 => "ed25519",
        }
    }

    fn algorithm(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Self::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

/// A role: which names its certificates may carry, for how long, for what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    pub name: String,
    pub allow_spiffe: Vec<String>,
    pub allow_dns: Vec<String>,
    pub max_ttl_secs: u64,
    pub key_type: KeyType,
    pub client: bool,
    pub server: bool,
    pub allow_wildcard_dns: bool,
}

/// A role as asked for, before it is checked.
#[derive(Clone, Debug, Default)]
pub struct RoleSpec {
    pub allow_spiffe: Vec<String>,
    pub allow_dns: Vec<String>,
    pub max_ttl_secs: u64,
    pub key_type: String,
    pub client: bool,
    pub server: bool,
    pub allow_wildcard_dns: bool,
}

/// A role name: 1 to 64 of `[a-z0-9_-]`.
pub fn check_role_name(name: &str) -> Result<(), PkiError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err(PkiError::Invalid(format!(
            "role name {name:?}: 1 to 64 of lower-case letters, digits, '_' and '-'"
        )));
    }
    Ok(())
}

/// The resource a role is used and managed under: `pki/<role>`.
pub fn role_resource(name: &str) -> String {
    format!("pki/{name}")
}

impl Role {
    fn purposes(&self) -> Vec<ExtendedKeyUsagePurpose> {
        let mut out = Vec::new();
        if self.server {
            out.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if self.client {
            out.push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        out
    }

    /// The SANs of a request, each checked against the role's patterns.
    fn check_sans(&self, spiffe: &[String], dns: &[String]) -> Result<Vec<SanType>, PkiError> {
        if spiffe.is_empty() && dns.is_empty() {
            return Err(PkiError::Invalid(
                "give at least one --spiffe-id or --dns name".into(),
            ));
        }
        if spiffe.len() + dns.len() > MAX_SANS {
            return Err(PkiError::Invalid(format!(
                "at most {MAX_SANS} names in one certificate"
            )));
        }
        let mut sans = Vec::new();
        for text in spiffe {
            let id = SpiffeId::parse(text)?;
            let allowed = self
                .allow_spiffe
                .iter()
                .filter_map(|p| SpiffePattern::parse(p).ok())
                .any(|p| p.matches(&id));
            if !allowed {
                return Err(PkiError::NameNotAllowed(format!(
                    "SPIFFE ID {text:?} matches none of role {:?}'s --allow-spiffe patterns",
                    self.name
                )));
            }
            sans.push(SanType::URI(id.as_str().try_into()?));
        }
        for text in dns {
            let dns_name = DnsName::parse(text)?;
            if dns_name.is_wildcard() && !self.allow_wildcard_dns {
                return Err(PkiError::NameNotAllowed(format!(
                    "DNS name {text:?} is a wildcard and role {:?} was not made with \
                     --allow-wildcard-dns",
                    self.name
                )));
            }
            let allowed = self
                .allow_dns
                .iter()
                .filter_map(|p| DnsPattern::parse(p).ok())
                .any(|p| p.matches(&dns_name, self.allow_wildcard_dns));
            if !allowed {
                return Err(PkiError::NameNotAllowed(format!(
                    "DNS name {text:?} matches none of role {:?}'s --allow-dns patterns",
                    self.name
                )));
            }
            sans.push(SanType::DnsName(dns_name.as_str().try_into()?));
        }
        Ok(sans)
    }
}

/// How the signing CA was made.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct CaCert {
    /// `root` (made by `pki init`) or `intermediate` (signed outside).
    kind: String,
    cert_pem: String,
    /// The certificates above it, nearest first (empty for a root).
    parents_pem: Vec<String>,
    not_after_ms: u64,
}

/// One issued certificate in the inventory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    /// Lower-case hex of the serial number's bytes.
    pub serial: String,
    pub role: String,
    /// The identity the certificate can log in as (its binding matches a
    /// SAN or the subject), or empty.
    pub identity: String,
    /// The identity of the token that asked for it.
    pub requested_by: String,
    pub sans: Vec<String>,
    pub issued_at_ms: u64,
    pub not_after_ms: u64,
    /// 0 while valid.
    pub revoked_at_ms: u64,
    /// `issue` (key made by keyward) or `sign` (from a CSR).
    pub origin: String,
}

/// A certificate made but not yet handed out: the caller checks who it
/// makes the holder, then [`PkiStore::record`]s it.
pub struct Built {
    pub der: Vec<u8>,
    pub certificate_pem: String,
    /// PKCS#8 PEM of a key keyward generated (`issue`); `None` for `sign`.
    pub private_key: Option<Zeroizing<String>>,
    /// The signing CA, then the certificates above it.
    pub ca_chain: Vec<String>,
    pub record: CertRecord,
}

impl std::fmt::Debug for Built {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Built")
            .field("record", &self.record)
            .field(
                "private_key",
                &self.private_key.as_ref().map(|_| "[redacted]"),
            )
            .finish_non_exhaustive()
    }
}

/// Figures for the governance report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PkiFigures {
    /// (role, certificates that are neither expired nor revoked).
    pub valid_by_role: Vec<(String, u64)>,
    pub expiring_soon: u64,
    pub revoked: u64,
}

pub struct PkiStore {
    barrier: Arc<Barrier>,
    trust: Arc<ClientTrust>,
    /// Serialises the changes of the CA (init, intermediate CSR,
    /// set-signed), so two at once cannot both find no CA and the second
    /// replace the first. Nothing awaits under it.
    ca_lock: std::sync::Mutex<()>,
    /// The last CRL built (DER) and when it was built: `crl` serves it for
    /// half its validity, so a caller looping `pki crl` neither signs nor
    /// writes a CRL number each time. Held while the CRL is built, so two
    /// builds never take the same number. Rebuilt on every revoke, init,
    /// set-signed and unseal (`refresh_trust`).
    last_crl: std::sync::Mutex<Option<(Vec<u8>, u64)>>,
    /// Tests: run once inside `crl`, before it takes `last_crl`'s lock.
    #[cfg(test)]
    pub(crate) before_crl: crate::test_hook::Hook,
    /// The signing CA, parsed once (its key from PKCS#8, its certificate
    /// from DER) and kept until the vault is sealed ([`PkiStore::on_seal`]).
    /// A CA is made once and never replaced, so the kept one stays right;
    /// only a CA that exists is kept.
    signer: std::sync::RwLock<Option<Arc<Signer>>>,
    /// Tests (integration tests too, so not `test_hook`): runs once right
    /// after a certificate is recorded.
    #[allow(clippy::type_complexity)]
    after_record: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

/// The signing CA ready to sign: its issuer (key and name), how it was
/// made, and the chain handed out with each certificate.
struct Signer {
    issuer: Issuer<'static, KeyPair>,
    ca: CaCert,
    chain: Vec<String>,
}

fn require(proof: &Authorized, capability: Capability, resource: &str) -> Result<(), PkiError> {
    if proof.grants(capability, resource) {
        Ok(())
    } else {
        Err(PkiError::WrongProof)
    }
}

fn pem_to_der(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|_| PkiError::Invalid("not a PEM certificate".into()))?;
    if certs.is_empty() {
        return Err(PkiError::Invalid("no PEM certificate found".into()));
    }
    Ok(certs)
}

fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// `ms` cut to whole seconds, as a certificate's validity holds it (see
/// `builder::set_validity`).
fn whole_seconds(ms: u64) -> u64 {
    ms - ms % 1000
}

fn not_after_ms(der: &[u8]) -> Result<u64, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| PkiError::Invalid("the certificate does not parse".into()))?;
    let secs = cert.validity().not_after.timestamp();
    Ok(u64::try_from(secs).unwrap_or(0).saturating_mul(1000))
}

/// Lower-case hex without separators, from `aa:bb`, `AABB` or `0xaabb`.
pub fn normalize_serial(text: &str) -> Result<String, PkiError> {
    let t = text.trim().trim_start_matches("0x").replace(':', "");
    if t.is_empty() || t.len() > 40 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PkiError::Invalid(format!(
            "serial {text:?}: hex digits (colons allowed), at most 20 bytes"
        )));
    }
    Ok(t.to_ascii_lowercase())
}

impl PkiStore {
    pub fn new(barrier: Arc<Barrier>, trust: Arc<ClientTrust>) -> Self {
        Self {
            barrier,
            trust,
            ca_lock: std::sync::Mutex::new(()),
            last_crl: std::sync::Mutex::new(None),
            #[cfg(test)]
            before_crl: crate::test_hook::Hook::default(),
            signer: std::sync::RwLock::new(None),
            after_record: std::sync::Mutex::new(None),
        }
    }

    /// Test hook: runs `f` once, right after the next certificate is
    /// recorded (what another node may do between an issue's record and
    /// its second read of the identities).
    #[doc(hidden)]
    pub fn danger_test_after_record(&self, f: impl FnOnce() + Send + 'static) {
        *self.after_record.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// Drops the CA's parsed private key from memory (called at seal).
    pub fn on_seal(&self) {
        *self.signer.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether the parsed CA (its private key) is held in memory now.
    pub fn keeps_ca_key(&self) -> bool {
        self.signer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The run-time trust store of client certificates (`login cert`).
    pub fn trust(&self) -> &Arc<ClientTrust> {
        &self.trust
    }

    fn ca(&self) -> Result<Option<CaCert>, PkiError> {
        match self.barrier.get(CA_CERT)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(
                serde_json::from_slice(&bytes).map_err(|_| PkiError::Corrupt)?,
            )),
        }
    }

    /// The signing CA, parsed from the store the first time after unseal.
    fn signer(&self) -> Result<Arc<Signer>, PkiError> {
        if let Some(kept) = &*self.signer.read().unwrap_or_else(|e| e.into_inner()) {
            return Ok(kept.clone());
        }
        let ca = self.ca()?.ok_or(PkiError::NoCa)?;
        let key_pem = self.barrier.get(CA_KEY)?.ok_or(PkiError::Corrupt)?;
        let key_text = std::str::from_utf8(&key_pem).map_err(|_| PkiError::Corrupt)?;
        let key = KeyPair::from_pem(key_text)?;
        let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, key)?;
        let mut chain = vec![ca.cert_pem.clone()];
        chain.extend(ca.parents_pem.iter().cloned());
        let signer = Arc::new(Signer { issuer, ca, chain });
        let mut kept = self.signer.write().unwrap_or_else(|e| e.into_inner());
        // `on_seal` runs after the barrier is sealed: if it ran before this
        // lock was taken, the barrier says sealed now and nothing is kept;
        // if it runs after, it drops what is kept here.
        if !self.barrier.status().sealed {
            *kept = Some(signer.clone());
        }
        Ok(signer)
    }

    /// The signing CA's certificate, then those above it (PEM).
    pub fn ca_chain(&self) -> Result<Vec<String>, PkiError> {
        let ca = self.ca()?.ok_or(PkiError::NoCa)?;
        let mut chain = vec![ca.cert_pem];
        chain.extend(ca.parents_pem);
        Ok(chain)
    }

    /// `pki init`: makes an internal root (ECDSA P-256) valid for `ttl_ms`.
    /// A CA that exists is not replaced.
    pub fn init_root(
        &self,
        proof: &Authorized,
        common_name: &str,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<String, PkiError> {
        require(proof, Capability::Admin, super::CA_RESOURCE)?;
        check_common_name(common_name)?;
        let _guard = self.ca_lock.lock().map_err(|_| PkiError::Corrupt)?;
        if self.ca()?.is_some() {
            return Err(PkiError::CaExists);
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = ca_params(name("keyward", common_name));
        let not_after = now_ms.saturating_add(ttl_ms);
        set_validity(&mut params, now_ms.saturating_sub(BACKDATE_MS), not_after);
        set_serial(&mut params, &random_serial().map_err(|_| PkiError::Random)?);
        let cert = params.self_signed(&key)?;
        let record = CaCert {
            kind: "root".into(),
            cert_pem: cert.pem(),
            parents_pem: Vec::new(),
            not_after_ms: not_after_ms(cert.der())?,
        };
        let key_pem = Zeroizing::new(key.serialize_pem());
        let json = serde_json::to_vec(&record).map_err(|_| PkiError::Corrupt)?;
        self.install_ca(key_pem.as_bytes(), &json)?;
        self.refresh_trust(now_ms)?;
        Ok(record.cert_pem)
    }

    /// `pki intermediate csr`: a new key (kept, encrypted, until the signed
    /// certificate comes back) and a CSR for it. Asking again replaces the
    /// pending key.
    pub fn intermediate_csr(
        &self,
        proof: &Authorized,
        common_name: &str,
    ) -> Result<String, PkiError> {
        require(proof, Capability::Admin, super::CA_RESOURCE)?;
        check_common_name(common_name)?;
        let _guard = self.ca_lock.lock().map_err(|_| PkiError::Corrupt)?;
        if self.ca()?.is_some() {
            return Err(PkiError::CaExists);
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(name("keyward", common_name));
        let csr = params.serialize_request(&key)?.pem()?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        self.barrier.batch(&[
            PlainOp::Put(PENDING_KEY, key_pem.as_bytes()),
            PlainOp::Put(PENDING_CSR, csr.as_bytes()),
        ])?;
        Ok(csr)
    }

    /// `pki intermediate set-signed`: the certificate for the pending key
    /// (first in `pem`), then optionally the chain above it. It must be a
    /// CA that may sign certificates and CRLs, for the pending key, and each
    /// certificate must be signed by the next.
    pub fn set_signed(&self, proof: &Authorized, pem: &str, now_ms: u64) -> Result<(), PkiError> {
        require(proof, Capability::Admin, super::CA_RESOURCE)?;
        let _guard = self.ca_lock.lock().map_err(|_| PkiError::Corrupt)?;
        if self.ca()?.is_some() {
            return Err(PkiError::CaExists);
        }
        let key_pem = self.barrier.get(PENDING_KEY)?.ok_or_else(|| {
            PkiError::Invalid("no intermediate is pending: run `pki intermediate csr` first".into())
        })?;
        let key_text = std::str::from_utf8(&key_pem).map_err(|_| PkiError::Corrupt)?;
        let key = KeyPair::from_pem(key_text)?;
        let ders = pem_to_der(pem)?;
        let parsed: Vec<_> = ders
            .iter()
            .map(|d| {
                x509_parser::parse_x509_certificate(d)
                    .map(|(_, c)| c)
                    .map_err(|_| {
                        PkiError::Invalid("a certificate in the file does not parse".into())
                    })
            })
            .collect::<Result<_, _>>()?;
        let leaf = &parsed[0];
        if leaf.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::Invalid(
                "the signed certificate is not for the pending key (was it made from this CSR?)"
                    .into(),
            ));
        }
        let is_ca = leaf
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|bc| bc.value.ca);
        let usage = leaf.key_usage().ok().flatten().map(|ku| ku.value);
        if !is_ca || !usage.is_some_and(|u| u.key_cert_sign() && u.crl_sign()) {
            return Err(PkiError::Invalid(
                "the signed certificate must be a CA (basicConstraints CA:true) with the key \
                 usages keyCertSign and cRLSign"
                    .into(),
            ));
        }
        if !leaf.validity().is_valid_at(
            x509_parser::time::ASN1Time::from_timestamp(i64::try_from(now_ms / 1000).unwrap_or(0))
                .map_err(|_| PkiError::Corrupt)?,
        ) {
            return Err(PkiError::Invalid(
                "the signed certificate is not valid now".into(),
            ));
        }
        for pair in parsed.windows(2) {
            if pair[0]
                .verify_signature(Some(pair[1].public_key()))
                .is_err()
            {
                return Err(PkiError::Invalid(
                    "each certificate in the file must be signed by the next one".into(),
                ));
            }
        }
        let record = CaCert {
            kind: "intermediate".into(),
            cert_pem: der_to_pem(&ders[0]),
            parents_pem: ders[1..].iter().map(|d| der_to_pem(d)).collect(),
            not_after_ms: not_after_ms(&ders[0])?,
        };
        let json = serde_json::to_vec(&record).map_err(|_| PkiError::Corrupt)?;
        self.install_ca(&key_pem, &json)?;
        self.refresh_trust(now_ms)?;
        Ok(())
    }

    /// Writes the CA's key and certificate, only if no CA is stored: `ca_lock`
    /// serializes this node's calls, the condition those of other nodes on a
    /// shared store (two `pki init` at once: one CA wins, the other call
    /// answers `CaExists` and nothing of it is kept).
    fn install_ca(&self, key_pem: &[u8], cert_json: &[u8]) -> Result<(), PkiError> {
        let written = self.barrier.batch_if(
            &[(CA_CERT, None)],
            &[
                PlainOp::Put(CA_KEY, key_pem),
                PlainOp::Put(CA_CERT, cert_json),
                PlainOp::Delete(PENDING_KEY),
                PlainOp::Delete(PENDING_CSR),
            ],
        )?;
        if written {
            Ok(())
        } else {
            Err(PkiError::CaExists)
        }
    }

    pub fn put_role(
        &self,
        proof: &Authorized,
        name: &str,
        spec: RoleSpec,
    ) -> Result<Role, PkiError> {
        check_role_name(name)?;
        require(proof, Capability::Admin, &role_resource(name))?;
        for p in &spec.allow_spiffe {
            SpiffePattern::parse(p)?;
        }
        for p in &spec.allow_dns {
            DnsPattern::parse(p)?;
        }
        if spec.allow_spiffe.is_empty() && spec.allow_dns.is_empty() {
            return Err(PkiError::Invalid(
                "a role needs at least one --allow-spiffe or --allow-dns pattern".into(),
            ));
        }
        if spec.max_ttl_secs == 0 {
            return Err(PkiError::Invalid("--max-ttl must be at least 1s".into()));
        }
        let (client, server) = if spec.client || spec.server {
            (spec.client, spec.server)
        } else {
            (true, true)
        };
        let role = Role {
            name: name.to_owned(),
            allow_spiffe: spec.allow_spiffe,
            allow_dns: spec.allow_dns,
            max_ttl_secs: spec.max_ttl_secs,
            key_type: KeyType::parse(&spec.key_type)?,
            client,
            server,
            allow_wildcard_dns: spec.allow_wildcard_dns,
        };
        let json = serde_json::to_vec(&role).map_err(|_| PkiError::Corrupt)?;
        self.barrier.put(&format!("{ROLES}{name}"), &json)?;
        Ok(role)
    }

    pub fn role(&self, name: &str) -> Result<Option<Role>, PkiError> {
        check_role_name(name)?;
        match self.barrier.get(&format!("{ROLES}{name}"))? {
            None => Ok(None),
            Some(b) => Ok(Some(
                serde_json::from_slice(&b).map_err(|_| PkiError::Corrupt)?,
            )),
        }
    }

    pub fn roles(&self) -> Result<Vec<Role>, PkiError> {
        self.barrier
            .scan_prefix(ROLES)?
            .iter()
            .map(|(_, b)| serde_json::from_slice(b).map_err(|_| PkiError::Corrupt))
            .collect()
    }

    pub fn delete_role(&self, proof: &Authorized, name: &str) -> Result<(), PkiError> {
        check_role_name(name)?;
        require(proof, Capability::Admin, &role_resource(name))?;
        if self.role(name)?.is_none() {
            return Err(PkiError::NoRole(name.to_owned()));
        }
        self.barrier.delete(&format!("{ROLES}{name}"))?;
        Ok(())
    }

    fn role_for_use(&self, proof: &Authorized, name: &str) -> Result<Role, PkiError> {
        check_role_name(name)?;
        require(proof, Capability::Issue, &role_resource(name))?;
        self.role(name)?
            .ok_or_else(|| PkiError::NoRole(name.to_owned()))
    }

    fn not_after(
        &self,
        role: &Role,
        ca: &CaCert,
        ttl_secs: u64,
        now_ms: u64,
    ) -> Result<u64, PkiError> {
        let ttl = if ttl_secs == 0 {
            role.max_ttl_secs
        } else {
            ttl_secs
        };
        if ttl > role.max_ttl_secs {
            return Err(PkiError::Invalid(format!(
                "--ttl {ttl}s is past role {:?}'s --max-ttl {}s",
                role.name, role.max_ttl_secs
            )));
        }
        let not_after = now_ms.saturating_add(ttl.saturating_mul(1000));
        if not_after > ca.not_after_ms {
            return Err(PkiError::Invalid(
                "the certificate would outlive its CA: ask for a shorter --ttl".into(),
            ));
        }
        Ok(not_after)
    }

    fn leaf(
        role: &Role,
        sans: Vec<SanType>,
        names: &[String],
        not_before_ms: u64,
        not_after_ms: u64,
        serial: &[u8],
    ) -> rcgen::CertificateParams {
        let first = names.first().map(String::as_str).unwrap_or_default();
        let cn = if first.len() <= 64 {
            first.to_owned()
        } else {
            hex::encode(serial)
        };
        let mut params = leaf_params(name("keyward", &cn), &role.purposes());
        params.subject_alt_names = sans;
        set_validity(&mut params, not_before_ms, not_after_ms);
        set_serial(&mut params, serial);
        params
    }

    /// `pki issue`: a new key of the role's type and a certificate for it
    /// with the names asked for, each allowed by the role.
    pub fn build_issue(
        &self,
        proof: &Authorized,
        role_name: &str,
        spiffe: &[String],
        dns: &[String],
        ttl_secs: u64,
        now_ms: u64,
    ) -> Result<Built, PkiError> {
        let role = self.role_for_use(proof, role_name)?;
        let sans = role.check_sans(spiffe, dns)?;
        let signer = self.signer()?;
        let not_after = self.not_after(&role, &signer.ca, ttl_secs, now_ms)?;
        let serial = random_serial().map_err(|_| PkiError::Random)?;
        let names: Vec<String> = spiffe.iter().chain(dns).cloned().collect();
        let params = Self::leaf(
            &role,
            sans,
            &names,
            now_ms.saturating_sub(BACKDATE_MS),
            not_after,
            &serial,
        );
        let key = NewKey::generate(role.key_type == KeyType::Ed25519)?;
        let cert = params.signed_by(&key, &signer.issuer)?;
        Ok(Built {
            der: cert.der().to_vec(),
            certificate_pem: cert.pem(),
            private_key: Some(key.pkcs8_pem()),
            ca_chain: signer.chain.clone(),
            record: CertRecord {
                serial: hex::encode(serial),
                role: role.name,
                identity: String::new(),
                requested_by: String::new(),
                sans: names,
                issued_at_ms: now_ms,
                not_after_ms: whole_seconds(not_after),
                revoked_at_ms: 0,
                origin: "issue".into(),
            },
        })
    }

    /// `pki sign`: a certificate for the public key of a CSR whose signature
    /// checks out. Only its key and its requested SANs (SPIFFE IDs and DNS
    /// names, each allowed by the role) are used; its subject, key usages,
    /// basic constraints and anything else it asks for are not.
    pub fn build_sign(
        &self,
        proof: &Authorized,
        role_name: &str,
        csr_pem: &str,
        ttl_secs: u64,
        now_ms: u64,
    ) -> Result<Built, PkiError> {
        let role = self.role_for_use(proof, role_name)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| match e {
            rcgen::Error::InvalidCertificationRequestSignature => {
                PkiError::Invalid("the CSR's signature does not verify".into())
            }
            rcgen::Error::UnsupportedExtension => PkiError::Invalid(
                "the CSR asks for an extension other than SANs, key usage, extended key usage \
                 and basic constraints"
                    .into(),
            ),
            rcgen::Error::UnsupportedSignatureAlgorithm => PkiError::Invalid(
                "the CSR's key type is not supported: use ec-p256 or ed25519".into(),
            ),
            _ => {
                PkiError::Invalid("the CSR does not parse (give a PEM CERTIFICATE REQUEST)".into())
            }
        })?;
        if csr.public_key.algorithm() != role.key_type.algorithm() {
            return Err(PkiError::Invalid(format!(
                "the CSR's key is not of role {:?}'s key type {}",
                role.name,
                role.key_type.as_str()
            )));
        }
        let mut spiffe = Vec::new();
        let mut dns = Vec::new();
        for san in &csr.params.subject_alt_names {
            match san {
                SanType::URI(u) => spiffe.push(u.as_str().to_owned()),
                SanType::DnsName(d) => dns.push(d.as_str().to_owned()),
                _ => {
                    return Err(PkiError::NameNotAllowed(
                        "the CSR asks for a SAN other than a SPIFFE ID (URI) or DNS name".into(),
                    ))
                }
            }
        }
        let sans = role.check_sans(&spiffe, &dns)?;
        let signer = self.signer()?;
        let not_after = self.not_after(&role, &signer.ca, ttl_secs, now_ms)?;
        let serial = random_serial().map_err(|_| PkiError::Random)?;
        let names: Vec<String> = spiffe.iter().chain(&dns).cloned().collect();
        let params = Self::leaf(
            &role,
            sans,
            &names,
            now_ms.saturating_sub(BACKDATE_MS),
            not_after,
            &serial,
        );
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&signer.issuer)?;
        Ok(Built {
            der: signed.der().to_vec(),
            certificate_pem: signed.pem(),
            private_key: None,
            ca_chain: signer.chain.clone(),
            record: CertRecord {
                serial: hex::encode(serial),
                role: role.name,
                identity: String::new(),
                requested_by: String::new(),
                sans: names,
                issued_at_ms: now_ms,
                not_after_ms: whole_seconds(not_after),
                revoked_at_ms: 0,
                origin: "sign".into(),
            },
        })
    }

    /// Writes the inventory record of a built certificate; only then may it
    /// be handed out (see the crash order above).
    pub fn record(&self, built: &Built) -> Result<(), PkiError> {
        let json = serde_json::to_vec(&built.record).map_err(|_| PkiError::Corrupt)?;
        self.barrier
            .put(&format!("{CERTS}{}", built.record.serial), &json)?;
        let hook = self
            .after_record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(hook) = hook {
            hook();
        }
        Ok(())
    }

    /// The inventory, soonest expiry first; with `expiring_within_ms`, only
    /// valid certificates that expire within it.
    pub fn list(
        &self,
        expiring_within_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<Vec<CertRecord>, PkiError> {
        let mut out: Vec<CertRecord> = self
            .barrier
            .scan_prefix(CERTS)?
            .iter()
            .map(|(_, b)| serde_json::from_slice(b).map_err(|_| PkiError::Corrupt))
            .collect::<Result<_, _>>()?;
        if let Some(within) = expiring_within_ms {
            out.retain(|c: &CertRecord| {
                c.revoked_at_ms == 0 && c.not_after_ms > now_ms && c.not_after_ms - now_ms <= within
            });
        }
        out.sort_by(|a, b| (a.not_after_ms, &a.serial).cmp(&(b.not_after_ms, &b.serial)));
        Ok(out)
    }

    /// For a certificate this PKI issued (its serial, lower-case hex, is in
    /// the inventory):
    /// its inventory record, which names the identity it was issued for
    /// (empty: none was bound to its names then) and whether it is revoked.
    /// `None` for any other certificate. Read from the store, so on etcd it
    /// is every node's answer at once (a node's trust store and CRL are its
    /// own, refreshed when it revokes or unseals).
    pub fn issued_for(&self, serial: &str) -> Result<Option<CertRecord>, PkiError> {
        match self.barrier.get(&format!("{CERTS}{serial}"))? {
            None => Ok(None),
            Some(raw) => {
                let record: CertRecord =
                    serde_json::from_slice(&raw).map_err(|_| PkiError::Corrupt)?;
                Ok(Some(record))
            }
        }
    }

    /// Revokes a certificate: it enters the CRL, and `login cert` refuses
    /// it from now on. Revoking it again changes nothing.
    pub fn revoke(
        &self,
        proof: &Authorized,
        serial: &str,
        now_ms: u64,
    ) -> Result<CertRecord, PkiError> {
        let serial = normalize_serial(serial)?;
        require(
            proof,
            Capability::Delete,
            &format!("{}/{serial}", super::CERTS_RESOURCE),
        )?;
        let key = format!("{CERTS}{serial}");
        let mut record: CertRecord = match self.barrier.get(&key)? {
            None => return Err(PkiError::NoCert(serial)),
            Some(b) => serde_json::from_slice(&b).map_err(|_| PkiError::Corrupt)?,
        };
        if record.revoked_at_ms == 0 {
            record.revoked_at_ms = now_ms;
            let json = serde_json::to_vec(&record).map_err(|_| PkiError::Corrupt)?;
            self.barrier.put(&key, &json)?;
        }
        self.refresh_trust(now_ms)?;
        Ok(record)
    }

    /// The serials of the valid (neither revoked nor expired) certificates
    /// that make their holder `identity` (a SAN matched its binding) or
    /// that `identity`'s tokens asked for.
    pub fn valid_serials_of_identity(
        &self,
        identity: &str,
        now_ms: u64,
    ) -> Result<Vec<String>, PkiError> {
        Ok(self
            .list(None, now_ms)?
            .into_iter()
            .filter(|c| c.revoked_at_ms == 0 && c.not_after_ms > now_ms)
            .filter(|c| c.identity == identity || c.requested_by == identity)
            .map(|c| c.serial)
            .collect())
    }

    /// Revokes every valid certificate of `identity` (see
    /// [`Self::valid_serials_of_identity`]) without a caller's
    /// authorization: the server's own act when the identity is
    /// decommissioned. They enter the CRL and the trust store at once.
    /// Returns how many; asking again answers 0.
    pub fn revoke_identity(&self, identity: &str, now_ms: u64) -> Result<u32, PkiError> {
        let serials = self.valid_serials_of_identity(identity, now_ms)?;
        if serials.is_empty() {
            // A run cut short may have marked them all: the trust store
            // learns of it now.
            self.refresh_trust(now_ms)?;
            return Ok(0);
        }
        self.revoke_serials(&serials, now_ms)
    }

    /// Revokes the valid certificates issued *for* `identity` (those that
    /// log in as it), not those it asked for on others' behalf: what an
    /// identity's delete takes with it, so that none logs in as an identity
    /// made again under the name. Nothing to revoke: nothing written, the
    /// CRL not signed again.
    pub fn revoke_issued_for(&self, identity: &str, now_ms: u64) -> Result<u32, PkiError> {
        self.revoke_issued_for_any(&[identity], now_ms)
    }

    /// [`Self::revoke_issued_for`] for several identities at once (the
    /// expiry sweep's): one pass over the inventory, one CRL.
    pub fn revoke_issued_for_any(&self, identities: &[&str], now_ms: u64) -> Result<u32, PkiError> {
        let identities: std::collections::HashSet<&str> = identities.iter().copied().collect();
        let serials: Vec<String> = self
            .list(None, now_ms)?
            .into_iter()
            .filter(|c| {
                c.revoked_at_ms == 0
                    && c.not_after_ms > now_ms
                    && identities.contains(c.identity.as_str())
            })
            .map(|c| c.serial)
            .collect();
        if serials.is_empty() {
            return Ok(0);
        }
        self.revoke_serials(&serials, now_ms)
    }

    /// Revokes a certificate that its own issue refused after recording it
    /// (the identity it logs in as changed meanwhile): the issue's own
    /// check is its authority, so no proof is asked for.
    pub fn take_back(&self, serial: &str, now_ms: u64) -> Result<u32, PkiError> {
        self.revoke_serials(&[serial.to_owned()], now_ms)
    }

    /// Marks `serials` revoked (those still valid), in batches that fit the
    /// store, and refreshes the trust store; returns how many it marked.
    fn revoke_serials(&self, serials: &[String], now_ms: u64) -> Result<u32, PkiError> {
        let mut records = Vec::with_capacity(serials.len());
        for serial in serials {
            let key = format!("{CERTS}{serial}");
            let Some(raw) = self.barrier.get(&key)? else {
                continue;
            };
            let mut record: CertRecord =
                serde_json::from_slice(&raw).map_err(|_| PkiError::Corrupt)?;
            if record.revoked_at_ms == 0 {
                record.revoked_at_ms = now_ms;
                let json = serde_json::to_vec(&record).map_err(|_| PkiError::Corrupt)?;
                records.push((key, json));
            }
        }
        let ops: Vec<PlainOp<'_>> = records
            .iter()
            .map(|(k, v)| PlainOp::Put(k.as_str(), v.as_slice()))
            .collect();
        // Each mark stands alone: in batches that fit the store. The trust
        // store learns of those written even if a later batch failed.
        let written = self.barrier.batch_in_chunks(&ops);
        self.refresh_trust(now_ms)?;
        written?;
        Ok(u32::try_from(records.len()).unwrap_or(u32::MAX))
    }

    /// Tests: holds the lock a CRL is served and built under, as a rebuild
    /// over a large inventory would.
    #[cfg(test)]
    pub(crate) fn crl_lock(&self) -> std::sync::MutexGuard<'_, Option<(Vec<u8>, u64)>> {
        self.last_crl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A CRL signed by the CA: every revoked certificate not yet expired.
    pub fn crl(&self, now_ms: u64) -> Result<Vec<u8>, PkiError> {
        #[cfg(test)]
        self.before_crl.run();
        let mut last = self.last_crl.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((der, built_ms)) = last.as_ref() {
            if now_ms >= *built_ms && now_ms - built_ms < CRL_VALIDITY_MS / 2 {
                return Ok(der.clone());
            }
        }
        let der = self.build_crl(now_ms)?;
        *last = Some((der.clone(), now_ms));
        Ok(der)
    }

    /// A new CRL under the next CRL number (`last_crl`'s lock is held).
    fn build_crl(&self, now_ms: u64) -> Result<Vec<u8>, PkiError> {
        let signer = self.signer()?;
        let revoked: Vec<RevokedCertParams> = self
            .list(None, now_ms)?
            .into_iter()
            .filter(|c| c.revoked_at_ms != 0 && c.not_after_ms > now_ms)
            .filter_map(|c| {
                Some(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&hex::decode(&c.serial).ok()?),
                    revocation_time: offset_of_ms(c.revoked_at_ms),
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect();
        let number = self.next_crl_number()?;
        let params = CertificateRevocationListParams {
            this_update: offset_of_ms(now_ms.saturating_sub(BACKDATE_MS)),
            next_update: offset_of_ms(now_ms.saturating_add(CRL_VALIDITY_MS)),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&signer.issuer)?.der().to_vec())
    }

    fn next_crl_number(&self) -> Result<u64, PkiError> {
        let last = match self.barrier.get(CRL_NUMBER)? {
            Some(b) => u64::from_be_bytes(b.as_slice().try_into().map_err(|_| PkiError::Corrupt)?),
            None => 0,
        };
        let next = last + 1;
        self.barrier.put(CRL_NUMBER, &next.to_be_bytes())?;
        Ok(next)
    }

    /// Hands the CA and a fresh CRL to the client-certificate trust store;
    /// after unseal, `pki init`, `set-signed` and every revoke.
    pub fn refresh_trust(&self, now_ms: u64) -> Result<(), PkiError> {
        match self.ca()? {
            None => self.trust.set_issued(Vec::new(), None),
            Some(ca) => {
                let anchor = pem_to_der(&ca.cert_pem)?;
                // A change of the revoked set: never the cached CRL.
                let crl = {
                    let mut last = self.last_crl.lock().unwrap_or_else(|e| e.into_inner());
                    let der = self.build_crl(now_ms)?;
                    *last = Some((der.clone(), now_ms));
                    der
                };
                self.trust.set_issued(anchor, Some(crl));
            }
        }
        Ok(())
    }

    /// Figures for the governance report.
    pub fn figures(&self, expiring_within_ms: u64, now_ms: u64) -> Result<PkiFigures, PkiError> {
        let mut by_role = std::collections::BTreeMap::<String, u64>::new();
        let mut figures = PkiFigures::default();
        for c in self.list(None, now_ms)? {
            if c.revoked_at_ms != 0 {
                figures.revoked += 1;
            } else if c.not_after_ms > now_ms {
                *by_role.entry(c.role.clone()).or_default() += 1;
                if c.not_after_ms - now_ms <= expiring_within_ms {
                    figures.expiring_soon += 1;
                }
            }
        }
        figures.valid_by_role = by_role.into_iter().collect();
        Ok(figures)
    }
}

fn check_common_name(cn: &str) -> Result<(), PkiError> {
    if cn.is_empty() || cn.len() > 64 || cn.chars().any(char::is_control) {
        return Err(PkiError::Invalid(
            "--common-name must be 1 to 64 bytes without control characters".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// An unsealed barrier on a new sled store, and its one share.
    fn unsealed_barrier() -> (tempfile::TempDir, Arc<Barrier>, String) {
        let dir = tempfile::tempdir().unwrap();
        let backend = crate::storage::SledBackend::open(dir.path()).unwrap();
        let barrier = Arc::new(
            Barrier::new(Arc::new(backend), crate::barrier::BarrierOptions::default()).unwrap(),
        );
        let shares = barrier.init(1, 1).unwrap();
        let share: String = (*shares[0].0).clone();
        barrier.unseal(&share).unwrap();
        (dir, barrier, share)
    }

    /// An identity's delete revokes the certificates issued for it, and not
    /// those it asked for on others' behalf (decommission's call); with none
    /// to revoke it writes nothing.
    #[test]
    fn revoke_issued_for_takes_only_the_certificates_that_log_in_as_it() {
        let (_dir, barrier, _share) = unsealed_barrier();
        let store = PkiStore::new(barrier.clone(), Arc::new(ClientTrust::new()));
        let put = |serial: &str, identity: &str, requested_by: &str| {
            let record = CertRecord {
                serial: serial.into(),
                role: "r".into(),
                identity: identity.into(),
                requested_by: requested_by.into(),
                sans: vec![],
                issued_at_ms: 1,
                not_after_ms: 10_000,
                revoked_at_ms: 0,
                origin: "sign".into(),
            };
            let json = serde_json::to_vec(&record).unwrap();
            barrier.put(&format!("{CERTS}{serial}"), &json).unwrap();
        };
        put("aa", "x", "root");
        put("bb", "y", "x");
        put("cc", "", "x");
        assert_eq!(store.revoke_issued_for("x", 5).unwrap(), 1);
        let revoked: Vec<String> = store
            .list(None, 5)
            .unwrap()
            .into_iter()
            .filter(|c| c.revoked_at_ms != 0)
            .map(|c| c.serial)
            .collect();
        assert_eq!(revoked, ["aa"]);
        assert_eq!(store.revoke_issued_for("nobody", 5).unwrap(), 0);
    }

    /// The CA is written only where none is stored, checked in the write
    /// itself: a second install (another node's `pki init` that passed its
    /// own "no CA yet" check at the same moment) answers `CaExists` and
    /// leaves the first CA's key and certificate in place.
    #[test]
    fn a_ca_is_installed_only_where_none_is_stored() {
        let (_dir, barrier, _share) = unsealed_barrier();
        let store = PkiStore::new(barrier.clone(), Arc::new(ClientTrust::new()));
        store
            .install_ca(b"first key", b"first certificate")
            .unwrap();
        let second = store.install_ca(b"second key", b"second certificate");
        assert!(matches!(second, Err(PkiError::CaExists)), "{second:?}");
        assert_eq!(
            barrier.get(CA_KEY).unwrap().unwrap().as_slice(),
            b"first key"
        );
        assert_eq!(
            barrier.get(CA_CERT).unwrap().unwrap().as_slice(),
            b"first certificate"
        );
    }

    /// Seal lands while callers are parsing the CA for the first time after
    /// unseal (the slow part of `signer`): a caller that parsed it while
    /// unsealed and takes the lock after `on_seal` must not keep it. The
    /// main thread seals a varying moment after each unseal, in `Core::seal`'s order
    /// (barrier, then `on_seal`), so most rounds land inside a parse.
    #[test]
    fn a_ca_parsed_across_a_seal_is_not_kept() {
        let (_dir, barrier, share) = unsealed_barrier();
        let store = Arc::new(PkiStore::new(barrier.clone(), Arc::new(ClientTrust::new())));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = ca_params(name("keyward", "race root"))
            .self_signed(&key)
            .unwrap();
        let record = CaCert {
            kind: "root".into(),
            cert_pem: cert.pem(),
            parents_pem: Vec::new(),
            not_after_ms: u64::MAX / 2,
        };
        store
            .install_ca(
                key.serialize_pem().as_bytes(),
                &serde_json::to_vec(&record).unwrap(),
            )
            .unwrap();
        assert!(store.signer().is_ok());
        store.on_seal();
        barrier.seal();

        let stop = Arc::new(AtomicBool::new(false));
        // Calls each caller has finished, to wait out those in flight.
        let done: Arc<Vec<AtomicU64>> = Arc::new((0..3).map(|_| AtomicU64::new(0)).collect());
        let callers: Vec<_> = (0..3)
            .map(|i| {
                let (store, stop, done) = (store.clone(), stop.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut signed = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        signed += u64::from(store.signer().is_ok());
                        done[i].fetch_add(1, Ordering::SeqCst);
                    }
                    signed
                })
            })
            .collect();
        for round in 0..300u64 {
            barrier.unseal(&share).unwrap();
            // A different moment of each round's parse (no bound depends
            // on it: a round that misses the parse only checks less).
            std::thread::sleep(std::time::Duration::from_micros((round * 37) % 3000));
            barrier.seal();
            store.on_seal();
            // Every call in flight at the seal has ended: each caller has
            // finished two more.
            let seen: Vec<u64> = done.iter().map(|d| d.load(Ordering::SeqCst)).collect();
            while done
                .iter()
                .zip(&seen)
                .any(|(d, s)| d.load(Ordering::SeqCst) < s + 2)
            {
                std::thread::yield_now();
            }
            assert!(
                !store.keeps_ca_key(),
                "round {round}: a CA parsed before the seal is kept after it"
            );
        }
        stop.store(true, Ordering::SeqCst);
        let signed: u64 = callers.into_iter().map(|c| c.join().unwrap()).sum();
        // The rounds did reach the parse at all (the test is not empty).
        assert!(signed > 0, "no caller ever got the CA while unsealed");
        assert!(!store.keeps_ca_key());
    }
}
