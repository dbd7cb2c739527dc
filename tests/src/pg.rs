//! The live PostgreSQL the pg tests use.

use idem_runtime::PgStore;
use idem_runtime::store::RecordsTable;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// `IDEM_TEST_PG_URL`, or the local server with trust auth.
pub fn url() -> String {
    std::env::var("IDEM_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// The records table of the `store_pg_custom_table` suite: a reserved word in mixed case, in
/// a schema of its own, so that every statement that does not quote and qualify it fails.
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
/// When PostgreSQL is unreachable: a missing service fails the test loudly.
pub async fn connect() -> PgStore {
    let url = url();
    PgStore::connect(&url).await.unwrap_or_else(|error| {
        panic!(
            "PostgreSQL is not reachable at {url}: {error}. Run the tests with scripts/test, which starts it, or set IDEM_TEST_PG_URL."
        )
    })
}

/// Connects, migrates `idem_records` and creates the conformance business tables.
///
/// # Panics
///
/// When PostgreSQL is unreachable: a missing service fails the test loudly.
pub async fn store() -> PgStore {
    store_on(RecordsTable::default()).await
}

/// Connects with the records in `table`, creates its schema if missing, migrates it and
/// creates the conformance business tables (in the default schema).
///
/// # Panics
///
/// When PostgreSQL is unreachable: a missing service fails the test loudly.
pub async fn store_on(table: RecordsTable) -> PgStore {
    let store = connect().await.with_records_table(table);
    create_schema_and_business_tables(&store)
        .await
        .expect("create the records table's schema and the conformance business tables");
    store.migrate().await.expect("migrate the records table");
    store
}

async fn create_schema_and_business_tables(store: &PgStore) -> Result<(), sqlx::Error> {
    let mut tx = store.pool().begin().await?;
    // Tests run in parallel; DDL races on the catalog without a lock.
    sqlx::query("SELECT pg_advisory_xact_lock(7280321149621735002)")
        .execute(&mut *tx)
        .await?;
    if let Some(schema) = store.records_table().schema() {
        // A validated identifier.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
        )))
        .execute(&mut *tx)
        .await?;
    }
    for ddl in crate::conformance::BUSINESS_TABLES {
        sqlx::query(*ddl).execute(&mut *tx).await?;
    }
    tx.commit().await
}

/// A new, empty schema, unique to this call, and a store whose connections have it as their
/// default schema (`search_path`), with the conformance business tables in it and no records
/// table: for applying a migration by hand. Drop it with [`drop_schema`].
///
/// # Panics
///
/// When PostgreSQL is unreachable or refuses the set-up.
pub async fn fresh_schema() -> (PgStore, String) {
    let schema = format!("idem_fresh_{}", crate::unique_int());
    let admin = connect().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(admin.pool())
        .await
        .expect("create a fresh schema");
    let options: PgConnectOptions = url().parse().expect("a PostgreSQL URL");
    let pool = PgPoolOptions::new()
        .connect_with(options.options([("search_path", schema.as_str())]))
        .await
        .expect("connect in the fresh schema");
    for ddl in crate::conformance::BUSINESS_TABLES {
        sqlx::query(*ddl)
            .execute(&pool)
            .await
            .expect("create the conformance business tables");
    }
    (PgStore::new(pool), schema)
}

/// Drops a schema made by [`fresh_schema`], with everything in it.
///
/// # Panics
///
/// When PostgreSQL refuses.
pub async fn drop_schema(schema: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(connect().await.pool())
    .await
    .expect("drop the fresh schema");
}
