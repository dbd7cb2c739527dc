-- idem's records table on PostgreSQL, split into 8 hash partitions of (scope, record_key):
-- the same columns, primary key and expiry index as migrations/postgres/0001_idem_records.sql,
-- so the store uses it as it is (`PgStore::migrate()` then finds it and changes nothing).
-- Each partition is vacuumed on its own (autovacuum works on several at once) and its indexes
-- stay an eighth of the size, which is what a large table's purges cost.
--
-- Not by time: PostgreSQL requires a partitioned table's primary key to contain the partition
-- key, so a table partitioned by `created_at_ms` could only be unique on
-- (scope, record_key, created_at_ms), and a redelivery, written at another time, would not
-- conflict with its first delivery: the gate would let it through. See the README, "Operating".
--
-- Run it instead of the shipped migration, on a database without the table (for another
-- table name, replace `idem_records` throughout and pass it to `with_records_table`).
CREATE TABLE idem_records (
    scope         TEXT   NOT NULL,
    record_key    TEXT   NOT NULL,
    fingerprint   TEXT,
    response      TEXT,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT,
    PRIMARY KEY (scope, record_key)
) PARTITION BY HASH (scope, record_key);
CREATE TABLE idem_records_p0 PARTITION OF idem_records FOR VALUES WITH (MODULUS 8, REMAINDER 0);
CREATE TABLE idem_records_p1 PARTITION OF idem_records FOR VALUES WITH (MODULUS 8, REMAINDER 1);
CREATE TABLE idem_records_p2 PARTITION OF idem_records FOR VALUES WITH (MODULUS 8, REMAINDER 2);
CREATE TABLE idem_records_p3 PARTITION OF idem_records FOR VALUES WITH (MODULUS 8, REMAINDER 3);
CREATE TABLE idem_records_p4 PARTITION OF idem_records FOR VALUES WITH (MODULUS 8, REMAINDER 4);
CREATE TABLE idem_records_p5 PARTITION OF idem_records FOR VALUES WITH (MODULUS 8, REMAINDER 5);
CREATE TABLE idem_records_p6 PARTITION OF idem_records FOR VALUES WITH (MODULUS 8, REMAINDER 6);
CREATE TABLE idem_records_p7 PARTITION OF idem_records FOR VALUES WITH (MODULUS 8, REMAINDER 7);
CREATE INDEX idem_records_expires_at_ms
    ON idem_records (expires_at_ms) WHERE expires_at_ms IS NOT NULL;
