#!/bin/sh
# The discovery scan beside detect-secrets (PyPI) on the same generated tree:
# makes a venv under target/ with detect-secrets 1.5.0, then runs
# examples/scan_bench.rs (release build) and prints its one line.
#   examples/scan_bench.sh [DIR] [MB]
set -eu
cd "$(dirname "$0")/.."
if [ ! -x target/scan-bench-venv/bin/detect-secrets ]; then
    python3 -m venv target/scan-bench-venv
    target/scan-bench-venv/bin/pip install -q detect-secrets==1.5.0
fi
cargo run --release --example scan_bench -- "${1:-target/scan-bench-tree}" "${2:-64}"
