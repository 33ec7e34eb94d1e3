//! `token issue --may-act`, `token exchange` (delegation), `oidc ...` and
//! `identity token` (keyward as an OIDC issuer).

use std::collections::HashMap;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;

use super::common::{connect, rfc3339};
use super::ident::token_json;
use super::output::{emit, Format};
use super::{Global, UsageError};
use keyward::client::{ExchangeOptions, IssueOptions};
use keyward::duration::TtlText;

#[derive(Args)]
pub struct ExchangeArgs {
    /// The subject's exchange-only token, or @FILE to read it from a file.
    #[arg(long, value_name = "TOKEN|@FILE")]
    subject_token: String,
    /// A policy of the delegated token (repeat; default: the subject token's).
    #[arg(long = "policy", value_name = "P")]
    policies: Vec<String>,
    /// Life of the delegated token (default and ceiling: delegation.max_ttl).
    #[arg(long, value_name = "D")]
    ttl: Option<TtlText>,
    /// Number of uses (default unlimited).
    #[arg(long, value_name = "N")]
    uses: Option<u32>,
}

#[derive(Subcommand)]
pub enum OidcCommand {
    /// Roles that identities get identity tokens (signed JWTs) for.
    #[command(subcommand)]
    Role(OidcRoleCommand),
    /// Make a new signing key now (old keys stay published until their tokens expire).
    RotateKey,
    /// The discovery document and JWKS the issuer publishes.
    Discovery,
}

#[derive(Subcommand)]
pub enum OidcRoleCommand {
    /// Create or replace a role.
    Put {
        name: String,
        /// An audience tokens of this role may name (repeat for several).
        #[arg(long = "audience", value_name = "AUD", required = true)]
        audiences: Vec<String>,
        /// The longest life of a token of this role.
        #[arg(long, value_name = "D")]
        max_ttl: TtlText,
        /// A claim: KEY=TEMPLATE with {{identity.name}}, {{identity.kind}},
        /// {{identity.owner}} (repeat for several).
        #[arg(long = "claim", value_name = "KEY=TEMPLATE")]
        claims: Vec<String>,
    },
    Get {
        name: String,
    },
}

#[derive(Args)]
pub struct IdentityTokenArgs {
    /// The OIDC role (needs `issue` on `sys/oidc/<role>`).
    role: String,
    /// The audience (default: the role's only one).
    #[arg(long, value_name = "AUD")]
    audience: Option<String>,
    /// Life of the token (default and ceiling: the role's max TTL).
    #[arg(long, value_name = "D")]
    ttl: Option<TtlText>,
}

/// `token issue --may-act IDENTITY ...`.
pub async fn issue_may_act(
    g: &Global,
    format: Format,
    options: IssueOptions,
    may_act: &str,
) -> Result<()> {
    let r = connect(g)
        .await?
        .issue_may_act_token(options, may_act)
        .await?;
    let mut shown = token_json(&r);
    shown["may_act"] = json!(may_act);
    emit(format, &shown);
    Ok(())
}

/// `token exchange ...`.
pub async fn exchange(g: &Global, format: Format, args: ExchangeArgs) -> Result<()> {
    let subject = match args.subject_token.strip_prefix('@') {
        Some(file) => std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("reading {file}: {e}"))?
            .trim()
            .to_owned(),
        None => args.subject_token.clone(),
    };
    if subject.is_empty() {
        return Err(UsageError("--subject-token is empty".into()).into());
    }
    let r = connect(g)
        .await?
        .exchange_token(
            &subject,
            ExchangeOptions {
                policies: args.policies,
                ttl: args.ttl.map(|t| t.as_duration()),
                uses: args.uses.unwrap_or(0),
            },
        )
        .await?;
    emit(format, &token_json(&r));
    Ok(())
}

/// `oidc ...`.
pub async fn oidc(g: &Global, format: Format, cmd: OidcCommand) -> Result<()> {
    match cmd {
        OidcCommand::Role(OidcRoleCommand::Put {
            name,
            audiences,
            max_ttl,
            claims,
        }) => {
            let mut map = HashMap::new();
            for claim in &claims {
                let Some((key, template)) = claim.split_once('=') else {
                    return Err(UsageError(format!(
                        "--claim takes KEY=TEMPLATE; got a value without '=' (claim {})",
                        map.len() + 1
                    ))
                    .into());
                };
                map.insert(key.to_owned(), template.to_owned());
            }
            let role = connect(g)
                .await?
                .put_oidc_role(&name, audiences, max_ttl.as_duration(), map)
                .await?;
            emit(format, &role_json(&role));
        }
        OidcCommand::Role(OidcRoleCommand::Get { name }) => {
            let role = connect(g).await?.get_oidc_role(&name).await?;
            emit(format, &role_json(&role));
        }
        OidcCommand::RotateKey => {
            let r = connect(g).await?.rotate_oidc_key().await?;
            emit(format, &json!({"kid": r.kid, "published": r.published}));
        }
        OidcCommand::Discovery => {
            let r = connect(g).await?.oidc_discovery().await?;
            let doc: serde_json::Value = serde_json::from_str(&r.openid_configuration)?;
            let jwks: serde_json::Value = serde_json::from_str(&r.jwks)?;
            emit(format, &json!({"openid_configuration": doc, "jwks": jwks}));
        }
    }
    Ok(())
}

fn role_json(role: &keyward::proto::v1::OidcRole) -> serde_json::Value {
    let claims: std::collections::BTreeMap<&String, &String> = role.claims.iter().collect();
    json!({"name": role.name, "audiences": role.audiences,
           "max_ttl_seconds": role.max_ttl_seconds, "claims": claims})
}

/// `identity token ROLE ...` -> `{"token", "expires_at"}`.
pub async fn identity_token(g: &Global, format: Format, args: IdentityTokenArgs) -> Result<()> {
    let r = connect(g)
        .await?
        .identity_token(
            &args.role,
            args.audience.as_deref(),
            args.ttl.map(|t| t.as_duration()),
        )
        .await?;
    emit(
        format,
        &json!({"token": r.token, "expires_at": rfc3339(&r.expires_at), "jti": r.jti}),
    );
    Ok(())
}

#[derive(Args)]
pub struct MetadataArgs {
    name: String,
    /// Labels to set, KEY=VALUE (keys: [a-z0-9_-]{1,64}).
    #[arg(value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// A key to remove (repeat).
    #[arg(long = "remove", value_name = "KEY")]
    remove: Vec<String>,
}

/// `keyward identity metadata NAME [KEY=VALUE]... [--remove KEY]...`.
pub async fn set_metadata(g: &Global, args: MetadataArgs) -> Result<serde_json::Value> {
    let mut set = HashMap::new();
    for (i, pair) in args.set.iter().enumerate() {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(UsageError(format!("label {} is not KEY=VALUE", i + 1)).into());
        };
        set.insert(k.to_owned(), v.to_owned());
    }
    if set.is_empty() && args.remove.is_empty() {
        return Err(UsageError("give KEY=VALUE labels to set or --remove KEY".into()).into());
    }
    let identity = connect(g)
        .await?
        .identity_set_metadata(&args.name, set, args.remove)
        .await?;
    Ok(super::ident::identity_json(&identity))
}
