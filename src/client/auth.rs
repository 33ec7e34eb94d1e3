//! Client calls of `keyward.v1.Auth`: the caller's tokens.

use std::time::Duration;

use tonic::transport::Channel;

use super::{Client, ClientError};
use crate::proto::v1::auth_client::AuthClient;
use crate::proto::v1::*;

/// What to ask for in `Client::issue_token`; zero/empty fields take the
/// server's defaults (TTL 1h, max TTL 24h or the TTL if longer, unlimited
/// uses, the parent's CIDR blocks).
#[derive(Debug, Clone, Default)]
pub struct IssueOptions {
    pub policies: Vec<String>,
    pub ttl: Option<Duration>,
    pub max_ttl: Option<Duration>,
    pub uses: u32,
    pub cidrs: Vec<String>,
}

impl Client {
    pub(crate) fn auth(&self) -> AuthClient<Channel> {
        AuthClient::new(self.channel.clone())
    }

    /// A child of this client's token. The answer carries the new token's
    /// text (its `Debug` is redacted).
    pub async fn issue_token(&self, options: IssueOptions) -> Result<TokenResponse, ClientError> {
        let req = self.request(IssueTokenRequest {
            policies: options.policies,
            ttl_seconds: options.ttl.map_or(0, |d| d.as_secs()),
            max_ttl_seconds: options.max_ttl.map_or(0, |d| d.as_secs()),
            uses: options.uses,
            cidrs: options.cidrs,
            ..Default::default()
        });
        Ok(self.auth().issue_token(req).await?.into_inner())
    }

    /// This client's own token.
    pub async fn lookup_self(&self) -> Result<TokenInfo, ClientError> {
        self.lookup(String::new(), String::new()).await
    }

    /// A token by its text.
    pub async fn lookup_token(&self, token: &str) -> Result<TokenInfo, ClientError> {
        self.lookup(token.to_owned(), String::new()).await
    }

    /// A token by its accessor.
    pub async fn lookup_accessor(&self, accessor: &str) -> Result<TokenInfo, ClientError> {
        self.lookup(String::new(), accessor.to_owned()).await
    }

    async fn lookup(&self, token: String, accessor: String) -> Result<TokenInfo, ClientError> {
        let req = self.request(LookupTokenRequest { token, accessor });
        Ok(self.auth().lookup_token(req).await?.into_inner())
    }

    /// Extends this client's token by `increment` (default: its TTL), never
    /// past its max TTL.
    pub async fn renew_self(&self, increment: Option<Duration>) -> Result<TokenInfo, ClientError> {
        let req = self.request(RenewTokenRequest {
            increment_seconds: increment.map_or(0, |d| d.as_secs()),
        });
        Ok(self.auth().renew_token(req).await?.into_inner())
    }

    /// Revokes this client's token and its descendants; returns how many.
    pub async fn revoke_self(&self) -> Result<u32, ClientError> {
        self.revoke(String::new(), String::new()).await
    }

    /// Revokes a token (by its text) and its descendants.
    pub async fn revoke_token(&self, token: &str) -> Result<u32, ClientError> {
        self.revoke(token.to_owned(), String::new()).await
    }

    /// Revokes a token (by accessor) and its descendants.
    pub async fn revoke_accessor(&self, accessor: &str) -> Result<u32, ClientError> {
        self.revoke(String::new(), accessor.to_owned()).await
    }

    async fn revoke(&self, token: String, accessor: String) -> Result<u32, ClientError> {
        let req = self.request(RevokeTokenRequest { token, accessor });
        Ok(self.auth().revoke_token(req).await?.into_inner().revoked)
    }
}
