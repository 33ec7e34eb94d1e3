//! The development certificates (`keyward::pki`, `keyward certs`,
//! `certs/generate.sh`) pass a strict RFC 5280 verifier: Python's
//! `cryptography` path validation (`tests/support/verify_chain.py`), which
//! refuses a leaf without an Authority Key Identifier as rustls and OpenSSL
//! do not. The test needs python3 with `cryptography` >= 43; without it, it
//! makes a venv under the target folder and installs the package from PyPI,
//! and fails, saying why, if it cannot.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Whether `python` imports a `cryptography` with client and server path
/// validation (`build_client_verifier` came in 43).
fn has_verifier(python: &Path) -> bool {
    Command::new(python)
        .args([
            "-c",
            "from cryptography.x509.verification import PolicyBuilder; \
             PolicyBuilder.build_client_verifier",
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

pub(crate) fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let system = PathBuf::from("python3");
        if has_verifier(&system) {
            return system;
        }
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("x509-venv");
        let python = venv.join("bin").join("python");
        if has_verifier(&python) {
            return python;
        }
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .output()
            .unwrap_or_else(|e| panic!("this test needs python3 (cannot run it: {e})"));
        assert!(
            made.status.success(),
            "cannot make a venv in {} (Debian: apt-get install python3-venv): {}",
            venv.display(),
            String::from_utf8_lossy(&made.stderr)
        );
        let pip = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "cryptography>=43"])
            .output()
            .unwrap();
        assert!(
            pip.status.success() && has_verifier(&python),
            "cannot install Python's cryptography >= 43 into {}: {}",
            venv.display(),
            String::from_utf8_lossy(&pip.stderr)
        );
        python
    })
}

/// Runs the strict verifier on a CA, a server certificate and client
/// certificates; fails the test with every refusal it names.
fn verify_chain(ca: &Path, server: &Path, clients: &[&Path]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/verify_chain.py");
    let out = Command::new(python())
        .arg(script)
        .arg(ca)
        .arg(server)
        .args(clients)
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "the chain is refused:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dev_certificates_pass_a_strict_verifier() {
    let dir = tempfile::tempdir().unwrap();
    let paths = keyward::pki::ensure_dev_certs(&dir.path().join("certs")).unwrap();
    // A further client certificate from the stored CA (what tests and
    // operators do for `login cert`): its AKI comes from the CA's own SKI.
    let issuer = keyward::pki::load_issuer(&paths).unwrap();
    let (pem, _key) =
        keyward::pki::issue_client_cert(&issuer, "agent-7", Some("spiffe://keyward.dev/agent-7"))
            .unwrap();
    let further = dir.path().join("further.pem");
    std::fs::write(&further, pem).unwrap();
    verify_chain(&paths.ca, &paths.server, &[&paths.client, &further]);
}

#[test]
fn generate_sh_certificates_pass_a_strict_verifier() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/generate.sh");
    let run = Command::new("bash")
        .arg(script)
        .arg(&out)
        .env("KEYWARD_BIN", crate::harness::binary())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "generate.sh failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let paths = keyward::pki::CertPaths::in_dir(&out);
    assert!(paths.all_exist(), "generate.sh wrote {}", out.display());
    verify_chain(&paths.ca, &paths.server, &[&paths.client]);
}
