-- idem's dedup records on PostgreSQL: one row per processed message; timestamps are Unix
-- milliseconds. `PgStore::migrate()` runs this SQL (under an advisory lock that serialises
-- concurrent runs). For a table other than `idem_records`, take the text of
-- `idem_runtime::store::migrations::postgres(&table)` instead.
CREATE TABLE IF NOT EXISTS idem_records (
    scope         TEXT   NOT NULL,
    record_key    TEXT   NOT NULL,
    fingerprint   TEXT,
    response      TEXT,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT,
    PRIMARY KEY (scope, record_key)
);
CREATE INDEX IF NOT EXISTS idem_records_expires_at_ms
    ON idem_records (expires_at_ms) WHERE expires_at_ms IS NOT NULL;
