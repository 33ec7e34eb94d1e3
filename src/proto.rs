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
    v1::AuditHashRequest
);

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
}
