//! SQLite database files for the sqlite tests: one per test, under the target directory.

use std::path::PathBuf;

use idem_runtime::SqliteStore;

/// A fresh database file path for `label`, unique to this run.
pub fn db_path(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join("idem-tests");
    std::fs::create_dir_all(&dir).expect("create the sqlite test directory");
    dir.join(format!("{}.db", crate::unique_key(label)))
}

/// Opens a fresh database file, migrates it and creates the conformance business tables.
pub async fn store() -> SqliteStore {
    let store = SqliteStore::open(db_path("conformance"))
        .await
        .expect("open a sqlite database file");
    store.migrate().await.expect("migrate idem_records");
    for ddl in crate::conformance::BUSINESS_TABLES {
        sqlx::query(*ddl)
            .execute(store.pool())
            .await
            .expect("create the conformance business tables");
    }
    store
}
