<?php
/**
 * mc_* and rd_call from PHP, against a running faed and the real stores behind it:
 *
 *     FAE_BACKENDS='{"memcache":[...],"redis":[...],"placement":[a,b,c]}' php tests/php/test_backends.php HOST PORT GENDIR
 *
 * faed's pools (tests/php/run.sh writes them): "default" memcache (the two "memcache" servers, standard
 * placement), "default" redis (the two "redis" servers), and "php_standard", "php_consistent", "php_ketama": the
 * three "placement" servers with each placement strategy.
 *
 * Every mc_* and rd_call case and error through the generated client (the session survives each error), then
 * key placement against PHP's own extensions: keys written through fae are read by the `memcache` extension
 * (standard and consistent strategies) and the `memcached` extension (libketama compatible), and keys they
 * write are read through fae. One line per check; the last line is "php-backends: N passed, M failed".
 */

use Thrift\Exception\TApplicationException;
use Thrift\Protocol\TBinaryProtocol;
use Thrift\Protocol\TBinaryProtocolAccelerated;
use Thrift\Transport\TBufferedTransport;
use Thrift\Transport\TFramedTransport;
use Thrift\Transport\TSocket;

if ($argc != 4) {
    fwrite(STDERR, "usage: FAE_BACKENDS=... php {$argv[0]} HOST PORT GENDIR\n");
    exit(2);
}
list(, $HOST, $PORT, $GENDIR) = $argv;
$PORT = (int)$PORT;
$B = json_decode((string)getenv('FAE_BACKENDS'), true);
if (!is_array($B) || !isset($B['memcache'], $B['redis'], $B['placement'])) {
    fwrite(STDERR, "FAE_BACKENDS must name the memcache, redis and placement servers\n");
    exit(2);
}

require __DIR__ . '/../../clients/php/FaeClient.php';
FaeClient::registerAutoload($GENDIR, getenv('THRIFT_PHP_LIB') ?: '/usr/lib/php');
error_reporting(E_ALL & ~E_DEPRECATED);

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

/** $f must throw a TApplicationException whose message contains every string of $needles. */
function check_app_error($name, array $needles, callable $f)
{
    try {
        $r = $f();
        check($name, false, 'no exception, returned ' . var_export($r, true));
    } catch (TApplicationException $e) {
        $missing = array_filter($needles, function ($n) use ($e) { return strpos($e->getMessage(), $n) === false; });
        check($name, !$missing && $e->getCode() === TApplicationException::INTERNAL_ERROR,
            'code ' . $e->getCode() . ': ' . $e->getMessage());
    } catch (Throwable $e) {
        check($name, false, get_class($e) . ': ' . $e->getMessage());
    }
}

function section($name, callable $f)
{
    echo "# $name\n";
    try {
        $f();
    } catch (Throwable $e) {
        check("$name: unexpected " . get_class($e), false, $e->getMessage() . ' @ ' . $e->getFile() . ':' . $e->getLine());
    }
}

function ctx()
{
    return new \fun\rpc\Context(array('rid' => random_int(1, PHP_INT_MAX), 'reason' => 'php-backends', 'uid' => 1));
}

function data($v, $flags = 0)
{
    return new \fun\rpc\TMemcacheData(array('data' => $v, 'flags' => $flags));
}

function client($host, $port, $framed)
{
    // FAE_PHP_PROTOCOL=compact, FAE_PHP_UNIX=/path: the same checks in the compact protocol, over a unix socket.
    $unix = getenv('FAE_PHP_UNIX');
    $socket = $unix ? FaeClient::unixSocket("unix://$unix", 5000) : new TSocket($host, $port);
    $socket->setSendTimeout(10000);
    $socket->setRecvTimeout(10000);
    $transport = $framed ? new TFramedTransport($socket) : new TBufferedTransport($socket, 8192, 8192);
    if (!$transport->isOpen()) { // a unix socket comes open
        $transport->open();
    }
    $protocol = FaeClient::protocolOver($transport, getenv('FAE_PHP_PROTOCOL') ?: 'binary');
    return new \fun\rpc\FunServantClient($protocol);
}

$uniq = sprintf('phpb-%d-%08x', getmypid(), random_int(0, 0x7FFFFFFF));

foreach (array(false, true) as $framed) {
    $kind = $framed ? 'framed' : 'buffered';
    section("memcache ($kind)", function () use ($HOST, $PORT, $framed, $kind, $uniq) {
        $c = client($HOST, $PORT, $framed);
        $k = "$uniq-$kind-mc";
        check("[$kind] mc_set", $c->mc_set(ctx(), 'default', $k, data("v\x00\xff", 77), 60) === true);
        $v = $c->mc_get(ctx(), 'default', $k);
        check("[$kind] mc_get data and flags", $v->data === "v\x00\xff" && $v->flags === 77, var_export($v, true));
        check("[$kind] mc_add existing -> false", $c->mc_add(ctx(), 'default', $k, data('x'), 0) === false);
        check("[$kind] mc_add new -> true", $c->mc_add(ctx(), 'default', "$k-new", data('x'), 0) === true);
        check("[$kind] mc_delete -> true", $c->mc_delete(ctx(), 'default', $k) === true);
        check("[$kind] mc_delete again -> false", $c->mc_delete(ctx(), 'default', $k) === false);
        try {
            $c->mc_get(ctx(), 'default', $k);
            check("[$kind] mc_get miss -> TCacheMissed", false, 'no exception');
        } catch (\fun\rpc\TCacheMissed $e) {
            check("[$kind] mc_get miss -> TCacheMissed", true);
        }
        $n = "$k-n";
        $c->mc_set(ctx(), 'default', $n, data('7'), 0);
        check("[$kind] mc_increment +3", $c->mc_increment(ctx(), 'default', $n, 3) === 10);
        check("[$kind] mc_increment -4", $c->mc_increment(ctx(), 'default', $n, -4) === 6);
        check("[$kind] mc_increment floors at 0", $c->mc_increment(ctx(), 'default', $n, -50) === 0);
        check_app_error("[$kind] mc_increment of a missing key", array('not found'),
            function () use ($c, $k) { return $c->mc_increment(ctx(), 'default', "$k-none", 1); });
        check_app_error("[$kind] key of 251 bytes", array('invalid key', '251'),
            function () use ($c) { return $c->mc_get(ctx(), 'default', str_repeat('k', 251)); });
        check_app_error("[$kind] key with a space", array('invalid key'),
            function () use ($c) { return $c->mc_set(ctx(), 'default', 'a b', data('v'), 0); });
        check_app_error("[$kind] unknown pool", array('unknown memcache pool', 'default'),
            function () use ($c) { return $c->mc_get(ctx(), 'nosuch', 'k'); });
        check("[$kind] session kept after the errors", $c->noop(11) === 11);
    });

    section("redis ($kind)", function () use ($HOST, $PORT, $framed, $kind, $uniq) {
        $c = client($HOST, $PORT, $framed);
        $k = "$uniq-$kind-rd";
        check("[$kind] rd_call SET", $c->rd_call(ctx(), 'SET', 'default', array($k, 'hello')) === 'OK');
        check("[$kind] rd_call GET", $c->rd_call(ctx(), 'GET', 'default', array($k)) === 'hello');
        check("[$kind] rd_call INCR", $c->rd_call(ctx(), 'INCR', 'default', array("$k-n")) === '1');
        $c->rd_call(ctx(), 'RPUSH', 'default', array("$k-l", 'a', 'b'));
        $r = $c->rd_call(ctx(), 'LRANGE', 'default', array("$k-l", '0', '-1'));
        check("[$kind] rd_call LRANGE -> JSON array", json_decode($r, true) === array('a', 'b'), $r);
        check_app_error("[$kind] rd_call nil", array('nil'),
            function () use ($c, $k) { return $c->rd_call(ctx(), 'GET', 'default', array("$k-none")); });
        check_app_error("[$kind] rd_call WRONGTYPE", array('WRONGTYPE'),
            function () use ($c, $k) { return $c->rd_call(ctx(), 'GET', 'default', array("$k-l")); });
        check_app_error("[$kind] rd_call wrong arity", array('wrong number of arguments'),
            function () use ($c, $k) { return $c->rd_call(ctx(), 'GET', 'default', array($k, 'x')); });
        check_app_error("[$kind] rd_call FLUSHALL denied", array('FLUSHALL', 'refused'),
            function () use ($c) { return $c->rd_call(ctx(), 'FLUSHALL', 'default', array()); });
        check_app_error("[$kind] rd_call unknown pool", array('unknown redis pool'),
            function () use ($c, $k) { return $c->rd_call(ctx(), 'GET', 'nosuch', array($k)); });
        check("[$kind] key kept after the denied FLUSHALL", $c->rd_call(ctx(), 'GET', 'default', array($k)) === 'hello');
        check("[$kind] session kept after the errors", $c->noop(12) === 12);
    });
}

// ---- placement against PHP's own extensions -----------------------------------------------------------

/** A `memcache` extension client over the placement servers, with hash strategy $strategy. */
function php_memcache($servers, $strategy)
{
    ini_set('memcache.hash_strategy', $strategy);
    ini_set('memcache.hash_function', 'crc32');
    $m = new Memcache();
    foreach ($servers as $s) {
        list($h, $p) = explode(':', $s);
        $m->addServer($h, (int)$p);
    }
    return $m;
}

function php_memcached($servers)
{
    $m = new Memcached();
    $m->setOption(Memcached::OPT_LIBKETAMA_COMPATIBLE, true);
    $m->setOption(Memcached::OPT_COMPRESSION, false);
    foreach ($servers as $s) {
        list($h, $p) = explode(':', $s);
        $m->addServer($h, (int)$p);
    }
    return $m;
}

function flush_all($servers)
{
    foreach ($servers as $s) {
        $f = stream_socket_client("tcp://$s", $errno, $err, 5);
        fwrite($f, "flush_all\r\n");
        fgets($f);
        fclose($f);
    }
}

/** Which server holds $key, asked of each server directly. */
function holder($servers, $key)
{
    $at = array();
    foreach ($servers as $i => $s) {
        $f = stream_socket_client("tcp://$s", $errno, $err, 5);
        fwrite($f, "get $key\r\n");
        $line = fgets($f);
        if (strpos($line, 'VALUE') === 0) {
            $at[] = $i;
        }
        fclose($f);
    }
    return implode(',', $at);
}

section('placement', function () use ($HOST, $PORT, $B, $uniq) {
    $c = client($HOST, $PORT, false);
    $servers = $B['placement'];
    // Keys whose 15-bit crc32 hash is 0 (the standard strategy counts them as 1), and ordinary ones.
    $keys = array('z37384', 'z63051', 'z118415', 'z171314');
    for ($i = 0; $i < 60; $i++) {
        $keys[] = "key:$i";
    }
    $clients = array(
        'php_standard' => function () use ($servers) { return php_memcache($servers, 'standard'); },
        'php_consistent' => function () use ($servers) { return php_memcache($servers, 'consistent'); },
        'php_ketama' => function () use ($servers) { return php_memcached($servers); },
    );
    foreach ($clients as $pool => $make) {
        $php = $make();
        // fae writes, PHP reads.
        flush_all($servers);
        $bad = array();
        foreach ($keys as $k) {
            $c->mc_set(ctx(), $pool, $k, data("fae:$pool:$k"), 0);
        }
        $spread = array();
        foreach ($keys as $k) {
            $got = $php->get($k);
            if ($got !== "fae:$pool:$k") {
                $bad[] = "$k (at " . holder($servers, $k) . ', PHP got ' . var_export($got, true) . ')';
            }
            $spread[holder($servers, $k)] = true;
        }
        check("$pool: 64 keys written through fae are read by PHP", !$bad, implode('; ', array_slice($bad, 0, 5)));
        check("$pool: keys land on all three servers", count($spread) === 3, implode(' ', array_keys($spread)));
        // PHP writes, fae reads.
        flush_all($servers);
        foreach ($keys as $k) {
            $php->set($k, "php:$pool:$k");
        }
        $bad = array();
        foreach ($keys as $k) {
            try {
                $v = $c->mc_get(ctx(), $pool, $k);
                if ($v->data !== "php:$pool:$k") {
                    $bad[] = "$k: " . var_export($v->data, true);
                }
            } catch (\fun\rpc\TCacheMissed $e) {
                $bad[] = "$k: missed (at " . holder($servers, $k) . ')';
            }
        }
        check("$pool: 64 keys written by PHP are read through fae", !$bad, implode('; ', array_slice($bad, 0, 5)));
    }
});

echo "php-backends: $passed passed, $failed failed\n";
exit($failed > 0 ? 1 : 0);
