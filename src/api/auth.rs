//! `keyward.v1.Auth`: login and tokens. (Placeholder on branch `ident` until
//! the `auth` helper's service lands: only `Login` is served here.)

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::core::Core;
use crate::proto::v1::auth_server::Auth;
use crate::proto::v1::*;

pub struct AuthService {
    core: Arc<Core>,
}

impl AuthService {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn login(&self, req: Request<LoginRequest>) -> Result<Response<TokenResponse>, Status> {
        super::login::login(&self.core, req).await
    }

    async fn issue_token(
        &self,
        _req: Request<IssueTokenRequest>,
    ) -> Result<Response<TokenResponse>, Status> {
        Err(Status::unimplemented("IssueToken"))
    }

    async fn lookup_token(
        &self,
        _req: Request<LookupTokenRequest>,
    ) -> Result<Response<TokenInfo>, Status> {
        Err(Status::unimplemented("LookupToken"))
    }

    async fn renew_token(
        &self,
        _req: Request<RenewTokenRequest>,
    ) -> Result<Response<TokenInfo>, Status> {
        Err(Status::unimplemented("RenewToken"))
    }

    async fn revoke_token(
        &self,
        _req: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        Err(Status::unimplemented("RevokeToken"))
    }
}
