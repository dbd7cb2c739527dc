//! The live MariaDB (or MySQL) the mysql tests use.

use idem_runtime::MySqlStore;

/// `IDEM_TEST_MYSQL_URL`, or the local server's root user without a password.
pub fn url() -> String {
    std::env::var("IDEM_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

/// Connects, migrates `idem_records` and creates the conformance business tables.
///
/// # Panics
///
/// When the server is unreachable: a missing service fails the test loudly.
pub async fn store() -> MySqlStore {
    let url = url();
    let store = MySqlStore::connect(&url).await.unwrap_or_else(|error| {
        panic!(
            "MariaDB/MySQL is not reachable at {url}: {error}. Run the tests with scripts/test, which starts it, or set IDEM_TEST_MYSQL_URL."
        )
    });
    store.migrate().await.expect("migrate idem_records");
    for ddl in crate::conformance::BUSINESS_TABLES {
        sqlx::query(*ddl)
            .execute(store.pool())
            .await
            .expect("create the conformance business tables");
    }
    store
}
