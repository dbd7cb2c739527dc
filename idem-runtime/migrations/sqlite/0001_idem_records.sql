-- idem's dedup records on SQLite: one row per processed message; timestamps are Unix
-- milliseconds. `SqliteStore::migrate()` runs this SQL. For a table other than `idem_records`,
-- take the text of `idem_runtime::store::migrations::sqlite(&table)` instead.
CREATE TABLE IF NOT EXISTS idem_records (
    scope         TEXT    NOT NULL,
    record_key    TEXT    NOT NULL,
    fingerprint   TEXT,
    response      TEXT,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER,
    PRIMARY KEY (scope, record_key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idem_records_expires_at_ms
    ON idem_records (expires_at_ms) WHERE expires_at_ms IS NOT NULL;
