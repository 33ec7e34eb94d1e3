//! `Auth.Login`: exchange a credential for a short-lived token. Login needs
//! no token; the answer's `token` is shown once (its `Debug` is redacted).
//! Use it with [`Client::with_token`].

use super::{Client, ClientError};
use crate::proto::v1::auth_client::AuthClient;
use crate::proto::v1::login_request::Method;
use crate::proto::v1::*;

impl Client {
    async fn login(&self, method: Method, ttl_seconds: u64) -> Result<TokenResponse, ClientError> {
        let req = tonic::Request::new(LoginRequest {
            method: Some(method),
            ttl_seconds,
        });
        Ok(AuthClient::new(self.channel.clone())
            .login(req)
            .await?
            .into_inner())
    }

    /// Role-id + secret-id login. `ttl_seconds` 0: the server's default.
    pub async fn login_approle(
        &self,
        role_id: &str,
        secret_id: &str,
        ttl_seconds: u64,
    ) -> Result<TokenResponse, ClientError> {
        self.login(
            Method::Approle(AppRoleLogin {
                role_id: role_id.to_owned(),
                secret_id: secret_id.to_owned(),
            }),
            ttl_seconds,
        )
        .await
    }

    /// Login with the client certificate of this connection
    /// (`ClientOptions::client_cert` and `client_key`).
    pub async fn login_cert(&self, ttl_seconds: u64) -> Result<TokenResponse, ClientError> {
        self.login(Method::Cert(CertLogin {}), ttl_seconds).await
    }

    /// OIDC/JWT login with a token of the stored issuer `issuer`. The
    /// keyward token never outlives the JWT.
    pub async fn login_oidc(
        &self,
        issuer: &str,
        jwt: &str,
        ttl_seconds: u64,
    ) -> Result<TokenResponse, ClientError> {
        self.login(
            Method::Oidc(OidcLogin {
                issuer: issuer.to_owned(),
                jwt: jwt.to_owned(),
            }),
            ttl_seconds,
        )
        .await
    }
}
