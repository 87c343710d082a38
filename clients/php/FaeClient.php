<?php
/**
 * FaeClient: a thin PHP helper over the Thrift-generated FunServant client (what FAE's PHP helper did).
 *
 * The generated code is not shipped: produce it with
 *
 *     thrift --gen php -out GENDIR idl/fae.thrift
 *
 * and make both it (namespace fun\rpc) and the Thrift PHP library (namespace Thrift\) loadable, for example
 * with FaeClient::registerAutoload(GENDIR) below, or with your own autoloader.
 *
 * What the helper adds to the generated \fun\rpc\FunServantClient, and nothing more:
 *  - a pool of servers given as "host:port" strings or unix sockets ("unix:///run/fae/faed.sock"); a
 *    connection goes to one picked at random;
 *  - a connect timeout and send/receive timeouts in milliseconds (TSocket::setSendTimeout/setRecvTimeout);
 *  - one retry when *connecting* fails: the next host of the pool is tried once (with a single host, that
 *    host once more). A call that fails once the connection is up is never retried (calls are not all
 *    idempotent): the connection is closed, the next call reconnects, and the exception goes to the caller;
 *  - a fresh \fun\rpc\Context for every request: rid from a per-process random base plus a counter (never 0),
 *    reason and uid given by the application;
 *  - TBufferedTransport (or TFramedTransport with 'framed' => true) and TBinaryProtocol, the accelerated one
 *    when the thrift_protocol extension is loaded (or TCompactProtocol with 'protocol' => 'compact').
 *
 * Example:
 *     require 'FaeClient.php';
 *     FaeClient::registerAutoload('/path/to/gen-php');
 *     $fae = new FaeClient(['10.0.0.1:9001', '10.0.0.2:9001'], 'user.login', $uid);
 *     $fae->lc_set('k', 'v');
 *
 * Errors come through unchanged: \fun\rpc\TCacheMissed for a cache miss, \Thrift\Exception\TApplicationException
 * for an application error (the connection stays usable), \Thrift\Exception\TException (TTransportException
 * or the plain TException that TSocket::open throws) for a network failure.
 */

use Thrift\Exception\TException;
use Thrift\Exception\TProtocolException;
use Thrift\Exception\TTransportException;
use Thrift\Protocol\TBinaryProtocol;
use Thrift\Protocol\TBinaryProtocolAccelerated;
use Thrift\Protocol\TCompactProtocol;
use Thrift\Transport\TBufferedTransport;
use Thrift\Transport\TFramedTransport;
use Thrift\Transport\TSocket;

class FaeClient
{
    /** @var array list of [host, port] */
    private $hosts;
    /** @var string */
    public $reason;
    /** @var int */
    public $uid;
    /** @var int milliseconds */
    public $connectTimeoutMs = 1000;
    /** @var int milliseconds */
    public $timeoutMs = 5000;
    /** @var bool */
    public $framed = false;
    /** @var string "binary" or "compact" */
    public $protocol = 'binary';
    /** @var array|null [host, port] of the open connection */
    public $addr = null;

    private $transport = null;
    private $client = null;

    private static $ridPid = null;
    private static $ridBase = 0;
    private static $ridCounter = 0;

    /**
     * @param string|array $hosts "h1:p1,h2:p2" or ["h1:p1", "h2:p2"]
     * @param string $reason  why the application calls (required, non-empty)
     * @param int $uid
     * @param array $opts     connect_timeout_ms, timeout_ms, framed
     */
    public function __construct($hosts, $reason, $uid = 0, array $opts = array())
    {
        if ($reason === null || $reason === '') {
            throw new \InvalidArgumentException('reason must not be empty');
        }
        $this->hosts = self::parseHosts($hosts);
        $this->reason = $reason;
        $this->uid = $uid;
        if (isset($opts['connect_timeout_ms'])) {
            $this->connectTimeoutMs = (int)$opts['connect_timeout_ms'];
        }
        if (isset($opts['timeout_ms'])) {
            $this->timeoutMs = (int)$opts['timeout_ms'];
        }
        if (isset($opts['framed'])) {
            $this->framed = (bool)$opts['framed'];
        }
        if (isset($opts['protocol'])) {
            if ($opts['protocol'] !== 'binary' && $opts['protocol'] !== 'compact') {
                throw new \InvalidArgumentException("protocol must be 'binary' or 'compact'");
            }
            $this->protocol = $opts['protocol'];
        }
    }

    /**
     * Autoloading for the generated code (fun\rpc\ under $genDir) and the Thrift library (Thrift\ under
     * $thriftLibDir, laid out either as Thrift/Transport/... or, as Debian's php-thrift does, Transport/...).
     */
    public static function registerAutoload($genDir, $thriftLibDir = '/usr/lib/php')
    {
        spl_autoload_register(function ($class) use ($genDir, $thriftLibDir) {
            $class = ltrim($class, '\\');
            $candidates = array();
            if (strpos($class, 'fun\\rpc\\') === 0) {
                $candidates[] = $genDir . '/' . str_replace('\\', '/', $class) . '.php';
            } elseif (strpos($class, 'Thrift\\') === 0) {
                $rel = str_replace('\\', '/', $class) . '.php';
                $candidates[] = $thriftLibDir . '/' . $rel;
                $candidates[] = $thriftLibDir . '/' . substr($rel, strlen('Thrift/'));
            }
            foreach ($candidates as $file) {
                if (is_file($file)) {
                    require_once $file;
                    return;
                }
            }
        });
    }

    /** "h1:p1,h2:p2" or ["h1:p1", "unix:///path", ...] -> [[h1, p1], ["unix:///path", 0], ...] */
    public static function parseHosts($hosts)
    {
        if (is_string($hosts)) {
            $hosts = explode(',', $hosts);
        }
        $out = array();
        foreach ($hosts as $h) {
            $h = trim($h);
            if ($h === '') {
                continue;
            }
            if (strpos($h, 'unix://') === 0) {
                $out[] = array($h, 0);
                continue;
            }
            $i = strrpos($h, ':');
            $host = $i === false ? '' : trim(substr($h, 0, $i), '[]');
            $port = $i === false ? '' : substr($h, $i + 1);
            if ($host === '' || !ctype_digit($port)) {
                throw new \InvalidArgumentException("bad server address '$h', want host:port");
            }
            $out[] = array($host, (int)$port);
        }
        if (!$out) {
            throw new \InvalidArgumentException('empty server list');
        }
        return $out;
    }

    /** The next request id of this process: positive, never 0; a new random base after a fork. */
    public static function nextRid()
    {
        $pid = getmypid();
        if (self::$ridPid !== $pid) {
            self::$ridPid = $pid;
            self::$ridBase = random_int(1, 0x7FFFFFFF) << 32;
            self::$ridCounter = 0;
        }
        self::$ridCounter = (self::$ridCounter + 1) & 0xFFFFFFFF;
        if (self::$ridCounter === 0) {
            self::$ridCounter = 1;
        }
        return self::$ridBase | self::$ridCounter;
    }

    /** A new Context for one request (a new rid each time). */
    public function context($reason = null)
    {
        return new \fun\rpc\Context(array(
            'rid' => self::nextRid(),
            'reason' => ($reason === null || $reason === '') ? $this->reason : $reason,
            'uid' => $this->uid,
        ));
    }

    // ---- connection ---------------------------------------------------------------------------------

    /** A TSocket on a unix socket: TSocket itself opens TCP only, so the stream is opened here. */
    public static function unixSocket($url, $timeoutMs)
    {
        $h = @stream_socket_client($url, $errno, $errstr, $timeoutMs / 1000.0);
        if ($h === false) {
            throw new TTransportException("cannot connect to $url: $errstr ($errno)", TTransportException::NOT_OPEN);
        }
        $socket = new TSocket('localhost', 1);
        $socket->setHandle($h);
        return $socket;
    }

    /** The protocol over $transport: compact, or binary (accelerated when the extension is loaded). */
    public static function protocolOver($transport, $protocol)
    {
        if ($protocol === 'compact') {
            return new TCompactProtocol($transport);
        }
        return function_exists('thrift_protocol_write_binary')
            ? new TBinaryProtocolAccelerated($transport)
            : new TBinaryProtocol($transport);
    }

    private function connect($host, $port)
    {
        $socket = $port === 0 ? self::unixSocket($host, $this->connectTimeoutMs) : new TSocket($host, $port);
        $socket->setSendTimeout($this->connectTimeoutMs);   // TSocket::open uses the send timeout to connect
        $socket->setRecvTimeout($this->timeoutMs);
        $transport = $this->framed ? new TFramedTransport($socket) : new TBufferedTransport($socket, 8192, 8192);
        if (!$transport->isOpen()) { // a unix socket comes open
            $transport->open();
        }
        $socket->setSendTimeout($this->timeoutMs);
        return $transport;
    }

    /** Connect if not connected: a random host of the pool, then (once) the next one. */
    public function open()
    {
        if ($this->client !== null) {
            return;
        }
        $n = count($this->hosts);
        $start = mt_rand(0, $n - 1);
        $last = null;
        for ($i = 0; $i < 2; $i++) {
            list($host, $port) = $this->hosts[($start + $i) % $n];
            try {
                $transport = $this->connect($host, $port);
            } catch (TException $e) {
                $last = $e;
                continue;
            }
            $protocol = self::protocolOver($transport, $this->protocol);
            $this->transport = $transport;
            $this->client = new \fun\rpc\FunServantClient($protocol);
            $this->addr = array($host, $port);
            return;
        }
        throw $last;
    }

    public function close()
    {
        if ($this->transport !== null) {
            try {
                $this->transport->close();
            } catch (\Exception $e) {
                // closing a broken socket: nothing to do
            }
        }
        $this->transport = null;
        $this->client = null;
        $this->addr = null;
    }

    public function __destruct()
    {
        $this->close();
    }

    private function call($method, array $args)
    {
        $this->open();
        try {
            return call_user_func_array(array($this->client, $method), $args);
        } catch (TTransportException $e) {
            // The stream is in an unknown state: drop it, the next call reconnects.
            $this->close();
            throw $e;
        } catch (TProtocolException $e) {
            $this->close();
            throw $e;
        }
    }

    // ---- FunServant, one method per IDL method; ctx is filled in ----------------------------------------

    public function noop($x)
    {
        return $this->call('noop', array($x));
    }

    public function ping()
    {
        return $this->call('ping', array($this->context()));
    }

    public function id_next()
    {
        return $this->call('id_next', array($this->context()));
    }

    public function id_next_with_tag($tag)
    {
        return $this->call('id_next_with_tag', array($this->context(), $tag));
    }

    /** @return array [ts_ms, tag, worker_id, seq] */
    public function id_decode($id)
    {
        return $this->call('id_decode', array($this->context(), $id));
    }

    public function lc_set($key, $value)
    {
        return $this->call('lc_set', array($this->context(), $key, $value));
    }

    /** @throws \fun\rpc\TCacheMissed when absent */
    public function lc_get($key)
    {
        return $this->call('lc_get', array($this->context(), $key));
    }

    public function lc_del($key)
    {
        return $this->call('lc_del', array($this->context(), $key));
    }

    public function lock($reason, $key)
    {
        return $this->call('lock', array($this->context(), $reason, $key));
    }

    public function unlock($reason, $key)
    {
        return $this->call('unlock', array($this->context(), $reason, $key));
    }

    public function mc_set($pool, $key, \fun\rpc\TMemcacheData $value, $expiration)
    {
        return $this->call('mc_set', array($this->context(), $pool, $key, $value, $expiration));
    }

    public function mc_get($pool, $key)
    {
        return $this->call('mc_get', array($this->context(), $pool, $key));
    }

    public function mc_add($pool, $key, \fun\rpc\TMemcacheData $value, $expiration)
    {
        return $this->call('mc_add', array($this->context(), $pool, $key, $value, $expiration));
    }

    public function mc_delete($pool, $key)
    {
        return $this->call('mc_delete', array($this->context(), $pool, $key));
    }

    public function mc_increment($pool, $key, $delta)
    {
        return $this->call('mc_increment', array($this->context(), $pool, $key, $delta));
    }

    public function rd_call($cmd, $pool, array $keysAndArgs)
    {
        return $this->call('rd_call', array($this->context(), $cmd, $pool, $keysAndArgs));
    }

    public function my_query($pool, $table, $hintId, $sql, array $args, $cacheKey = '')
    {
        return $this->call('my_query', array($this->context(), $pool, $table, $hintId, $sql, $args, $cacheKey));
    }

    public function my_bulk_exec(array $pool, array $table, array $hintId, array $sql, array $args, array $cacheKey)
    {
        return $this->call('my_bulk_exec', array($this->context(), $pool, $table, $hintId, $sql, $args, $cacheKey));
    }

    public function my_query_shards($pool, $table, $sql, array $args)
    {
        return $this->call('my_query_shards', array($this->context(), $pool, $table, $sql, $args));
    }

    public function my_merge($pool, $table, $hintId, $where, $key, $column, $jsonValue)
    {
        return $this->call('my_merge',
            array($this->context(), $pool, $table, $hintId, $where, $key, $column, $jsonValue));
    }

    public function my_evict($cacheKey)
    {
        return $this->call('my_evict', array($this->context(), $cacheKey));
    }

    public function zk_create($path, $data)
    {
        return $this->call('zk_create', array($this->context(), $path, $data));
    }

    public function zk_children($path)
    {
        return $this->call('zk_children', array($this->context(), $path));
    }

    public function zk_del($path)
    {
        return $this->call('zk_del', array($this->context(), $path));
    }
}
