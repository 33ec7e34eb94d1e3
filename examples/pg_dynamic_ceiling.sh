#!/usr/bin/env bash
# Benchmark (not a test): what the local PostgreSQL itself does for the
# statements keyward sends per dynamic credential, with no keyward at all:
# the ceiling any issuer of PostgreSQL users can reach on this machine.
#
#   examples/pg_dynamic_ceiling.sh [CLIENTS] [SECONDS]      # 16 10
#
# pgbench, CLIENTS connections each, SECONDS a phase, against
# 127.0.0.1:5432 as postgres (BENCH_PG_PASSWORD if not trust):
#   noop        SELECT 1
#   create      CREATE ROLE kwceil_N LOGIN PASSWORD '<SCRAM verifier, 4096 rounds>'
#               VALID UNTIL '...' IN ROLE kwceil_granted          (keyward's default)
#   create_16   the same with a verifier of 16 rounds          (scram_iterations=16)
#   create_conn `create` with a new connection per credential (pgbench -C): the
#               cost of a login per credential, as keyward paid before its pool
#   drop        keyward's revocation (NOLOGIN; end its sessions; REASSIGN OWNED;
#               DROP OWNED; DROP ROLE), one per user made above, until all are gone
# Each transaction takes its user name from a sequence (one extra SELECT).
# Prints one `summary` line with the rates, ratios to the no-op and the
# 1-minute load average; every user made is dropped again.
set -euo pipefail
umask 077
CLIENTS=${1:-16}
SECONDS_PER_PHASE=${2:-10}
export PGPASSWORD=${BENCH_PG_PASSWORD:-x}
export PGOPTIONS="-c client_min_messages=warning"
PG=(-h 127.0.0.1 -p 5432 -U postgres)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
psql "${PG[@]}" -d postgres -v ON_ERROR_STOP=1 -Atq <<'SQL'
DO $$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'kwceil_granted') THEN CREATE ROLE kwceil_granted NOLOGIN; END IF; END$$;
DROP SEQUENCE IF EXISTS kwceil_make; CREATE SEQUENCE kwceil_make;
DROP SEQUENCE IF EXISTS kwceil_drop; CREATE SEQUENCE kwceil_drop;
SQL
# SCRAM-SHA-256 verifiers of a random password, as keyward makes them.
verifier() {
    python3 - "$1" <<'PY'
import base64, hashlib, hmac, os, secrets, string, sys
n = int(sys.argv[1])
pw = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32)).encode()
salt = os.urandom(16)
salted = hashlib.pbkdf2_hmac("sha256", pw, salt, n)
ck = hmac.new(salted, b"Client Key", "sha256").digest()
sk = hmac.new(salted, b"Server Key", "sha256").digest()
b = lambda x: base64.b64encode(x).decode()
print(f"SCRAM-SHA-256${n}:{b(salt)}${b(hashlib.sha256(ck).digest())}:{b(sk)}")
PY
}
UNTIL=$(date -u -d '+1 day' '+%Y-%m-%d %H:%M:%S+00')
printf 'SELECT 1;\n' >"$WORK/noop.sql"
for n in 4096 16; do
    {
        printf "SELECT nextval('kwceil_make') AS n \\\\gset\n"
        printf "CREATE ROLE kwceil_:n LOGIN PASSWORD '%s' VALID UNTIL '%s' IN ROLE kwceil_granted;\n" "$(verifier $n)" "$UNTIL"
    } >"$WORK/create_$n.sql"
done
cat >"$WORK/drop.sql" <<'SQL'
SELECT nextval('kwceil_drop') AS n \gset
ALTER ROLE kwceil_:n NOLOGIN \; COMMIT \; SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'kwceil_:n' \; COMMIT \; REASSIGN OWNED BY kwceil_:n TO postgres \; DROP OWNED BY kwceil_:n \; DROP ROLE IF EXISTS kwceil_:n;
SQL
tps() { sed -n 's/^tps = \([0-9.]*\) .*/\1/p' | head -1; }
load1() { cut -d' ' -f1 /proc/loadavg; }
LOAD_BEFORE=$(load1)
bench() { pgbench "${PG[@]}" -n -c "$CLIENTS" -j 2 "$@" postgres 2>&1; }
NOOP=$(bench -T "$SECONDS_PER_PHASE" -f "$WORK/noop.sql" | tps)
echo "phase=noop clients=$CLIENTS per_second=$NOOP"
CREATE=$(bench -T "$SECONDS_PER_PHASE" -f "$WORK/create_4096.sql" | tps)
echo "phase=create scram_iterations=4096 per_second=$CREATE"
CREATE16=$(bench -T "$SECONDS_PER_PHASE" -f "$WORK/create_16.sql" | tps)
echo "phase=create scram_iterations=16 per_second=$CREATE16"
CREATE_CONN=$(bench -C -T "$SECONDS_PER_PHASE" -f "$WORK/create_4096.sql" | tps)
echo "phase=create_conn scram_iterations=4096 per_second=$CREATE_CONN"
MADE=$(psql "${PG[@]}" -d postgres -Atc "SELECT last_value FROM kwceil_make")
PER_CLIENT=$((MADE / CLIENTS))
DROP=$(bench -t "$PER_CLIENT" -f "$WORK/drop.sql" | tps)
echo "phase=drop users=$((PER_CLIENT * CLIENTS)) per_second=$DROP"
# The rest (fewer than CLIENTS), and anything a phase left.
psql "${PG[@]}" -d postgres -v ON_ERROR_STOP=1 -Atq <<'SQL'
DO $$DECLARE r text; BEGIN
  FOR r IN SELECT rolname FROM pg_roles WHERE rolname ~ '^kwceil_[0-9]+$' LOOP
    EXECUTE format('DROP ROLE %I', r);
  END LOOP;
END$$;
SQL
LEFT=$(psql "${PG[@]}" -d postgres -Atc "SELECT count(*) FROM pg_roles WHERE rolname ~ '^kwceil_[0-9]+\$'")
awk -v c="$CLIENTS" -v s="$SECONDS_PER_PHASE" -v noop="$NOOP" -v cr="$CREATE" -v cr16="$CREATE16" \
    -v crc="$CREATE_CONN" -v dr="$DROP" -v lb="$LOAD_BEFORE" -v la="$(load1)" -v left="$LEFT" 'BEGIN {
    printf "summary target=postgresql clients=%s seconds=%s load1_before=%s load1_after=%s", c, s, lb, la
    printf " noop_per_second=%.0f create_per_second=%.0f create_16_per_second=%.0f create_new_connection_per_second=%.0f drop_per_second=%.0f", noop, cr, cr16, crc, dr
    printf " ratio_create=%.4f ratio_create_16=%.4f ratio_drop=%.4f users_left=%s\n", cr / noop, cr16 / noop, dr / noop, left
}'
