//! `keyward pki ...`: the CA, roles, issue and sign, the inventory, the CRL.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use base64::Engine as _;
use clap::Subcommand;
use serde_json::{json, Value};

use super::bench::Stop;
use super::common::{connect, rfc3339};
use super::output::{emit, Format};
use super::{Global, UsageError};
use keyward::duration;
use keyward::proto::v1::{PkiCertRecord, PkiIssueRequest, PkiRole};

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Make an internal root CA (admin on sys/pki/ca).
    Init {
        #[arg(long)]
        common_name: String,
        /// Validity of the root (default 10 years).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// An intermediate CA signed by an outside CA.
    #[command(subcommand)]
    Intermediate(IntermediateCommand),
    /// Print the CA chain (PEM, the signing CA first).
    Ca,
    /// Roles: which SANs, how long, for what.
    #[command(subcommand)]
    Role(RoleCommand),
    /// A new key and a certificate for it (issue on pki/ROLE).
    Issue {
        role: String,
        #[arg(long = "spiffe-id")]
        spiffe_ids: Vec<String>,
        #[arg(long = "dns")]
        dns_names: Vec<String>,
        #[arg(long)]
        ttl: Option<String>,
    },
    /// A certificate for a CSR's key; the key never leaves the workload.
    Sign {
        role: String,
        /// `@FILE`, or `-` for stdin.
        #[arg(long)]
        csr: String,
        #[arg(long)]
        ttl: Option<String>,
    },
    /// The inventory of issued certificates (never private keys).
    List {
        /// Only valid certificates expiring within this.
        #[arg(long)]
        expiring: Option<String>,
    },
    /// Revoke a certificate by serial (hex).
    Revoke { serial: String },
    /// A fresh CRL: PEM on stdout; `--der FILE` also writes DER.
    Crl {
        #[arg(long)]
        der: Option<PathBuf>,
    },
    /// Certificates issued (ec-p256, key made by the server) and signed
    /// from a CSR per second, beside Health/Check and Secrets/Get in the
    /// same run. Makes a root if there is none and a role `bench-<id>`.
    Bench {
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// A fixed number of calls per phase instead of `--seconds` (for
        /// counting instructions per call under callgrind).
        #[arg(long)]
        calls: Option<u64>,
        /// The phases to run, comma-separated, of health, get, issue, sign.
        #[arg(long, value_delimiter = ',', default_value = "health,get,issue,sign")]
        phases: Vec<String>,
        /// The server's pid on this machine: adds its CPU time per call.
        #[arg(long)]
        server_pid: Option<u32>,
    },
}

#[derive(Subcommand)]
pub enum IntermediateCommand {
    /// Make a key (kept in the vault) and print its CSR.
    Csr {
        #[arg(long, default_value = "keyward intermediate CA")]
        common_name: String,
    },
    /// Install the outside CA's certificate (PEM; its chain may follow).
    SetSigned { file: PathBuf },
}

#[derive(Subcommand)]
pub enum RoleCommand {
    Put {
        name: String,
        #[arg(long = "allow-spiffe", num_args = 1..)]
        allow_spiffe: Vec<String>,
        #[arg(long = "allow-dns", num_args = 1..)]
        allow_dns: Vec<String>,
        #[arg(long)]
        max_ttl: String,
        /// ec-p256 (default) or ed25519.
        #[arg(long, default_value = "ec-p256")]
        key_type: String,
        /// clientAuth EKU (with neither --client nor --server: both).
        #[arg(long)]
        client: bool,
        /// serverAuth EKU.
        #[arg(long)]
        server: bool,
        #[arg(long)]
        allow_wildcard_dns: bool,
    },
    Get {
        name: String,
    },
    List,
    Delete {
        name: String,
    },
}

fn seconds(flag: &str, text: &Option<String>) -> Result<u64> {
    match text {
        None => Ok(0),
        Some(t) => Ok(duration::parse(t)
            .map_err(|e| UsageError(format!("{flag}: {e}")))?
            .as_secs()),
    }
}

fn role_json(r: &PkiRole) -> Value {
    json!({"name": r.name, "allow_spiffe": r.allow_spiffe, "allow_dns": r.allow_dns,
           "max_ttl": duration::format(std::time::Duration::from_secs(r.max_ttl_seconds)),
           "key_type": r.key_type, "client": r.client, "server": r.server,
           "allow_wildcard_dns": r.allow_wildcard_dns})
}

fn record_json(c: &PkiCertRecord) -> Value {
    json!({"serial": c.serial, "role": c.role,
           "identity": if c.identity.is_empty() { Value::Null } else { json!(c.identity) },
           "requested_by": c.requested_by, "sans": c.sans, "origin": c.origin,
           "issued_at": rfc3339(&c.issued_at), "expires_at": rfc3339(&c.expires_at),
           "revoked_at": rfc3339(&c.revoked_at)})
}

fn read_arg(text: &str) -> Result<String> {
    if text == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        Ok(s)
    } else if let Some(path) = text.strip_prefix('@') {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))
    } else {
        Err(UsageError("--csr takes @FILE or - (stdin)".into()).into())
    }
}

fn chain_out(format: Format, chain: &[String]) {
    match format {
        Format::Json => emit(format, &json!({"ca_chain": chain})),
        Format::Table => print!("{}", chain.concat()),
    }
}

pub async fn pki(g: &Global, format: Format, cmd: PkiCommand) -> Result<()> {
    let client = connect(g).await?;
    match cmd {
        PkiCommand::Init { common_name, ttl } => {
            let ttl = seconds("--ttl", &ttl)?;
            chain_out(format, &client.pki_init(&common_name, ttl).await?);
        }
        PkiCommand::Intermediate(IntermediateCommand::Csr { common_name }) => {
            let csr = client.pki_intermediate_csr(&common_name).await?;
            match format {
                Format::Json => emit(format, &json!({"csr": csr})),
                Format::Table => print!("{csr}"),
            }
        }
        PkiCommand::Intermediate(IntermediateCommand::SetSigned { file }) => {
            let pem = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            chain_out(format, &client.pki_set_signed(&pem).await?);
        }
        PkiCommand::Ca => chain_out(format, &client.pki_ca().await?),
        PkiCommand::Role(RoleCommand::Put {
            name,
            allow_spiffe,
            allow_dns,
            max_ttl,
            key_type,
            client: client_eku,
            server,
            allow_wildcard_dns,
        }) => {
            let max_ttl_seconds = seconds("--max-ttl", &Some(max_ttl))?;
            let role = client
                .pki_role_put(PkiRole {
                    name,
                    allow_spiffe,
                    allow_dns,
                    max_ttl_seconds,
                    key_type,
                    client: client_eku,
                    server,
                    allow_wildcard_dns,
                })
                .await?;
            emit(format, &role_json(&role));
        }
        PkiCommand::Role(RoleCommand::Get { name }) => {
            emit(format, &role_json(&client.pki_role_get(&name).await?));
        }
        PkiCommand::Role(RoleCommand::List) => {
            let roles: Vec<Value> = client
                .pki_role_list()
                .await?
                .iter()
                .map(role_json)
                .collect();
            emit(format, &json!({"roles": roles}));
        }
        PkiCommand::Role(RoleCommand::Delete { name }) => {
            client.pki_role_delete(&name).await?;
            emit(format, &json!({"deleted": name}));
        }
        PkiCommand::Issue {
            role,
            spiffe_ids,
            dns_names,
            ttl,
        } => {
            let ttl_seconds = seconds("--ttl", &ttl)?;
            let issued = client
                .pki_issue(PkiIssueRequest {
                    role,
                    spiffe_ids,
                    dns_names,
                    ttl_seconds,
                })
                .await?;
            emit(
                format,
                &json!({"certificate": issued.certificate, "private_key": issued.private_key,
                        "ca_chain": issued.ca_chain, "serial": issued.serial,
                        "expires_at": rfc3339(&issued.expires_at)}),
            );
        }
        PkiCommand::Sign { role, csr, ttl } => {
            let ttl_seconds = seconds("--ttl", &ttl)?;
            let csr = read_arg(&csr)?;
            let signed = client.pki_sign(&role, &csr, ttl_seconds).await?;
            emit(
                format,
                &json!({"certificate": signed.certificate, "ca_chain": signed.ca_chain,
                        "serial": signed.serial, "expires_at": rfc3339(&signed.expires_at)}),
            );
        }
        PkiCommand::List { expiring } => {
            let within = seconds("--expiring", &expiring)?;
            let certs: Vec<Value> = client
                .pki_list(within)
                .await?
                .iter()
                .map(record_json)
                .collect();
            emit(format, &json!({"certificates": certs}));
        }
        PkiCommand::Revoke { serial } => {
            emit(format, &record_json(&client.pki_revoke(&serial).await?));
        }
        PkiCommand::Bench {
            concurrency,
            seconds,
            connections,
            calls,
            phases,
            server_pid,
        } => {
            let stop = match calls {
                Some(n) => Stop::Calls(n),
                None => Stop::After(std::time::Duration::from_secs(seconds.max(1))),
            };
            for p in &phases {
                if !["health", "get", "issue", "sign"].contains(&p.as_str()) {
                    return Err(UsageError(format!(
                        "--phases: {p:?} is none of health, get, issue, sign"
                    ))
                    .into());
                }
            }
            let opts = BenchOptions {
                concurrency,
                connections,
                stop,
                phases,
                server_pid,
            };
            bench(g, format, opts).await?
        }
        PkiCommand::Crl { der } => {
            let bytes = client.pki_crl().await?;
            if let Some(path) = der {
                std::fs::write(&path, &bytes)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            let pem = crl_pem(&bytes);
            match format {
                Format::Json => emit(
                    format,
                    &json!({"pem": pem,
                            "der_base64": base64::engine::general_purpose::STANDARD.encode(&bytes)}),
                ),
                Format::Table => print!("{pem}"),
            }
        }
    }
    Ok(())
}

fn crl_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN X509 CRL-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END X509 CRL-----\n");
    out
}

/// What `pki bench` runs.
struct BenchOptions {
    concurrency: usize,
    connections: usize,
    stop: Stop,
    phases: Vec<String>,
    server_pid: Option<u32>,
}

async fn bench(g: &Global, format: Format, opts: BenchOptions) -> Result<()> {
    use std::sync::Arc;

    use super::bench::{phase_until, Phase};
    use keyward::client::PutOptions;
    use keyward::secrecy::{SecretBytes, SecretData};

    let BenchOptions {
        concurrency,
        connections,
        stop,
        phases,
        server_pid,
    } = opts;
    let concurrency = concurrency.max(1);
    let wanted = |name: &str| phases.iter().any(|p| p == name);
    let mut clients = Vec::new();
    for _ in 0..connections.max(1) {
        clients.push(connect(g).await?);
    }
    let c0 = &clients[0];
    if c0.pki_ca().await.is_err() {
        c0.pki_init("keyward bench root", 0).await?;
    }
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let role = format!("bench-{id}");
    c0.pki_role_put(PkiRole {
        name: role.clone(),
        allow_spiffe: vec![format!("spiffe://bench.test/{id}/**")],
        allow_dns: vec![],
        max_ttl_seconds: 3600,
        key_type: "ec-p256".into(),
        client: true,
        server: false,
        allow_wildcard_dns: false,
    })
    .await?;
    let get_path = format!("bench/{id}/get");
    let mut data = SecretData::new();
    data.insert(
        "password".into(),
        SecretBytes::from("bench-password-0123456789"),
    );
    c0.put(&get_path, &data, PutOptions::default()).await?;
    // One CSR, made here (the workload's side), signed again and again.
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        format!("spiffe://bench.test/{id}/w").as_str().try_into()?,
    )];
    let csr = Arc::new(params.serialize_request(&key)?.pem()?);

    eprintln!(
        "pki bench: {concurrency} in flight over {} connections, {} per phase",
        clients.len(),
        match stop {
            Stop::After(d) => format!("{}s", d.as_secs()),
            Stop::Calls(n) => format!("{n} calls"),
        }
    );
    let mut health = Phase::default();
    if wanted("health") {
        health = phase_until(&clients, concurrency, stop, server_pid, |c, _| async move {
            c.health().await.is_ok()
        })
        .await?;
    }
    let mut get = Phase::default();
    if wanted("get") {
        let path = Arc::new(get_path);
        get = phase_until(&clients, concurrency, stop, server_pid, move |c, _| {
            let path = path.clone();
            async move { c.get(&path).await.is_ok() }
        })
        .await?;
    }
    let mut issue = Phase::default();
    if wanted("issue") {
        let (r, i) = (Arc::new(role.clone()), Arc::new(id.clone()));
        issue = phase_until(&clients, concurrency, stop, server_pid, move |c, n| {
            let (r, i) = (r.clone(), i.clone());
            async move {
                c.pki_issue(keyward::proto::v1::PkiIssueRequest {
                    role: r.to_string(),
                    spiffe_ids: vec![format!("spiffe://bench.test/{i}/w{}", n % 1024)],
                    dns_names: vec![],
                    ttl_seconds: 600,
                })
                .await
                .is_ok()
            }
        })
        .await?;
    }
    let mut sign = Phase::default();
    if wanted("sign") {
        let r = Arc::new(role.clone());
        sign = phase_until(&clients, concurrency, stop, server_pid, move |c, _| {
            let (r, csr) = (r.clone(), csr.clone());
            async move { c.pki_sign(&r, &csr, 600).await.is_ok() }
        })
        .await?;
    }
    let round = |v: f64| (v * 10.0).round() / 10.0;
    // A ratio only between two phases that ran.
    let ratio = |a: (&str, &Phase), b: (&str, &Phase)| {
        (wanted(a.0) && wanted(b.0))
            .then(|| (a.1.rps() / b.1.rps().max(1e-9) * 1000.0).round() / 1000.0)
    };
    let (h, gt, is, sg) = (
        ("health", &health),
        ("get", &get),
        ("issue", &issue),
        ("sign", &sign),
    );
    let mut summary = json!({
        "concurrency": concurrency, "connections": clients.len(),
        "health_per_s": round(health.rps()), "get_per_s": round(get.rps()),
        "issue_per_s": round(issue.rps()), "sign_per_s": round(sign.rps()),
        "issue_vs_get": ratio(is, gt), "sign_vs_get": ratio(sg, gt),
        "issue_vs_health": ratio(is, h), "sign_vs_health": ratio(sg, h),
        "issue_p99_ms": round(issue.percentile_ms(0.99)), "sign_p99_ms": round(sign.percentile_ms(0.99)),
        "errors": health.errors + get.errors + issue.errors + sign.errors,
    });
    if let Some(map) = summary.as_object_mut() {
        match stop {
            Stop::After(d) => map.insert("seconds".into(), json!(d.as_secs())),
            Stop::Calls(n) => map.insert("calls".into(), json!(n)),
        };
        if server_pid.is_some() {
            for (name, p) in [h, gt, is, sg] {
                if wanted(name) {
                    let us = p.cpu_us_per_op().map(round);
                    map.insert(format!("{name}_cpu_us_per_op"), json!(us));
                }
            }
        }
    }
    // One line a script can read, then the document.
    eprintln!("pki-bench {summary}");
    emit(format, &summary);
    Ok(())
}
