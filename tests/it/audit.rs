//! The audit trail: one hash-chained record per request, values only as
//! HMACs, and `keyward audit verify` naming the first bad record.

use serde_json::Value;

use crate::harness::{cli, data, unique, TestServer};
use keyward::client::PutOptions;

fn records(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn every_request_is_recorded_with_hmacs_only() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let path = unique("audited");
    let value = unique("audited-value");
    root.put(&path, &data(&[("password", &value)]), PutOptions::default())
        .await
        .unwrap();
    root.get(&path).await.unwrap();
    let _ = root.get(&unique("missing")).await;
    let _ = server.anonymous().await.get(&path).await;

    let all = records(&server.audit_path);
    let mine: Vec<&Value> = all
        .iter()
        .filter(|r| r["resource"] == format!("secret/{path}"))
        .collect();
    let methods: Vec<(&str, &str, &str)> = mine
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap(),
                r["outcome"].as_str().unwrap(),
                r["code"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(
        methods.contains(&("keyward.v1.Secrets/Put", "allowed", "OK")),
        "{methods:?}"
    );
    assert!(
        methods.contains(&("keyward.v1.Secrets/Get", "allowed", "OK")),
        "{methods:?}"
    );
    let denied = all
        .iter()
        .find(|r| r["code"] == "UNAUTHENTICATED")
        .expect("the anonymous call is recorded");
    assert_eq!(denied["outcome"], "denied");
    assert!(all
        .iter()
        .any(|r| r["code"] == "NOT_FOUND" && r["outcome"] == "failed"));

    // The value appears only as the HMAC that `audit hash` gives.
    let text = std::fs::read_to_string(&server.audit_path).unwrap();
    assert!(!text.contains(&value));
    assert!(!text.contains(&server.root_token));
    let hash = root.audit_hash(&value).await.unwrap();
    assert!(hash.starts_with("hmac-sha256:"), "{hash}");
    let put = mine
        .iter()
        .find(|r| r["method"] == "keyward.v1.Secrets/Put")
        .unwrap();
    assert_eq!(put["data"]["password"], hash.as_str());
    let token_hash = root.audit_hash(&server.root_token).await.unwrap();
    assert_eq!(put["token"], token_hash.as_str());
    assert_eq!(put["identity"], "root");
    assert!(put["accessor"].as_str().unwrap().starts_with("kwa_"));
    assert!(put["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(put["source"].as_str().unwrap().starts_with("127.0.0.1:"));
}

fn verify(path: &std::path::Path) -> (i32, Value) {
    let (code, out, err) = cli(
        &[
            "audit",
            "verify",
            path.to_str().unwrap(),
            "--format",
            "json",
        ],
        &[],
        None,
    );
    let report: Value =
        serde_json::from_str(&out).unwrap_or_else(|_| panic!("not JSON: {out} / {err}"));
    (code, report)
}

#[tokio::test]
async fn verify_finds_edited_removed_and_swapped_records() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    for i in 0..6 {
        root.put(
            &unique("chain"),
            &data(&[("n", &i.to_string())]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    }
    let dir = server.stop().await;
    let original = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    assert!(
        lines.len() >= 6,
        "one record per put: {} records",
        lines.len()
    );
    let seq = |line: &str| {
        serde_json::from_str::<Value>(line).unwrap()["seq"]
            .as_u64()
            .unwrap()
    };
    let write = |name: &str, lines: &[String]| {
        let p = dir.path().join(name);
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        p
    };
    let owned: Vec<String> = lines.iter().map(|s| s.to_string()).collect();

    let (code, report) = verify(&dir.path().join("audit.log"));
    assert_eq!(code, 0);
    assert_eq!(report["ok"], true);
    assert_eq!(report["records"], lines.len() as u64);
    assert!(report["first_bad"].is_null());

    // Edit one field of record 4.
    let mut edited = owned.clone();
    edited[3] = edited[3].replacen("\"OK\"", "\"NOT_FOUND\"", 1);
    assert_ne!(edited[3], owned[3]);
    let (code, report) = verify(&write("edited.log", &edited));
    assert_eq!(
        (code, report["ok"].clone(), report["first_bad"].as_u64()),
        (1, Value::Bool(false), Some(seq(lines[3])))
    );

    // Remove record 3: the chain breaks where record 3 was expected.
    let mut removed = owned.clone();
    removed.remove(2);
    let (code, report) = verify(&write("removed.log", &removed));
    assert_eq!(code, 1);
    assert_eq!(report["first_bad"].as_u64(), Some(seq(lines[2])));

    // Swap records 5 and 6: it breaks at record 5's place.
    let mut swapped = owned.clone();
    swapped.swap(4, 5);
    let (code, report) = verify(&write("swapped.log", &swapped));
    assert_eq!(code, 1);
    assert_eq!(report["first_bad"].as_u64(), Some(seq(lines[4])));
}
