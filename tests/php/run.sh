#!/usr/bin/env bash
# The PHP suite: generate the PHP code from idl/fae.thrift into a temp dir, start memcached, redis-server and
# MariaDB processes and faed on free loopback ports (faed's pools hold the stores), run tests/php/test_fae.php,
# tests/php/test_backends.php and tests/php/test_mysql.php (with plain PHP, then again with the thrift_protocol
# extension if it can be loaded), stop faed by PID (SIGTERM, SIGKILL after 10 s) and require exit code 0 from
# it, and stop every store by PID.
#
#   tests/php/run.sh                 # uses target/debug/faed
#   FAED_BIN=/path/to/faed tests/php/run.sh
#   PHP=php8.2 THRIFT=/usr/bin/thrift tests/php/run.sh
set -u

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
IDL="$ROOT/idl/fae.thrift"
FAED_BIN=${FAED_BIN:-$ROOT/target/debug/faed}
PHP=${PHP:-php}
THRIFT=${THRIFT:-thrift}
HOST=127.0.0.1

TMP=$(mktemp -d "${TMPDIR:-/tmp}/fae-php.XXXXXX")
FAED_PID=""
STORE_PIDS=()

stop_faed() {
    # Stop faed by PID: SIGTERM, then SIGKILL after 10 s. Sets FAED_RC.
    FAED_RC=""
    [ -n "$FAED_PID" ] || return 0
    if kill -0 "$FAED_PID" 2>/dev/null; then
        kill -TERM "$FAED_PID" 2>/dev/null
        for _ in $(seq 100); do
            kill -0 "$FAED_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$FAED_PID" 2>/dev/null; then
            echo "run.sh: faed (pid $FAED_PID) still alive 10 s after SIGTERM, sending SIGKILL" >&2
            kill -KILL "$FAED_PID" 2>/dev/null
        fi
    fi
    wait "$FAED_PID" 2>/dev/null
    FAED_RC=$?
    FAED_PID=""
}

cleanup() {
    stop_faed
    for pid in "${STORE_PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    "$ROOT/tests/mysql/mariadb" stop "$TMP/mariadb"
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() {
    echo "run.sh: $*" >&2
    if [ -s "$TMP/faed.log" ]; then
        echo "---- faed log (tail) ----" >&2
        tail -n 40 "$TMP/faed.log" >&2
    fi
    exit 1
}

# ---- generated code ----
GEN="$TMP/gen-php"
mkdir -p "$GEN"
if ! "$THRIFT" --gen php -out "$GEN" "$IDL" 2>"$TMP/thrift.err"; then
    cat "$TMP/thrift.err" >&2
    fail "thrift --gen php failed"
fi
[ -f "$GEN/fun/rpc/FunServantClient.php" ] || fail "generated code not where expected: $GEN/fun/rpc"

# ---- the stores and the server ----
[ -x "$FAED_BIN" ] || fail "faed binary not found or not executable: $FAED_BIN (set FAED_BIN)"
# Ten free ports at once: faed's RPC and admin, memcached x5 (two for "default", three for placement), redis x2,
# MariaDB.
read -r RPC_PORT ADMIN_PORT MC1 MC2 P1 P2 P3 RD1 RD2 MY < <("$PHP" -r '
    $s = array(); for ($i = 0; $i < 10; $i++) { $s[] = stream_socket_server("tcp://127.0.0.1:0"); }
    $p = function ($s) { $n = stream_socket_get_name($s, false); return substr($n, strrpos($n, ":") + 1); };
    echo implode(" ", array_map($p, $s)), "\n";')
[ -n "${MY:-}" ] || fail "could not pick free ports"

wait_store() { # PORT PROBE EXPECT: the store answers PROBE with a line starting with EXPECT, within 10 s
    local r
    for _ in $(seq 200); do
        r=$(printf '%b' "$2" | timeout 1 nc -q 1 "$HOST" "$1" 2>/dev/null | head -c 64)
        [[ "$r" == "$3"* ]] && return 0
        sleep 0.05
    done
    fail "the store on port $1 did not answer"
}
for port in $MC1 $MC2 $P1 $P2 $P3; do
    memcached -l "$HOST" -p "$port" -U 0 -u root -m 64 -t 1 </dev/null >/dev/null 2>&1 &
    STORE_PIDS+=($!)
    wait_store "$port" 'version\r\n' VERSION
done
for port in $RD1 $RD2; do
    mkdir -p "$TMP/redis-$port"
    redis-server --port "$port" --bind "$HOST" --save '' --appendonly no --daemonize no --logfile '' \
        --dir "$TMP/redis-$port" </dev/null >/dev/null 2>&1 &
    STORE_PIDS+=($!)
    wait_store "$port" 'PING\r\n' +PONG
done
"$ROOT/tests/mysql/mariadb" start "$TMP/mariadb" "$MY" >/dev/null || fail "MariaDB did not start"
PLACEMENT="\"$HOST:$P1\", \"$HOST:$P2\", \"$HOST:$P3\""
cat >"$TMP/faed.toml" <<EOF
[server]
unix_socket = "$TMP/faed.sock"

[[memcache.pools]]
name = "default"
servers = ["$HOST:$MC1", "$HOST:$MC2"]

[[memcache.pools]]
name = "php_standard"
hash = "standard"
servers = [$PLACEMENT]

[[memcache.pools]]
name = "php_consistent"
hash = "consistent"
servers = [$PLACEMENT]

[[memcache.pools]]
name = "php_ketama"
hash = "ketama"
servers = [$PLACEMENT]

[[redis.pools]]
name = "default"
servers = ["$HOST:$RD1", "$HOST:$RD2"]

EOF
"$ROOT/tests/mysql/mariadb" config "$TMP/mariadb" "$MY" >>"$TMP/faed.toml"
export FAE_BACKENDS="{\"memcache\": [\"$HOST:$MC1\", \"$HOST:$MC2\"], \"redis\": [\"$HOST:$RD1\", \"$HOST:$RD2\"], \"placement\": [$PLACEMENT], \"mysql\": \"$HOST:$MY\"}"

"$FAED_BIN" -c "$TMP/faed.toml" --listen "$HOST:$RPC_PORT" --admin "$HOST:$ADMIN_PORT" --log-level warn \
    </dev/null >"$TMP/faed.log" 2>&1 &
FAED_PID=$!

up=""
for _ in $(seq 100); do  # 10 s
    kill -0 "$FAED_PID" 2>/dev/null || { wait "$FAED_PID"; rc=$?; FAED_PID=""; fail "faed exited with code $rc before listening"; }
    if (exec 3<>"/dev/tcp/$HOST/$RPC_PORT") 2>/dev/null; then
        up=1
        break
    fi
    sleep 0.1
done
[ -n "$up" ] || fail "faed did not accept on $HOST:$RPC_PORT within 10 s"

# ---- the suite ----
status=0
echo "== php (plain TBinaryProtocol) =="
"$PHP" "$ROOT/tests/php/test_fae.php" "$HOST" "$RPC_PORT" "$GEN" || status=1
"$PHP" "$ROOT/tests/php/test_backends.php" "$HOST" "$RPC_PORT" "$GEN" || status=1
"$PHP" "$ROOT/tests/php/test_mysql.php" "$HOST" "$RPC_PORT" "$GEN" || status=1

# The same checks in TCompactProtocol over TCP, and over faed's unix socket in both protocols (PHP-FPM on the
# same host as faed); faed tells them apart from each connection's first bytes.
echo "== php (TCompactProtocol) =="
FAE_PHP_PROTOCOL=compact "$PHP" "$ROOT/tests/php/test_fae.php" "$HOST" "$RPC_PORT" "$GEN" || status=1
FAE_PHP_PROTOCOL=compact "$PHP" "$ROOT/tests/php/test_backends.php" "$HOST" "$RPC_PORT" "$GEN" || status=1
[ -S "$TMP/faed.sock" ] || { status=1; echo "run.sh: faed did not create its unix socket $TMP/faed.sock" >&2; }
echo "== php (TBinaryProtocol over the unix socket) =="
FAE_PHP_UNIX="$TMP/faed.sock" "$PHP" "$ROOT/tests/php/test_fae.php" "$HOST" "$RPC_PORT" "$GEN" || status=1
echo "== php (TCompactProtocol over the unix socket) =="
FAE_PHP_UNIX="$TMP/faed.sock" FAE_PHP_PROTOCOL=compact "$PHP" "$ROOT/tests/php/test_fae.php" "$HOST" "$RPC_PORT" "$GEN" || status=1
FAE_PHP_UNIX="$TMP/faed.sock" FAE_PHP_PROTOCOL=compact "$PHP" "$ROOT/tests/php/test_backends.php" "$HOST" "$RPC_PORT" "$GEN" || status=1

if ! "$PHP" -r 'exit(function_exists("thrift_protocol_write_binary") ? 0 : 1);' 2>/dev/null &&
   "$PHP" -d extension=thrift_protocol.so -r 'exit(function_exists("thrift_protocol_write_binary") ? 0 : 1);' 2>/dev/null; then
    echo "== php (thrift_protocol extension, TBinaryProtocolAccelerated) =="
    "$PHP" -d extension=thrift_protocol.so "$ROOT/tests/php/test_fae.php" "$HOST" "$RPC_PORT" "$GEN" || status=1
    "$PHP" -d extension=thrift_protocol.so "$ROOT/tests/php/test_backends.php" "$HOST" "$RPC_PORT" "$GEN" || status=1
    "$PHP" -d extension=thrift_protocol.so "$ROOT/tests/php/test_mysql.php" "$HOST" "$RPC_PORT" "$GEN" || status=1
else
    echo "== php: thrift_protocol extension not loadable (or already loaded): accelerated run skipped =="
fi

kill -0 "$FAED_PID" 2>/dev/null || { status=1; echo "run.sh: faed died during the tests" >&2; }
stop_faed
if [ "$FAED_RC" != "0" ]; then
    echo "run.sh: faed exited with code $FAED_RC after SIGTERM, want 0" >&2
    status=1
fi
[ $status -eq 0 ] || { [ -s "$TMP/faed.log" ] && { echo "---- faed log (tail) ----" >&2; tail -n 40 "$TMP/faed.log" >&2; }; }
exit $status
