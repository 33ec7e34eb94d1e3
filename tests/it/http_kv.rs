//! Vault's KV v2 over HTTPS, curl-style: each endpoint's envelope and
//! status codes, the same state as gRPC both ways, and a low-privileged
//! token refused with 403 and audited.

use keyward::client::{IssueOptions, PutOptions};
use serde_json::json;

use super::harness::{data, unique, TestServer};
use super::http_client::HttpClient;
use super::ident_kit::put_policy;

fn audit_lines(server: &TestServer) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&server.audit_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn kv_v2_data_versions_and_metadata() {
    let server = TestServer::dev().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let root = Some(server.root_token.as_str());
    let app = unique("app");
    let data_path = format!("/v1/secret/data/{app}/db");

    // Write: the version's metadata in Vault's envelope.
    let a = http
        .call(
            "POST",
            &data_path,
            root,
            Some(json!({"data": {"password": "s3cret-1"}})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["data"]["version"], 1);
    assert_eq!(a.json["data"]["destroyed"], false);
    for key in [
        "request_id",
        "lease_id",
        "renewable",
        "lease_duration",
        "wrap_info",
        "warnings",
        "auth",
    ] {
        assert!(a.json.get(key).is_some(), "{key} missing: {}", a.text);
    }
    // Check-and-set: 0 refuses an existing secret, the newest version passes.
    let a = http
        .call(
            "PUT",
            &data_path,
            root,
            Some(json!({"data": {"password": "x"}, "options": {"cas": 0}})),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(
        a.error().contains("check-and-set") || a.error().contains("cas"),
        "{}",
        a.text
    );
    let a = http
        .call(
            "PUT",
            &data_path,
            root,
            Some(json!({"data": {"password": "s3cret-2"}, "options": {"cas": 1}})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["data"]["version"], 2);

    // Read: newest, and ?version=.
    let a = http.get(&data_path, root).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["data"]["data"]["password"], "s3cret-2");
    assert_eq!(a.json["data"]["metadata"]["version"], 2);
    let a = http.get(&format!("{data_path}?version=1"), root).await;
    assert_eq!(a.json["data"]["data"]["password"], "s3cret-1", "{}", a.text);
    let a = http.get(&format!("{data_path}?version=x"), root).await;
    assert_eq!(a.status, 400, "{}", a.text);

    // Metadata and list.
    let a = http
        .get(&format!("/v1/secret/metadata/{app}/db"), root)
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["data"]["current_version"], 2);
    assert!(a.json["data"]["versions"]["1"]["created_time"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    let a = http
        .call("LIST", &format!("/v1/secret/metadata/{app}"), root, None)
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["data"]["keys"], json!(["db"]));
    let a = http.get("/v1/secret/metadata/?list=true", root).await;
    assert!(
        a.json["data"]["keys"]
            .as_array()
            .unwrap()
            .contains(&json!(format!("{app}/"))),
        "{}",
        a.text
    );
    let a = http
        .call(
            "LIST",
            &format!("/v1/secret/metadata/{}", unique("none")),
            root,
            None,
        )
        .await;
    assert_eq!(a.status, 404, "{}", a.text);

    // Soft delete of the newest, then undelete, then destroy.
    let a = http.call("DELETE", &data_path, root, None).await;
    assert_eq!(a.status, 204, "{}", a.text);
    let a = http.get(&format!("{data_path}?version=2"), root).await;
    assert_eq!(a.status, 404, "{}", a.text);
    let a = http
        .call(
            "POST",
            &format!("/v1/secret/undelete/{app}/db"),
            root,
            Some(json!({"versions": [2]})),
        )
        .await;
    assert_eq!(a.status, 204, "{}", a.text);
    assert_eq!(
        http.get(&data_path, root).await.json["data"]["data"]["password"],
        "s3cret-2"
    );
    let a = http
        .call(
            "POST",
            &format!("/v1/secret/delete/{app}/db"),
            root,
            Some(json!({"versions": [1]})),
        )
        .await;
    assert_eq!(a.status, 204, "{}", a.text);
    let a = http
        .call(
            "PUT",
            &format!("/v1/secret/destroy/{app}/db"),
            root,
            Some(json!({"versions": [1]})),
        )
        .await;
    assert_eq!(a.status, 204, "{}", a.text);
    let a = http
        .get(&format!("/v1/secret/metadata/{app}/db"), root)
        .await;
    assert_eq!(
        a.json["data"]["versions"]["1"]["destroyed"], true,
        "{}",
        a.text
    );
    let a = http
        .call(
            "POST",
            &format!("/v1/secret/undelete/{app}/db"),
            root,
            Some(json!({"versions": []})),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    // Metadata delete destroys every version.
    let a = http
        .call(
            "DELETE",
            &format!("/v1/secret/metadata/{app}/db"),
            root,
            None,
        )
        .await;
    assert_eq!(a.status, 204, "{}", a.text);
    assert_eq!(http.get(&data_path, root).await.status, 404);

    // Config and the CLIs' preflight.
    let a = http.get("/v1/secret/config", root).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(a.json["data"]["max_versions"].as_u64().unwrap() > 0);
    let a = http
        .get(&format!("/v1/sys/internal/ui/mounts/secret/{app}/db"), root)
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["data"]["path"], "secret/");
    assert_eq!(a.json["data"]["options"]["version"], "2");
    let a = http.get("/v1/sys/internal/ui/mounts/kv/x", root).await;
    assert_eq!(a.status, 404, "{}", a.text);
    let a = http.get("/v1/sys/mounts", root).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["data"]["secret/"]["type"], "kv");
    server.stop().await;
}

#[tokio::test]
async fn bad_input_is_vaults_400_naming_the_rule() {
    let server = TestServer::dev().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let root = Some(server.root_token.as_str());
    // A path that is not a valid secret path.
    for bad in ["a/../b", "a//b", "a/b%20c"] {
        let a = http
            .call(
                "POST",
                &format!("/v1/secret/data/{bad}"),
                root,
                Some(json!({"data": {"k": "v"}})),
            )
            .await;
        assert_eq!(a.status, 400, "{bad}: {}", a.text);
        assert!(!a.error().is_empty(), "{bad}: {}", a.text);
    }
    let path = format!("/v1/secret/data/{}", unique("bad"));
    // A field value that is not a string, a missing data, an unknown field.
    let a = http
        .call("POST", &path, root, Some(json!({"data": {"n": 5}})))
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(a.error().contains("\"n\" must be a string"), "{}", a.text);
    let a = http
        .call("POST", &path, root, Some(json!({"options": {}})))
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(a.error().contains("no data"), "{}", a.text);
    let a = http
        .call(
            "POST",
            &path,
            root,
            Some(json!({"data": {"k": "v"}, "extra": 1})),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    // The rule and the fields expected; the unknown name is not repeated
    // (it can be anything, of any length: see `http_attack`).
    assert!(a.error().contains("unknown field"), "{}", a.text);
    assert!(a.error().contains("`data` or `options`"), "{}", a.text);
    assert!(!a.error().contains("extra"), "{}", a.text);
    let a = http
        .send(
            "POST",
            &path,
            &[("x-vault-token", &server.root_token)],
            Some(b"{nope".to_vec()),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    // Methods and unknown operations.
    let a = http.call("PATCH", &path, root, None).await;
    assert_eq!(a.status, 405, "{}", a.text);
    let a = http.get("/v1/secret/wat/x", root).await;
    assert_eq!(a.status, 404, "{}", a.text);
    // A namespace other than root.
    let a = http
        .send(
            "GET",
            &path,
            &[
                ("x-vault-token", &server.root_token),
                ("x-vault-namespace", "team"),
            ],
            None,
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    // X-Vault-Request and the root namespace are accepted; Bearer works too.
    let auth = format!("Bearer {}", server.root_token);
    let a = http
        .send(
            "POST",
            &path,
            &[
                ("authorization", &auth),
                ("x-vault-request", "true"),
                ("x-vault-namespace", "root"),
            ],
            Some(br#"{"data":{"k":"v"}}"#.to_vec()),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    server.stop().await;
}

#[tokio::test]
async fn grpc_and_http_see_the_same_secrets_both_ways() {
    let server = TestServer::dev().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let grpc = server.root().await;
    let root = Some(server.root_token.as_str());
    let p = unique("shared");
    grpc.put(
        &p,
        &data(&[("user", "svc"), ("password", "from-grpc")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let a = http.get(&format!("/v1/secret/data/{p}"), root).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["data"]["data"]["password"], "from-grpc");
    assert_eq!(a.json["data"]["data"]["user"], "svc");
    let a = http
        .call(
            "POST",
            &format!("/v1/secret/data/{p}"),
            root,
            Some(json!({"data": {"password": "from-http"}})),
        )
        .await;
    assert_eq!(a.json["data"]["version"], 2, "{}", a.text);
    let got = grpc.get(&p).await.unwrap();
    assert_eq!(got.version, 2);
    assert_eq!(got.data["password"].expose(), b"from-http");
    // Bytes that are not UTF-8 (only gRPC can write them) come back in base64 with a warning.
    let mut raw = keyward::secrecy::SecretData::new();
    raw.insert(
        "blob".into(),
        keyward::secrecy::SecretBytes::new(vec![0xff, 0x00, 0x80]),
    );
    grpc.put(&p, &raw, PutOptions::default()).await.unwrap();
    let a = http.get(&format!("/v1/secret/data/{p}"), root).await;
    assert_eq!(a.json["data"]["data"]["blob"], "/wCA", "{}", a.text);
    assert!(
        a.json["warnings"][0].as_str().unwrap().contains("base64"),
        "{}",
        a.text
    );
    server.stop().await;
}

#[tokio::test]
async fn a_low_privileged_token_is_refused_with_403_and_audited() {
    let server = TestServer::dev().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let root = server.root().await;
    let team = unique("team");
    let policy = unique("kvread");
    put_policy(
        &server,
        &policy,
        &format!("[[rule]]\npath = \"secret/{team}/**\"\ncapabilities = [\"read\", \"list\"]\n"),
    )
    .await;
    root.put(
        &format!("{team}/ok"),
        &data(&[("k", "visible")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let other = unique("other");
    root.put(
        &format!("{other}/hidden"),
        &data(&[("k", "hidden-value")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let low = root
        .issue_token(IssueOptions {
            policies: vec![policy.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let t = Some(low.token.as_str());
    // Allowed: its own path.
    let a = http.get(&format!("/v1/secret/data/{team}/ok"), t).await;
    assert_eq!(a.status, 200, "{}", a.text);
    // Denied: another path (existing or not, the same answer), writes, sys.
    let denied_existing = http
        .get(&format!("/v1/secret/data/{other}/hidden"), t)
        .await;
    let denied_missing = http
        .get(&format!("/v1/secret/data/{other}/nothing"), t)
        .await;
    assert_eq!(denied_existing.status, 403, "{}", denied_existing.text);
    assert_eq!(denied_missing.status, 403);
    assert_eq!(
        denied_existing.text,
        denied_missing.text.replace("nothing", "hidden")
    );
    assert!(!denied_existing.text.contains("hidden-value"));
    let a = http
        .call(
            "POST",
            &format!("/v1/secret/data/{team}/ok"),
            t,
            Some(json!({"data": {"k": "x"}})),
        )
        .await;
    assert_eq!(a.status, 403, "{}", a.text);
    let a = http.call("PUT", "/v1/sys/seal", t, None).await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert!(!server.core.is_sealed());
    let a = http.get("/v1/sys/mounts", t).await;
    assert_eq!(a.status, 403, "{}", a.text);
    // A list shows only what it may see.
    let a = http.call("LIST", "/v1/secret/metadata/", t, None).await;
    assert_eq!(a.status, 403, "{}", a.text);
    let a = http
        .call("LIST", &format!("/v1/secret/metadata/{team}"), t, None)
        .await;
    assert_eq!(a.json["data"]["keys"], json!(["ok"]), "{}", a.text);
    // Confused deputy: a child token or a secret-id with more than it holds.
    let a = http
        .call(
            "POST",
            "/v1/auth/token/create",
            t,
            Some(json!({"policies": ["root"]})),
        )
        .await;
    assert_eq!(a.status, 403, "{}", a.text);
    // Bad and missing tokens: 403 as Vault answers.
    let a = http
        .get(&format!("/v1/secret/data/{team}/ok"), Some("kwt_notatoken"))
        .await;
    assert_eq!(a.status, 403, "{}", a.text);
    let a = http.get(&format!("/v1/secret/data/{team}/ok"), None).await;
    assert_eq!(a.status, 403, "{}", a.text);
    // The denial is in the audit log under the gRPC method, with the accessor.
    let lines = audit_lines(&server);
    let denied = lines.iter().find(|l| {
        l["method"] == "keyward.v1.Secrets/Get"
            && l["resource"] == format!("secret/{other}/hidden")
            && l["outcome"] == "denied"
    });
    let denied = denied.expect("the HTTP denial is audited");
    assert_eq!(denied["accessor"], low.accessor);
    assert!(denied["source"].as_str().unwrap().starts_with("127.0.0.1:"));
    let text = std::fs::read_to_string(&server.audit_path).unwrap();
    assert!(!text.contains(&low.token), "a token in the audit log");
    assert!(!text.contains("visible"), "a secret value in the audit log");
    server.stop().await;
}
