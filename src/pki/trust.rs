//! The trust store of client certificates (`login cert`), changed at run
//! time: the CAs named by configuration (`tls.client_ca`, a dev server's
//! own CA) stay trusted, and the PKI's signing CA joins them as soon as
//! `pki init` or `pki intermediate set-signed` makes it (and after every
//! unseal), with its CRL, so a revoked certificate is refused at the
//! handshake. The TLS server holds one [`SwappableClientVerifier`]; each
//! handshake reads the verifier current at that moment.
//!
//! The PKI's CA is a trust anchor itself (also when it is an intermediate):
//! a certificate signed by the outside CA above it, but not by keyward, is
//! not accepted through it.

use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

#[derive(Default)]
struct Anchors {
    configured: Vec<CertificateDer<'static>>,
    issued: Vec<CertificateDer<'static>>,
    crl: Option<CertificateRevocationListDer<'static>>,
}

/// The set of CAs client certificates may chain to, and the verifier made
/// from it.
pub struct ClientTrust {
    anchors: RwLock<Anchors>,
    verifier: RwLock<Option<Arc<dyn ClientCertVerifier>>>,
}

impl Default for ClientTrust {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ClientTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTrust")
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ClientTrust {
    pub fn new() -> Self {
        Self {
            anchors: RwLock::new(Anchors::default()),
            verifier: RwLock::new(None),
        }
    }

    /// The CAs from configuration (PEM, one or more certificates).
    pub fn set_configured_pem(&self, pem: &[u8]) -> Result<(), String> {
        let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
        let certs = certs.map_err(|e| format!("client CA: {e}"))?;
        if let Ok(mut a) = self.anchors.write() {
            a.configured = certs;
        }
        self.rebuild()
    }

    /// The PKI's signing CA and its CRL (empty when there is no CA yet).
    pub fn set_issued(&self, anchors: Vec<CertificateDer<'static>>, crl: Option<Vec<u8>>) {
        if let Ok(mut a) = self.anchors.write() {
            a.issued = anchors;
            a.crl = crl.map(CertificateRevocationListDer::from);
        }
        if let Err(e) = self.rebuild() {
            tracing::error!(error = %e, "client-certificate trust store not updated");
        }
    }

    fn rebuild(&self) -> Result<(), String> {
        let (roots, crls) = {
            let a = self
                .anchors
                .read()
                .map_err(|_| "trust store lock poisoned")?;
            let mut roots = RootCertStore::empty();
            for cert in a.configured.iter().chain(&a.issued) {
                roots
                    .add(cert.clone())
                    .map_err(|e| format!("a client CA is not a usable trust anchor: {e}"))?;
            }
            (roots, a.crl.iter().cloned().collect::<Vec<_>>())
        };
        let verifier = if roots.is_empty() {
            None
        } else {
            Some(
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .with_crls(crls)
                    .only_check_end_entity_revocation()
                    .allow_unknown_revocation_status()
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| format!("client verifier: {e}"))?,
            )
        };
        if let Ok(mut v) = self.verifier.write() {
            *v = verifier;
        }
        Ok(())
    }

    fn current(&self) -> Option<Arc<dyn ClientCertVerifier>> {
        self.verifier.read().ok().and_then(|v| v.clone())
    }

    /// Whether any CA is trusted (else the server asks for no certificate).
    pub fn is_empty(&self) -> bool {
        self.current().is_none()
    }

    /// Checks a chain a connection presented (leaf first) against the
    /// trust store as it is at `now_ms`: chain, validity period and CRL,
    /// as a full handshake would now. A login made over a connection that
    /// outlived its certificate (held open, or resumed) is refused by this.
    pub fn recheck(&self, chain: &[Vec<u8>], now_ms: u64) -> bool {
        let Some((leaf, rest)) = chain.split_first() else {
            return false;
        };
        let Some(verifier) = self.current() else {
            return false;
        };
        let intermediates: Vec<CertificateDer<'_>> = rest
            .iter()
            .map(|der| CertificateDer::from(der.as_slice()))
            .collect();
        let now = UnixTime::since_unix_epoch(std::time::Duration::from_millis(now_ms));
        verifier
            .verify_client_cert(&CertificateDer::from(leaf.as_slice()), &intermediates, now)
            .is_ok()
    }

    /// The verifier to give the TLS server once.
    pub fn verifier(self: &Arc<Self>) -> Arc<dyn ClientCertVerifier> {
        Arc::new(SwappableClientVerifier {
            trust: self.clone(),
            algorithms: provider().signature_verification_algorithms,
        })
    }
}

/// A client-certificate verifier that asks [`ClientTrust`] for the current
/// one at each handshake. A certificate is optional (one login among
/// several); one that is presented must chain to a trusted CA and not be
/// revoked, or the handshake fails.
#[derive(Debug)]
pub struct SwappableClientVerifier {
    trust: Arc<ClientTrust>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for SwappableClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The set changes at run time; with no hints a client offers the
        // certificate it has.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.trust.current() {
            Some(v) => v.verify_client_cert(end_entity, intermediates, now),
            None => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
