//! What can go wrong, what to do about it, and the exit code each failure ends with.

use std::process::ExitCode;

use idem_runtime::sqlx;
use idem_runtime::store::{InvalidIdentifier, RecordsTable};

/// A failed command. The message says what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    #[error(
        "no database URL: pass --database-url or set DATABASE_URL \
         (postgres://user@host/db, mysql://user@host/db, mariadb://…, sqlite:path/to/file.db)"
    )]
    NoUrl,
    #[error("--table `{table}` is not a table name idem accepts: {source}")]
    BadTable {
        table: String,
        source: InvalidIdentifier,
    },
    #[error("`{url}` is not a database URL idem can use: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot connect to {url}: {source}")]
    Unreachable { url: String, source: sqlx::Error },
    #[error(
        "the records table {table} does not exist in this database: create it with `idem migrate`, \
         or name the service's table with --table"
    )]
    MissingTable { table: String },
    #[error("the database refused the command: {0}")]
    Database(sqlx::Error),
    #[error("not confirmed, nothing was deleted: answer `y` to the question, or pass --yes")]
    NotConfirmed,
    #[error("could not read the answer: {0}")]
    Io(#[from] std::io::Error),
}

impl CliError {
    /// The exit code, as `idem --help` lists them.
    pub(crate) fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Self::NoUrl | Self::BadTable { .. } => 2,
            Self::BadUrl { .. } | Self::Unreachable { .. } => 3,
            Self::MissingTable { .. } => 4,
            Self::Database(_) | Self::Io(_) => 5,
            Self::NotConfirmed => 6,
        })
    }

    /// `error` from a command on `table`: a missing table, a lost connection, or the rest.
    pub(crate) fn from_sqlx(error: sqlx::Error, table: &RecordsTable, url: &str) -> Self {
        if is_missing_table(&error) {
            return Self::MissingTable {
                table: display_table(table),
            };
        }
        match error {
            error @ (sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed) => Self::Unreachable {
                url: redact(url),
                source: error,
            },
            error => Self::Database(error),
        }
    }
}

/// `schema.name` as the user would type it.
pub(crate) fn display_table(table: &RecordsTable) -> String {
    match table.schema() {
        Some(schema) => format!("{schema}.{}", table.name()),
        None => table.name().to_owned(),
    }
}

/// PostgreSQL's undefined_table, MySQL's ER_NO_SUCH_TABLE, SQLite's "no such table".
fn is_missing_table(error: &sqlx::Error) -> bool {
    let Some(error) = error.as_database_error() else {
        return false;
    };
    match error.code().as_deref() {
        Some("42P01" | "42S02") => true,
        _ => error.message().starts_with("no such table"),
    }
}

/// Where `url` points, for messages: scheme, host, port and database only. Never the user
/// name, the password or the query (which may carry `password=`); for a URL that does not
/// parse, not even that.
pub(crate) fn redact(url: &str) -> String {
    if let Some(path) = url.strip_prefix("sqlite:") {
        // A file path: no credentials, but the query may carry options; leave it out.
        return format!("sqlite:{}", path.split('?').next().unwrap_or_default());
    }
    match url::Url::parse(url) {
        Ok(parsed) => match parsed.host_str() {
            Some(host) => {
                let port = parsed
                    .port()
                    .map(|port| format!(":{port}"))
                    .unwrap_or_default();
                format!("{}://{host}{port}{}", parsed.scheme(), parsed.path())
            }
            None => format!("the {} URL given (not shown)", parsed.scheme()),
        },
        Err(_) => "the URL given (not shown: it may hold a password)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_a_message() {
        assert_eq!(
            redact("postgres://app:s3cr%40t@db:5432/orders?sslmode=require"),
            "postgres://db:5432/orders"
        );
        assert_eq!(
            redact("mysql://root@127.0.0.1/test"),
            "mysql://127.0.0.1/test"
        );
        assert_eq!(redact("sqlite:orders.db?mode=ro"), "sqlite:orders.db");
        for leaky in [
            "postgres://app:se/cret@127.0.0.1:5432/test",
            "postgres://127.0.0.1:1/test?user=app&password=secret",
            "postgres:app:secret@127.0.0.1/test",
            "mysql://root:se/cret@127.0.0.1/test",
            "postgres://app:secret@[::1",
        ] {
            let shown = redact(leaky);
            assert!(
                !shown.contains("secret") && !shown.contains("cret"),
                "{leaky} -> {shown}"
            );
        }
    }

    #[test]
    fn every_failure_has_its_documented_exit_code() {
        let code = |error: CliError| format!("{:?}", error.exit_code());
        assert_eq!(code(CliError::NoUrl), format!("{:?}", ExitCode::from(2)));
        assert_eq!(
            code(CliError::MissingTable { table: "t".into() }),
            format!("{:?}", ExitCode::from(4))
        );
        assert_eq!(
            code(CliError::NotConfirmed),
            format!("{:?}", ExitCode::from(6))
        );
    }
}
