//! Calls of the `Pki` service: short-lived workload certificates.

use tonic::transport::Channel;

use super::{Client, ClientError};
use crate::proto::v1::pki_client::PkiClient;
use crate::proto::v1::*;

impl Client {
    fn pki(&self) -> PkiClient<Channel> {
        PkiClient::new(self.channel.clone())
    }

    /// Makes an internal root CA; `ttl_seconds` 0 is ten years.
    pub async fn pki_init(
        &self,
        common_name: &str,
        ttl_seconds: u64,
    ) -> Result<Vec<String>, ClientError> {
        let req = self.request(PkiInitRequest {
            common_name: common_name.to_owned(),
            ttl_seconds,
        });
        Ok(self.pki().init(req).await?.into_inner().ca_chain)
    }

    /// A CSR for an intermediate CA to be signed outside.
    pub async fn pki_intermediate_csr(&self, common_name: &str) -> Result<String, ClientError> {
        let req = self.request(PkiIntermediateCsrRequest {
            common_name: common_name.to_owned(),
        });
        Ok(self.pki().intermediate_csr(req).await?.into_inner().csr)
    }

    /// The outside CA's certificate for the pending intermediate (PEM,
    /// optionally followed by its chain).
    pub async fn pki_set_signed(&self, certificate_pem: &str) -> Result<Vec<String>, ClientError> {
        let req = self.request(PkiSetSignedRequest {
            certificate: certificate_pem.to_owned(),
        });
        Ok(self
            .pki()
            .intermediate_set_signed(req)
            .await?
            .into_inner()
            .ca_chain)
    }

    /// The signing CA's certificate, then those above it (PEM).
    pub async fn pki_ca(&self) -> Result<Vec<String>, ClientError> {
        let req = self.request(PkiCaRequest {});
        Ok(self.pki().ca(req).await?.into_inner().ca_chain)
    }

    pub async fn pki_role_put(&self, role: PkiRole) -> Result<PkiRole, ClientError> {
        Ok(self.pki().put_role(self.request(role)).await?.into_inner())
    }

    pub async fn pki_role_get(&self, name: &str) -> Result<PkiRole, ClientError> {
        let req = self.request(PkiRoleName {
            name: name.to_owned(),
        });
        Ok(self.pki().get_role(req).await?.into_inner())
    }

    pub async fn pki_role_list(&self) -> Result<Vec<PkiRole>, ClientError> {
        let req = self.request(PkiListRolesRequest {});
        Ok(self.pki().list_roles(req).await?.into_inner().roles)
    }

    pub async fn pki_role_delete(&self, name: &str) -> Result<(), ClientError> {
        let req = self.request(PkiRoleName {
            name: name.to_owned(),
        });
        self.pki().delete_role(req).await?;
        Ok(())
    }

    /// A new key and certificate; the response's `private_key` is secret.
    pub async fn pki_issue(
        &self,
        request: PkiIssueRequest,
    ) -> Result<PkiIssueResponse, ClientError> {
        Ok(self.pki().issue(self.request(request)).await?.into_inner())
    }

    /// A certificate for the key of a CSR (PEM).
    pub async fn pki_sign(
        &self,
        role: &str,
        csr_pem: &str,
        ttl_seconds: u64,
    ) -> Result<PkiIssueResponse, ClientError> {
        let req = self.request(PkiSignRequest {
            role: role.to_owned(),
            csr: csr_pem.to_owned(),
            ttl_seconds,
        });
        Ok(self.pki().sign(req).await?.into_inner())
    }

    /// The inventory; with `expiring_within_seconds` > 0 only valid
    /// certificates expiring within it.
    pub async fn pki_list(
        &self,
        expiring_within_seconds: u64,
    ) -> Result<Vec<PkiCertRecord>, ClientError> {
        let req = self.request(PkiListRequest {
            expiring_within_seconds,
        });
        Ok(self.pki().list(req).await?.into_inner().certificates)
    }

    pub async fn pki_revoke(&self, serial: &str) -> Result<PkiCertRecord, ClientError> {
        let req = self.request(PkiRevokeRequest {
            serial: serial.to_owned(),
        });
        Ok(self.pki().revoke(req).await?.into_inner())
    }

    /// A fresh CRL, DER.
    pub async fn pki_crl(&self) -> Result<Vec<u8>, ClientError> {
        let req = self.request(PkiCrlRequest {});
        Ok(self.pki().crl(req).await?.into_inner().der)
    }
}
