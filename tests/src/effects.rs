//! The conformance handlers' business effects, and how a test counts them, on every store:
//! a ledger row per committed body run (SQL stores), or a ledger entry written on commit
//! (memory store, through [`MemoryTx::on_commit`]). The ledger has no unique key, so a second
//! entry for a key means a body ran twice to commit: it is what proves a gate.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex, OnceLock, PoisonError};

use idem_runtime::store::RecordsTable;
use idem_runtime::{
    MemoryStore, MemoryTx, MySqlStore, MySqlTx, PgStore, PgTx, SqliteStore, SqliteTx,
};

use crate::AppError;

/// A handler transaction the conformance bodies write their effects through.
pub trait Effects: Send {
    /// Writes one ledger entry for `entry`, committed with the transaction.
    fn ledger(
        &mut self,
        entry: &str,
        amount: i64,
    ) -> impl Future<Output = Result<(), AppError>> + Send;
}

macro_rules! sql_ledger {
    ($tx:ty, $sql:literal) => {
        impl Effects for $tx {
            async fn ledger(&mut self, entry: &str, amount: i64) -> Result<(), AppError> {
                sqlx::query($sql)
                    .bind(entry)
                    .bind(amount)
                    .execute(&mut **self)
                    .await?;
                Ok(())
            }
        }
    };
}

sql_ledger!(
    PgTx<'_>,
    "INSERT INTO idem_conf_ledger (order_id, amount) VALUES ($1, $2)"
);
sql_ledger!(
    MySqlTx<'_>,
    "INSERT INTO idem_conf_ledger (order_id, amount) VALUES (?, ?)"
);
sql_ledger!(
    SqliteTx<'_>,
    "INSERT INTO idem_conf_ledger (order_id, amount) VALUES (?1, ?2)"
);

fn memory_ledger() -> &'static Mutex<HashMap<String, i64>> {
    static LEDGER: OnceLock<Mutex<HashMap<String, i64>>> = OnceLock::new();
    LEDGER.get_or_init(Mutex::default)
}

impl Effects for MemoryTx {
    async fn ledger(&mut self, entry: &str, _amount: i64) -> Result<(), AppError> {
        let entry = entry.to_owned();
        self.on_commit(move || {
            *memory_ledger()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(entry)
                .or_default() += 1;
        });
        Ok(())
    }
}

/// A store as the conformance assertions see it.
pub trait TestStore: Clone + Send + Sync + 'static {
    /// Committed ledger entries for `entry`.
    fn ledger_rows(&self, entry: &str) -> impl Future<Output = i64> + Send;
    /// Dedup records (live or expired) for `key` in `scope`: 0 or 1.
    fn records(&self, scope: &str, key: &str) -> impl Future<Output = i64> + Send;
    /// Deletes expired records, by the store's clock.
    fn purge(&self) -> impl Future<Output = u64> + Send;
}

impl TestStore for MemoryStore {
    async fn ledger_rows(&self, entry: &str) -> i64 {
        memory_ledger()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(entry)
            .copied()
            .unwrap_or(0)
    }

    async fn records(&self, scope: &str, key: &str) -> i64 {
        i64::from(self.has_record(scope, key))
    }

    async fn purge(&self) -> u64 {
        self.purge_expired()
    }
}

/// `table` as a statement names it: each part quoted with `quote`, the schema first.
pub fn quoted(table: &RecordsTable, quote: char) -> String {
    let part = |name: &str| format!("{quote}{name}{quote}");
    match table.schema() {
        Some(schema) => format!("{}.{}", part(schema), part(table.name())),
        None => part(table.name()),
    }
}

/// `template` with `{records}` replaced by the store's records table, quoted with `quote`.
fn on_records_table(template: &str, table: &RecordsTable, quote: char) -> String {
    template.replace("{records}", &quoted(table, quote))
}

macro_rules! sql_test_store {
    ($store:ty, $ledger:literal, $records:literal, quote = $quote:literal) => {
        impl TestStore for $store {
            async fn ledger_rows(&self, entry: &str) -> i64 {
                sqlx::query_scalar($ledger)
                    .bind(entry)
                    .fetch_one(self.pool())
                    .await
                    .expect("count ledger rows")
            }

            async fn records(&self, scope: &str, key: &str) -> i64 {
                let sql = on_records_table($records, self.records_table(), $quote);
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .bind(scope)
                    .bind(key)
                    .fetch_one(self.pool())
                    .await
                    .expect("count dedup records")
            }

            async fn purge(&self) -> u64 {
                self.purge_expired().await.expect("purge expired records")
            }
        }
    };
}

sql_test_store!(
    PgStore,
    "SELECT COUNT(*) FROM idem_conf_ledger WHERE order_id = $1",
    "SELECT COUNT(*) FROM {records} WHERE scope = $1 AND record_key = $2",
    quote = '"'
);
sql_test_store!(
    MySqlStore,
    "SELECT COUNT(*) FROM idem_conf_ledger WHERE order_id = ?",
    "SELECT COUNT(*) FROM {records} WHERE scope = ? AND record_key = ?",
    quote = '`'
);
sql_test_store!(
    SqliteStore,
    "SELECT COUNT(*) FROM idem_conf_ledger WHERE order_id = ?1",
    "SELECT COUNT(*) FROM {records} WHERE scope = ?1 AND record_key = ?2",
    quote = '"'
);

/// The SQL stores' extra views, for the cases that need their tables.
pub trait SqlTestStore: TestStore {
    /// The status of order `order_id` in `idem_conf_orders`.
    fn status(&self, order_id: &str) -> impl Future<Output = Option<String>> + Send;
    /// Runs a set-up statement with one integer parameter.
    fn execute_with_int(&self, sql: &'static str, value: i64) -> impl Future<Output = ()> + Send;
    /// Another store on the same database and records table, with a pool of one connection:
    /// every delivery then reuses the connection the previous one left behind.
    fn single_connection(&self) -> impl Future<Output = Self> + Send;
    /// Overwrites the stored result of the record of `key` in `scope` with `response`.
    fn set_response(
        &self,
        scope: &str,
        key: &str,
        response: &str,
    ) -> impl Future<Output = ()> + Send;
}

macro_rules! sql_extras {
    ($store:ty, $status:literal, $set_response:literal, quote = $quote:literal) => {
        impl SqlTestStore for $store {
            async fn single_connection(&self) -> Self {
                let options = (*self.pool().connect_options()).clone();
                let pool = sqlx::pool::PoolOptions::new()
                    .max_connections(1)
                    .connect_with(options)
                    .await
                    .expect("a one-connection pool");
                Self::new(pool).with_records_table(self.records_table().clone())
            }

            async fn set_response(&self, scope: &str, key: &str, response: &str) {
                let sql = on_records_table($set_response, self.records_table(), $quote);
                let done = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(response)
                    .bind(scope)
                    .bind(key)
                    .execute(self.pool())
                    .await
                    .expect("overwrite a stored result");
                assert_eq!(done.rows_affected(), 1, "one record for {scope}/{key}");
            }

            async fn status(&self, order_id: &str) -> Option<String> {
                sqlx::query_scalar($status)
                    .bind(order_id)
                    .fetch_optional(self.pool())
                    .await
                    .expect("read the order's status")
            }

            async fn execute_with_int(&self, sql: &'static str, value: i64) {
                sqlx::query(sql)
                    .bind(value)
                    .execute(self.pool())
                    .await
                    .expect("execute a set-up statement");
            }
        }
    };
}

sql_extras!(
    PgStore,
    "SELECT status FROM idem_conf_orders WHERE order_id = $1",
    "UPDATE {records} SET response = $1 WHERE scope = $2 AND record_key = $3",
    quote = '"'
);
sql_extras!(
    MySqlStore,
    "SELECT status FROM idem_conf_orders WHERE order_id = ?",
    "UPDATE {records} SET response = ? WHERE scope = ? AND record_key = ?",
    quote = '`'
);
sql_extras!(
    SqliteStore,
    "SELECT status FROM idem_conf_orders WHERE order_id = ?1",
    "UPDATE {records} SET response = ?1 WHERE scope = ?2 AND record_key = ?3",
    quote = '"'
);

/// A transaction whose body can run a statement that fails *and ignore the error*, in the way
/// that ends the whole transaction on its database.
pub trait SwallowsAFailure: Send {
    /// Runs the failing statement and discards its error, as a careless body would.
    fn swallow_a_failed_statement(&mut self) -> impl Future<Output = ()> + Send;
}

impl SwallowsAFailure for PgTx<'_> {
    /// Any failed statement aborts a PostgreSQL transaction.
    async fn swallow_a_failed_statement(&mut self) {
        let _ = sqlx::query("SELECT 1/0").execute(&mut **self).await;
    }
}

impl SwallowsAFailure for SqliteTx<'_> {
    /// A conflict under `OR ROLLBACK` rolls the whole transaction back.
    async fn swallow_a_failed_statement(&mut self) {
        let _ = sqlx::query("INSERT OR ROLLBACK INTO idem_conf_probe (id) VALUES (1), (1)")
            .execute(&mut **self)
            .await;
    }
}

impl SwallowsAFailure for MySqlTx<'_> {
    /// A real deadlock with a heavier transaction on another connection: InnoDB rolls this
    /// (lighter) one back whole, and later statements would run in autocommit mode.
    async fn swallow_a_failed_statement(&mut self) {
        use sqlx::Connection as _;
        let (a, b) = (crate::unique_int(), crate::unique_int());
        let url = crate::mysql::url();
        let mut setup = sqlx::MySqlConnection::connect(&url).await.expect("connect");
        sqlx::query("INSERT INTO idem_conf_locks (id, v) VALUES (?, 0), (?, 0)")
            .bind(a)
            .bind(b)
            .execute(&mut setup)
            .await
            .expect("lock rows");
        sqlx::query("UPDATE idem_conf_locks SET v = v + 1 WHERE id = ?")
            .bind(a)
            .execute(&mut **self)
            .await
            .expect("this transaction locks row a");
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let helper = tokio::spawn(async move {
            let mut conn = sqlx::MySqlConnection::connect(&url).await.expect("connect");
            let mut tx = conn.begin().await.expect("begin");
            sqlx::query("UPDATE idem_conf_locks SET v = v + 1 WHERE id = ?")
                .bind(b)
                .execute(&mut *tx)
                .await
                .expect("the helper locks row b");
            // Heavier than the handler's transaction, so InnoDB picks the handler as victim.
            for n in 0..30 {
                sqlx::query("INSERT INTO idem_conf_ledger (order_id, amount) VALUES (?, ?)")
                    .bind(format!("deadlock-filler-{a}"))
                    .bind(n)
                    .execute(&mut *tx)
                    .await
                    .expect("filler");
            }
            let _ = ready_tx.send(());
            // Blocks on row a until the handler's transaction is rolled back.
            sqlx::query("UPDATE idem_conf_locks SET v = v + 1 WHERE id = ?")
                .bind(a)
                .execute(&mut *tx)
                .await
                .expect("the helper survives the deadlock");
            tx.commit().await.expect("helper commit");
        });
        // The helper holds row b and is about to ask for row a. Whichever of the two requests
        // reaches InnoDB second closes the cycle; either way the victim is the lighter
        // transaction, this one, so no waiting for the helper to block is needed.
        ready.await.expect("helper ready");
        let deadlock = sqlx::query("UPDATE idem_conf_locks SET v = v + 1 WHERE id = ?")
            .bind(b)
            .execute(&mut **self)
            .await;
        let number = deadlock
            .as_ref()
            .err()
            .and_then(|e| e.as_database_error())
            .and_then(|db| db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
            .map(sqlx::mysql::MySqlDatabaseError::number);
        assert_eq!(
            number,
            Some(1213),
            "the set-up must produce a deadlock: {deadlock:?}"
        );
        helper.await.expect("helper task");
    }
}

/// Rolls back a transaction `store` began, as its caller would.
///
/// # Panics
///
/// When the rollback fails: the tests need it to happen.
pub async fn rollback<S: idem_runtime::Store>(_store: &S, tx: S::Tx) {
    S::rollback(tx).await.expect("the caller rolls back");
}
