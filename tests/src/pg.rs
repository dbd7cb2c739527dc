//! The live PostgreSQL the pg tests use.

use idem_runtime::PgStore;

/// `IDEM_TEST_PG_URL`, or the local server with trust auth.
pub fn url() -> String {
    std::env::var("IDEM_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Connects, migrates `idem_records` and creates the conformance business tables.
///
/// # Panics
///
/// When PostgreSQL is unreachable: a missing service fails the test loudly.
pub async fn store() -> PgStore {
    let url = url();
    let store = PgStore::connect(&url).await.unwrap_or_else(|error| {
        panic!(
            "PostgreSQL is not reachable at {url}: {error}. Run the tests with scripts/test, which starts it, or set IDEM_TEST_PG_URL."
        )
    });
    store.migrate().await.expect("migrate idem_records");
    create_business_tables(&store)
        .await
        .expect("create the conformance business tables");
    store
}

async fn create_business_tables(store: &PgStore) -> Result<(), sqlx::Error> {
    let mut tx = store.pool().begin().await?;
    // Tests run in parallel; DDL races on the catalog without a lock.
    sqlx::query("SELECT pg_advisory_xact_lock(7280321149621735002)")
        .execute(&mut *tx)
        .await?;
    for ddl in crate::conformance::BUSINESS_TABLES {
        sqlx::query(*ddl).execute(&mut *tx).await?;
    }
    tx.commit().await
}
