<?php
/**
 * my_* from PHP, against a running faed and the MariaDB behind it (tests/mysql: pools "global", "lookup" and the
 * sharded "user" of four shards):
 *
 *     FAE_BACKENDS='{"mysql":"HOST:PORT",...}' php tests/php/test_mysql.php HOST PORT GENDIR
 *
 * Every my_* method and its error paths through the generated client; what fae did is checked in the database
 * with mysqli. The session survives each application error. Last line: "php-mysql: N passed, M failed".
 */

use Thrift\Exception\TApplicationException;
use Thrift\Protocol\TBinaryProtocol;
use Thrift\Protocol\TBinaryProtocolAccelerated;
use Thrift\Transport\TBufferedTransport;
use Thrift\Transport\TSocket;

if ($argc != 4) {
    fwrite(STDERR, "usage: FAE_BACKENDS=... php {$argv[0]} HOST PORT GENDIR\n");
    exit(2);
}
list(, $HOST, $PORT, $GENDIR) = $argv;
$PORT = (int)$PORT;
$B = json_decode((string)getenv('FAE_BACKENDS'), true);
if (!is_array($B) || !isset($B['mysql'])) {
    fwrite(STDERR, "FAE_BACKENDS must name the mysql server\n");
    exit(2);
}
list($DBHOST, $DBPORT) = explode(':', $B['mysql']);

require __DIR__ . '/../../clients/php/FaeClient.php';
FaeClient::registerAutoload($GENDIR, getenv('THRIFT_PHP_LIB') ?: '/usr/lib/php');
error_reporting(E_ALL & ~E_DEPRECATED);
mysqli_report(MYSQLI_REPORT_ERROR | MYSQLI_REPORT_STRICT);

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

function check_app_error($name, array $needles, callable $f)
{
    try {
        $r = $f();
        check($name, false, 'no exception, returned ' . var_export($r, true));
    } catch (TApplicationException $e) {
        $missing = array_filter($needles, function ($n) use ($e) { return strpos($e->getMessage(), $n) === false; });
        check($name, !$missing, 'code ' . $e->getCode() . ': ' . $e->getMessage());
    } catch (Throwable $e) {
        check($name, false, get_class($e) . ': ' . $e->getMessage());
    }
}

function ctx()
{
    return new \fun\rpc\Context(array('rid' => random_int(1, PHP_INT_MAX), 'reason' => 'php-mysql', 'uid' => 1));
}

function db($name)
{
    global $DBHOST, $DBPORT;
    return new mysqli($DBHOST, 'app', 'pw', $name, (int)$DBPORT);
}

$socket = new TSocket($HOST, $PORT);
$socket->setSendTimeout(20000);
$socket->setRecvTimeout(20000);
$transport = new TBufferedTransport($socket, 8192, 8192);
$transport->open();
$protocol = function_exists('thrift_protocol_write_binary')
    ? new TBinaryProtocolAccelerated($transport) : new TBinaryProtocol($transport);
$c = new \fun\rpc\FunServantClient($protocol);
$uniq = sprintf('phpm-%d-%08x', getmypid(), random_int(0, 0x7FFFFFFF));

try {
    // my_query: exec, read, NULL, lastInsertId.
    $r = $c->my_query(ctx(), 'global', 'kv', 0, 'INSERT INTO kv (k, v, n) VALUES (?, ?, ?)', array($uniq, "it's", '3'), '');
    check('my_query exec: rowsAffected', $r->rowsAffected === 1, var_export($r, true));
    $r = $c->my_query(ctx(), 'global', 'kv', 0, 'SELECT k, v, n, d FROM kv WHERE k = ?', array($uniq), '');
    check('my_query read: cols and rows, NULL as "NULL"', $r->cols === array('k', 'v', 'n', 'd')
        && $r->rows === array(array($uniq, "it's", '3', 'NULL')), var_export($r, true));
    $r = $c->my_query(ctx(), 'global', 'seq', 0, 'INSERT INTO seq (v) VALUES (?)', array($uniq), '');
    check('my_query lastInsertId', $r->lastInsertId > 0, var_export($r, true));

    // Sharded: the lookup table places the entity.
    $eid = random_int(1000000000, PHP_INT_MAX >> 2);
    db('fae_lookup')->query("INSERT INTO ShardLookup (entityId, shardId) VALUES ($eid, 3)");
    $c->my_query(ctx(), 'user', 'users', $eid, 'INSERT INTO users (uid, name) VALUES (?, ?)', array("$eid", "p$eid"), '');
    $got = db('fae_user3')->query("SELECT name FROM users WHERE uid = $eid")->fetch_row();
    check('my_query on a sharded pool lands on the lookup\'s shard', $got === array("p$eid"), var_export($got, true));

    // Injection: stored and matched literally.
    $evil = "'; DROP TABLE kv; -- \\ \" $uniq";
    $c->my_query(ctx(), 'global', 'kv', 0, 'INSERT INTO kv (k, v) VALUES (?, ?)', array("$uniq-evil", $evil), '');
    $r = $c->my_query(ctx(), 'global', 'kv', 0, 'SELECT k FROM kv WHERE v = ?', array($evil), '');
    check('arguments are bound, never spliced', $r->rows === array(array("$uniq-evil")), var_export($r->rows, true));
    $r = $c->my_query(ctx(), 'global', 'kv', 0, 'SELECT COUNT(*) AS n FROM kv WHERE k = ?', array('1 OR 1=1'), '');
    check('1 OR 1=1 matches nothing', $r->rows === array(array('0')), var_export($r->rows, true));

    // Result cache and my_evict.
    $ck = "cache:$uniq";
    $read = function () use ($c, $uniq, $ck) {
        return $c->my_query(ctx(), 'global', 'kv', 0, 'SELECT v FROM kv WHERE k = ?', array($uniq), $ck)->rows;
    };
    check('cached read', $read() === array(array("it's")));
    db('fae_global')->query("UPDATE kv SET v = 'behind' WHERE k = '$uniq'");
    check('cached read answered from the cache', $read() === array(array("it's")));
    $c->my_evict(ctx(), $ck);
    check('my_evict evicts', $read() === array(array('behind')));

    // my_bulk_exec.
    $n = $c->my_bulk_exec(ctx(), array('global', 'global'), array('kv', 'kv'), array(0, 0),
        array('INSERT INTO kv (k) VALUES (?)', 'UPDATE kv SET n = 9 WHERE k = ?'),
        array(array("$uniq-b"), array("$uniq-b")), array('', ''));
    check('my_bulk_exec returns the rows affected', $n === 2, var_export($n, true));
    check_app_error('my_bulk_exec stops at the first error and names it', array('statement 1 (pool global)', '1054'),
        function () use ($c, $uniq) {
            return $c->my_bulk_exec(ctx(), array('global', 'global'), array('kv', 'kv'), array(0, 0),
                array('INSERT INTO kv (k) VALUES (?)', 'UPDATE kv SET nope = 1'), array(array("$uniq-c"), array()),
                array());
        });

    // my_query_shards.
    $r = $c->my_query_shards(ctx(), 'user', 'users', 'SELECT DATABASE() AS db', array());
    check('my_query_shards: every shard, in order', $r->rows === array(array('fae_user1'), array('fae_user2'),
        array('fae_user3'), array('fae_user4')), var_export($r->rows, true));
    check_app_error('my_query_shards names the failing shard', array('user4'), function () use ($c) {
        return $c->my_query_shards(ctx(), 'user', 'partial', 'SELECT x FROM partial', array());
    });

    // my_merge.
    $did = random_int(1, PHP_INT_MAX >> 2);
    db('fae_global')->query("INSERT INTO doc (id, body) VALUES ($did, '{\"a\":{\"b\":1}}')");
    $m = $c->my_merge(ctx(), 'global', 'doc', 0, 'id', "$did", 'body', '{"a":{"c":2},"d":3}');
    check('my_merge deep-merges', $m->ok === true && json_decode($m->newVal, true) === array('a' => array('b' => 1, 'c' => 2), 'd' => 3),
        var_export($m, true));
    check_app_error('my_merge refuses a where that is not a column name', array('not a plain column'),
        function () use ($c, $did) { return $c->my_merge(ctx(), 'global', 'doc', 0, 'id = 1 OR 1', "$did", 'body', '{}'); });

    // Errors.
    check_app_error('duplicate key is an application error with its code', array('MySQL error 1062'),
        function () use ($c, $uniq) { return $c->my_query(ctx(), 'global', 'kv', 0, 'INSERT INTO kv (k) VALUES (?)', array($uniq), ''); });
    check_app_error('unknown column', array('MySQL error 1054'),
        function () use ($c) { return $c->my_query(ctx(), 'global', 'kv', 0, 'SELECT nope FROM kv', array(), ''); });
    check_app_error('unknown pool lists the pools', array('unknown mysql pool', 'global'),
        function () use ($c) { return $c->my_query(ctx(), 'nosuch', 'kv', 0, 'SELECT 1', array(), ''); });
    check_app_error('missing lookup row', array('no row in lookup table'),
        function () use ($c) { return $c->my_query(ctx(), 'user', 'users', 987654321987, 'SELECT 1', array(), ''); });
    $locked = random_int(1000000000, PHP_INT_MAX >> 2);
    db('fae_lookup')->query("INSERT INTO ShardLookup (entityId, shardId, shardLock) VALUES ($locked, 1, 1)");
    check_app_error('shardLock refuses', array('being locked'),
        function () use ($c, $locked) { return $c->my_query(ctx(), 'user', 'users', $locked, 'SELECT 1', array(), ''); });
    check('session kept after the errors', $c->noop(21) === 21);
} catch (Throwable $e) {
    check('unexpected ' . get_class($e), false, $e->getMessage() . ' @ ' . $e->getFile() . ':' . $e->getLine());
}

echo "php-mysql: $passed passed, $failed failed\n";
exit($failed > 0 ? 1 : 0);
