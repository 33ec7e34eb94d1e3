//! The audit trail in production (issue 16): size rotation with the chain
//! going on across files, `verify_files` naming the file that breaks it,
//! reopen on SIGHUP, the syslog sink, fail closed.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyward::audit::{rotated_files, verify_files, CONTINUE_METHOD};
use keyward::client::PutOptions;

use crate::harness::{cli, data, private_tempdir, ChildServer, TestServer};

fn chain_files(path: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = rotated_files(path).into_iter().map(|(_, p)| p).collect();
    files.push(path.to_owned());
    files
}

async fn write_some(server: &TestServer, n: usize) {
    let root = server.root().await;
    for i in 0..n {
        root.put(
            &format!("ops/audit/{i}"),
            &data(&[("v", "x")]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn rotated_files_verify_as_one_chain_and_each_break_names_its_file() {
    let server = TestServer::dev_with(|c| c.audit.max_bytes = 4096).await;
    write_some(&server, 40).await;
    let files = chain_files(&server.audit_path);
    assert!(
        files.len() >= 4,
        "a small max_bytes made {} files",
        files.len()
    );
    for file in &files {
        assert!(
            std::fs::metadata(file).unwrap().len() <= 4096,
            "{}",
            file.display()
        );
    }
    let report = verify_files(&files).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.first_seq, Some(1));
    // Each later file begins with the record that continues the chain.
    let second = std::fs::read_to_string(&files[1]).unwrap();
    let first_line = second.lines().next().unwrap();
    assert!(first_line.contains(CONTINUE_METHOD), "{first_line}");
    assert!(
        first_line.contains("\"previous_file\":\"audit.log.000001\""),
        "{first_line}"
    );
    // One file alone that begins with the continuing record verifies too.
    assert!(verify_files(&files[1..2]).unwrap().ok);
    // The CLI takes several files.
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let mut args = vec!["--format", "json", "audit", "verify"];
    args.extend(names.iter().map(String::as_str));
    let (code, stdout, stderr) = cli(&args, &[], None);
    assert_eq!(code, 0, "{stderr}");
    let out: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["ok"], true);

    let dir = private_tempdir();
    let copy = |tag: &str| -> Vec<PathBuf> {
        files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let to = dir.path().join(format!("{tag}-{i}.log"));
                std::fs::copy(f, &to).unwrap();
                to
            })
            .collect()
    };

    // A record edited in the middle file.
    let edited = copy("edited");
    let middle = &edited[1];
    let text = std::fs::read_to_string(middle).unwrap();
    let changed = text.replacen("\"outcome\":\"allowed\"", "\"outcome\":\"denied\"", 2);
    assert_ne!(changed, text);
    std::fs::write(middle, changed).unwrap();
    let report = verify_files(&edited).unwrap();
    assert!(!report.ok);
    assert_eq!(
        report.file.as_deref(),
        Some(middle.to_str().unwrap()),
        "{report:?}"
    );

    // The middle file missing.
    let mut missing = copy("missing");
    missing.remove(1);
    let report = verify_files(&missing).unwrap();
    assert!(!report.ok);
    assert_eq!(
        report.file.as_deref(),
        Some(missing[1].to_str().unwrap()),
        "{report:?}"
    );
    assert_eq!(report.line, Some(1));
    assert!(report.reason.unwrap().contains("missing"), "{report:?}");

    // Two files swapped.
    let mut swapped = copy("swapped");
    swapped.swap(1, 2);
    let report = verify_files(&swapped).unwrap();
    assert!(!report.ok);
    assert_eq!(
        report.file.as_deref(),
        Some(swapped[1].to_str().unwrap()),
        "{report:?}"
    );
    // And through the CLI: exit 1, naming the file.
    let names: Vec<String> = swapped.iter().map(|f| f.display().to_string()).collect();
    let mut args = vec!["audit", "verify"];
    args.extend(names.iter().map(String::as_str));
    let (code, _, stderr) = cli(&args, &[], None);
    assert_eq!(code, 1);
    assert!(stderr.contains(swapped[1].to_str().unwrap()), "{stderr}");
}

#[tokio::test]
async fn max_files_keeps_that_many_rotated_files() {
    let server = TestServer::dev_with(|c| {
        c.audit.max_bytes = 2048;
        c.audit.max_files = 2;
    })
    .await;
    write_some(&server, 40).await;
    let rotated = rotated_files(&server.audit_path);
    assert_eq!(rotated.len(), 2, "{rotated:?}");
    // What is kept still verifies as one chain (it begins with a continuing record).
    assert!(verify_files(&chain_files(&server.audit_path)).unwrap().ok);
}

#[tokio::test]
async fn a_rotation_that_cannot_make_its_file_fails_the_request_and_drops_nothing() {
    let server = TestServer::dev_with(|c| c.audit.max_bytes = 4096).await;
    let root = server.root().await;
    // The next file is made at `audit.log.new`: a folder there stops it.
    let blocker = server.dir.path().join("audit.log.new");
    std::fs::create_dir(&blocker).unwrap();
    let mut failed = Vec::new();
    let mut done = Vec::new();
    for i in 0..40 {
        let put = root
            .put(
                &format!("ops/blocked/{i}"),
                &data(&[("v", "x")]),
                PutOptions::default(),
            )
            .await;
        if put.is_err() {
            failed.push(i);
        } else {
            done.push(i);
        }
    }
    assert!(!failed.is_empty(), "no write needed a rotation");
    assert!(rotated_files(&server.audit_path).is_empty());
    std::fs::remove_dir(&blocker).unwrap();
    write_some(&server, 10).await;
    let log: String = chain_files(&server.audit_path)
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let put_requests = lines
        .iter()
        .filter(|r| r["method"] == "keyward.v1.Secrets/Put" && r["phase"] == "request")
        .count();
    // Nothing dropped: every acknowledged write has its outcome record,
    // and its request record under the same request id.
    for i in &done {
        let resource = format!("secret/ops/blocked/{i}");
        let outcome = lines
            .iter()
            .find(|r| r["resource"] == resource.as_str() && r["phase"] == "outcome")
            .unwrap_or_else(|| panic!("{resource}: no outcome record"));
        assert!(lines
            .iter()
            .any(|r| r["request_id"] == outcome["request_id"] && r["phase"] == "request"));
    }
    // Fail closed: a refused write acted only if its request record was
    // written (it was its outcome record that could not be).
    let mut acted = 0;
    for i in failed {
        match root.get(&format!("ops/blocked/{i}")).await {
            Ok(_) => acted += 1,
            Err(e) => assert_eq!(e.code(), Some(tonic::Code::NotFound)),
        }
    }
    assert!(
        put_requests >= done.len() + 10 + acted,
        "a write acted without its request record"
    );
    assert!(!rotated_files(&server.audit_path).is_empty());
    assert!(verify_files(&chain_files(&server.audit_path)).unwrap().ok);
}

#[tokio::test]
async fn reopen_after_a_move_begins_a_new_file_that_continues_the_chain() {
    let server = TestServer::dev().await;
    write_some(&server, 3).await;
    let moved = server.dir.path().join("audit.log.moved");
    std::fs::rename(&server.audit_path, &moved).unwrap();
    // Until reopened, records go on into the moved file.
    write_some(&server, 1).await;
    assert!(!server.audit_path.exists());
    // The path the SIGHUP handler takes.
    server.core.audit.reopen().unwrap();
    write_some(&server, 2).await;
    let text = std::fs::read_to_string(&server.audit_path).unwrap();
    assert!(text
        .lines()
        .next()
        .unwrap()
        .contains("\"reason\":\"reopen\""));
    assert!(
        verify_files(&[moved.clone(), server.audit_path.clone()])
            .unwrap()
            .ok
    );
    // A second reopen with the file in place changes nothing.
    server.core.audit.reopen().unwrap();
    write_some(&server, 1).await;
    assert!(
        verify_files(&[moved, server.audit_path.clone()])
            .unwrap()
            .ok
    );
}

#[tokio::test]
async fn sighup_to_the_server_process_reopens_the_audit_file() {
    let dir = private_tempdir();
    let log = dir.path().join("server.log");
    let data_dir = dir.path().join("dev");
    let server = ChildServer::start(&data_dir, &log);
    let client = server.client().await;
    client
        .put("ops/hup/1", &data(&[("v", "x")]), PutOptions::default())
        .await
        .unwrap();
    let audit = data_dir.join("audit.log");
    let moved = data_dir.join("audit.log.1");
    std::fs::rename(&audit, &moved).unwrap();
    server.signal("HUP");
    crate::harness::eventually("the server made a new audit file", || async {
        audit.exists()
    })
    .await;
    client
        .put("ops/hup/2", &data(&[("v", "x")]), PutOptions::default())
        .await
        .unwrap();
    let report = verify_files(&[moved, audit.clone()]).unwrap();
    assert!(report.ok, "{report:?}");
    assert!(std::fs::read_to_string(&audit)
        .unwrap()
        .contains("ops/hup/2"));
}

#[tokio::test]
async fn the_syslog_sink_gets_every_record_and_a_closed_socket_fails_the_request() {
    let dir = private_tempdir();
    let socket_path = dir.path().join("log.sock");
    let receiver = UnixDatagram::bind(&socket_path).unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let path = socket_path.clone();
    let server = TestServer::dev_with(move |c| c.audit.syslog = Some(path)).await;
    let root = server.root().await;
    root.put("ops/syslog", &data(&[("v", "x")]), PutOptions::default())
        .await
        .unwrap();
    // Every record in the file went to syslog too, in order.
    let file = std::fs::read_to_string(&server.audit_path).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    for line in file.lines() {
        let n = receiver.recv(&mut buf).unwrap();
        let datagram = std::str::from_utf8(&buf[..n]).unwrap();
        assert_eq!(datagram, format!("<86>keyward: {line}"));
    }
    assert!(file.contains("ops/syslog"));

    // The socket goes away: requests fail (fail closed).
    drop(receiver);
    std::fs::remove_file(&socket_path).unwrap();
    let refused = root
        .put("ops/syslog-2", &data(&[("v", "y")]), PutOptions::default())
        .await;
    assert!(
        refused.is_err(),
        "a request succeeded with its syslog sink gone"
    );
    // A syslog daemon back on the socket: the sink reconnects, and the
    // refused change did not happen.
    let receiver = UnixDatagram::bind(&socket_path).unwrap();
    let got = root.get("ops/syslog-2").await;
    assert_eq!(
        got.err().and_then(|e| e.code()),
        Some(tonic::Code::NotFound)
    );
    receiver
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let n = receiver.recv(&mut buf).unwrap();
    assert!(std::str::from_utf8(&buf[..n])
        .unwrap()
        .contains("ops/syslog-2"));
}
