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
