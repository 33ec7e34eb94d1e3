//! Certificates for development and tests: a private CA, a server
//! certificate for `localhost`, `127.0.0.1` and `::1`, and client
//! certificates. Made at run time with rcgen through the one builder
//! ([`super::builder`]) that issued certificates use too; no key is ever
//! committed. Private keys are written with mode 0600.

use std::path::{Path, PathBuf};

use rcgen::{ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};

use super::builder::{ca_params, dev_name, leaf_params};
use super::PkiError;

/// The files of a certificate folder.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub server: PathBuf,
    pub server_key: PathBuf,
    pub client: PathBuf,
    pub client_key: PathBuf,
}

impl CertPaths {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            server: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        }
    }

    pub fn all_exist(&self) -> bool {
        [
            &self.ca,
            &self.ca_key,
            &self.server,
            &self.server_key,
            &self.client,
            &self.client_key,
        ]
        .iter()
        .all(|p| p.exists())
    }
}

pub(crate) fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<(), PkiError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let _ = private;
    let mut file = options
        .open(path)
        .map_err(|e| PkiError::Write(path.to_owned(), e))?;
    file.write_all(contents)
        .map_err(|e| PkiError::Write(path.to_owned(), e))?;
    file.sync_all()
        .map_err(|e| PkiError::Write(path.to_owned(), e))
}

/// Makes a CA, a server certificate and a client certificate in `dir`
/// (created if missing), unless all files are already there.
pub fn ensure_dev_certs(dir: &Path) -> Result<CertPaths, PkiError> {
    let paths = CertPaths::in_dir(dir);
    if paths.all_exist() {
        return Ok(paths);
    }
    std::fs::create_dir_all(dir).map_err(|e| PkiError::Write(dir.to_owned(), e))?;

    let ca_key = KeyPair::generate()?;
    let ca_params = ca_params(dev_name("keyward dev CA"));
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write_file(&paths.ca, ca_cert.pem().as_bytes(), false)?;
    write_file(&paths.ca_key, ca_key.serialize_pem().as_bytes(), true)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate()?;
    let mut server_params = leaf_params(
        dev_name("localhost"),
        &[ExtendedKeyUsagePurpose::ServerAuth],
    );
    server_params.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
        SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
    ];
    let server_cert = server_params.signed_by(&server_key, &issuer)?;
    write_file(&paths.server, server_cert.pem().as_bytes(), false)?;
    write_file(
        &paths.server_key,
        server_key.serialize_pem().as_bytes(),
        true,
    )?;

    let (client_pem, client_key_pem) = issue_client_cert(
        &issuer,
        "dev-client",
        Some("spiffe://keyward.dev/dev-client"),
    )?;
    write_file(&paths.client, client_pem.as_bytes(), false)?;
    write_file(&paths.client_key, client_key_pem.as_bytes(), true)?;
    Ok(paths)
}

/// Loads the CA of a certificate folder as an issuer of further certificates.
pub fn load_issuer(paths: &CertPaths) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key_pem = std::fs::read_to_string(&paths.ca_key)
        .map_err(|e| PkiError::Read(paths.ca_key.clone(), e))?;
    let cert_pem =
        std::fs::read_to_string(&paths.ca).map_err(|e| PkiError::Read(paths.ca.clone(), e))?;
    let key = KeyPair::from_pem(&key_pem)?;
    Ok(Issuer::from_ca_cert_pem(&cert_pem, key)?)
}

/// A client certificate with common name `cn` and, optionally, a SPIFFE ID
/// as URI SAN, signed by `issuer`. Returns (certificate PEM, key PEM).
pub fn issue_client_cert(
    issuer: &Issuer<'_, KeyPair>,
    cn: &str,
    spiffe_id: Option<&str>,
) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = leaf_params(dev_name(cn), &[ExtendedKeyUsagePurpose::ClientAuth]);
    if let Some(id) = spiffe_id {
        params.subject_alt_names.push(SanType::URI(id.try_into()?));
    }
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}
