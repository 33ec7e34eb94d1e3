#!/usr/bin/env bash
# Generates a development CA, server and client certificates into certs/out/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet --release -- certs --out certs/out "$@"
