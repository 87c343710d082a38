<?php
/**
 * FunServant from PHP, against a running faed:
 *
 *     php tests/php/test_fae.php HOST PORT GENDIR
 *
 * GENDIR holds the output of `thrift --gen php -out GENDIR idl/fae.thrift`. tests/php/run.sh does all of it
 * (code generation, a faed on free ports, this script without and with the thrift_protocol extension).
 *
 * Calls every in-scope method through the generated client over TBufferedTransport + TBinaryProtocol (the
 * accelerated protocol when the thrift_protocol extension is loaded), the error paths (TCacheMissed, invalid
 * Context, unknown method, tag out of range, invalid registry path), then the same through
 * clients/php/FaeClient.php. One line per check; the last line is "php: N passed, M failed"; exit 1 on failure.
 */

use Thrift\Exception\TApplicationException;
use Thrift\Exception\TException;
use Thrift\Protocol\TBinaryProtocol;
use Thrift\Protocol\TBinaryProtocolAccelerated;
use Thrift\Transport\TBufferedTransport;
use Thrift\Transport\TSocket;
use Thrift\Type\TMessageType;

if ($argc != 4) {
    fwrite(STDERR, "usage: php {$argv[0]} HOST PORT GENDIR\n");
    exit(2);
}
list(, $HOST, $PORT, $GENDIR) = $argv;
$PORT = (int)$PORT;

require __DIR__ . '/../../clients/php/FaeClient.php';
FaeClient::registerAutoload($GENDIR, getenv('THRIFT_PHP_LIB') ?: '/usr/lib/php');

error_reporting(E_ALL & ~E_DEPRECATED);
set_error_handler(function ($no, $str, $file, $line) {
    if (!(error_reporting() & $no)) {
        return false; // silenced with @
    }
    throw new ErrorException($str, 0, $no, $file, $line);
});

const EPOCH_MS = 1388834974657;
const PING_RE = '/^ver:[^,\s]+, build:[^,\s]+, myid:[^,\s]+, uptime:\d+$/';

$passed = 0;
$failed = 0;

function check($name, $ok, $detail = '')
{
    global $passed, $failed;
    if ($ok) {
        $passed++;
        echo "ok   $name\n";
    } else {
        $failed++;
        echo "FAIL $name" . ($detail !== '' ? ": $detail" : '') . "\n";
    }
}

/** Run $f; check that it throws exactly $class (or a subclass). Returns the exception. */
function check_throws($name, $class, callable $f)
{
    try {
        $r = $f();
        check($name, false, "no exception, returned " . show($r));
    } catch (Throwable $e) {
        $ok = $e instanceof $class;
        check($name, $ok, $ok ? '' : 'got ' . get_class($e) . ': ' . $e->getMessage());
        return $e;
    }
    return null;
}

/** Run a group of checks; an unexpected exception counts as one failure and the next group runs. */
function section($name, callable $f)
{
    echo "# $name\n";
    try {
        $f();
    } catch (Throwable $e) {
        check("$name: unexpected " . get_class($e), false, $e->getMessage() . ' @ ' . $e->getFile() . ':' . $e->getLine());
    }
}

function show($v)
{
    $s = var_export($v, true);
    return strlen($s) > 200 ? substr($s, 0, 200) . '...' : $s;
}

function ctx($rid = null, $reason = 'php-test', $uid = 1)
{
    return new \fun\rpc\Context(array(
        'rid' => $rid === null ? random_int(1, PHP_INT_MAX) : $rid,
        'reason' => $reason,
        'uid' => $uid,
    ));
}

function now_ms()
{
    return (int)floor(microtime(true) * 1000);
}

function compose_id($ts, $tag, $worker, $seq)
{
    return (($ts - EPOCH_MS) << 22) | ($tag << 17) | ($worker << 12) | $seq;
}

function free_port()
{
    $s = stream_socket_server('tcp://127.0.0.1:0');
    $name = stream_socket_get_name($s, false);
    fclose($s);
    return (int)substr($name, strrpos($name, ':') + 1);
}

/** A raw connection: [client, protocol, transport]. */
function connect_raw($host, $port)
{
    $socket = fae_socket($host, $port);
    $socket->setSendTimeout(10000);
    $socket->setRecvTimeout(10000);
    $transport = new TBufferedTransport($socket, 8192, 8192);
    if (!$transport->isOpen()) { // a unix socket comes open
        $transport->open();
    }
    $protocol = FaeClient::protocolOver($transport, fae_protocol());
    return array(new \fun\rpc\FunServantClient($protocol), $protocol, $transport);
}

/** FAE_PHP_PROTOCOL: "binary" (default) or "compact". */
function fae_protocol()
{
    return getenv('FAE_PHP_PROTOCOL') ?: 'binary';
}

/** A TSocket to faed: over FAE_PHP_UNIX (a unix socket's path) when set, else host:port. */
function fae_socket($host, $port)
{
    $unix = getenv('FAE_PHP_UNIX');
    return $unix ? FaeClient::unixSocket("unix://$unix", 5000) : new TSocket($host, $port);
}

/** What FaeClient is given: the unix socket when FAE_PHP_UNIX is set. */
function fae_server($host, $port)
{
    $unix = getenv('FAE_PHP_UNIX');
    return $unix ? "unix://$unix" : "$host:$port";
}

$uniq = sprintf('php-%d-%08x', getmypid(), random_int(0, 0x7FFFFFFF));
$accel = function_exists('thrift_protocol_write_binary');
echo '# protocol: ' . (fae_protocol() === 'compact' ? 'TCompactProtocol'
    : ($accel ? 'TBinaryProtocolAccelerated (thrift_protocol extension)' : 'TBinaryProtocol (plain PHP)'))
    . (getenv('FAE_PHP_UNIX') ? ', over the unix socket ' . getenv('FAE_PHP_UNIX') : '') . "\n";

try {
    list($c, $proto, $trans) = connect_raw($HOST, $PORT);
} catch (Throwable $e) {
    check("connect to $HOST:$PORT", false, $e->getMessage());
    echo "php: $passed passed, $failed failed\n";
    exit(1);
}

// ---- misc ---------------------------------------------------------------------------------------------

section('misc', function () use ($c) {
    foreach (array(0, 1, 42, -1, 2147483647, -2147483648) as $x) {
        $r = $c->noop($x);
        check("noop($x)", $r === $x, show($r));
    }
    $p = $c->ping(ctx());
    check('ping format', is_string($p) && preg_match(PING_RE, $p), show($p));
});

// ---- idgen --------------------------------------------------------------------------------------------

section('idgen', function () use ($c) {
    $ids = array();
    for ($i = 0; $i < 100; $i++) {
        $ids[] = $c->id_next(ctx());
    }
    check('id_next > 0', is_int($ids[0]) && $ids[0] > 0, show($ids[0]));
    $inc = true;
    for ($i = 1; $i < count($ids); $i++) {
        if (!($ids[$i] > $ids[$i - 1])) {
            $inc = false;
            $bad = array($ids[$i - 1], $ids[$i]);
        }
    }
    check('id_next strictly increasing (100 ids)', $inc, $inc ? '' : show($bad));

    foreach (array(0, 1, 17, 31) as $tag) {
        $t0 = now_ms();
        $id = $c->id_next_with_tag(ctx(), $tag);
        $t1 = now_ms();
        $d = $c->id_decode(ctx(), $id);
        $ok = is_array($d) && count($d) == 4;
        check("id_decode(id_next_with_tag($tag)) has 4 parts", $ok, show($d));
        if (!$ok) {
            continue;
        }
        list($ts, $gtag, $worker, $seq) = $d;
        check("id_next_with_tag($tag): tag round-trips", $gtag === $tag, show($d));
        check("id_next_with_tag($tag): ts close to now", $ts >= $t0 - 1000 && $ts <= $t1 + 1000,
            "ts=$ts now=[$t0,$t1]");
        check("id_next_with_tag($tag): worker/seq in range", $worker >= 0 && $worker < 32 && $seq >= 0 && $seq < 4096,
            show($d));
        check("id_next_with_tag($tag): parts recompose the id", compose_id($ts, $gtag, $worker, $seq) === $id,
            "id=$id parts=" . show($d));
    }

    $known = array(1700000000123, 5, 3, 7);
    $r = $c->id_decode(ctx(), compose_id(1700000000123, 5, 3, 7));
    check('id_decode of a known id', $r === $known, show($r));
    $r = $c->id_decode(ctx(0, ''), compose_id(1700000000123, 31, 31, 4095));
    check('id_decode does not validate ctx', $r === array(1700000000123, 31, 31, 4095), show($r));

    foreach (array(32, -1, 1000) as $tag) {
        check_throws("id_next_with_tag($tag) -> TApplicationException", TApplicationException::class,
            function () use ($c, $tag) { return $c->id_next_with_tag(ctx(), $tag); });
        $p = $c->ping(ctx());
        check("ping after id_next_with_tag($tag)", (bool)preg_match(PING_RE, $p), show($p));
    }
});

// ---- lcache -------------------------------------------------------------------------------------------

section('lcache', function () use ($c, $uniq) {
    $k = "$uniq-k";
    check('lc_set -> true', $c->lc_set(ctx(), $k, 'hello') === true);
    $r = $c->lc_get(ctx(), $k);
    check('lc_get -> value', $r === 'hello', show($r));
    check('lc_set overwrite -> true', $c->lc_set(ctx(), $k, 'world') === true);
    check('lc_get -> new value', $c->lc_get(ctx(), $k) === 'world');
    $r = $c->lc_del(ctx(), $k);
    check('lc_del -> null', $r === null, show($r));
    check_throws('lc_get after lc_del -> TCacheMissed', \fun\rpc\TCacheMissed::class,
        function () use ($c, $k) { return $c->lc_get(ctx(), $k); });
    check_throws('lc_get of a missing key -> TCacheMissed', \fun\rpc\TCacheMissed::class,
        function () use ($c, $uniq) { return $c->lc_get(ctx(), "$uniq-never-set"); });
    $p = $c->ping(ctx());
    check('ping after TCacheMissed', (bool)preg_match(PING_RE, $p), show($p));

    $bin = '';
    for ($i = 0; $i < 256; $i++) {
        $bin .= chr($i);
    }
    $bin = str_repeat($bin, 3);
    check('lc_set all 256 byte values', $c->lc_set(ctx(), "$uniq-bin", $bin) === true);
    $r = $c->lc_get(ctx(), "$uniq-bin");
    check('lc_get all 256 byte values round-trip', $r === $bin, 'len ' . strlen((string)$r));

    $big = random_bytes(1 << 20);
    check('lc_set 1 MiB', $c->lc_set(ctx(), "$uniq-big", $big) === true);
    $r = $c->lc_get(ctx(), "$uniq-big");
    check('lc_get 1 MiB round-trip', $r === $big, 'len ' . strlen((string)$r));
    $c->lc_del(ctx(), "$uniq-big");
});

// ---- lock ---------------------------------------------------------------------------------------------

section('lock', function () use ($c, $uniq, $HOST, $PORT) {
    $k = "$uniq-lock";
    check('lock -> true', $c->lock(ctx(), 'php', $k) === true);
    check('lock while held -> false', $c->lock(ctx(), 'php', $k) === false);
    list($c2) = connect_raw($HOST, $PORT);
    check('lock while held, other connection -> false', $c2->lock(ctx(), 'other', $k) === false);
    $r = $c->unlock(ctx(), 'php', $k);
    check('unlock -> null', $r === null, show($r));
    check('lock after unlock -> true', $c2->lock(ctx(), 'other', $k) === true);
    $c2->unlock(ctx(), 'other', $k);
});

// ---- registry -----------------------------------------------------------------------------------------

section('registry', function () use ($c, $uniq) {
    $root = "/$uniq";
    check('zk_create with implicit parents -> true', $c->zk_create(ctx(), "$root/a/b", 'data') === true);
    check('zk_create existing -> false', $c->zk_create(ctx(), "$root/a/b", 'x') === false);
    check('zk_create implicit parent -> false', $c->zk_create(ctx(), "$root/a", 'x') === false);
    check('zk_create sibling', $c->zk_create(ctx(), "$root/a/a0", '') === true);
    check('zk_create sibling 2', $c->zk_create(ctx(), "$root/a/c", 'c') === true);
    $r = $c->zk_children(ctx(), $root);
    check('zk_children root', $r === array('a'), show($r));
    $r = $c->zk_children(ctx(), "$root/a");
    check('zk_children sorted', $r === array('a0', 'b', 'c'), show($r));
    $r = $c->zk_children(ctx(), "$root/missing");
    check('zk_children of a missing path -> []', $r === array(), show($r));
    check('zk_del existing -> true', $c->zk_del(ctx(), "$root/a/b") === true);
    check('zk_del again -> false', $c->zk_del(ctx(), "$root/a/b") === false);
    check('zk_del subtree -> true', $c->zk_del(ctx(), $root) === true);
    $r = $c->zk_children(ctx(), "$root/a");
    check('subtree gone', $r === array(), show($r));
    foreach (array('', 'a/b', "$root/a//b", "$root/a/") as $bad) {
        foreach (array('zk_create', 'zk_children', 'zk_del') as $m) {
            check_throws("$m('$bad') -> TApplicationException", TApplicationException::class,
                function () use ($c, $m, $bad) {
                    return $m === 'zk_create' ? $c->zk_create(ctx(), $bad, 'd') : $c->$m(ctx(), $bad);
                });
        }
    }
    $p = $c->ping(ctx());
    check('ping after invalid paths', (bool)preg_match(PING_RE, $p), show($p));
});

// ---- invalid Context ----------------------------------------------------------------------------------

section('invalid context', function () use ($c, $uniq) {
    $calls = array(
        'ping' => function ($x) use ($c) { return $c->ping($x); },
        'id_next' => function ($x) use ($c) { return $c->id_next($x); },
        'id_next_with_tag' => function ($x) use ($c) { return $c->id_next_with_tag($x, 1); },
        'lc_set' => function ($x) use ($c, $uniq) { return $c->lc_set($x, "$uniq-bad", 'v'); },
        'lc_get' => function ($x) use ($c, $uniq) { return $c->lc_get($x, "$uniq-bad"); },
        'lc_del' => function ($x) use ($c, $uniq) { return $c->lc_del($x, "$uniq-bad"); },
        'lock' => function ($x) use ($c, $uniq) { return $c->lock($x, 'php', "$uniq-bad"); },
        'unlock' => function ($x) use ($c, $uniq) { return $c->unlock($x, 'php', "$uniq-bad"); },
        'zk_create' => function ($x) use ($c, $uniq) { return $c->zk_create($x, "/$uniq-bad/x", 'd'); },
        'zk_children' => function ($x) use ($c, $uniq) { return $c->zk_children($x, "/$uniq-bad"); },
        'zk_del' => function ($x) use ($c, $uniq) { return $c->zk_del($x, "/$uniq-bad"); },
    );
    foreach ($calls as $m => $f) {
        foreach (array('rid=0' => ctx(0), 'reason=""' => ctx(null, '')) as $what => $bad) {
            check_throws("$m with $what -> TApplicationException", TApplicationException::class,
                function () use ($f, $bad) { return $f($bad); });
        }
    }
    $p = $c->ping(ctx());
    check('ping on the same connection after invalid contexts', (bool)preg_match(PING_RE, $p), show($p));
    check_throws('invalid lc_set stored nothing', \fun\rpc\TCacheMissed::class,
        function () use ($c, $uniq) { return $c->lc_get(ctx(), "$uniq-bad"); });
});

// ---- unknown method -----------------------------------------------------------------------------------

section('unknown method', function () use ($c, $proto, $trans) {
    $proto->writeMessageBegin('no_such_method', TMessageType::CALL, 77);
    $proto->writeStructBegin('no_such_method_args');
    $proto->writeFieldStop();
    $proto->writeStructEnd();
    $proto->writeMessageEnd();
    $trans->flush();
    $name = null;
    $type = 0;
    $seq = 0;
    $proto->readMessageBegin($name, $type, $seq);
    check('unknown method: reply is an EXCEPTION message', $type === TMessageType::EXCEPTION, "type=$type");
    check('unknown method: name and seqid echoed', $name === 'no_such_method' && $seq === 77, "$name/$seq");
    $x = new TApplicationException();
    $x->read($proto);
    $proto->readMessageEnd();
    check('unknown method: UNKNOWN_METHOD', $x->getCode() === TApplicationException::UNKNOWN_METHOD,
        'code=' . $x->getCode() . ' message=' . $x->getMessage());
    $p = $c->ping(ctx());
    check('ping on the same connection after unknown method', (bool)preg_match(PING_RE, $p), show($p));
});

$trans->close();

// ---- FaeClient ----------------------------------------------------------------------------------------

foreach (array(false, true) as $framed) {
    $kind = $framed ? 'framed' : 'buffered';
    section("FaeClient ($kind)", function () use ($HOST, $PORT, $uniq, $framed, $kind) {
        $fae = new FaeClient(array(fae_server($HOST, $PORT)), 'php-test.FaeClient', 3,
            array('framed' => $framed, 'protocol' => fae_protocol()));
        check("[$kind] FaeClient noop", $fae->noop(12) === 12);
        $p = $fae->ping();
        check("[$kind] FaeClient ping", (bool)preg_match(PING_RE, $p), show($p));
        $a = $fae->id_next();
        $b = $fae->id_next();
        check("[$kind] FaeClient id_next increasing", $a > 0 && $b > $a, "$a $b");
        $t = $fae->id_next_with_tag(9);
        $d = $fae->id_decode($t);
        check("[$kind] FaeClient id_next_with_tag/id_decode", is_array($d) && $d[1] === 9
            && abs($d[0] - now_ms()) < 60000, show($d));
        check_throws("[$kind] FaeClient id_next_with_tag(32)", TApplicationException::class,
            function () use ($fae) { return $fae->id_next_with_tag(32); });
        check("[$kind] FaeClient still connected after an application error", $fae->addr !== null);

        $k = "$uniq-fae-$kind";
        check("[$kind] FaeClient lc_set", $fae->lc_set($k, "\x00\xff\x01") === true);
        check("[$kind] FaeClient lc_get", $fae->lc_get($k) === "\x00\xff\x01");
        $fae->lc_del($k);
        check_throws("[$kind] FaeClient lc_get after lc_del -> TCacheMissed", \fun\rpc\TCacheMissed::class,
            function () use ($fae, $k) { return $fae->lc_get($k); });

        check("[$kind] FaeClient lock", $fae->lock('php', "$k-lock") === true);
        check("[$kind] FaeClient lock held", $fae->lock('php', "$k-lock") === false);
        $fae->unlock('php', "$k-lock");
        check("[$kind] FaeClient lock after unlock", $fae->lock('php', "$k-lock") === true);
        $fae->unlock('php', "$k-lock");

        $root = "/$uniq-fae-$kind";
        check("[$kind] FaeClient zk_create", $fae->zk_create("$root/y", 'd') === true);
        check("[$kind] FaeClient zk_create 2", $fae->zk_create("$root/x", 'd') === true);
        $r = $fae->zk_children($root);
        check("[$kind] FaeClient zk_children", $r === array('x', 'y'), show($r));
        check("[$kind] FaeClient zk_del", $fae->zk_del($root) === true);
        check("[$kind] FaeClient zk_del again", $fae->zk_del($root) === false);
        $fae->close();
        check("[$kind] FaeClient reconnects after close", $fae->noop(5) === 5);
        $fae->close();
    });
}

section('FaeClient pool', function () use ($HOST, $PORT) {
    $rids = array();
    $fae = new FaeClient("$HOST:$PORT", 'php-test.pool');
    for ($i = 0; $i < 1000; $i++) {
        $rids[$fae->context()->rid] = true;
    }
    check('FaeClient: 1000 distinct positive rids', count($rids) === 1000 && min(array_keys($rids)) > 0);
    check('FaeClient: context carries reason and uid',
        $fae->context()->reason === 'php-test.pool' && $fae->context('x')->reason === 'x');

    $dead = free_port();
    $ok = true;
    for ($i = 0; $i < 20; $i++) { // the first host is random: both orders get exercised
        $f = new FaeClient(array("127.0.0.1:$dead", "$HOST:$PORT"), 'php-test.retry', 0,
            array('connect_timeout_ms' => 500));
        $p = $f->ping();
        if (!preg_match(PING_RE, $p) || $f->addr[1] !== $PORT) {
            $ok = false;
        }
        $f->close();
    }
    check('FaeClient: retries the next host when connecting fails', $ok);

    list($d1, $d2) = array(free_port(), free_port());
    $f = new FaeClient(array("127.0.0.1:$d1", "127.0.0.1:$d2"), 'php-test.down', 0,
        array('connect_timeout_ms' => 500));
    check_throws('FaeClient: all hosts down -> TException', TException::class,
        function () use ($f) { return $f->ping(); });
    check_throws('FaeClient: empty reason refused', InvalidArgumentException::class,
        function () { return new FaeClient("127.0.0.1:1", ''); });
    check_throws('FaeClient: bad address refused', InvalidArgumentException::class,
        function () { return new FaeClient('nohostport', 'r'); });
});

echo "php: $passed passed, $failed failed\n";
exit($failed > 0 ? 1 : 0);
