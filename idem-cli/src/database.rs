//! The store behind a URL: PostgreSQL, MySQL/MariaDB or SQLite, each through idem-runtime's own
//! store, so that the command runs exactly the SQL a service runs.

use std::str::FromStr;
use std::time::Duration;

use idem_runtime::retention::{PurgeOptions, PurgeProgress, purge};
use idem_runtime::sqlx;
use idem_runtime::sqlx::mysql::MySqlConnectOptions;
use idem_runtime::sqlx::postgres::PgConnectOptions;
use idem_runtime::sqlx::sqlite::SqliteConnectOptions;
use idem_runtime::store::{RecordDetails, RecordStats, Records, RecordsTable};
use idem_runtime::{MySqlStore, PgStore, SqliteStore, Store};

use crate::error::{CliError, redact};

/// A connected store.
pub(crate) enum Database {
    Postgres(PgStore),
    MySql(MySqlStore),
    Sqlite(SqliteStore),
}

/// Runs `$body` with `$store` bound to whichever store `$database` holds.
macro_rules! on_store {
    ($database:expr, $store:ident => $body:expr) => {
        match $database {
            Database::Postgres($store) => $body,
            Database::MySql($store) => $body,
            Database::Sqlite($store) => $body,
        }
    };
}

/// A pool of one connection for the command, after a [`probe`] proved the database reachable.
async fn one_connection<C: sqlx::Connection>(
    options: C::Options,
    timeout: Duration,
) -> Result<sqlx::Pool<C::Database>, sqlx::Error> {
    probe::<C>(&options, timeout).await?;
    Ok(sqlx::pool::PoolOptions::new()
        .max_connections(1)
        .acquire_timeout(timeout)
        .connect_lazy_with(options))
}

/// Opens one connection and closes it: a pool retries a refused connection until its timeout
/// and then reports only that it timed out, where this reports why ("connection refused",
/// "password authentication failed", "unable to open database file").
async fn probe<C: sqlx::Connection>(
    options: &C::Options,
    timeout: Duration,
) -> Result<(), sqlx::Error> {
    let connection = tokio::time::timeout(timeout, C::connect_with(options))
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
    connection.close().await
}

/// How the command opens the database: `migrate` may create an SQLite file, the others must
/// find one (a typo in a path must not yield an empty database and a "missing table").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Open {
    CreatingSqliteFile,
    Existing,
}

impl Database {
    /// Connects to `url` (one connection is opened at once, so that a bad URL or an unreachable
    /// server fails here), with the records in `table`.
    pub(crate) async fn connect(
        url: &str,
        table: RecordsTable,
        timeout: Duration,
        open: Open,
    ) -> Result<Self, CliError> {
        let bad_url = |reason: String| CliError::BadUrl {
            url: redact(url),
            reason,
        };
        let unreachable = |source| CliError::Unreachable {
            url: redact(url),
            source,
        };
        let scheme = url
            .split_once(':')
            .map(|(scheme, _)| scheme.to_ascii_lowercase());
        let database = match scheme.as_deref() {
            Some("postgres" | "postgresql") => {
                let options =
                    PgConnectOptions::from_str(url).map_err(|e| bad_url(e.to_string()))?;
                let pool = one_connection::<sqlx::PgConnection>(options, timeout)
                    .await
                    .map_err(unreachable)?;
                Self::Postgres(PgStore::new(pool).with_records_table(table))
            }
            Some("mysql" | "mariadb") => {
                // sqlx names both servers `mysql`.
                let url = url
                    .strip_prefix("mariadb:")
                    .map_or_else(|| url.to_owned(), |rest| format!("mysql:{rest}"));
                let options =
                    MySqlConnectOptions::from_str(&url).map_err(|e| bad_url(e.to_string()))?;
                let pool = one_connection::<sqlx::MySqlConnection>(options, timeout)
                    .await
                    .map_err(unreachable)?;
                Self::MySql(MySqlStore::new(pool).with_records_table(table))
            }
            Some("sqlite") => {
                let options = SqliteConnectOptions::from_str(url)
                    .map_err(|e| bad_url(e.to_string()))?
                    .create_if_missing(open == Open::CreatingSqliteFile)
                    .busy_timeout(timeout);
                let pool = one_connection::<sqlx::SqliteConnection>(options, timeout)
                    .await
                    .map_err(unreachable)?;
                Self::Sqlite(SqliteStore::new(pool).with_records_table(table))
            }
            _ => {
                return Err(bad_url(
                    "it must start with postgres://, postgresql://, mysql://, mariadb:// or sqlite:"
                        .to_owned(),
                ));
            }
        };
        Ok(database)
    }

    /// The server's kind, for messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "PostgreSQL",
            Self::MySql(_) => "MySQL/MariaDB",
            Self::Sqlite(_) => "SQLite",
        }
    }

    pub(crate) async fn migrate(&self) -> Result<(), sqlx::Error> {
        on_store!(self, store => store.migrate().await)
    }

    pub(crate) async fn stats(&self) -> Result<RecordStats, sqlx::Error> {
        on_store!(self, store => store.stats().await)
    }

    pub(crate) async fn inspect(
        &self,
        scope: &str,
        key: &str,
    ) -> Result<Option<RecordDetails>, sqlx::Error> {
        on_store!(self, store => store.inspect(scope, key).await)
    }

    pub(crate) async fn forget(&self, scope: &str, key: &str) -> Result<bool, sqlx::Error> {
        on_store!(self, store => store.forget(scope, key).await)
    }

    pub(crate) async fn purge(
        &self,
        options: &PurgeOptions,
        progress: impl FnMut(&PurgeProgress) + Send,
    ) -> Result<PurgeProgress, sqlx::Error> {
        on_store!(self, store => purge(store, options, progress).await)
    }
}
