#!/usr/bin/env bash
# Generates a development CA, server and client certificates with
# `keyward certs` into DIR (default: certs/out/ beside this script).
# KEYWARD_BIN names a keyward binary to use instead of building one.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/certs/out}"
if [ -n "${KEYWARD_BIN:-}" ]; then
  exec "$KEYWARD_BIN" certs --out "$out"
fi
exec cargo run --quiet --release --manifest-path "$root/Cargo.toml" -- certs --out "$out"
