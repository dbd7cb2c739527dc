//! SQLite database files for the sqlite tests: one per test, under the target directory.

use std::path::PathBuf;

use idem_runtime::SqliteStore;
use idem_runtime::store::RecordsTable;

/// A fresh database file path for `label`, unique to this run.
pub fn db_path(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join("idem-tests");
    std::fs::create_dir_all(&dir).expect("create the sqlite test directory");
    dir.join(format!("{}.db", crate::unique_key(label)))
}

/// The records table of the `store_sqlite_custom_table` suite: a reserved word in mixed case,
/// qualified with the main database's name, so that every statement that does not quote it
/// fails, and the expiry index shows SQLite's own placement of the schema.
///
/// # Panics
///
/// Never: the name is valid.
pub fn custom_table() -> RecordsTable {
    RecordsTable::parse("main.Order").expect("a valid table name")
}

/// Opens a fresh database file with the conformance business tables and no records table.
///
/// # Panics
///
/// When the file cannot be created.
pub async fn fresh_database() -> SqliteStore {
    let store = SqliteStore::open(db_path("conformance"))
        .await
        .expect("open a sqlite database file");
    for ddl in crate::conformance::BUSINESS_TABLES {
        sqlx::query(*ddl)
            .execute(store.pool())
            .await
            .expect("create the conformance business tables");
    }
    store
}

/// Opens a fresh database file, migrates `idem_records` and creates the conformance business
/// tables.
pub async fn store() -> SqliteStore {
    store_on(RecordsTable::default()).await
}

/// Opens a fresh database file with the records in `table`, migrates it and creates the
/// conformance business tables.
///
/// # Panics
///
/// When the file cannot be created or migrated.
pub async fn store_on(table: RecordsTable) -> SqliteStore {
    let store = fresh_database().await.with_records_table(table);
    store.migrate().await.expect("migrate the records table");
    store
}
