//! The SQL that creates the records table, as shipped in the crate's `migrations/` directory:
//! one directory per database, each in sqlx-cli's layout (`<version>_<description>.sql`),
//! plain SQL for any migration tool.
//!
//! | constant | file | run by |
//! |---|---|---|
//! | [`POSTGRES`] | `migrations/postgres/0001_idem_records.sql` | `PgStore::migrate()` |
//! | [`MYSQL`] | `migrations/mysql/0001_idem_records.sql` | `MySqlStore::migrate()` on MySQL 8 |
//! | [`MARIADB`] | `migrations/mariadb/0001_idem_records.sql` | `MySqlStore::migrate()` on MariaDB |
//! | [`SQLITE`] | `migrations/sqlite/0001_idem_records.sql` | `SqliteStore::migrate()` |
//!
//! MySQL and MariaDB differ in one word, the byte-for-byte NO PAD collation each names
//! differently (`utf8mb4_0900_bin`, `utf8mb4_nopad_bin`). Each file creates the table (and its
//! expiry index) if missing, so running it on a database that has the table does nothing.
//!
//! To manage the table with your own migrations instead of calling `migrate()`, copy the file
//! into your migrations directory, or write the text of the functions below for a
//! [`RecordsTable`] other than `idem_records`; then give the store the same table:
//!
//! ```
//! use idem_runtime::store::{RecordsTable, migrations};
//!
//! # fn main() -> Result<(), idem_runtime::store::InvalidIdentifier> {
//! let table = RecordsTable::parse("billing.dedup_records")?;
//! let sql = migrations::postgres(&table);
//! assert!(sql.contains(r#"CREATE TABLE IF NOT EXISTS "billing"."dedup_records""#));
//! assert!(sql.contains(r#"CREATE INDEX IF NOT EXISTS "dedup_records_expires_at_ms""#));
//! assert_eq!(migrations::postgres(&RecordsTable::default()), migrations::POSTGRES);
//! # Ok(()) }
//! ```

use super::table::{Dialect, RecordsTable};

/// `migrations/postgres/0001_idem_records.sql`: the records table and its expiry index on
/// PostgreSQL.
pub const POSTGRES: &str = include_str!("../../migrations/postgres/0001_idem_records.sql");

/// `migrations/mysql/0001_idem_records.sql`: the records table, with its expiry index, on
/// MySQL 8.
pub const MYSQL: &str = include_str!("../../migrations/mysql/0001_idem_records.sql");

/// `migrations/mariadb/0001_idem_records.sql`: the records table, with its expiry index, on
/// MariaDB.
pub const MARIADB: &str = include_str!("../../migrations/mariadb/0001_idem_records.sql");

/// `migrations/sqlite/0001_idem_records.sql`: the records table and its expiry index on SQLite.
pub const SQLITE: &str = include_str!("../../migrations/sqlite/0001_idem_records.sql");

/// [`POSTGRES`] for `table`: its quoted, schema-qualified name in place of `idem_records`, and
/// its expiry index's name in place of `idem_records_expires_at_ms`.
pub fn postgres(table: &RecordsTable) -> String {
    table.rewrite_text(POSTGRES, Dialect::Postgres)
}

/// [`MYSQL`] for `table` (see [`postgres`]).
pub fn mysql(table: &RecordsTable) -> String {
    table.rewrite_text(MYSQL, Dialect::MySql)
}

/// [`MARIADB`] for `table` (see [`postgres`]).
pub fn mariadb(table: &RecordsTable) -> String {
    table.rewrite_text(MARIADB, Dialect::MySql)
}

/// [`SQLITE`] for `table` (see [`postgres`]).
pub fn sqlite(table: &RecordsTable) -> String {
    table.rewrite_text(SQLITE, Dialect::Sqlite)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_table_gets_the_files_unchanged() {
        let table = RecordsTable::default();
        assert_eq!(postgres(&table), POSTGRES);
        assert_eq!(mysql(&table), MYSQL);
        assert_eq!(mariadb(&table), MARIADB);
        assert_eq!(sqlite(&table), SQLITE);
    }

    #[test]
    fn the_mysql_files_differ_only_in_the_collation() {
        let statement = |sql: &'static str| {
            sql.lines()
                .filter(|line| !line.starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            statement(MYSQL).replace("utf8mb4_0900_bin", "utf8mb4_nopad_bin"),
            statement(MARIADB)
        );
        assert!(MARIADB.contains("COLLATE = utf8mb4_nopad_bin;"));
    }

    #[test]
    fn every_mention_of_the_table_is_replaced_outside_comments() {
        let table = RecordsTable::parse("app.dedup").expect("valid");
        for (sql, quote) in [
            (postgres(&table), '"'),
            (mysql(&table), '`'),
            (mariadb(&table), '`'),
            (sqlite(&table), '"'),
        ] {
            let statements: String = sql.lines().filter(|line| !line.starts_with("--")).collect();
            assert!(!statements.contains("idem_records"), "{sql}");
            assert!(
                statements.contains(&format!("{quote}dedup_expires_at_ms{quote}")),
                "{sql}"
            );
            assert!(
                statements.contains(&format!(
                    "CREATE TABLE IF NOT EXISTS {quote}app{quote}.{quote}dedup{quote}"
                )),
                "{sql}"
            );
        }
    }
}
