//! The live MariaDB (or MySQL) the mysql tests use.

use std::str::FromStr as _;

use idem_runtime::MySqlStore;
use idem_runtime::store::RecordsTable;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};

/// `IDEM_TEST_MYSQL_URL`, or the local server's root user without a password.
pub fn url() -> String {
    std::env::var("IDEM_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

/// The records table of the `store_mysql_custom_table` suite: a reserved word in mixed case,
/// in a database of its own, so that every statement that does not quote and qualify it fails.
///
/// # Panics
///
/// Never: the name is valid.
pub fn custom_table() -> RecordsTable {
    RecordsTable::parse("idem_custom.Order").expect("a valid table name")
}

/// Connects.
///
/// # Panics
///
/// When the server is unreachable: a missing service fails the test loudly.
pub async fn connect() -> MySqlStore {
    let url = url();
    MySqlStore::connect(&url).await.unwrap_or_else(|error| {
        panic!(
            "MariaDB/MySQL is not reachable at {url}: {error}. Run the tests with scripts/test, which starts it, or set IDEM_TEST_MYSQL_URL."
        )
    })
}

/// Connects, migrates `idem_records` and creates the conformance business tables.
///
/// # Panics
///
/// When the server is unreachable: a missing service fails the test loudly.
pub async fn store() -> MySqlStore {
    store_on(RecordsTable::default()).await
}

/// Connects with the records in `table`, creates its database if missing, migrates it and
/// creates the conformance business tables (in the default database).
///
/// # Panics
///
/// When the server is unreachable: a missing service fails the test loudly.
pub async fn store_on(table: RecordsTable) -> MySqlStore {
    let store = connect().await.with_records_table(table);
    if let Some(schema) = store.records_table().schema() {
        // A validated identifier.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE IF NOT EXISTS `{schema}`"
        )))
        .execute(store.pool())
        .await
        .expect("create the records table's database");
    }
    store.migrate().await.expect("migrate the records table");
    for ddl in crate::conformance::BUSINESS_TABLES {
        sqlx::query(*ddl)
            .execute(store.pool())
            .await
            .expect("create the conformance business tables");
    }
    store
}

/// A new, empty database, unique to this call, and a store connected to it, with the
/// conformance business tables in it and no records table: for applying a migration by hand.
/// Drop it with [`drop_database`].
///
/// # Panics
///
/// When the server is unreachable or refuses the set-up.
pub async fn fresh_database() -> (MySqlStore, String) {
    let database = format!("idem_fresh_{}", crate::unique_int());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(connect().await.pool())
        .await
        .expect("create a fresh database");
    let options = MySqlConnectOptions::from_str(&url()).expect("a MySQL URL");
    let pool = MySqlPoolOptions::new()
        .connect_with(options.database(&database))
        .await
        .expect("connect to the fresh database");
    for ddl in crate::conformance::BUSINESS_TABLES {
        sqlx::query(*ddl)
            .execute(&pool)
            .await
            .expect("create the conformance business tables");
    }
    (MySqlStore::new(pool), database)
}

/// Drops a database made by [`fresh_database`], with everything in it.
///
/// # Panics
///
/// When the server refuses.
pub async fn drop_database(database: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {database}"
    )))
    .execute(connect().await.pool())
    .await
    .expect("drop the fresh database");
}

/// Whether the server is MariaDB (else MySQL), which decides the migration file.
///
/// # Panics
///
/// When the server is unreachable.
pub async fn is_mariadb(store: &MySqlStore) -> bool {
    let version: String = sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(store.pool())
        .await
        .expect("the server's version");
    version.contains("MariaDB")
}
