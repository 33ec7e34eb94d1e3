//! Generated protobuf and gRPC code, with hand-written `Debug` for the
//! messages that carry secret material (see `skip_debug` in build.rs).

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod v1 {
    tonic::include_proto!("keyward.v1");
}

/// The file descriptor set that server reflection serves.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keyward_descriptor");

macro_rules! redacted_debug {
    ($($ty:ty),*) => {$(
        impl std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!(stringify!($ty), " { [redacted] }"))
            }
        }
    )*};
}

redacted_debug!(
    v1::InitResponse,
    v1::UnsealRequest,
    v1::PutSecretRequest,
    v1::GetSecretResponse,
    v1::AppRoleLogin,
    v1::OidcLogin,
    v1::TokenResponse,
    v1::LookupTokenRequest,
    v1::RevokeTokenRequest,
    v1::CreateSecretIdResponse,
    v1::AuditHashRequest,
    v1::ExchangeTokenRequest,
    v1::IdentityTokenResponse
);

/// A dynamic credential: everything but the password.
impl std::fmt::Debug for v1::CredsResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredsResponse")
            .field("lease_id", &self.lease_id)
            .field("username", &self.username)
            .field("password", &"[redacted]")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// Names the certificate, never the private key.
impl std::fmt::Debug for v1::PkiIssueResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PkiIssueResponse")
            .field("serial", &self.serial)
            .field("private_key", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// The external rotation provider protocol (`proto/keyward/provider/v1/`).
/// `Secret` carries secret values: its `Debug` names the fields only.
pub mod provider_v1 {
    tonic::include_proto!("keyward.provider.v1");

    impl std::fmt::Debug for Secret {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let mut names: Vec<&str> = self.fields.keys().map(String::as_str).collect();
            names.sort_unstable();
            f.debug_struct("Secret")
                .field("fields", &names)
                .finish_non_exhaustive()
        }
    }

    /// The account a plugin made for a lease: the password is never shown.
    impl std::fmt::Debug for CreateResponse {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("CreateResponse")
                .field("username", &self.username)
                .field("host", &self.host)
                .field("port", &self.port)
                .field("database", &self.database)
                .finish_non_exhaustive()
        }
    }
}

/// The gRPC name of a status code (`NOT_FOUND`, ...), as the client prints
/// a server's refusal. The server's audit records use the same names
/// (`core::call::FailureKind::code_name`; `api` tests that they agree).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

// Candidate values of a scan may be secrets: never printed.
redacted_debug!(v1::ScanMatchRequest);
