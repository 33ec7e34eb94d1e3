//! `keyward.v1.Governance`: the report of DESIGN.md. Needs `read` on
//! `sys/governance`. The rotation fields are the rotation broker's and stay
//! empty here.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{Access, Call};
use crate::core::Core;
use crate::policy::Capability;
use crate::proto::v1::governance_server::Governance;
use crate::proto::v1::*;

pub struct GovernanceService {
    core: Arc<Core>,
}

impl GovernanceService {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

#[tonic::async_trait]
impl Governance for GovernanceService {
    async fn report(
        &self,
        req: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        let mut call = Call::begin(
            &self.core,
            "keyward.v1.Governance/Report",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        call.authorize(Capability::Read, "sys/governance".to_owned())?;
        let report = call.check(self.core.governance_report(
            r.dormant_after_seconds.saturating_mul(1000),
            Duration::from_secs(r.long_ttl_seconds),
        ))?;
        call.ok(&[])?;
        Ok(Response::new(ReportResponse {
            identities_total: report.identities_total,
            identities_by_kind: report
                .by_kind
                .into_iter()
                .map(|(key, count)| CountByKey { key, count })
                .collect(),
            unowned: report.unowned,
            dormant: report.dormant,
            unused_grants: report
                .unused_grants
                .into_iter()
                .map(|g| IdentityGrants {
                    identity: g.identity,
                    unused_rules: g.rules,
                })
                .collect(),
            long_lived_tokens: report
                .long_lived
                .into_iter()
                .map(|t| LongLivedToken {
                    accessor: t.accessor,
                    identity: t.identity,
                    ttl_seconds: t.ttl_seconds,
                })
                .collect(),
            expiring_soon: report
                .expiring_soon
                .into_iter()
                .map(|e| ExpiringCredential {
                    kind: e.kind.to_owned(),
                    name: e.name,
                    identity: e.identity,
                    expires_at_unix: e.expires_at_ms / 1000,
                })
                .collect(),
            failed_logins: report
                .failed_logins
                .into_iter()
                .map(|f| FailedLogins {
                    identity: f.identity,
                    source: f.source,
                    count: f.count,
                })
                .collect(),
            // Filled by the rotation broker (issue 4).
            overdue_rotations: Vec::new(),
            rotation_compliance: 0.0,
            rotation_failures: Vec::new(),
        }))
    }
}
