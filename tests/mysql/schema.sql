-- The databases the MySQL tests use, FAE's model: a lookup table that says which shard holds an entity,
-- four shards of the sharded pool "user" (servers user1..user4, one database each), and a global pool.
CREATE USER IF NOT EXISTS 'app'@'%' IDENTIFIED BY 'pw';
-- A user whose password the secrets test looks for in faed's logs, metrics and admin answers.
CREATE USER IF NOT EXISTS 'secretive'@'%' IDENTIFIED BY 'Zq9-secret-7Kx';

CREATE DATABASE IF NOT EXISTS fae_lookup;
CREATE TABLE IF NOT EXISTS fae_lookup.ShardLookup (
    entityId BIGINT NOT NULL PRIMARY KEY,
    shardId INT NOT NULL,
    shardLock INT NOT NULL DEFAULT 0
) ENGINE=InnoDB;
CREATE TABLE IF NOT EXISTS fae_lookup.OrderLookup LIKE fae_lookup.ShardLookup;

CREATE DATABASE IF NOT EXISTS fae_global;
CREATE TABLE IF NOT EXISTS fae_global.kv (
    k VARCHAR(255) NOT NULL PRIMARY KEY,
    v TEXT,
    n INT NULL,
    d DATE NULL,
    t DATETIME NULL
) ENGINE=InnoDB;
CREATE TABLE IF NOT EXISTS fae_global.doc (
    id BIGINT NOT NULL PRIMARY KEY,
    body TEXT
) ENGINE=InnoDB;

CREATE DATABASE IF NOT EXISTS fae_user1;
CREATE DATABASE IF NOT EXISTS fae_user2;
CREATE DATABASE IF NOT EXISTS fae_user3;
CREATE DATABASE IF NOT EXISTS fae_user4;
CREATE TABLE IF NOT EXISTS fae_user1.users (
    uid BIGINT NOT NULL PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    profile TEXT,
    UNIQUE KEY (name)
) ENGINE=InnoDB;
CREATE TABLE IF NOT EXISTS fae_user2.users LIKE fae_user1.users;
CREATE TABLE IF NOT EXISTS fae_user3.users LIKE fae_user1.users;
CREATE TABLE IF NOT EXISTS fae_user4.users LIKE fae_user1.users;

GRANT ALL ON fae_lookup.* TO 'app'@'%';
GRANT ALL ON fae_global.* TO 'app'@'%';
GRANT ALL ON fae_global.* TO 'secretive'@'%';
GRANT ALL ON fae_user1.* TO 'app'@'%';
GRANT ALL ON fae_user2.* TO 'app'@'%';
GRANT ALL ON fae_user3.* TO 'app'@'%';
GRANT ALL ON fae_user4.* TO 'app'@'%';
FLUSH PRIVILEGES;

CREATE TABLE IF NOT EXISTS fae_global.seq (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    v VARCHAR(255)
) ENGINE=InnoDB;
-- On three shards of four only: my_query_shards over it fails on the fourth.
CREATE TABLE IF NOT EXISTS fae_user1.partial (x INT);
CREATE TABLE IF NOT EXISTS fae_user2.partial (x INT);
CREATE TABLE IF NOT EXISTS fae_user3.partial (x INT);
