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

/// A private key made for one issued certificate (`pki issue`): ring's
/// PKCS#8 document of a fresh key from `SystemRandom`, and its public key
/// read out of that document.
///
/// rcgen's `KeyPair::generate_for` parses the document it has just made
/// back into a ring key pair, and ring's parse derives the public key from
/// the private one again to check it: one more scalar multiplication for a
/// key keyward never signs with. The public key is the last field of the
/// document (RFC 5915's `publicKey [1]` for P-256, RFC 5958's `publicKey
/// [1]` for Ed25519), a BIT STRING at its end; [`NewKey::generate`] checks
/// the DER header in front of it before taking those bytes.
pub struct NewKey {
    pkcs8: zeroize::Zeroizing<Vec<u8>>,
    public_len: usize,
    algorithm: &'static rcgen::SignatureAlgorithm,
}

impl NewKey {
    /// A new ECDSA P-256 (`ed25519 == false`) or Ed25519 key.
    pub fn generate(ed25519: bool) -> Result<Self, NewKeyError> {
        let rng = ring::rand::SystemRandom::new();
        // `[1]` of 68 bytes holding a BIT STRING of 66 (no unused bits, then
        // the uncompressed point 04 || X || Y); for Ed25519 the `[1]
        // IMPLICIT BIT STRING` of 33 bytes (no unused bits, then 32).
        let (doc, header, public_len, algorithm): (_, &[u8], _, _) = if ed25519 {
            (
                ring::signature::Ed25519KeyPair::generate_pkcs8(&rng),
                &[0x81, 0x21, 0x00],
                32,
                &rcgen::PKCS_ED25519,
            )
        } else {
            (
                ring::signature::EcdsaKeyPair::generate_pkcs8(
                    &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                    &rng,
                ),
                &[0xa1, 0x44, 0x03, 0x42, 0x00, 0x04],
                65,
                &rcgen::PKCS_ECDSA_P256_SHA256,
            )
        };
        let doc = doc.map_err(|_| NewKeyError::Random)?;
        let pkcs8 = zeroize::Zeroizing::new(doc.as_ref().to_vec());
        // For P-256 the header's last byte is the point's first (0x04).
        let overlap = usize::from(!ed25519);
        let start = pkcs8
            .len()
            .checked_sub(public_len + header.len() - overlap)
            .ok_or(NewKeyError::Layout)?;
        if !pkcs8[start..].starts_with(header) {
            return Err(NewKeyError::Layout);
        }
        Ok(Self {
            pkcs8,
            public_len,
            algorithm,
        })
    }

    /// The private key as PEM (`PRIVATE KEY`, PKCS#8), for the caller only.
    pub fn pkcs8_pem(&self) -> zeroize::Zeroizing<String> {
        pem("PRIVATE KEY", &self.pkcs8)
    }
}

impl rcgen::PublicKeyData for NewKey {
    fn der_bytes(&self) -> &[u8] {
        &self.pkcs8[self.pkcs8.len() - self.public_len..]
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.algorithm
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NewKeyError {
    #[error("the system random source failed")]
    Random,
    #[error("ring's PKCS#8 document is not laid out as expected")]
    Layout,
}

/// PEM with `label`, 64 characters a line, LF line ends (as rcgen writes
/// on Unix). Every buffer that holds the text is wiped when dropped.
pub fn pem(label: &str, der: &[u8]) -> zeroize::Zeroizing<String> {
    use base64::Engine as _;
    let b64 = zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(der));
    let lines = b64.len().div_ceil(64);
    let mut out = zeroize::Zeroizing::new(String::with_capacity(
        b64.len() + lines + 2 * label.len() + 32,
    ));
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 is ASCII: every chunk is UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData as _;

    #[test]
    fn a_new_p256_key_has_the_public_key_ring_derives() {
        for _ in 0..8 {
            let key = NewKey::generate(false).unwrap();
            let parsed = rcgen::KeyPair::from_pem(&key.pkcs8_pem()).unwrap();
            assert_eq!(key.der_bytes(), parsed.public_key_raw());
            assert_eq!(key.der_bytes().len(), 65);
            assert_eq!(parsed.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
        }
    }

    #[test]
    fn a_new_ed25519_key_has_the_public_key_ring_derives() {
        for _ in 0..8 {
            let key = NewKey::generate(true).unwrap();
            let parsed = rcgen::KeyPair::from_pem(&key.pkcs8_pem()).unwrap();
            assert_eq!(key.der_bytes(), parsed.public_key_raw());
            assert_eq!(key.der_bytes().len(), 32);
            assert_eq!(parsed.algorithm(), &rcgen::PKCS_ED25519);
        }
    }

    #[test]
    fn new_keys_differ_and_their_pem_is_what_rcgen_writes() {
        let a = NewKey::generate(false).unwrap();
        let b = NewKey::generate(false).unwrap();
        assert_ne!(a.der_bytes(), b.der_bytes());
        let parsed = rcgen::KeyPair::from_pem(&a.pkcs8_pem()).unwrap();
        assert_eq!(parsed.serialize_pem(), a.pkcs8_pem().as_str());
    }

    #[test]
    fn pem_wraps_at_64_and_ends_with_a_newline() {
        let text = pem("CERTIFICATE", &[7u8; 100]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last().copied(), Some("-----END CERTIFICATE-----"));
        assert!(text.ends_with('\n'));
    }
}
