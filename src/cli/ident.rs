//! `keyward identity`, `oidc-issuer`, `login` and `report`.

use anyhow::Result;
use clap::{ArgGroup, Args, Subcommand};
use serde_json::{json, Value};

use super::common::{connect, rfc3339, rfc3339_unix, seconds_or_never, text_or_null};
use super::output::{emit, Format};
use super::{Global, UsageError};
use keyward::proto::v1::{
    unbind_request, CreateIdentityRequest, Identity, ListIdentitiesRequest, PutOidcIssuerRequest,
    TokenResponse, UpdateIdentityRequest,
};

#[derive(Subcommand)]
pub enum IdentityCommand {
    /// Add an identity to the inventory.
    Create(CreateArgs),
    /// A signed identity token (JWT) of the caller's identity for an OIDC role.
    Token(super::federation::IdentityTokenArgs),
    Get {
        name: String,
    },
    List(ListArgs),
    /// Change owner, description, policies or expiry.
    Update(UpdateArgs),
    /// Disable an identity: every token it holds stops working at once and
    /// its secret-ids are revoked (unless --keep-secret-ids).
    Disable {
        name: String,
        /// Keep the secret-ids: they work again after an enable.
        #[arg(long)]
        keep_secret_ids: bool,
    },
    /// Enable an identity (needs every policy it holds).
    Enable {
        name: String,
    },
    /// Delete an identity, its secret-ids and bindings; revokes its tokens.
    Delete {
        name: String,
    },
    /// Disable, revoke everything it holds, rotate every secret it read.
    Decommission(super::lifecycle::DecommissionArgs),
    /// Record that you (an owner) attest the identity is still needed.
    Attest(super::lifecycle::AttestArgs),
    /// Every identity's recertification standing (due, overdue).
    Attestations,
    /// The secret paths an identity read.
    Reads {
        name: String,
    },
    /// Make a secret-id for role-id login (shown once); or list or revoke them.
    SecretId(SecretIdArgs),
    /// Remove one binding, as `identity get` lists it.
    Unbind(UnbindArgs),
    /// Bind a client certificate by subject DN or SPIFFE ID.
    BindCert(BindCertArgs),
    /// Bind JWTs of an OIDC issuer whose claims all match.
    BindOidc(BindOidcArgs),
    /// Set (KEY=VALUE) or remove (--remove KEY) metadata labels; public,
    /// like the owner: OIDC role claims may name them.
    Metadata(super::federation::MetadataArgs),
}

// The argument structs carry no doc comment: the variant's is the help text.

#[derive(Args)]
pub struct CreateArgs {
    name: String,
    /// service-account, bot, api-client, ci-runner, workload or ai-agent.
    #[arg(long)]
    kind: String,
    #[arg(long)]
    owner: Option<String>,
    #[arg(long)]
    description: Option<String>,
    #[arg(long = "policy")]
    policies: Vec<String>,
    /// Expires after this long (e.g. 90d).
    #[arg(long)]
    expires: Option<String>,
}

impl CreateArgs {
    fn request(self) -> Result<CreateIdentityRequest> {
        Ok(CreateIdentityRequest {
            expires_in_seconds: seconds(&self.expires)?,
            name: self.name,
            kind: self.kind,
            owner: self.owner.unwrap_or_default(),
            description: self.description.unwrap_or_default(),
            policies: self.policies,
        })
    }
}

#[derive(Args)]
pub struct ListArgs {
    #[arg(long)]
    kind: Option<String>,
    /// Only identities without an owner.
    #[arg(long)]
    no_owner: bool,
    /// Only identities unused for at least this long (e.g. 30d).
    #[arg(long)]
    dormant: Option<String>,
}

impl ListArgs {
    fn request(self) -> Result<ListIdentitiesRequest> {
        Ok(ListIdentitiesRequest {
            dormant_seconds: seconds(&self.dormant)?,
            kind: self.kind.unwrap_or_default(),
            no_owner: self.no_owner,
        })
    }
}

#[derive(Args)]
pub struct UpdateArgs {
    name: String,
    #[arg(long)]
    owner: Option<String>,
    #[arg(long)]
    description: Option<String>,
    /// Replaces the policy list (repeat for several).
    #[arg(long = "policy")]
    policies: Vec<String>,
    /// Removes every policy.
    #[arg(long, conflicts_with = "policies")]
    no_policies: bool,
    /// Expires after this long from now, or `never`.
    #[arg(long)]
    expires: Option<String>,
}

impl UpdateArgs {
    fn request(self) -> Result<UpdateIdentityRequest> {
        // 0 on the wire is "never"; a duration is at least a second.
        let expires_in_seconds = match self.expires.as_deref() {
            None => None,
            Some("never") => Some(0),
            Some(d) => Some(parse_duration(d)?.max(1)),
        };
        Ok(UpdateIdentityRequest {
            set_policies: self.no_policies || !self.policies.is_empty(),
            name: self.name,
            owner: self.owner,
            description: self.description,
            policies: self.policies,
            expires_in_seconds,
        })
    }
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SecretIdArgs {
    #[command(subcommand)]
    action: Option<SecretIdCommand>,
    /// The identity (an identity named `list` or `revoke`: give `-- NAME`).
    #[arg(required = true)]
    name: Option<String>,
    #[arg(long)]
    ttl: Option<String>,
    #[arg(long)]
    uses: Option<u32>,
    #[arg(long = "cidr")]
    cidrs: Vec<String>,
}

#[derive(Subcommand)]
pub enum SecretIdCommand {
    /// The identity's live secret-ids: accessors and expiry, never values.
    List { name: String },
    /// Revoke one secret-id by its accessor.
    Revoke {
        name: String,
        #[arg(long)]
        accessor: String,
    },
}

#[derive(Args)]
#[command(group(ArgGroup::new("binding").required(true).args(["cert_subject", "cert_spiffe", "oidc_issuer"])))]
pub struct UnbindArgs {
    name: String,
    /// A subject DN binding (any RFC 4514 spelling of it).
    #[arg(long)]
    cert_subject: Option<String>,
    /// A SPIFFE ID binding.
    #[arg(long)]
    cert_spiffe: Option<String>,
    /// Every OIDC binding to this issuer.
    #[arg(long)]
    oidc_issuer: Option<String>,
}

impl UnbindArgs {
    fn binding(self) -> Result<(String, unbind_request::Binding)> {
        use unbind_request::Binding;
        let binding = match (self.cert_subject, self.cert_spiffe, self.oidc_issuer) {
            (Some(dn), None, None) => Binding::CertSubject(dn),
            (None, Some(id), None) => Binding::CertSpiffe(id),
            (None, None, Some(issuer)) => Binding::OidcIssuer(issuer),
            _ => {
                return Err(UsageError(
                    "give one of --cert-subject, --cert-spiffe or --oidc-issuer".into(),
                )
                .into())
            }
        };
        Ok((self.name, binding))
    }
}

#[derive(Args)]
#[command(group(ArgGroup::new("cert").required(true).args(["subject", "spiffe_id"])))]
pub struct BindCertArgs {
    name: String,
    #[arg(long)]
    subject: Option<String>,
    #[arg(long)]
    spiffe_id: Option<String>,
}

#[derive(Args)]
pub struct BindOidcArgs {
    name: String,
    #[arg(long)]
    issuer: String,
    #[arg(long = "claim", required = true)]
    claims: Vec<String>,
}

impl BindOidcArgs {
    /// The `--claim KEY=VALUE` pairs; a value is never echoed.
    fn claims(&self) -> Result<Vec<(String, String)>> {
        self.claims
            .iter()
            .enumerate()
            .map(|(i, c)| {
                c.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .ok_or_else(|| UsageError(format!("--claim {} is not KEY=VALUE", i + 1)).into())
            })
            .collect()
    }
}

#[derive(Subcommand)]
pub enum OidcIssuerCommand {
    /// Store (or replace) an issuer.
    #[command(group(ArgGroup::new("jwks").required(true).args(["jwks_file", "jwks_url"])))]
    Put {
        name: String,
        /// The `iss` of its tokens (https://...).
        #[arg(long)]
        issuer: String,
        /// A JWK Set file the server reads.
        #[arg(long)]
        jwks_file: Option<std::path::PathBuf>,
        /// An https:// URL the server fetches the JWK Set from.
        #[arg(long)]
        jwks_url: Option<String>,
        #[arg(long)]
        audience: String,
    },
    List,
}

#[derive(Subcommand)]
pub enum LoginCommand {
    /// Role-id + secret-id.
    Approle {
        #[arg(long)]
        role_id: String,
        /// The secret-id, `@FILE` to read it from a file, or `-` for stdin.
        #[arg(long)]
        secret_id: String,
        #[arg(long)]
        ttl: Option<String>,
    },
    /// The client certificate given with --client-cert/--client-key.
    Cert {
        #[arg(long)]
        ttl: Option<String>,
    },
    /// An OIDC/JWT token of a stored issuer (e.g. a CI job's token).
    Oidc {
        #[arg(long)]
        issuer: String,
        /// The JWT, or `@FILE` to read it from a file.
        #[arg(long)]
        jwt: String,
        #[arg(long)]
        ttl: Option<String>,
    },
}

#[derive(Args)]
pub struct ReportArgs {
    /// An identity unused this long is dormant (default 30d).
    #[arg(long)]
    pub dormant_after: Option<String>,
    /// Tokens allowed to live longer than this are long-lived (default 24h).
    #[arg(long)]
    pub long_ttl: Option<String>,
}

/// Parses `90s`, `15m`, `1h`, `30d` (`keyward::duration`) to seconds.
pub fn parse_duration(text: &str) -> Result<u64> {
    text.parse::<keyward::duration::TtlText>()
        .map(|d| d.as_secs())
        .map_err(|e| UsageError(e.to_string()).into())
}

fn seconds(text: &Option<String>) -> Result<u64> {
    text.as_deref().map_or(Ok(0), parse_duration)
}

/// A value given inline, as `@FILE`, or as `-` (stdin); trailing newline cut.
fn read_value(text: &str, allow_stdin: bool) -> Result<String> {
    let raw = if let Some(file) = text.strip_prefix('@') {
        std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("reading {file}: {e}"))?
    } else if allow_stdin && text == "-" {
        let mut buf = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut buf)?;
        buf
    } else {
        return Ok(text.to_owned());
    };
    Ok(raw.trim_end_matches(['\n', '\r']).to_owned())
}

pub fn identity_json(i: &Identity) -> Value {
    let certs: Vec<Value> = i
        .cert_bindings
        .iter()
        .map(|b| {
            if b.spiffe_id.is_empty() {
                json!({"subject": b.subject})
            } else {
                json!({"spiffe_id": b.spiffe_id})
            }
        })
        .collect();
    let oidc: Vec<Value> = i
        .oidc_bindings
        .iter()
        .map(|b| {
            let claims: std::collections::BTreeMap<&String, &String> = b.claims.iter().collect();
            json!({"issuer": b.issuer, "claims": claims})
        })
        .collect();
    json!({
        "name": i.name, "kind": i.kind,
        "owner": text_or_null(&i.owner),
        "description": i.description, "policies": i.policies,
        "expires_at": rfc3339(&i.expires_at), "disabled": i.disabled,
        "created_at": rfc3339(&i.created_at), "last_used_at": rfc3339(&i.last_used_at),
        "role_id": i.role_id, "cert_bindings": certs, "oidc_bindings": oidc,
        "metadata": i.metadata.iter().collect::<std::collections::BTreeMap<_, _>>(),
    })
}

pub fn token_json(t: &TokenResponse) -> Value {
    json!({"token": t.token, "accessor": t.accessor, "expires_at": rfc3339(&t.expires_at),
           "policies": t.policies, "identity": t.identity})
}

/// `keyward identity ...`: each subcommand's arguments become a request
/// (a usage error before any connection), then one call, then its output.
pub async fn identity(g: &Global, format: Format, cmd: IdentityCommand) -> Result<()> {
    let shown = match cmd {
        IdentityCommand::Decommission(args) => {
            return super::lifecycle::decommission(g, format, args).await
        }
        IdentityCommand::Attest(args) => return super::lifecycle::attest(g, format, args).await,
        IdentityCommand::Attestations => return super::lifecycle::attestations(g, format).await,
        IdentityCommand::Reads { name } => return super::lifecycle::reads(g, format, name).await,
        IdentityCommand::Token(args) => {
            return super::federation::identity_token(g, format, args).await
        }
        IdentityCommand::Create(args) => {
            let request = args.request()?;
            identity_json(&connect(g).await?.identity_create(request).await?)
        }
        IdentityCommand::Get { name } => {
            identity_json(&connect(g).await?.identity_get(&name).await?)
        }
        IdentityCommand::List(args) => {
            let request = args.request()?;
            let list = connect(g).await?.identity_list(request).await?;
            json!({ "identities": list.iter().map(identity_json).collect::<Vec<_>>() })
        }
        IdentityCommand::Update(args) => {
            let request = args.request()?;
            let client = connect(g).await?;
            // Best effort (it needs `read`, the update only `write`): the
            // expiry before, to say when the update logs the identity out.
            let before = match request.expires_in_seconds {
                Some(seconds) if seconds > 0 => client.identity_get(&request.name).await.ok(),
                _ => None,
            };
            let updated = client.identity_update(request).await?;
            if let Some(before) = before {
                let was = before.expires_at.map(|t| (t.seconds, t.nanos));
                let now = updated.expires_at.map(|t| (t.seconds, t.nanos));
                if now.is_some() && (was.is_none() || now < was) {
                    eprintln!(
                        "note: the expiry of {} was brought forward, so its tokens were revoked: \
                         its clients log in again",
                        updated.name
                    );
                }
            }
            identity_json(&updated)
        }
        IdentityCommand::Disable {
            name,
            keep_secret_ids,
        } => identity_json(
            &connect(g)
                .await?
                .identity_disable_with(&name, keep_secret_ids)
                .await?,
        ),
        IdentityCommand::Enable { name } => {
            identity_json(&connect(g).await?.identity_enable(&name).await?)
        }
        IdentityCommand::Delete { name } => {
            let revoked = connect(g).await?.identity_delete(&name).await?;
            json!({"name": name, "deleted": true, "revoked_tokens": revoked})
        }
        IdentityCommand::SecretId(args) => secret_id(g, args).await?,
        IdentityCommand::Unbind(args) => {
            let (name, binding) = args.binding()?;
            identity_json(&connect(g).await?.identity_unbind(&name, binding).await?)
        }
        IdentityCommand::BindCert(args) => identity_json(
            &connect(g)
                .await?
                .identity_bind_cert(
                    &args.name,
                    args.subject.as_deref(),
                    args.spiffe_id.as_deref(),
                )
                .await?,
        ),
        IdentityCommand::BindOidc(args) => {
            let claims = args.claims()?;
            identity_json(
                &connect(g)
                    .await?
                    .identity_bind_oidc(&args.name, &args.issuer, &claims)
                    .await?,
            )
        }
        IdentityCommand::Metadata(args) => super::federation::set_metadata(g, args).await?,
    };
    emit(format, &shown);
    Ok(())
}

/// A new secret-id: printed once, never stored in the clear. Or the list
/// of an identity's secret-ids (accessors only), or one revoked.
async fn secret_id(g: &Global, args: SecretIdArgs) -> Result<Value> {
    match args.action {
        Some(SecretIdCommand::List { name }) => {
            let list = connect(g).await?.identity_secret_ids(&name).await?;
            let items: Vec<Value> = list
                .iter()
                .map(|s| {
                    json!({"accessor": s.accessor, "created_at": rfc3339(&s.created_at),
                           "expires_at": rfc3339(&s.expires_at), "uses_left": s.uses_left,
                           "cidrs": s.cidrs})
                })
                .collect();
            return Ok(json!({"name": name, "secret_ids": items}));
        }
        Some(SecretIdCommand::Revoke { name, accessor }) => {
            connect(g)
                .await?
                .identity_revoke_secret_id(&name, &accessor)
                .await?;
            return Ok(json!({"name": name, "accessor": accessor, "revoked": true}));
        }
        None => {}
    }
    let name = args
        .name
        .ok_or_else(|| UsageError("give the identity's NAME".into()))?;
    let ttl = seconds(&args.ttl)?;
    let r = connect(g)
        .await?
        .identity_secret_id(&name, ttl, args.uses.unwrap_or(0), &args.cidrs)
        .await?;
    Ok(
        json!({"role_id": r.role_id, "secret_id": r.secret_id, "expires_at": rfc3339(&r.expires_at)}),
    )
}

pub async fn oidc_issuer(g: &Global, format: Format, cmd: OidcIssuerCommand) -> Result<()> {
    let show = |i: &keyward::proto::v1::OidcIssuer| {
        json!({"name": i.name, "issuer": i.issuer_url,
               "jwks_file": text_or_null(&i.jwks_file), "jwks_url": text_or_null(&i.jwks_url),
               "audience": i.audience})
    };
    match cmd {
        OidcIssuerCommand::Put {
            name,
            issuer,
            jwks_file,
            jwks_url,
            audience,
        } => {
            // The server reads the file: send an absolute path.
            let jwks_file = jwks_file
                .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let i = connect(g)
                .await?
                .oidc_issuer_put(PutOidcIssuerRequest {
                    name,
                    issuer_url: issuer,
                    jwks_file,
                    jwks_url: jwks_url.unwrap_or_default(),
                    audience,
                })
                .await?;
            emit(format, &show(&i));
        }
        OidcIssuerCommand::List => {
            let list = connect(g).await?.oidc_issuer_list().await?;
            let items: Vec<Value> = list.iter().map(show).collect();
            emit(format, &json!({ "issuers": items }));
        }
    }
    Ok(())
}

pub async fn login(g: &Global, format: Format, cmd: LoginCommand) -> Result<()> {
    let client = connect(g).await?.without_token();
    let t = match cmd {
        LoginCommand::Approle {
            role_id,
            secret_id,
            ttl,
        } => {
            let secret_id = read_value(&secret_id, true)?;
            client
                .login_approle(&role_id, &secret_id, seconds(&ttl)?)
                .await?
        }
        LoginCommand::Cert { ttl } => {
            if g.client_cert.is_none() {
                return Err(UsageError(
                    "login cert needs --client-cert and --client-key (or KEYWARD_CLIENT_CERT/KEYWARD_CLIENT_KEY)"
                        .into(),
                )
                .into());
            }
            client.login_cert(seconds(&ttl)?).await?
        }
        LoginCommand::Oidc { issuer, jwt, ttl } => {
            let jwt = read_value(&jwt, false)?;
            client.login_oidc(&issuer, &jwt, seconds(&ttl)?).await?
        }
    };
    emit(format, &token_json(&t));
    Ok(())
}

pub async fn report(g: &Global, format: Format, args: ReportArgs) -> Result<()> {
    let r = connect(g)
        .await?
        .governance_report(seconds(&args.dormant_after)?, seconds(&args.long_ttl)?)
        .await?;
    let by_kind: serde_json::Map<String, Value> = r
        .identities_by_kind
        .iter()
        .map(|c| (c.key.clone(), json!(c.count)))
        .collect();
    let unused: Vec<Value> = r
        .unused_grants
        .iter()
        .map(|u| json!({"identity": u.identity, "unused_rules": u.unused_rules}))
        .collect();
    let long_lived: Vec<Value> = r
        .long_lived_tokens
        .iter()
        .map(|t| {
            json!({"accessor": t.accessor, "identity": t.identity,
                   "ttl_seconds": seconds_or_never(format, t.ttl_seconds)})
        })
        .collect();
    let expiring: Vec<Value> = r
        .expiring_soon
        .iter()
        .map(|e| {
            json!({"kind": e.kind, "name": e.name, "identity": e.identity,
                   "expires_at": rfc3339_unix(e.expires_at_unix)})
        })
        .collect();
    let failed: Vec<Value> = r
        .failed_logins
        .iter()
        .map(|f| json!({"identity": f.identity, "source": f.source, "count": f.count}))
        .collect();
    let rotations = |list: &[keyward::proto::v1::RotationStatus]| -> Vec<Value> {
        list.iter()
            .map(|s| json!({"path": s.path, "due_at_unix": s.due_at_unix, "last_failure": s.last_failure}))
            .collect()
    };
    emit(
        format,
        &json!({
            "identities_total": r.identities_total,
            "identities_by_kind": by_kind,
            "unowned": r.unowned,
            "dormant": r.dormant,
            "unused_grants": unused,
            "long_lived_tokens": long_lived,
            "expiring_soon": expiring,
            "failed_logins": failed,
            "overdue_rotations": rotations(&r.overdue_rotations),
            "rotation_compliance": r.rotation_compliance,
            "rotation_failures": rotations(&r.rotation_failures),
            "certificates_by_role": r.certificates_by_role.iter()
                .map(|c| (c.key.clone(), json!(c.count)))
                .collect::<serde_json::Map<String, Value>>(),
            "certificates_expiring_soon": r.certificates_expiring_soon,
            "certificates_revoked": r.certificates_revoked,
            "lease_revocations_failing": r.lease_revocations_failing,
            "identity_tokens_issued": r.identity_tokens_issued.iter()
                .map(|c| json!({"role": c.role, "audience": c.audience, "count": c.count}))
                .collect::<Vec<Value>>(),
            "delegations_by_agent": r.delegations_by_agent.iter()
                .map(|c| (c.key.clone(), json!(c.count)))
                .collect::<serde_json::Map<String, Value>>(),
            "delegations_by_delegator": r.delegations_by_delegator.iter()
                .map(|c| (c.key.clone(), json!(c.count)))
                .collect::<serde_json::Map<String, Value>>(),
            "anomalies_recent": r.anomalies_recent.iter()
                .map(|c| (c.key.clone(), json!(c.count)))
                .collect::<serde_json::Map<String, Value>>(),
        }),
    );
    Ok(())
}
