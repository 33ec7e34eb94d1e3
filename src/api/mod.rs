//! api: the gRPC services. Each file maps one service's protobuf to domain
//! types and calls the core; this file holds what every service shares:
//! reading a tonic request's metadata into the core's request seam
//! ([`begin`], which starts a `core::call::Call`) and the one mapping of the
//! seam's failure kinds to gRPC status codes ([`grpc_code`]). No business
//! rule lives here: which domain error is which kind is decided in core.

pub mod auth;
pub mod detach;
pub mod dynamic;
pub mod federation;
pub mod governance;
pub mod identities;
pub mod leases;
pub mod lifecycle;
pub mod login;
pub mod pki;
pub mod policies;
pub mod rotation;
pub mod scan;
pub mod secrets;
pub mod sys;

use std::sync::{Arc, LazyLock};

use tonic::metadata::{Ascii, MetadataKey};
use tonic::{Code, Request, Status};

use crate::core::call::{bearer, request_id, RequestMeta};
use crate::core::call::{Access, Acting, Call, Failure, FailureKind};
use crate::core::Core;

/// The gRPC code a failure kind is answered with. The one place gRPC codes
/// are chosen; an HTTP layer maps the same kinds to its own statuses.
pub fn grpc_code(kind: FailureKind) -> Code {
    match kind {
        FailureKind::InvalidInput => Code::InvalidArgument,
        FailureKind::NotFound => Code::NotFound,
        FailureKind::AlreadyExists => Code::AlreadyExists,
        FailureKind::Denied => Code::PermissionDenied,
        FailureKind::Unauthenticated => Code::Unauthenticated,
        FailureKind::Unavailable => Code::Unavailable,
        FailureKind::Conflict | FailureKind::Upstream => Code::FailedPrecondition,
        FailureKind::Exhausted => Code::ResourceExhausted,
        FailureKind::Aborted => Code::Aborted,
        FailureKind::Cancelled => Code::Cancelled,
        FailureKind::Internal => Code::Internal,
    }
}

impl From<Failure> for Status {
    fn from(failure: Failure) -> Self {
        Status::new(grpc_code(failure.kind()), failure.message())
    }
}

/// What the seam needs of a tonic request: the request id
/// (`x-request-id`), the peer address and the bearer token
/// (`authorization`).
fn request_meta<T>(method: &'static str, req: &Request<T>) -> RequestMeta {
    // Parsed once: a lookup by `&str` parses the header name on every call.
    static REQUEST_ID: LazyLock<MetadataKey<Ascii>> =
        LazyLock::new(|| MetadataKey::from_static("x-request-id"));
    static AUTHORIZATION: LazyLock<MetadataKey<Ascii>> =
        LazyLock::new(|| MetadataKey::from_static("authorization"));
    let metadata = req.metadata();
    let text = |name: &MetadataKey<Ascii>| metadata.get(name).and_then(|v| v.to_str().ok());
    RequestMeta {
        method,
        request_id: request_id(text(&REQUEST_ID)),
        source: req.remote_addr(),
        token: text(&AUTHORIZATION).and_then(bearer),
        acting: req.extensions().get::<Acting>().cloned(),
    }
}

/// Starts the call of one RPC (`Call::begin`): for `Access::Token`, checks
/// the seal and the token; a refusal is audited and answered.
pub async fn begin<T>(
    core: &Arc<Core>,
    method: &'static str,
    access: Access,
    req: &Request<T>,
) -> Result<Call, Status> {
    Ok(Call::begin(core, request_meta(method, req), access).await?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_grpc_code() {
        let expected = [
            (FailureKind::InvalidInput, Code::InvalidArgument),
            (FailureKind::NotFound, Code::NotFound),
            (FailureKind::AlreadyExists, Code::AlreadyExists),
            (FailureKind::Denied, Code::PermissionDenied),
            (FailureKind::Unauthenticated, Code::Unauthenticated),
            (FailureKind::Unavailable, Code::Unavailable),
            (FailureKind::Conflict, Code::FailedPrecondition),
            (FailureKind::Upstream, Code::FailedPrecondition),
            (FailureKind::Exhausted, Code::ResourceExhausted),
            (FailureKind::Aborted, Code::Aborted),
            (FailureKind::Cancelled, Code::Cancelled),
            (FailureKind::Internal, Code::Internal),
        ];
        assert_eq!(expected.len(), FailureKind::ALL.len());
        for (kind, code) in expected {
            assert_eq!(grpc_code(kind), code, "{kind:?}");
        }
    }

    /// The audit record names a failure by the code the client receives.
    #[test]
    fn the_audited_code_name_is_the_answered_code() {
        for kind in FailureKind::ALL {
            assert_eq!(
                crate::proto::code_name(grpc_code(kind)),
                kind.code_name(),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn a_failure_becomes_a_status_with_its_message() {
        let status = Status::from(Failure::new(FailureKind::Conflict, "check-and-set failed"));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.message(), "check-and-set failed");
    }

    #[test]
    fn metadata_becomes_the_request_description() {
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", "Bearer kwt_abc".parse().unwrap());
        req.metadata_mut()
            .insert("x-request-id", "req-1".parse().unwrap());
        let meta = request_meta("keyward.v1.Sys/Status", &req);
        assert_eq!(meta.method, "keyward.v1.Sys/Status");
        assert_eq!(meta.request_id, "req-1");
        assert_eq!(meta.token.as_deref().map(String::as_str), Some("kwt_abc"));
        assert!(!format!("{meta:?}").contains("kwt_abc"));
        // A request id that is not 1-64 letters, digits and dashes is replaced.
        req.metadata_mut()
            .insert("x-request-id", "a b".parse().unwrap());
        assert_ne!(request_meta("m", &req).request_id, "a b");
    }
}
