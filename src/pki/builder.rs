//! The one certificate builder: the RFC 5280 profile of every certificate
//! keyward makes, the dev certificates of `keyward dev` and
//! `certs/generate.sh`'s set as well as the certificates the PKI issues.
//!
//! - A CA has a Subject Key Identifier, a critical `basicConstraints CA:true`
//!   and the key usages keyCertSign and cRLSign only.
//! - An end entity has an SKI, an Authority Key Identifier naming its
//!   issuer's key, a critical `CA:false`, the key usage digitalSignature (the
//!   keys are ECDSA P-256 or Ed25519, which sign and never encipher, so not
//!   keyEncipherment) and the extended key usages its purpose allows:
//!   serverAuth, clientAuth or both.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SerialNumber,
};

/// The subject of a dev certificate: `O=keyward dev, CN=<cn>`.
pub fn dev_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "keyward dev");
    dn.push(DnType::CommonName, cn);
    dn
}

/// `O=<organization>, CN=<cn>`.
pub fn name(organization: &str, cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, organization);
    dn.push(DnType::CommonName, cn);
    dn
}

/// A CA that signs end entities only (path length 0).
pub fn ca_params(subject: DistinguishedName) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// An end entity for `purposes` (SKI and `CA:false`, which rcgen writes
/// for `ExplicitNoCa`; AKI from the issuer's key identifier).
pub fn leaf_params(
    subject: DistinguishedName,
    purposes: &[ExtendedKeyUsagePurpose],
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject;
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = purposes.to_vec();
    params
}

/// The validity window `[not_before_ms, not_after_ms]` in milliseconds
/// since the epoch (seconds precision, as X.509 stores it).
pub fn set_validity(params: &mut CertificateParams, not_before_ms: u64, not_after_ms: u64) {
    params.not_before = offset(not_before_ms);
    params.not_after = offset(not_after_ms);
}

fn offset(ms: u64) -> time::OffsetDateTime {
    let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

pub(crate) fn offset_of_ms(ms: u64) -> time::OffsetDateTime {
    offset(ms)
}

/// A random serial number: 16 bytes, positive, with no leading zero byte
/// (RFC 5280: at most 20 octets, non-negative; CA/B: 64 bits of entropy).
pub fn random_serial() -> Result<[u8; 16], ring::error::Unspecified> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut bytes)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(bytes)
}

pub fn set_serial(params: &mut CertificateParams, serial: &[u8]) {
    params.serial_number = Some(SerialNumber::from_slice(serial));
}
