//! Calls of the `Identities` and `Governance` services.

use tonic::transport::Channel;

use super::{Client, ClientError};
use crate::proto::v1::governance_client::GovernanceClient;
use crate::proto::v1::identities_client::IdentitiesClient;
use crate::proto::v1::*;

impl Client {
    fn identities(&self) -> IdentitiesClient<Channel> {
        IdentitiesClient::new(self.channel.clone())
    }

    pub async fn identity_create(
        &self,
        request: CreateIdentityRequest,
    ) -> Result<Identity, ClientError> {
        Ok(self
            .identities()
            .create(self.request(request))
            .await?
            .into_inner())
    }

    pub async fn identity_get(&self, name: &str) -> Result<Identity, ClientError> {
        let req = self.request(GetIdentityRequest {
            name: name.to_owned(),
        });
        Ok(self.identities().get(req).await?.into_inner())
    }

    pub async fn identity_list(
        &self,
        request: ListIdentitiesRequest,
    ) -> Result<Vec<Identity>, ClientError> {
        Ok(self
            .identities()
            .list(self.request(request))
            .await?
            .into_inner()
            .identities)
    }

    pub async fn identity_update(
        &self,
        request: UpdateIdentityRequest,
    ) -> Result<Identity, ClientError> {
        Ok(self
            .identities()
            .update(self.request(request))
            .await?
            .into_inner())
    }

    /// Sets and removes metadata labels of an identity.
    pub async fn identity_set_metadata(
        &self,
        name: &str,
        set: std::collections::HashMap<String, String>,
        remove: Vec<String>,
    ) -> Result<Identity, ClientError> {
        let req = self.request(crate::proto::v1::SetIdentityMetadataRequest {
            name: name.to_owned(),
            set,
            remove,
        });
        Ok(self.identities().set_metadata(req).await?.into_inner())
    }

    /// Disables an identity; every token it holds stops working at once,
    /// and its secret-ids are revoked.
    pub async fn identity_disable(&self, name: &str) -> Result<Identity, ClientError> {
        self.identity_disable_with(name, false).await
    }

    /// Disables an identity; with `keep_secret_ids` its secret-ids stay
    /// (they work again once it is enabled).
    pub async fn identity_disable_with(
        &self,
        name: &str,
        keep_secret_ids: bool,
    ) -> Result<Identity, ClientError> {
        let req = self.request(IdentityNameRequest {
            name: name.to_owned(),
            keep_secret_ids,
        });
        Ok(self.identities().disable(req).await?.into_inner())
    }

    /// Enables an identity (needs every policy it holds).
    pub async fn identity_enable(&self, name: &str) -> Result<Identity, ClientError> {
        let req = self.request(IdentityNameRequest {
            name: name.to_owned(),
            keep_secret_ids: false,
        });
        Ok(self.identities().enable(req).await?.into_inner())
    }

    /// The identity's live secret-ids: accessors and limits, never values.
    pub async fn identity_secret_ids(&self, name: &str) -> Result<Vec<SecretIdInfo>, ClientError> {
        let req = self.request(IdentityNameRequest {
            name: name.to_owned(),
            keep_secret_ids: false,
        });
        Ok(self
            .identities()
            .list_secret_ids(req)
            .await?
            .into_inner()
            .secret_ids)
    }

    /// Revokes one secret-id by its accessor.
    pub async fn identity_revoke_secret_id(
        &self,
        name: &str,
        accessor: &str,
    ) -> Result<(), ClientError> {
        let req = self.request(RevokeSecretIdRequest {
            name: name.to_owned(),
            accessor: accessor.to_owned(),
        });
        self.identities().revoke_secret_id(req).await?;
        Ok(())
    }

    /// Removes one binding of an identity.
    pub async fn identity_unbind(
        &self,
        name: &str,
        binding: unbind_request::Binding,
    ) -> Result<Identity, ClientError> {
        let req = self.request(UnbindRequest {
            name: name.to_owned(),
            binding: Some(binding),
        });
        Ok(self.identities().unbind(req).await?.into_inner())
    }

    /// Deletes an identity; returns how many tokens were revoked.
    pub async fn identity_delete(&self, name: &str) -> Result<u32, ClientError> {
        let req = self.request(IdentityNameRequest {
            name: name.to_owned(),
            keep_secret_ids: false,
        });
        Ok(self
            .identities()
            .delete(req)
            .await?
            .into_inner()
            .revoked_tokens)
    }

    /// A new secret-id (shown once). `ttl_seconds`/`uses` 0: unlimited.
    pub async fn identity_secret_id(
        &self,
        name: &str,
        ttl_seconds: u64,
        uses: u32,
        cidrs: &[String],
    ) -> Result<CreateSecretIdResponse, ClientError> {
        let req = self.request(CreateSecretIdRequest {
            name: name.to_owned(),
            ttl_seconds,
            uses,
            cidrs: cidrs.to_vec(),
        });
        Ok(self.identities().create_secret_id(req).await?.into_inner())
    }

    /// Binds a certificate by subject DN or by SPIFFE ID (give one).
    pub async fn identity_bind_cert(
        &self,
        name: &str,
        subject: Option<&str>,
        spiffe_id: Option<&str>,
    ) -> Result<Identity, ClientError> {
        let req = self.request(BindCertRequest {
            name: name.to_owned(),
            subject: subject.unwrap_or_default().to_owned(),
            spiffe_id: spiffe_id.unwrap_or_default().to_owned(),
        });
        Ok(self.identities().bind_cert(req).await?.into_inner())
    }

    pub async fn identity_bind_oidc(
        &self,
        name: &str,
        issuer: &str,
        claims: &[(String, String)],
    ) -> Result<Identity, ClientError> {
        let req = self.request(BindOidcRequest {
            name: name.to_owned(),
            issuer: issuer.to_owned(),
            claims: claims.iter().cloned().collect(),
        });
        Ok(self.identities().bind_oidc(req).await?.into_inner())
    }

    pub async fn oidc_issuer_put(
        &self,
        request: PutOidcIssuerRequest,
    ) -> Result<OidcIssuer, ClientError> {
        Ok(self
            .identities()
            .put_oidc_issuer(self.request(request))
            .await?
            .into_inner())
    }

    pub async fn oidc_issuer_list(&self) -> Result<Vec<OidcIssuer>, ClientError> {
        let req = self.request(ListOidcIssuersRequest {});
        Ok(self
            .identities()
            .list_oidc_issuers(req)
            .await?
            .into_inner()
            .issuers)
    }

    /// The governance report. 0 takes the server's defaults (30 days, 24 h).
    pub async fn governance_report(
        &self,
        dormant_after_seconds: u64,
        long_ttl_seconds: u64,
    ) -> Result<ReportResponse, ClientError> {
        let req = self.request(ReportRequest {
            dormant_after_seconds,
            long_ttl_seconds,
        });
        Ok(GovernanceClient::new(self.channel.clone())
            .report(req)
            .await?
            .into_inner())
    }
}
