//! TLS for the gRPC listener, run by keyward rather than tonic: tonic's
//! `ServerTlsConfig` takes a fixed client CA, while `login cert` must
//! accept certificates the PKI issues from the moment `pki init` makes its
//! CA, and refuse revoked ones at once. The rustls configuration here
//! holds `pki::trust`'s swappable verifier (the configured `tls.client_ca`
//! stays trusted beside the PKI's CA); handshakes run in their own tasks,
//! each within `TLS_HANDSHAKE_DEADLINE`, so a slow client holds only its
//! own connection slot.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::{Stream, StreamExt as _};

use super::limits::Admitted;
use super::{ServerError, TLS_HANDSHAKE_DEADLINE};
use crate::config::TlsConfig;
use crate::pki::trust::ClientTrust;

/// The server's rustls configuration: its certificate, HTTP/2, and the
/// run-time client-certificate verifier (a certificate is optional).
pub(super) fn server_config(
    tls: &TlsConfig,
    trust: &Arc<ClientTrust>,
) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let read =
        |p: &std::path::Path| std::fs::read(p).map_err(|e| ServerError::TlsFile(p.to_owned(), e));
    let bad = |p: &std::path::Path, what: &str| {
        ServerError::TlsFile(
            p.to_owned(),
            std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned()),
        )
    };
    if let Some(ca) = &tls.client_ca {
        trust
            .set_configured_pem(&read(ca)?)
            .map_err(|e| bad(ca, &e))?;
    }
    let cert_pem = read(&tls.cert)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| bad(&tls.cert, "not a PEM certificate"))?;
    let key_pem = zeroize::Zeroizing::new(read(&tls.key)?);
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| bad(&tls.key, "not a PEM private key"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ServerError::Transport(e.to_string()))?
    .with_client_cert_verifier(trust.verifier())
    .with_single_cert(certs, key)
    .map_err(|e| bad(&tls.cert, &e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No session resumption: a resumed handshake does not run the
    // client-certificate verifier, so a certificate revoked or expired
    // since would come back with it. (A login checks the chain again
    // anyway; this keeps the handshake's own answer true.) Clients keep
    // their connections, so a full handshake is rare.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Runs the TLS handshake of each admitted connection in its own task and
/// yields those that complete within the deadline; a failed or slow
/// handshake closes that connection only.
pub(super) fn accept<S>(
    incoming: S,
    config: Arc<rustls::ServerConfig>,
) -> impl Stream<Item = std::io::Result<TlsStream<Admitted>>>
where
    S: Stream<Item = std::io::Result<Admitted>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        let mut incoming = std::pin::pin!(incoming);
        loop {
            // Ends (closing the listener) once the server stops reading.
            let accepted = tokio::select! {
                next = incoming.next() => match next {
                    Some(accepted) => accepted,
                    None => break,
                },
                () = tx.closed() => break,
            };
            match accepted {
                Ok(stream) => {
                    let acceptor = acceptor.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let handshake =
                            tokio::time::timeout(TLS_HANDSHAKE_DEADLINE, acceptor.accept(stream));
                        match handshake.await {
                            Ok(Ok(tls)) => {
                                let _ = tx.send(Ok(tls)).await;
                            }
                            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    });
                }
                Err(e) => {
                    if tx.send(Err(e)).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
