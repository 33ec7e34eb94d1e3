//! Client calls of delegation (`Auth.ExchangeToken`, exchange-only tokens)
//! and of `keyward.v1.Federation` (keyward as an OIDC issuer).

use std::collections::HashMap;
use std::time::Duration;

use tonic::transport::Channel;

use super::{Client, ClientError, IssueOptions};
use crate::proto::v1::federation_client::FederationClient;
use crate::proto::v1::*;

/// What to ask for in `Client::exchange_token`.
#[derive(Debug, Clone, Default)]
pub struct ExchangeOptions {
    /// Empty: the subject token's policies.
    pub policies: Vec<String>,
    /// None: `delegation.max_ttl`.
    pub ttl: Option<Duration>,
    /// 0: unlimited.
    pub uses: u32,
}

impl Client {
    fn federation(&self) -> FederationClient<Channel> {
        FederationClient::new(self.channel.clone())
    }

    /// An exchange-only child of this client's token that only `may_act`
    /// may use, with `token exchange` (RFC 8693 `may_act`).
    pub async fn issue_may_act_token(
        &self,
        options: IssueOptions,
        may_act: &str,
    ) -> Result<TokenResponse, ClientError> {
        let req = self.request(IssueTokenRequest {
            policies: options.policies,
            ttl_seconds: options.ttl.map_or(0, |d| d.as_secs()),
            max_ttl_seconds: options.max_ttl.map_or(0, |d| d.as_secs()),
            uses: options.uses,
            cidrs: options.cidrs,
            may_act: may_act.to_owned(),
        });
        Ok(self.auth().issue_token(req).await?.into_inner())
    }

    /// Exchanges a subject's exchange-only token for a delegated token; this
    /// client's token is the actor's.
    pub async fn exchange_token(
        &self,
        subject_token: &str,
        options: ExchangeOptions,
    ) -> Result<TokenResponse, ClientError> {
        let req = self.request(ExchangeTokenRequest {
            subject_token: subject_token.to_owned(),
            policies: options.policies,
            ttl_seconds: options.ttl.map_or(0, |d| d.as_secs()),
            uses: options.uses,
        });
        Ok(self.auth().exchange_token(req).await?.into_inner())
    }

    /// Creates or replaces an OIDC role.
    pub async fn put_oidc_role(
        &self,
        name: &str,
        audiences: Vec<String>,
        max_ttl: Duration,
        claims: HashMap<String, String>,
    ) -> Result<OidcRole, ClientError> {
        let req = self.request(OidcRole {
            name: name.to_owned(),
            audiences,
            max_ttl_seconds: max_ttl.as_secs(),
            claims,
        });
        Ok(self.federation().put_oidc_role(req).await?.into_inner())
    }

    pub async fn get_oidc_role(&self, name: &str) -> Result<OidcRole, ClientError> {
        let req = self.request(GetOidcRoleRequest {
            name: name.to_owned(),
        });
        Ok(self.federation().get_oidc_role(req).await?.into_inner())
    }

    /// A signed identity token (a JWT) of this client's identity for `role`.
    pub async fn identity_token(
        &self,
        role: &str,
        audience: Option<&str>,
        ttl: Option<Duration>,
    ) -> Result<IdentityTokenResponse, ClientError> {
        let req = self.request(IdentityTokenRequest {
            role: role.to_owned(),
            audience: audience.unwrap_or_default().to_owned(),
            ttl_seconds: ttl.map_or(0, |d| d.as_secs()),
        });
        Ok(self.federation().identity_token(req).await?.into_inner())
    }

    /// Makes a new signing key; older keys stay published until their
    /// tokens have expired.
    pub async fn rotate_oidc_key(&self) -> Result<RotateOidcKeyResponse, ClientError> {
        let req = self.request(RotateOidcKeyRequest {});
        Ok(self.federation().rotate_oidc_key(req).await?.into_inner())
    }

    /// The discovery document and JWKS as the issuer publishes them.
    pub async fn oidc_discovery(&self) -> Result<DiscoveryResponse, ClientError> {
        let req = self.request(DiscoveryRequest {});
        Ok(self.federation().discovery(req).await?.into_inner())
    }
}
