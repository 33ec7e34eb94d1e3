//! The examples as child processes of a test, each built once per test
//! binary (`example_binary`). The example rotation plugin
//! (`examples/provider_plugin.rs`) is started on a unix socket in a
//! temporary folder and killed by its pid when dropped. Shared by
//! `tests/rotation_providers.rs` and `tests/it` (rotation, login).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// The plugin process, killed by its pid when the test ends (or fails).
pub struct Plugin {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the example `name` once per test binary (cargo builds examples
/// for a plain `cargo test`, not for `cargo test --test rotation_providers`),
/// and returns the path cargo reports for it.
pub fn example_binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, Result<PathBuf, String>>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let built = built
        .entry(name.to_owned())
        .or_insert_with(|| build_example(name));
    match built {
        Ok(path) => path.clone(),
        Err(e) => panic!("cannot build the example {name}: {e}"),
    }
}

fn build_example(name: &str) -> Result<PathBuf, String> {
    let mut cargo = Command::new(env!("CARGO"));
    cargo.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "build",
        "--example",
        name,
        "--message-format=json",
    ]);
    // Not the variables cargo sets for a running test: build scripts
    // watch some (ring: CARGO_MANIFEST_DIR), so inheriting them would
    // rebuild half the tree here and again at the next plain build.
    const SET_FOR_TESTS: [&str; 8] = [
        "CARGO_MANIFEST_",
        "CARGO_PKG_",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    for (var, _) in std::env::vars_os() {
        let text = var.to_string_lossy();
        if SET_FOR_TESTS.iter().any(|prefix| text.starts_with(prefix)) {
            cargo.env_remove(&var);
        }
    }
    // The same profile as this test binary (target/<profile>/deps/).
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    if exe.ancestors().nth(2).and_then(Path::file_name) == Some("release".as_ref()) {
        cargo.arg("--release");
    }
    let output = cargo
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(format!("cargo build --example {name}: {}", output.status));
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| format!("cargo reported no {name} executable"))
}

/// Starts the example plugin on a unix socket in a new temporary folder.
pub fn start_plugin() -> Plugin {
    start_plugin_with(&[])
}

/// [`start_plugin`] with more arguments (`--old-protocol`).
pub fn start_plugin_with(extra: &[&str]) -> Plugin {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("plugin.sock");
    let child = Command::new(example_binary("provider_plugin"))
        .arg("--socket")
        .arg(&socket)
        .args(extra)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut plugin = Plugin { child, socket, dir };
    // Wait for the socket (the event); a plugin that exits early fails the
    // test. The bound is generous: only a plugin that hangs reaches it.
    let started = std::time::Instant::now();
    while !plugin.socket.exists() {
        if let Some(status) = plugin.child.try_wait().unwrap() {
            panic!("the example plugin exited: {status}");
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "the example plugin made no socket in 120 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    plugin
}
