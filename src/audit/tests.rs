use std::fs;
use std::sync::Arc;

use chrono::TimeZone;

use super::*;

const TOKEN: &[u8] = b"kwt_s3cr3t-token-value-0123456789";
const PASSWORD: &[u8] = b"hunter2-very-secret-password";
const API_KEY: &[u8] = b"ak_live_another-secret";

fn key(byte: u8) -> Option<Zeroizing<[u8; 32]>> {
    Some(Zeroizing::new([byte; 32]))
}

fn event<'a>(request_id: &'a str, values: &'a [(&'a str, &'a [u8])]) -> AuditEvent<'a> {
    AuditEvent {
        request_id,
        method: "keyward.v1.Secrets/Get",
        resource: Some("secret/app/db"),
        identity: Some("svc-billing"),
        accessor: Some("acc-1234"),
        actor: None,
        source: Some("127.0.0.1:50123"),
        outcome: Outcome::Allowed,
        code: "OK",
        error: None,
        token: Some(TOKEN),
        values,
        call: None,
    }
}

/// A log at `dir/audit.log` with records 1..=n, written under key 7.
fn log_with(dir: &Path, n: u64) -> (PathBuf, AuditLog) {
    let path = dir.join("audit.log");
    let log = AuditLog::open(&path, Clock::system()).unwrap();
    log.set_hmac_key(key(7));
    for i in 1..=n {
        let id = format!("req-{i}");
        let values: [(&str, &[u8]); 2] = [("password", PASSWORD), ("api_key", API_KEY)];
        log.append(&event(&id, &values)).unwrap();
    }
    (path, log)
}

fn read_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    fs::write(path, text).unwrap();
}

fn assert_bad(path: &Path, records: u64, first_bad: u64) -> VerifyReport {
    let report = verify_file(path).unwrap();
    assert!(!report.ok, "{report:?}");
    assert_eq!(report.first_bad, Some(first_bad), "{report:?}");
    assert_eq!(report.records, records, "{report:?}");
    report
}

#[test]
fn append_then_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = log_with(dir.path(), 5);
    let report = verify_file(&path).unwrap();
    assert_eq!(
        report,
        VerifyReport {
            records: 5,
            ok: true,
            first_bad: None,
            unanswered: Vec::new(),
            in_flight_at_end: Vec::new(),
            reason: None
        }
    );
    assert_eq!(
        serde_json::to_value(&report).unwrap(),
        serde_json::json!({"records": 5, "ok": true, "first_bad": null,
            "unanswered": [], "in_flight_at_end": []})
    );
    let lines = read_lines(&path);
    let last: serde_json::Value = serde_json::from_str(&lines[4]).unwrap();
    assert_eq!(last["hash"], log.head());
    assert_eq!(last["seq"], 5);
}

#[test]
fn record_shape() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = log_with(dir.path(), 1);
    log.append(&AuditEvent {
        request_id: "req-2",
        method: "keyward.v1.Sys/Status",
        resource: None,
        identity: None,
        accessor: Some(""),
        actor: None,
        source: None,
        outcome: Outcome::Denied,
        code: "UNAUTHENTICATED",
        error: Some("no token"),
        token: None,
        values: &[],
        call: None,
    })
    .unwrap();
    let lines = read_lines(&path);
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["seq"], 1);
    assert_eq!(first["prev"], GENESIS);
    assert_eq!(first["outcome"], "allowed");
    assert_eq!(first["method"], "keyward.v1.Secrets/Get");
    assert_eq!(first["resource"], "secret/app/db");
    let expected_token = log.hmac(TOKEN).unwrap();
    assert_eq!(first["token"], expected_token.as_str());
    assert_eq!(
        first["data"]["password"],
        log.hmac(PASSWORD).unwrap().as_str()
    );
    let time = first["time"].as_str().unwrap();
    assert_eq!(time.len(), "2025-01-02T03:04:05.678Z".len(), "{time}");
    assert!(time.ends_with('Z'));
    chrono::DateTime::parse_from_rfc3339(time).unwrap();
    assert!(
        lines[0].starts_with("{\"seq\":1,\"time\":\""),
        "{}",
        lines[0]
    );

    // Optional fields that are None or empty are left out.
    let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    let keys: Vec<&str> = second
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = vec![
        "seq",
        "time",
        "request_id",
        "method",
        "outcome",
        "code",
        "error",
        "prev",
        "hash",
    ];
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    expected.sort_unstable();
    assert_eq!(sorted, expected);
    assert_eq!(second["outcome"], "denied");
    assert_eq!(second["prev"], first["hash"]);
}

#[test]
fn canonical_hash_is_sha256_of_prev_and_body() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _log) = log_with(dir.path(), 2);
    let lines = read_lines(&path);
    let mut prev = [0u8; 32];
    for line in &lines {
        let cut = line.rfind(",\"hash\":\"").unwrap();
        let (body, rest) = line.split_at(cut);
        let mut input = prev.to_vec();
        input.extend_from_slice(body.as_bytes());
        let digest = digest::digest(&digest::SHA256, &input);
        let expected = hex::encode(digest.as_ref());
        assert_eq!(rest, format!(",\"hash\":\"{expected}\"}}"));
        prev.copy_from_slice(digest.as_ref());
    }
}

#[test]
fn resume_continues_seq_and_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = log_with(dir.path(), 3);
    let head = log.head();
    drop(log);

    let log = AuditLog::open(&path, Clock::system()).unwrap();
    assert_eq!(log.head(), head);
    log.set_hmac_key(key(7));
    // A last record longer than one tail chunk.
    let long_error = "x".repeat(3 * TAIL_CHUNK as usize);
    log.append(&AuditEvent {
        error: Some(&long_error),
        ..event("req-4", &[])
    })
    .unwrap();
    let head = log.head();
    drop(log);

    let log = AuditLog::open(&path, Clock::system()).unwrap();
    assert_eq!(log.head(), head);
    log.append(&event("req-5", &[])).unwrap();

    let report = verify_file(&path).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, 5);
    let seqs: Vec<u64> = read_lines(&path)
        .iter()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
}

#[test]
fn new_file_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _log) = log_with(dir.path(), 0);
    let mode = fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(verify_file(&path).unwrap().records, 0);
    assert!(verify_file(&path).unwrap().ok);
}

#[test]
fn edited_record_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _log) = log_with(dir.path(), 5);
    let mut lines = read_lines(&path);
    assert!(lines[2].contains("\"code\":\"OK\""));
    lines[2] = lines[2].replace("\"code\":\"OK\"", "\"code\":\"NOT_FOUND\"");
    write_lines(&path, &lines);
    let report = assert_bad(&path, 5, 3);
    assert_eq!(report.reason, Some("hash does not match the record"));
}

#[test]
fn edited_and_rehashed_record_breaks_the_next_link() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _log) = log_with(dir.path(), 5);
    let mut lines = read_lines(&path);
    // Edit record 3 and give it a correct hash of its own: record 4 no longer links.
    let cut = lines[2].rfind(",\"hash\":\"").unwrap();
    let body = lines[2][..cut].replace("req-3", "req-X");
    let prev: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    let prev = decode_hash(prev["hash"].as_str().unwrap().as_bytes()).unwrap();
    let hash = hex::encode(chain_hash(&prev, body.as_bytes()));
    lines[2] = format!("{body},\"hash\":\"{hash}\"}}");
    write_lines(&path, &lines);
    let report = assert_bad(&path, 5, 4);
    assert_eq!(
        report.reason,
        Some("prev is not the hash of the previous record")
    );
}

#[test]
fn deleted_record_is_reported_by_its_seq() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _log) = log_with(dir.path(), 5);
    let mut lines = read_lines(&path);
    lines.remove(1);
    write_lines(&path, &lines);
    // The line in its place holds seq 3; the missing record is 2.
    assert_bad(&path, 4, 2);
}

#[test]
fn deleted_last_record_is_not_detectable_without_the_head() {
    // Documented limit: the chain alone cannot tell a cut tail; the head can.
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = log_with(dir.path(), 3);
    let mut lines = read_lines(&path);
    lines.pop();
    write_lines(&path, &lines);
    assert!(verify_file(&path).unwrap().ok);
    let last: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_ne!(last["hash"], log.head());
}

#[test]
fn swapped_records_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _log) = log_with(dir.path(), 5);
    let mut lines = read_lines(&path);
    lines.swap(1, 2);
    write_lines(&path, &lines);
    assert_bad(&path, 5, 2);
}

#[test]
fn inserted_record_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _log) = log_with(dir.path(), 5);
    let mut lines = read_lines(&path);
    let copy = lines[1].clone();
    lines.insert(2, copy);
    write_lines(&path, &lines);
    assert_bad(&path, 6, 3);
}

#[test]
fn blank_line_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _log) = log_with(dir.path(), 3);
    let mut lines = read_lines(&path);
    lines.insert(1, String::new());
    write_lines(&path, &lines);
    let report = assert_bad(&path, 4, 2);
    assert_eq!(report.reason, Some("empty line"));
}

#[test]
fn truncated_tail_is_found_and_refused_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = log_with(dir.path(), 5);
    drop(log);
    let bytes = fs::read(&path).unwrap();

    // Only the newline is missing.
    fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    let report = assert_bad(&path, 5, 5);
    assert_eq!(
        report.reason,
        Some("truncated record (no newline at the end)")
    );
    assert!(matches!(
        AuditLog::open(&path, Clock::system()),
        Err(AuditError::Corrupt { .. })
    ));

    // Half of the last record is missing.
    fs::write(&path, &bytes[..bytes.len() - 40]).unwrap();
    assert_bad(&path, 5, 5);
    assert!(matches!(
        AuditLog::open(&path, Clock::system()),
        Err(AuditError::Corrupt { .. })
    ));

    // A complete last line that does not check out is refused too.
    let mut lines = read_lines(&path);
    lines.pop();
    lines[3] = lines[3].replace("req-4", "req-Y");
    write_lines(&path, &lines);
    assert!(matches!(
        AuditLog::open(&path, Clock::system()),
        Err(AuditError::Corrupt { .. })
    ));
}

#[test]
fn secrets_never_appear_raw() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = log_with(dir.path(), 2);
    // Sealed: no key, the values are marked unavailable.
    log.set_hmac_key(None);
    let values: [(&str, &[u8]); 1] = [("password", PASSWORD)];
    log.append(&event("req-sealed", &values)).unwrap();

    let bytes = fs::read(&path).unwrap();
    let text = String::from_utf8(bytes.clone()).unwrap();
    for secret in [TOKEN, PASSWORD, API_KEY] {
        assert!(
            !bytes.windows(secret.len()).any(|window| window == secret),
            "raw secret in the log"
        );
        assert!(!text.contains(&hex::encode(secret)));
    }
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["token"], UNAVAILABLE);
    assert_eq!(last["data"]["password"], UNAVAILABLE);
    assert!(verify_file(&path).unwrap().ok);

    let shown = format!("{:?}", event("req-debug", &values));
    assert!(
        !shown.contains("hunter2") && !shown.contains("kwt_"),
        "{shown}"
    );
}

#[test]
fn hmac_is_deterministic_and_keyed() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(&dir.path().join("audit.log"), Clock::system()).unwrap();
    assert!(matches!(log.hmac(PASSWORD), Err(AuditError::NoKey)));

    log.set_hmac_key(key(1));
    let first = log.hmac(PASSWORD).unwrap();
    assert_eq!(first, log.hmac(PASSWORD).unwrap());
    assert!(first.starts_with("hmac-sha256:"));
    assert_eq!(first.len(), "hmac-sha256:".len() + 64);
    assert_ne!(first, log.hmac(API_KEY).unwrap());

    log.set_hmac_key(key(2));
    assert_ne!(first, log.hmac(PASSWORD).unwrap());

    log.set_hmac_key(None);
    assert!(matches!(log.hmac(PASSWORD), Err(AuditError::NoKey)));
}

#[test]
fn failed_write_fails_the_append_and_keeps_the_chain() {
    let path = Path::new("/dev/full");
    if !path.exists() {
        return;
    }
    let log = AuditLog::open(path, Clock::system()).unwrap();
    log.set_hmac_key(key(7));
    let error = log.append(&event("req-1", &[])).unwrap_err();
    assert!(matches!(error, AuditError::Write(_)), "{error}");
    assert_eq!(log.head(), GENESIS);
    // The partial write cannot be cut off a device: the log stays closed.
    assert!(log.append(&event("req-2", &[])).is_err());
    assert_eq!(log.head(), GENESIS);
}

#[test]
fn open_fails_in_a_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gone").join("audit.log");
    assert!(matches!(
        AuditLog::open(&path, Clock::system()),
        Err(AuditError::Io { .. })
    ));
}

#[test]
fn hostile_strings_stay_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = log_with(dir.path(), 1);
    let nasty = "a\"b\\c\nd\r\t\u{0}\u{1f}\u{7f}é\u{2028},\"hash\":\"00\"}\n{\"seq\":9";
    log.append(&AuditEvent {
        request_id: nasty,
        error: Some(nasty),
        ..event("unused", &[(nasty, PASSWORD)])
    })
    .unwrap();
    let lines = read_lines(&path);
    assert_eq!(lines.len(), 2);
    let record: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(record["request_id"], nasty);
    assert_eq!(record["error"], nasty);
    assert!(record["data"][nasty].is_string());
    assert!(verify_file(&path).unwrap().ok);
}

#[test]
fn concurrent_appends_make_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = log_with(dir.path(), 0);
    let log = Arc::new(log);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for i in 0..50 {
                    let id = format!("t{t}-{i}");
                    log.append(&event(&id, &[("password", PASSWORD)])).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let report = verify_file(&path).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, 200);
}

#[test]
fn time_format() {
    let time =
        Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).unwrap() + chrono::Duration::milliseconds(678);
    let mut buf = Vec::new();
    push_time(&mut buf, time);
    assert_eq!(buf, b"2025-01-02T03:04:05.678Z");
    let mut buf = Vec::new();
    push_time(
        &mut buf,
        Utc.with_ymd_and_hms(987, 11, 30, 23, 59, 9).unwrap(),
    );
    assert_eq!(buf, b"0987-11-30T23:59:09.000Z");
    let mut buf = Vec::new();
    for n in [0, 7, 10, 12345, u64::MAX] {
        buf.clear();
        push_u64(&mut buf, n);
        assert_eq!(buf, n.to_string().as_bytes());
    }
}

/// `cargo test --release --lib audit::tests::append_speed -- --ignored --nocapture`
#[test]
#[ignore = "timing, run by hand"]
fn append_speed() {
    let dir = tempfile::tempdir().unwrap();
    let (_path, log) = log_with(dir.path(), 0);
    let n = 100_000u32;
    let start = std::time::Instant::now();
    for i in 0..n {
        let id = format!("req-{i}");
        log.append(&event(&id, &[("password", PASSWORD)])).unwrap();
    }
    println!("append: {:?} per record", start.elapsed() / n);
}

/// Polls a future once, with a waker that does nothing.
fn poll_once<F: std::future::Future + Unpin>(future: &mut F) -> std::task::Poll<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    std::pin::Pin::new(future).poll(&mut cx)
}

#[test]
fn time_comes_from_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    // 2025-01-02T03:04:05.678Z
    let log = AuditLog::open(&path, Clock::starting_at(1_735_787_045_678)).unwrap();
    log.append(&event("req-1", &[])).unwrap();
    let record: serde_json::Value = serde_json::from_str(&read_lines(&path)[0]).unwrap();
    let time = record["time"].as_str().unwrap();
    assert!(time.starts_with("2025-01-02T03:04:0"), "{time}");
    assert_eq!(time.len(), "2025-01-02T03:04:05.678Z".len());
}

#[test]
fn records_queued_while_the_chain_is_busy_go_out_in_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = log_with(dir.path(), 1);
    let ids: Vec<String> = (0..8).map(|i| format!("queued-{i}")).collect();
    let events: Vec<AuditEvent<'_>> = ids.iter().map(|id| event(id, &[])).collect();
    let len_before = fs::metadata(&path).unwrap().len();
    let mut waiting: Vec<_> = {
        // Another caller is writing: every record queues and waits.
        let busy = log.lock_chain();
        let mut waiting: Vec<_> = events
            .iter()
            .map(|e| Box::pin(log.append_async(e)))
            .collect();
        for future in &mut waiting {
            assert!(poll_once(future).is_pending());
        }
        assert_eq!(log.lock_queue().len(), 8);
        drop(busy);
        waiting
    };
    // Whoever takes the chain next writes them all; here a sync append.
    log.append(&event("sync", &[])).unwrap();
    assert!(log.lock_queue().is_empty());
    for future in &mut waiting {
        assert!(matches!(poll_once(future), std::task::Poll::Ready(Ok(()))));
    }
    let lines = read_lines(&path);
    assert_eq!(lines.len(), 10);
    // In queue order, then the sync caller's record, all in one write.
    for (i, line) in lines[1..9].iter().enumerate() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(record["request_id"], format!("queued-{i}"));
        assert_eq!(record["seq"], i as u64 + 2);
    }
    assert!(lines[9].contains("\"request_id\":\"sync\""));
    assert!(fs::metadata(&path).unwrap().len() > len_before);
    assert!(verify_file(&path).unwrap().ok);
}

#[test]
fn a_dropped_caller_still_has_its_record_written() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = log_with(dir.path(), 0);
    {
        let busy = log.lock_chain();
        let ev = event("gave-up", &[]);
        let mut future = Box::pin(log.append_async(&ev));
        assert!(poll_once(&mut future).is_pending());
        drop(future);
        drop(busy);
    }
    log.append(&event("next", &[])).unwrap();
    let lines = read_lines(&path);
    assert_eq!(lines.len(), 2);
    assert!(lines[0].contains("\"request_id\":\"gave-up\""));
    // With the chain free, a caller dropped while it yields writes its record at once.
    let ev = event("gave-up-too", &[]);
    let mut future = Box::pin(log.append_async(&ev));
    assert!(poll_once(&mut future).is_pending());
    drop(future);
    let lines = read_lines(&path);
    assert_eq!(lines.len(), 3);
    assert!(lines[2].contains("\"request_id\":\"gave-up-too\""));
    assert!(verify_file(&path).unwrap().ok);
}

#[test]
fn a_failed_batch_fails_every_waiting_caller() {
    let path = Path::new("/dev/full");
    if !path.exists() {
        return;
    }
    let log = AuditLog::open(path, Clock::system()).unwrap();
    log.set_hmac_key(key(7));
    let ids: Vec<String> = (0..5).map(|i| format!("req-{i}")).collect();
    let events: Vec<AuditEvent<'_>> = ids.iter().map(|id| event(id, &[])).collect();
    let busy = log.lock_chain();
    let mut waiting: Vec<_> = events
        .iter()
        .map(|e| Box::pin(log.append_async(e)))
        .collect();
    for future in &mut waiting {
        assert!(poll_once(future).is_pending());
    }
    drop(busy);
    log.drain();
    for future in &mut waiting {
        match poll_once(future) {
            std::task::Poll::Ready(Err(AuditError::Write(_))) => {}
            other => panic!("expected a write error, got {:?}", other.map(|r| r.is_ok())),
        }
    }
    assert_eq!(log.head(), GENESIS);
    // The partial write cannot be cut off a device: later callers fail too.
    let ev = event("after", &[]);
    let mut future = Box::pin(log.append_async(&ev));
    // Queued, then (after its one yield) written by itself.
    assert!(poll_once(&mut future).is_pending());
    assert!(matches!(
        poll_once(&mut future),
        std::task::Poll::Ready(Err(AuditError::Broken))
    ));
}

#[test]
fn concurrent_async_and_sync_appends_make_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = log_with(dir.path(), 0);
    let log = Arc::new(log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for i in 0..50 {
                    let id = format!("sync-{t}-{i}");
                    log.append(&event(&id, &[("password", PASSWORD)])).unwrap();
                }
            })
        })
        .collect();
    runtime.block_on(async {
        let tasks: Vec<_> = (0..16)
            .map(|t| {
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    for i in 0..50 {
                        let id = format!("async-{t}-{i}");
                        let values: [(&str, &[u8]); 1] = [("password", PASSWORD)];
                        log.append_async(&event(&id, &values)).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    for thread in threads {
        thread.join().unwrap();
    }
    let report = verify_file(&path).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, 16 * 50 + 2 * 50);
    let ids: std::collections::HashSet<String> = read_lines(&path)
        .iter()
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            record["request_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 900);
}

/// An event of a caller with no identity from `source`.
fn anonymous<'a>(request_id: &'a str, method: &'a str, source: &'a str) -> AuditEvent<'a> {
    AuditEvent {
        request_id,
        method,
        resource: None,
        identity: None,
        accessor: None,
        actor: None,
        source: Some(source),
        outcome: Outcome::Denied,
        code: "UNAUTHENTICATED",
        error: Some("invalid token"),
        token: Some(TOKEN),
        values: &[],
        call: None,
    }
}

fn parsed(path: &Path) -> Vec<serde_json::Value> {
    read_lines(path)
        .iter()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// Records written one by one plus the counts of aggregate records.
fn calls_recorded(records: &[serde_json::Value], method: &str) -> u64 {
    records
        .iter()
        .filter(|r| r["method"] == method)
        .map(|r| r["count"].as_u64().unwrap_or(1))
        .sum()
}

#[tokio::test(start_paused = true)]
async fn repeats_of_unauthenticated_calls_are_counted_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, Clock::starting_at(1_735_787_045_678)).unwrap();
    log.set_hmac_key(key(7));
    let get = "keyward.v1.Secrets/Get";
    // Each call on a new connection: the port differs, the address does not.
    for i in 0..1000u32 {
        let id = format!("bad-{i}");
        let source = format!("10.0.0.1:{}", 20000 + i);
        log.append_unauthenticated(&anonymous(&id, get, &source))
            .unwrap();
    }
    let first = AGGREGATE_AFTER as usize;
    assert_eq!(
        read_lines(&path).len(),
        first,
        "only the first are written at once"
    );
    // The window ends: the next call writes the aggregate, then itself.
    tokio::time::advance(std::time::Duration::from_millis(AGGREGATE_WINDOW_MS)).await;
    log.append_unauthenticated(&anonymous("bad-x", get, "10.0.0.1:1"))
        .unwrap();
    let records = parsed(&path);
    assert_eq!(records.len(), first + 2);
    let aggregate = &records[first];
    assert_eq!(aggregate["aggregate"], true);
    assert_eq!(aggregate["count"], 1000 - first as u64);
    assert_eq!(aggregate["source"], "10.0.0.1");
    assert_eq!(aggregate["code"], "UNAUTHENTICATED");
    assert_eq!(aggregate["outcome"], "denied");
    assert!(
        aggregate["window_start"].as_str().unwrap() <= aggregate["window_end"].as_str().unwrap()
    );
    assert!(records[first + 1].get("aggregate").is_none());
    // Another source is written on its own; the rest goes out at sync (shutdown).
    log.append_unauthenticated(&anonymous("other", get, "10.0.0.2:1"))
        .unwrap();
    for i in 0..30 {
        let id = format!("again-{i}");
        log.append_unauthenticated(&anonymous(&id, get, "10.0.0.1:2"))
            .unwrap();
    }
    log.sync().unwrap();
    let records = parsed(&path);
    assert_eq!(calls_recorded(&records, get), 1000 + 1 + 1 + 30);
    assert!(verify_file(&path).unwrap().ok);
    assert!(!fs::read_to_string(&path).unwrap().contains("s3cr3t"));
}

#[tokio::test(start_paused = true)]
async fn a_full_table_is_written_out_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, Clock::system()).unwrap();
    let status = "keyward.v1.Sys/Status";
    let sources = MAX_AGGREGATES + 10;
    for round in 0..2 + AGGREGATE_AFTER as usize {
        for s in 0..sources {
            let id = format!("r{round}-{s}");
            let source = format!("10.{}.{}.{}:1", s >> 16, (s >> 8) & 0xff, s & 0xff);
            log.append_unauthenticated(&anonymous(&id, status, &source))
                .unwrap();
        }
    }
    assert!(log.lock_aggregates().tallies.len() <= MAX_AGGREGATES);
    log.flush_aggregates().unwrap();
    assert!(log.lock_aggregates().tallies.is_empty());
    let records = parsed(&path);
    assert_eq!(
        calls_recorded(&records, status),
        (2 + AGGREGATE_AFTER as u64) * sources as u64
    );
    assert!(verify_file(&path).unwrap().ok);
}

#[test]
fn counts_survive_a_failed_flush() {
    let log = AuditLog::open(Path::new("/dev/full"), Clock::system()).unwrap();
    let get = "keyward.v1.Secrets/Get";
    let tally = Tally {
        window_start_ms: 1,
        written: AGGREGATE_AFTER,
        last_ms: 2,
        count: 5,
    };
    let key = AggregateKey {
        source: "10.0.0.1".into(),
        method: get.into(),
        outcome: Outcome::Denied,
        code: "UNAUTHENTICATED".into(),
    };
    log.lock_aggregates().tallies.insert(key.clone(), tally);
    assert!(log.flush_aggregates().is_err());
    assert_eq!(log.lock_aggregates().tallies[&key].count, 5);
}

fn change(log: &AuditLog, request_id: &str, phase: Phase) {
    log.append_phase(&event(request_id, &[]), Some(phase))
        .unwrap();
}

#[test]
fn verify_names_requests_without_an_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = log_with(dir.path(), 1);
    change(&log, "lost", Phase::Request);
    change(&log, "done", Phase::Request);
    change(&log, "done", Phase::Outcome);
    change(&log, "slow", Phase::Request);
    log.append(&event("read", &[])).unwrap();
    change(&log, "cut", Phase::Request);
    let report = verify_file(&path).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, 7);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(
        json["unanswered"],
        serde_json::json!([{"seq": 2, "request_id": "lost"}])
    );
    assert_eq!(
        json["in_flight_at_end"],
        serde_json::json!([{"seq": 5, "request_id": "slow"}, {"seq": 7, "request_id": "cut"}])
    );
    let lines = read_lines(&path);
    assert!(lines[1].contains(",\"phase\":\"request\""));
    assert!(lines[3].contains(",\"phase\":\"outcome\""));
    assert!(!lines[5].contains("phase"));
}

/// A note's own field may not take the name of a field every record has:
/// a record with a name twice does not verify (an anomaly response once
/// wrote `outcome` twice).
#[test]
fn a_note_with_a_reserved_field_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = log_with(dir.path(), 1);
    for name in ["outcome", "request_id", "hash", "call"] {
        let refused = log.append_note("keyward.anomaly/Respond", "identity/x", &[(name, "v")]);
        assert!(
            matches!(&refused, Err(AuditError::ReservedField(n)) if n == name),
            "{name}: {refused:?}"
        );
    }
    log.append_note(
        "keyward.anomaly/Respond",
        "identity/x",
        &[
            ("response", "revoke-token"),
            ("response_outcome", "revoked 1 token(s)"),
        ],
    )
    .unwrap();
    assert_eq!(read_lines(&path).len(), 2);
    let report = verify_file(&path).unwrap();
    assert!(report.ok, "{report:?}");
}

/// After other calls reused its request id: `verify` lists the request at
/// seq 1 (`victim`'s) as unanswered, and its own outcome then answers it.
fn only_the_first_request_is_open_until_its_own_outcome(
    log: &AuditLog,
    path: &Path,
    victim: &AuditEvent<'_>,
) {
    let report = verify_file(path).unwrap();
    assert!(report.ok, "{report:?}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(
        json["unanswered"],
        serde_json::json!([{"seq": 1, "request_id": victim.request_id}])
    );
    log.append_phase(victim, Some(Phase::Outcome)).unwrap();
    let report = verify_file(path).unwrap();
    assert_eq!(report.unanswered, Vec::new());
    assert_eq!(report.in_flight_at_end, Vec::new());
}

/// Every field a record of a call can have is reserved for notes: a record
/// with every optional field set has no key outside [`RESERVED`].
#[test]
fn every_field_of_a_record_is_reserved_for_notes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = log_with(dir.path(), 0);
    log.set_node_id("node-1");
    let values: [(&str, &[u8]); 1] = [("password", PASSWORD)];
    let full = AuditEvent {
        actor: Some(AuditActor {
            identity: "agent",
            accessor: "acc-agent",
            subject_accessor: "acc-subject",
        }),
        error: Some("refused"),
        call: Some("k1-1"),
        ..event("full", &values)
    };
    log.append_phase(&full, Some(Phase::Outcome)).unwrap();
    let record: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&read_lines(&path)[0]).unwrap();
    for key in record.keys() {
        assert!(RESERVED.contains(&key.as_str()), "{key} is not reserved");
    }
    assert_eq!(record.len(), RESERVED.len(), "{:?}", record.keys());
}

/// A request id is the client's: another call reusing it (here after the
/// first change was cut short), even from the same address, must not answer
/// the first one's request. Records pair on the server's `call` id.
#[test]
fn a_request_id_reused_by_another_call_does_not_answer_its_request() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = log_with(dir.path(), 0);
    let victim = AuditEvent {
        call: Some("k1-1"),
        ..event("ci-build-42", &[])
    };
    let other = AuditEvent {
        call: Some("k1-2"),
        ..event("ci-build-42", &[])
    };
    log.append_phase(&victim, Some(Phase::Request)).unwrap();
    log.append_phase(&other, Some(Phase::Request)).unwrap();
    log.append_phase(&other, Some(Phase::Outcome)).unwrap();
    // A read has no phase, and so no call id.
    log.append(&victim).unwrap();
    let lines = read_lines(&path);
    assert!(lines[0].contains(",\"phase\":\"request\",\"call\":\"k1-1\""));
    assert!(!lines[3].contains("\"call\""));
    only_the_first_request_is_open_until_its_own_outcome(&log, &path, &victim);
}

/// Records written before the call id (0.6.14) pair on the request id, the
/// method and the connection: a reuse from another connection or for
/// another method does not answer the first request.
#[test]
fn a_request_id_reused_by_another_caller_does_not_answer_its_request() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = log_with(dir.path(), 0);
    let victim = event("ci-build-42", &[]);
    let other_connection = AuditEvent {
        source: Some("127.0.0.1:50999"),
        ..event("ci-build-42", &[])
    };
    let other_method = AuditEvent {
        method: "keyward.v1.Secrets/Delete",
        ..event("ci-build-42", &[])
    };
    log.append_phase(&victim, Some(Phase::Request)).unwrap();
    for other in [&other_connection, &other_method] {
        log.append_phase(other, Some(Phase::Request)).unwrap();
        log.append_phase(other, Some(Phase::Outcome)).unwrap();
    }
    only_the_first_request_is_open_until_its_own_outcome(&log, &path, &victim);
}

#[tokio::test(start_paused = true)]
async fn an_ended_window_is_written_by_the_next_append_of_any_kind() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = log_with(dir.path(), 0);
    let get = "keyward.v1.Secrets/Get";
    let calls = AGGREGATE_AFTER as u64 + 5;
    for i in 0..calls {
        let id = format!("bad-{i}");
        log.append_unauthenticated(&anonymous(&id, get, "10.0.0.9:1"))
            .unwrap();
    }
    tokio::time::advance(std::time::Duration::from_millis(AGGREGATE_WINDOW_MS)).await;
    log.append(&event("authenticated", &[])).unwrap();
    let records = parsed(&path);
    assert_eq!(records[records.len() - 2]["count"], 5);
    assert_eq!(records[records.len() - 1]["request_id"], "authenticated");
    assert_eq!(calls_recorded(&records, get), calls + 1);
}

/// Batched async appends keep their order and chain across rotations: every
/// record lands once, the files verify as one chain, and no file is larger
/// than `max_bytes` unless one batch alone is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn async_batches_stay_chained_across_rotations() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let options = AuditOptions {
        max_bytes: 2048,
        max_files: 0,
        syslog: None,
    };
    let log = Arc::new(AuditLog::open_with(&path, Clock::system(), options).unwrap());
    let mut tasks = Vec::new();
    for t in 0..8 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let id = format!("r-{t}-{i}");
                log.append_async(&event(&id, &[])).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut files: Vec<PathBuf> = rotated_files(&path).into_iter().map(|(_, p)| p).collect();
    assert!(files.len() >= 3, "{files:?}");
    files.push(path.clone());
    let report = verify_files(&files).unwrap();
    assert!(report.ok, "{report:?}");
    let mut ids = std::collections::BTreeSet::new();
    let mut continuing = 0;
    for file in &files {
        for line in read_lines(file) {
            if line.contains(CONTINUE_METHOD) {
                continuing += 1;
            } else {
                let value: serde_json::Value = serde_json::from_str(&line).unwrap();
                assert!(ids.insert(value["request_id"].as_str().unwrap().to_owned()));
            }
        }
    }
    assert_eq!(ids.len(), 200, "every record written once");
    assert_eq!(continuing, files.len() - 1);
    assert_eq!(report.records, 200 + continuing as u64);
}

#[test]
fn a_file_beginning_mid_chain_without_a_continuing_record_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _log) = log_with(dir.path(), 5);
    let lines = read_lines(&path);
    // The first two records cut away: the file now begins at seq 3.
    write_lines(&path, &lines[2..]);
    let report = verify_files(std::slice::from_ref(&path)).unwrap();
    assert!(!report.ok);
    assert_eq!(report.line, Some(1));
}

/// A crash between the renames of a rotation, or a current file moved away
/// while the server was down: the next open continues the chain.
#[test]
fn an_open_after_a_cut_rotation_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let options = AuditOptions {
        max_bytes: 1024,
        max_files: 0,
        syslog: None,
    };
    let log = AuditLog::open_with(&path, Clock::system(), options.clone()).unwrap();
    for i in 0..20 {
        log.append(&event(&format!("a-{i}"), &[])).unwrap();
    }
    drop(log);
    // The current file gone (as if renamed to its number and the new one
    // never put in place): the open begins a file that continues the chain.
    let last = rotated_files(&path).last().unwrap().0;
    fs::rename(&path, dir.path().join(format!("audit.log.{:06}", last + 1))).unwrap();
    let log = AuditLog::open_with(&path, Clock::system(), options.clone()).unwrap();
    log.append(&event("after", &[])).unwrap();
    drop(log);
    let mut files: Vec<PathBuf> = rotated_files(&path).into_iter().map(|(_, p)| p).collect();
    files.push(path.clone());
    let report = verify_files(&files).unwrap();
    assert!(report.ok, "{report:?}");
    // A leftover `.new` beside the current file is removed; rotation works again.
    fs::write(dir.path().join("audit.log.new"), b"x").unwrap();
    let log = AuditLog::open_with(&path, Clock::system(), options).unwrap();
    assert!(!dir.path().join("audit.log.new").exists());
    for i in 0..20 {
        log.append(&event(&format!("b-{i}"), &[])).unwrap();
    }
    let mut files: Vec<PathBuf> = rotated_files(&path).into_iter().map(|(_, p)| p).collect();
    files.push(path.clone());
    assert!(verify_files(&files).unwrap().ok);
}

/// Attack: a rotation renamed the current file onto `<path>.NNNNNN` with
/// the number it had counted at open, replacing whatever file had that
/// name since (an archived file copied back, a second writer), so a
/// rotation could destroy audit records. It now takes the next number free.
#[test]
fn a_rotation_never_replaces_an_existing_numbered_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let options = AuditOptions {
        max_bytes: 1024,
        max_files: 0,
        syslog: None,
    };
    let log = AuditLog::open_with(&path, Clock::system(), options).unwrap();
    // Appears after the open counted the rotated files (none).
    let precious = path_with(&path, ".000001");
    fs::write(&precious, b"precious\n").unwrap();
    let mut i = 0;
    while rotated_files(&path).len() < 3 {
        log.append(&event(&format!("r-{i}"), &[])).unwrap();
        i += 1;
        assert!(i < 1000, "no rotation");
    }
    assert_eq!(fs::read(&precious).unwrap(), b"precious\n");
    let mut files: Vec<PathBuf> = rotated_files(&path)
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| *p != precious)
        .collect();
    files.push(path.clone());
    let report = verify_files(&files).unwrap();
    assert!(report.ok, "{report:?}");
}

/// The `token` field of each record of the log at `path`.
fn token_fields(path: &Path) -> Vec<String> {
    read_lines(path)
        .iter()
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            record["token"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

#[test]
fn a_remembered_token_hmac_is_reused_only_under_the_key_it_was_made_with() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, Clock::system()).unwrap();
    let mac = TokenMac::new();
    let values: [(&str, &[u8]); 1] = [("password", PASSWORD)];

    // Key 1: computed once, then taken from `mac`; both equal `hmac`.
    log.set_hmac_key(key(1));
    let under_1 = log.hmac(TOKEN).unwrap();
    log.append_phase_with(&event("a", &values), None, Some(&mac))
        .unwrap();
    assert!(mac.slot.lock().unwrap().is_some());
    log.append_phase_with(&event("b", &values), None, Some(&mac))
        .unwrap();

    // An audit key change: the remembered HMAC is of the old key and is not used.
    log.set_hmac_key(key(2));
    let under_2 = log.hmac(TOKEN).unwrap();
    assert_ne!(under_1, under_2);
    log.append_phase_with(&event("c", &values), None, Some(&mac))
        .unwrap();

    // Seal (no key): "unavailable", whatever `mac` holds.
    log.set_hmac_key(None);
    log.append_phase_with(&event("d", &values), None, Some(&mac))
        .unwrap();

    // Unseal with key 2 again: a new generation, computed afresh (same value).
    log.set_hmac_key(key(2));
    let stale = mac.slot.lock().unwrap().unwrap().0;
    log.append_phase_with(&event("e", &values), None, Some(&mac))
        .unwrap();
    assert_ne!(mac.slot.lock().unwrap().unwrap().0, stale);

    // Back to key 1: a record under key 1 again, not key 2's remembered value.
    log.set_hmac_key(key(1));
    log.append_phase_with(&event("f", &values), None, Some(&mac))
        .unwrap();
    // And a record without `mac` agrees.
    log.append(&event("g", &values)).unwrap();

    let expected: Vec<&str> = vec![
        &under_1,
        &under_1,
        &under_2,
        UNAVAILABLE,
        &under_2,
        &under_1,
        &under_1,
    ];
    assert_eq!(token_fields(&path), expected);
    let text = fs::read(&path).unwrap();
    assert!(!text.windows(TOKEN.len()).any(|w| w == TOKEN));
    assert!(verify_file(&path).unwrap().ok);
}

#[test]
fn a_token_mac_shows_nothing_in_debug() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(&dir.path().join("audit.log"), Clock::system()).unwrap();
    log.set_hmac_key(key(3));
    let mac = TokenMac::new();
    let values: [(&str, &[u8]); 0] = [];
    log.append_phase_with(&event("a", &values), None, Some(&mac))
        .unwrap();
    let tag = hex::encode(mac.slot.lock().unwrap().unwrap().1);
    assert!(!format!("{mac:?}").contains(&tag[..16]));
}

#[test]
fn a_cluster_nodes_id_follows_time_and_the_file_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, Clock::system()).unwrap();
    log.set_hmac_key(key(7));
    // Records before the id (an old file, or one node) have no `node`.
    log.append(&event("before", &[])).unwrap();
    log.set_node_id("kw-2 \"east\"");
    log.set_node_id("ignored: set once");
    log.append(&event("after-1", &[])).unwrap();
    log.append(&event("after-2", &[])).unwrap();
    let lines = read_lines(&path);
    assert_eq!(lines.len(), 3);
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert!(first.get("node").is_none(), "{}", lines[0]);
    for line in &lines[1..] {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(record["node"], "kw-2 \"east\"", "{line}");
        let time_at = line.find("\"time\":").unwrap();
        let node_at = line.find("\"node\":").unwrap();
        let request_at = line.find("\"request_id\":").unwrap();
        assert!(time_at < node_at && node_at < request_at, "{line}");
    }
    let report = verify_file(&path).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, 3);
    // An edit of the node id breaks the chain like any other edit.
    let mut edited = lines.clone();
    edited[1] = edited[1].replace("kw-2", "kw-9");
    write_lines(&path, &edited);
    let report = verify_file(&path).unwrap();
    assert!(!report.ok);
    assert_eq!(report.first_bad, Some(2));
}

/// `push_json_str` as it was written before its word-at-a-time scan: one
/// byte at a time. The reference the fast one is held to.
fn json_str_bytewise(text: &str) -> Vec<u8> {
    let mut out = vec![b'"'];
    for &byte in text.as_bytes() {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x00..=0x1f | 0x7f => out.extend_from_slice(format!("\\u{byte:04x}").as_bytes()),
            _ => out.push(byte),
        }
    }
    out.push(b'"');
    out
}

fn needs_escape(byte: u8) -> bool {
    byte < 0x20 || byte == 0x7f || byte == b'"' || byte == b'\\'
}

#[test]
fn json_strings_are_escaped_as_byte_by_byte_escaping_does() {
    let mut fixed: Vec<String> = vec![
        String::new(),
        "plain-request-id-0123456789abcdef".into(),
        "a\"b\\c\nd\re\tf\u{0}g\u{1f}h\u{7f}i".into(),
        "secret/app/db ünïcödé ✓ \u{80}\u{85} \u{a0}".into(),
        "\u{85} x".into(),
        "12345678\"".into(),
        "1234567\"".into(),
        "123456789012345\\".into(),
    ];
    for b in 0u8..0x80 {
        fixed.push(format!("abcdefg{}hijklmnop", char::from(b)));
        fixed.push(char::from(b).to_string().repeat(9));
    }
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let alphabet: Vec<char> = "abcXYZ019 -_/:.\"\\\n\r\t\u{0}\u{1}\u{1f}\u{7f}\u{80}\u{85}éü✓😀"
        .chars()
        .collect();
    for _ in 0..5000 {
        let len = (next() % 40) as usize;
        let text: String = (0..len)
            .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
            .collect();
        fixed.push(text);
    }
    for text in &fixed {
        let mut fast = Vec::new();
        push_json_str(&mut fast, text);
        assert_eq!(fast, json_str_bytewise(text), "{text:?}");
        // The scan never passes a byte that needs escaping, and stops at
        // a whole number of words.
        let plain = plain_prefix(text.as_bytes());
        assert_eq!(plain % 8, 0);
        assert!(
            text.as_bytes()[..plain].iter().all(|&b| !needs_escape(b)),
            "{text:?}"
        );
        // On ASCII text it stops only at the word that needs escaping.
        if text.is_ascii() {
            let first = text.bytes().position(needs_escape).unwrap_or(text.len());
            assert_eq!(plain, first - first % 8, "{text:?}");
        }
    }
}

#[test]
fn hex_is_lower_case_two_digits_a_byte() {
    for len in [0usize, 1, 31, 32, 33, 64, 65, 100] {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
        let mut out = b"x".to_vec();
        push_hex(&mut out, &bytes);
        assert_eq!(&out[..1], b"x");
        assert_eq!(std::str::from_utf8(&out[1..]).unwrap(), hex::encode(&bytes));
    }
}

/// Every holder of the chain looks at the queue after letting go: a record
/// queued by an async append whose drain found the chain held (here by the
/// test, standing for `head`, `sync` or `reopen` holding it) is written by
/// that holder's next call of each of them, not left for some later append.
/// (A Status flood takes `head` and writes only aggregated records, so
/// without this a queued request record could wait without bound.)
#[tokio::test]
async fn a_record_queued_while_the_chain_is_held_is_written_by_head_sync_and_reopen() {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let dir = tempfile::tempdir().unwrap();
    let (_, log) = log_with(dir.path(), 1);
    type Holder<'a> = &'a dyn Fn(&AuditLog);
    let holders: [(&str, Holder); 3] = [
        ("head", &|log| drop(log.head())),
        ("sync", &|log| log.sync().unwrap()),
        ("reopen", &|log| log.reopen().unwrap()),
    ];
    for (name, holder) in holders {
        let id = format!("queued-under-{name}");
        let ev = event(&id, &[]);
        let mut cx = Context::from_waker(Waker::noop());
        let chain = log.lock_chain();
        let mut append = std::pin::pin!(log.append_async(&ev));
        // First poll: queued, then yields. Second: its drain finds the
        // chain held and leaves the record to the holder.
        assert!(append.as_mut().poll(&mut cx).is_pending(), "{name}");
        assert!(append.as_mut().poll(&mut cx).is_pending(), "{name}");
        drop(chain);
        holder(&log);
        match append.as_mut().poll(&mut cx) {
            Poll::Ready(written) => written.unwrap(),
            Poll::Pending => panic!("{name} left a queued record unwritten"),
        }
        let text = fs::read_to_string(dir.path().join("audit.log")).unwrap();
        assert!(text.contains(&id), "{name}");
    }
}
