//! `keyward identity`, `oidc-issuer`, `login` and `report`.

use anyhow::Result;
use clap::{ArgGroup, Args, Subcommand};
use serde_json::{json, Value};

use super::output::{emit, Format};
use super::run::{connect, rfc3339};
use super::{Global, UsageError};
use keyward::proto::v1::{
    CreateIdentityRequest, Identity, ListIdentitiesRequest, PutOidcIssuerRequest, TokenResponse,
    UpdateIdentityRequest,
};

#[derive(Subcommand)]
pub enum IdentityCommand {
    /// Add an identity to the inventory.
    Create {
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
    },
    Get {
        name: String,
    },
    List {
        #[arg(long)]
        kind: Option<String>,
        /// Only identities without an owner.
        #[arg(long)]
        no_owner: bool,
        /// Only identities unused for at least this long (e.g. 30d).
        #[arg(long)]
        dormant: Option<String>,
    },
    /// Change owner, description, policies or expiry.
    Update {
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
    },
    /// Disable an identity: every token it holds stops working at once.
    Disable {
        name: String,
    },
    Enable {
        name: String,
    },
    /// Delete an identity, its secret-ids and bindings; revokes its tokens.
    Delete {
        name: String,
    },
    /// Make a secret-id for role-id login (shown once).
    SecretId {
        name: String,
        #[arg(long)]
        ttl: Option<String>,
        #[arg(long)]
        uses: Option<u32>,
        #[arg(long = "cidr")]
        cidrs: Vec<String>,
    },
    /// Bind a client certificate by subject DN or SPIFFE ID.
    #[command(group(ArgGroup::new("cert").required(true).args(["subject", "spiffe_id"])))]
    BindCert {
        name: String,
        #[arg(long)]
        subject: Option<String>,
        #[arg(long)]
        spiffe_id: Option<String>,
    },
    /// Bind JWTs of an OIDC issuer whose claims all match.
    BindOidc {
        name: String,
        #[arg(long)]
        issuer: String,
        #[arg(long = "claim", required = true)]
        claims: Vec<String>,
    },
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
        "owner": if i.owner.is_empty() { Value::Null } else { Value::String(i.owner.clone()) },
        "description": i.description, "policies": i.policies,
        "expires_at": rfc3339(&i.expires_at), "disabled": i.disabled,
        "created_at": rfc3339(&i.created_at), "last_used_at": rfc3339(&i.last_used_at),
        "role_id": i.role_id, "cert_bindings": certs, "oidc_bindings": oidc,
    })
}

pub fn token_json(t: &TokenResponse) -> Value {
    json!({"token": t.token, "accessor": t.accessor, "expires_at": rfc3339(&t.expires_at),
           "policies": t.policies, "identity": t.identity})
}

pub async fn identity(g: &Global, format: Format, cmd: IdentityCommand) -> Result<()> {
    match cmd {
        IdentityCommand::Create {
            name,
            kind,
            owner,
            description,
            policies,
            expires,
        } => {
            let expires_in_seconds = seconds(&expires)?;
            let i = connect(g)
                .await?
                .identity_create(CreateIdentityRequest {
                    name,
                    kind,
                    owner: owner.unwrap_or_default(),
                    description: description.unwrap_or_default(),
                    policies,
                    expires_in_seconds,
                })
                .await?;
            emit(format, &identity_json(&i));
        }
        IdentityCommand::Get { name } => {
            let i = connect(g).await?.identity_get(&name).await?;
            emit(format, &identity_json(&i));
        }
        IdentityCommand::List {
            kind,
            no_owner,
            dormant,
        } => {
            let dormant_seconds = seconds(&dormant)?;
            let list = connect(g)
                .await?
                .identity_list(ListIdentitiesRequest {
                    kind: kind.unwrap_or_default(),
                    no_owner,
                    dormant_seconds,
                })
                .await?;
            let items: Vec<Value> = list.iter().map(identity_json).collect();
            emit(format, &json!({ "identities": items }));
        }
        IdentityCommand::Update {
            name,
            owner,
            description,
            policies,
            no_policies,
            expires,
        } => {
            let expires_in_seconds = match expires.as_deref() {
                None => None,
                Some("never") => Some(0),
                Some(d) => Some(parse_duration(d)?.max(1)),
            };
            let set_policies = no_policies || !policies.is_empty();
            let i = connect(g)
                .await?
                .identity_update(UpdateIdentityRequest {
                    name,
                    owner,
                    description,
                    set_policies,
                    policies,
                    expires_in_seconds,
                })
                .await?;
            emit(format, &identity_json(&i));
        }
        IdentityCommand::Disable { name } => {
            let i = connect(g).await?.identity_disable(&name).await?;
            emit(format, &identity_json(&i));
        }
        IdentityCommand::Enable { name } => {
            let i = connect(g).await?.identity_enable(&name).await?;
            emit(format, &identity_json(&i));
        }
        IdentityCommand::Delete { name } => {
            let revoked = connect(g).await?.identity_delete(&name).await?;
            emit(
                format,
                &json!({"name": name, "deleted": true, "revoked_tokens": revoked}),
            );
        }
        IdentityCommand::SecretId {
            name,
            ttl,
            uses,
            cidrs,
        } => {
            let r = connect(g)
                .await?
                .identity_secret_id(&name, seconds(&ttl)?, uses.unwrap_or(0), &cidrs)
                .await?;
            emit(
                format,
                &json!({"role_id": r.role_id, "secret_id": r.secret_id, "expires_at": rfc3339(&r.expires_at)}),
            );
        }
        IdentityCommand::BindCert {
            name,
            subject,
            spiffe_id,
        } => {
            let i = connect(g)
                .await?
                .identity_bind_cert(&name, subject.as_deref(), spiffe_id.as_deref())
                .await?;
            emit(format, &identity_json(&i));
        }
        IdentityCommand::BindOidc {
            name,
            issuer,
            claims,
        } => {
            let mut pairs = Vec::new();
            for (i, c) in claims.iter().enumerate() {
                let (k, v) = c
                    .split_once('=')
                    .ok_or_else(|| UsageError(format!("--claim {} is not KEY=VALUE", i + 1)))?;
                pairs.push((k.to_owned(), v.to_owned()));
            }
            let i = connect(g)
                .await?
                .identity_bind_oidc(&name, &issuer, &pairs)
                .await?;
            emit(format, &identity_json(&i));
        }
    }
    Ok(())
}

pub async fn oidc_issuer(g: &Global, format: Format, cmd: OidcIssuerCommand) -> Result<()> {
    let show = |i: &keyward::proto::v1::OidcIssuer| {
        json!({"name": i.name, "issuer": i.issuer_url,
               "jwks_file": if i.jwks_file.is_empty() { Value::Null } else { Value::String(i.jwks_file.clone()) },
               "jwks_url": if i.jwks_url.is_empty() { Value::Null } else { Value::String(i.jwks_url.clone()) },
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
        .map(|t| json!({"accessor": t.accessor, "identity": t.identity, "ttl_seconds": t.ttl_seconds}))
        .collect();
    let expiring: Vec<Value> = r
        .expiring_soon
        .iter()
        .map(|e| {
            let at = prost_types::Timestamp {
                seconds: i64::try_from(e.expires_at_unix).unwrap_or(i64::MAX),
                nanos: 0,
            };
            json!({"kind": e.kind, "name": e.name, "identity": e.identity, "expires_at": rfc3339(&Some(at))})
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
        }),
    );
    Ok(())
}
