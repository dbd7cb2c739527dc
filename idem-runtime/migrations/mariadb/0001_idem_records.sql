-- idem's dedup records on MariaDB (for MySQL 8, use ../mysql/: only the collation differs):
-- one row per processed message; timestamps are Unix milliseconds. `MySqlStore::migrate()`
-- runs this SQL on MariaDB. For a table other than `idem_records`, take the text of
-- `idem_runtime::store::migrations::mariadb(&table)` instead.
--
-- Scope and key fit one index entry: (200 + 500) characters x 4 bytes = 2,800 of InnoDB's
-- 3,072. The collation is binary and NO PAD, so that keys compare byte for byte, as on
-- PostgreSQL and SQLite: under `utf8mb4_bin` (PAD SPACE), "k" and "k " would be one key and the
-- second message would be skipped as a duplicate of the first. A table created by idem before
-- 2026-11-23 has a PAD SPACE collation: `MySqlStore::migrate()` converts it (this file, which
-- only creates a missing table, does not).
CREATE TABLE IF NOT EXISTS idem_records (
    scope         VARCHAR(200) NOT NULL,
    record_key    VARCHAR(500) NOT NULL,
    fingerprint   CHAR(64),
    response      MEDIUMTEXT,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT,
    PRIMARY KEY (scope, record_key),
    KEY idem_records_expires_at_ms (expires_at_ms)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_nopad_bin;
