//! The command line against a real server: JSON output, raw `--field`,
//! stdin and file values, and exit codes 0, 1 and 2.

use serde_json::Value;

use crate::harness::{cli, unique, TestServer};

#[tokio::test(flavor = "multi_thread")]
async fn secret_commands_print_json_and_exit_codes_follow_the_contract() {
    let server = TestServer::dev().await;
    let addr = format!("https://{}", server.addr);
    let ca = server.ca.to_str().unwrap().to_owned();
    let env = [
        ("KEYWARD_ADDR", addr.as_str()),
        ("KEYWARD_CACERT", ca.as_str()),
        ("KEYWARD_TOKEN", server.root_token.as_str()),
    ];
    let path = unique("cli");
    let file = server.dir.path().join("value.txt");
    std::fs::write(&file, "from-a-file").unwrap();

    let run = |args: Vec<String>, stdin: Option<&[u8]>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        tokio::task::block_in_place(|| cli(&refs, &env, stdin))
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    let (code, out, err) = run(
        s(&[
            "secret",
            "put",
            &path,
            "user=svc",
            &format!("file=@{}", file.display()),
            "pw=-",
            "--format",
            "json",
        ]),
        Some(b"from-stdin"),
    );
    assert_eq!(code, 0, "{err}");
    let put: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(put, serde_json::json!({"path": path, "version": 1}));

    let (code, out, _) = run(s(&["secret", "get", &path, "--format", "json"]), None);
    assert_eq!(code, 0);
    let got: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        got["data"],
        serde_json::json!({"user": "svc", "file": "from-a-file", "pw": "from-stdin"})
    );
    assert_eq!(
        (got["version"].as_u64(), got["stage"].as_str()),
        (Some(1), Some("current"))
    );
    assert!(got["created_at"].as_str().unwrap().ends_with('Z'));

    let (code, out, _) = run(s(&["secret", "get", &path, "--field", "pw"]), None);
    assert_eq!(
        (code, out.as_str()),
        (0, "from-stdin"),
        "raw value, no newline"
    );

    let (code, out, _) = run(s(&["status", "--format", "json"]), None);
    assert_eq!(code, 0);
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (status["sealed"].as_bool(), status["initialized"].as_bool()),
        (Some(false), Some(true))
    );

    // Server refusals exit 1 with the message on stderr and nothing on stdout.
    let (code, out, err) = run(s(&["secret", "get", &unique("missing")]), None);
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.contains("NOT_FOUND"), "{err}");
    let (code, _, err) = run(s(&["secret", "put", &path, "a=1", "--cas", "7"]), None);
    assert_eq!(code, 1);
    assert!(err.contains("FAILED_PRECONDITION"), "{err}");
    // Usage errors exit 2.
    let (code, _, _) = run(s(&["secret", "put", &path, "novalue"]), None);
    assert_eq!(code, 2);
    let (code, _, _) = run(s(&["secret", "frobnicate"]), None);
    assert_eq!(code, 2);
    let (code, _, _) = run(s(&["secret", "put", &path, "a=-", "b=-"]), Some(b"x"));
    assert_eq!(code, 2);
}

/// `keyward server --config FILE` starts uninitialised; the operator
/// commands initialise and unseal it; SIGTERM stops it.
#[tokio::test(flavor = "multi_thread")]
async fn production_server_from_a_config_file() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let certs = keyward::pki::ensure_dev_certs(&dir.path().join("certs")).unwrap();
    let config = dir.path().join("keyward.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\n[storage]\npath = \"data\"\n[tls]\ncert = \"certs/server.pem\"\n\
         key = \"certs/server-key.pem\"\nclient_ca = \"certs/ca.pem\"\n[audit]\npath = \"logs/audit.log\"\n\
         [metrics]\nlisten = \"off\"\n",
    )
    .unwrap();
    let mut child = std::process::Command::new(crate::harness::binary())
        .args(["server", "--config"])
        .arg(&config)
        .env("KEYWARD_HTTP_LISTEN", "127.0.0.1:0")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("addr=").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the server did not log its address");
    let addr = format!("https://{addr}");
    let ca = certs.ca.to_str().unwrap().to_owned();
    let env = [
        ("KEYWARD_ADDR", addr.as_str()),
        ("KEYWARD_CACERT", ca.as_str()),
    ];
    let run =
        |args: &[&str], env: &[(&str, &str)]| tokio::task::block_in_place(|| cli(args, env, None));

    let (code, out, _) = run(&["status", "--format", "json"], &env);
    assert_eq!(code, 0);
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (status["initialized"].as_bool(), status["sealed"].as_bool()),
        (Some(false), Some(true))
    );

    let (code, out, err) = run(
        &[
            "operator",
            "init",
            "--shares",
            "3",
            "--threshold",
            "2",
            "--format",
            "json",
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    let init: Value = serde_json::from_str(&out).unwrap();
    let shares: Vec<String> = init["shares"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    let token = init["root_token"].as_str().unwrap().to_owned();
    for (i, share) in shares.iter().take(2).enumerate() {
        let (code, out, _) = run(&["operator", "unseal", share, "--format", "json"], &env);
        assert_eq!(code, 0);
        let r: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(r["sealed"].as_bool(), Some(i == 0));
    }
    let mut with_token = env.to_vec();
    with_token.push(("KEYWARD_TOKEN", token.as_str()));
    assert_eq!(
        run(&["secret", "put", "prod/db", "password=p"], &with_token).0,
        0
    );
    let (code, out, _) = run(
        &["secret", "get", "prod/db", "--field", "password"],
        &with_token,
    );
    assert_eq!((code, out.as_str()), (0, "p"));
    assert!(
        dir.path().join("logs/audit.log").exists(),
        "relative paths are taken from the config's folder"
    );
    assert!(dir.path().join("data").is_dir());

    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_config_with_an_unknown_key_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[storage]\npath = \"d\"\npasword = \"hunter2\"\n").unwrap();
    let (code, _, err) = cli(&["server", "--config", config.to_str().unwrap()], &[], None);
    assert_eq!(code, 1);
    assert!(
        err.contains("unknown configuration key 'storage.pasword'"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

/// "Never" is `null` in JSON (a root token's life is `u64::MAX` on the wire,
/// which JSON readers holding doubles cannot say) and `never` in a table;
/// `status` reports the crate's version.
#[tokio::test(flavor = "multi_thread")]
async fn never_prints_as_null_in_json_and_status_gives_the_crate_version() {
    let server = TestServer::dev().await;
    let addr = format!("https://{}", server.addr);
    let ca = server.ca.to_str().unwrap().to_owned();
    let env = [
        ("KEYWARD_ADDR", addr.as_str()),
        ("KEYWARD_CACERT", ca.as_str()),
        ("KEYWARD_TOKEN", server.root_token.as_str()),
    ];
    let run = |args: &[&str]| {
        let (code, out, err) = tokio::task::block_in_place(|| cli(args, &env, None));
        assert_eq!(code, 0, "{args:?}: {err}");
        out
    };

    let json = |out: String| serde_json::from_str::<Value>(&out).unwrap();
    let report = json(run(&["report", "--format", "json"]));
    let root = report["long_lived_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["identity"] == "root")
        .unwrap_or_else(|| panic!("no root token among the long-lived: {report}"));
    assert_eq!(root["ttl_seconds"], Value::Null, "{root}");
    let table = run(&["report"]);
    assert!(table.contains("never"), "{table}");
    assert!(!table.contains(&u64::MAX.to_string()), "{table}");

    let me = json(run(&["token", "lookup", "--format", "json"]));
    assert_eq!(me["identity"], "root");
    assert_eq!(
        (&me["expires_at"], &me["max_expires_at"]),
        (&Value::Null, &Value::Null),
        "{me}"
    );
    let table = run(&["token", "lookup"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("expires_at") && l.ends_with("never")),
        "{table}"
    );

    let status = json(run(&["status", "--format", "json"]));
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(env!("CARGO_PKG_VERSION"), "0.6.20");
}
