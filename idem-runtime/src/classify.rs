//! Every database driver's error codes, in one place: whether a failure is worth a redelivery,
//! whether it is a unique violation of a named constraint, and whether a commit found its
//! transaction already aborted.
//!
//! The rule, per database, is the server's own error *class*, not a short list of codes:
//!
//! - **PostgreSQL**, by SQLSTATE: classes `08` (connection), `28` (invalid authorization:
//!   credentials rotate), `40` (transaction rollback: serialization failures, deadlocks), `53`
//!   (insufficient resources), `57` (operator intervention: a cancelled statement, a shutdown)
//!   and `58` (system errors) are retried, as are `55P03` (lock not available), the
//!   transaction time-outs `25P03`/`25P04`, `25006` (read-only after a fail-over), `25P02` and
//!   `72000`. Everything else — `22` (bad data), `23` (integrity),
//!   `42` (syntax, missing column, operator mismatch), `0A` (not supported), … — is permanent,
//!   except the few codes [`pg_disposition`] lists with the reason a redelivery can succeed.
//! - **MySQL / MariaDB**, by error number (SQLSTATE `HY000` says nothing): the numbers in
//!   [`mysql_disposition`]'s table (deadlocks, lock waits, time-outs, shutdowns, read-only
//!   fail-overs, resource exhaustion) and SQLSTATE classes `08` and `40` are retried; the rest
//!   is permanent.
//! - **SQLite**, by primary result code: `BUSY`, `LOCKED`, `NOMEM`, `READONLY`, `INTERRUPT`,
//!   `IOERR`, `FULL`, `CANTOPEN`, `PROTOCOL` and `SCHEMA` are retried; the rest is permanent.
//!
//! A foreign-key violation on insert is retried on every database: the parent row may arrive
//! with a later message. Retries are bounded by the handler's `max_attempts`, so a wrong guess
//! costs a few redeliveries, never a loop.

use std::error::Error as StdError;

/// What the broker should do with a message whose handling failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Disposition {
    /// A redelivery may succeed: connection lost, pool timeout, deadlock, serialization
    /// failure, a lease held elsewhere, or a handler error its type calls retryable.
    Retry,
    /// A redelivery never will: the key or payload is invalid, the same key came with a
    /// different payload, or a handler error its type calls permanent.
    DeadLetter,
}

/// Classifies an error by the first database error in its source chain (itself included):
/// a [`sqlx::Error`] with [`classify_sqlx_error`], or a driver's database error (which is what
/// the chain holds when an `#[error(transparent)]` variant wraps the `sqlx::Error`). An error
/// chain without one is [`Disposition::Retry`] (and `max_attempts` bounds the retries).
pub fn classify_error_chain(error: &(dyn StdError + 'static)) -> Disposition {
    match find_database_error(error) {
        Some(FoundDatabaseError::Sqlx(error)) => classify_sqlx_error(error),
        Some(FoundDatabaseError::Driver(db)) => classify_database_error(db),
        None => Disposition::Retry,
    }
}

/// Classifies a sqlx error.
///
/// Retryable: I/O, TLS and protocol failures, pool time-outs, a closed pool, a crashed worker,
/// a `BEGIN` that did not open a transaction, a missing row (what it refers to may arrive
/// later), and the database errors the [module docs](self) list. Permanent: configuration,
/// encoding and decoding errors, a missing column, and the other database errors.
pub fn classify_sqlx_error(error: &sqlx::Error) -> Disposition {
    match error {
        sqlx::Error::Database(db) => classify_database_error(db.as_ref()),
        sqlx::Error::Configuration(_)
        | sqlx::Error::InvalidArgument(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::Encode(_)
        | sqlx::Error::Decode(_)
        | sqlx::Error::InvalidSavePointStatement
        | sqlx::Error::Migrate(_) => Disposition::DeadLetter,
        _ => Disposition::Retry,
    }
}

/// Classifies a driver's database error by its database's rules (see the [module docs](self)).
pub fn classify_database_error(db: &dyn sqlx::error::DatabaseError) -> Disposition {
    #[cfg(feature = "sqlite")]
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        let extended = db
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .unwrap_or(SQLITE_ERROR);
        return sqlite_disposition(extended);
    }
    #[cfg(feature = "mysql")]
    if let Some(mysql) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return mysql_disposition(mysql.number(), mysql.code().unwrap_or(""));
    }
    match db.code() {
        Some(code) => pg_disposition(&code),
        // A driver that gives no code: nothing says it is permanent.
        None => Disposition::Retry,
    }
}

/// PostgreSQL: the disposition of a SQLSTATE.
pub fn pg_disposition(sqlstate: &str) -> Disposition {
    // Codes retried although their class is permanent, each with the reason.
    const RETRIED_CODES: &[(&str, &str)] = &[
        (
            "23503",
            "foreign_key_violation: the parent row may arrive with a later message",
        ),
        (
            "25006",
            "read_only_sql_transaction: a fail-over left us on a standby for a moment",
        ),
        (
            "25P02",
            "in_failed_sql_transaction: an earlier, ignored failure is the cause",
        ),
        (
            "25P03",
            "idle_in_transaction_session_timeout: a slow body; the next may be faster",
        ),
        ("25P04", "transaction_timeout (PostgreSQL 17): the same"),
        ("55P03", "lock_not_available: NOWAIT or lock_timeout"),
        ("72000", "snapshot_too_old"),
    ];
    // Classes retried: connection, transaction rollback, resources, operator intervention,
    // system errors, and invalid authorization (credentials rotate; the message is not at fault).
    const RETRIED_CLASSES: &[&str] = &["08", "28", "40", "53", "57", "58"];
    if RETRIED_CODES.iter().any(|(code, _)| *code == sqlstate)
        || RETRIED_CLASSES.iter().any(|c| sqlstate.starts_with(c))
    {
        Disposition::Retry
    } else {
        Disposition::DeadLetter
    }
}

/// `ER_DUP_ENTRY`: a unique key already holds the value.
#[cfg(feature = "mysql")]
pub(crate) const MYSQL_DUPLICATE_ENTRY: u16 = 1062;

/// MySQL / MariaDB error numbers that a redelivery can outlive.
const MYSQL_RETRIED: &[(u16, &str)] = &[
    (1020, "ER_CHECKREAD: record changed since last read"),
    (1021, "ER_DISK_FULL"),
    (1037, "ER_OUTOFMEMORY"),
    (1038, "ER_OUT_OF_SORTMEMORY"),
    (1040, "ER_CON_COUNT_ERROR: too many connections"),
    (1041, "ER_OUT_OF_RESOURCES"),
    (1045, "ER_ACCESS_DENIED_ERROR: credentials rotate"),
    (1053, "ER_SERVER_SHUTDOWN"),
    (1077, "ER_NORMAL_SHUTDOWN"),
    (1078, "ER_GOT_SIGNAL"),
    (1079, "ER_SHUTDOWN_COMPLETE"),
    (1114, "ER_RECORD_FILE_FULL: table full"),
    (1135, "ER_CANT_CREATE_THREAD"),
    (1152, "ER_ABORTING_CONNECTION"),
    (1158, "ER_NET_READ_ERROR"),
    (1159, "ER_NET_READ_INTERRUPTED"),
    (1160, "ER_NET_ERROR_ON_WRITE"),
    (1161, "ER_NET_WRITE_INTERRUPTED"),
    (1180, "ER_ERROR_DURING_COMMIT"),
    (1181, "ER_ERROR_DURING_ROLLBACK"),
    (1203, "ER_TOO_MANY_USER_CONNECTIONS"),
    (1205, "ER_LOCK_WAIT_TIMEOUT"),
    (1213, "ER_LOCK_DEADLOCK"),
    (
        1216,
        "ER_NO_REFERENCED_ROW: the parent row may arrive later",
    ),
    (1226, "ER_USER_LIMIT_REACHED"),
    (
        1290,
        "ER_OPTION_PREVENTS_STATEMENT: --read-only during a fail-over",
    ),
    (1317, "ER_QUERY_INTERRUPTED"),
    (1402, "ER_XA_RBROLLBACK"),
    (
        1452,
        "ER_NO_REFERENCED_ROW_2: the parent row may arrive later",
    ),
    (1613, "ER_XA_RBTIMEOUT"),
    (1614, "ER_XA_RBDEADLOCK"),
    (1637, "ER_TOO_MANY_CONCURRENT_TRXS"),
    (1792, "ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION"),
    (1836, "ER_READ_ONLY_MODE"),
    (1927, "ER_CONNECTION_KILLED"),
    (1969, "ER_STATEMENT_TIMEOUT (MariaDB max_statement_time)"),
    (3024, "ER_QUERY_TIMEOUT (MySQL max_execution_time)"),
    (3572, "ER_LOCK_NOWAIT"),
    (4031, "ER_CLIENT_INTERACTION_TIMEOUT"),
];

/// MySQL / MariaDB: the disposition of an error number and its SQLSTATE.
pub fn mysql_disposition(number: u16, sqlstate: &str) -> Disposition {
    let retried = MYSQL_RETRIED.iter().any(|(n, _)| *n == number)
        || sqlstate.starts_with("08")
        || sqlstate.starts_with("40");
    if retried {
        Disposition::Retry
    } else {
        Disposition::DeadLetter
    }
}

#[cfg_attr(not(feature = "mysql"), allow(dead_code))]
/// The key named in a MySQL duplicate-entry message: MariaDB says `… for key 'name'`, MySQL 8
/// `… for key 'table.name'`.
pub(crate) fn mysql_duplicate_key_name(message: &str) -> Option<&str> {
    let quoted = message.rsplit_once("for key '")?.1.strip_suffix('\'')?;
    Some(quoted.rsplit_once('.').map_or(quoted, |(_, name)| name))
}

#[cfg_attr(
    not(any(feature = "pg", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)] // used by the SQL stores
const SQLITE_ERROR: i32 = 1;
const SQLITE_CONSTRAINT_FOREIGNKEY: i32 = 787;

/// SQLite: the disposition of an extended result code (its low byte is the primary code).
pub fn sqlite_disposition(extended: i32) -> Disposition {
    const BUSY: i32 = 5;
    const LOCKED: i32 = 6;
    const NOMEM: i32 = 7;
    const READONLY: i32 = 8;
    const INTERRUPT: i32 = 9;
    const IOERR: i32 = 10;
    const FULL: i32 = 13;
    const CANTOPEN: i32 = 14;
    const PROTOCOL: i32 = 15;
    // The schema changed under a prepared statement; preparing it again succeeds.
    const SCHEMA: i32 = 17;
    let retried = extended == SQLITE_CONSTRAINT_FOREIGNKEY
        || matches!(
            extended & 0xff,
            BUSY | LOCKED
                | NOMEM
                | READONLY
                | INTERRUPT
                | IOERR
                | FULL
                | CANTOPEN
                | PROTOCOL
                | SCHEMA
        );
    if retried {
        Disposition::Retry
    } else {
        Disposition::DeadLetter
    }
}

/// SQLite names no constraint: its message lists the columns (`UNIQUE constraint failed:
/// payments.order_id`) or, for an index on expressions, the index (`… failed: index 'name'`).
/// `constraint` matches either form: `"payments.order_id"` (comma-separated for several
/// columns) or the index name.
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) fn sqlite_unique_detail_matches(message: &str, constraint: &str) -> bool {
    let detail = message
        .split_once("constraint failed: ")
        .map_or("", |(_, detail)| detail);
    if let Some(index) = detail
        .strip_prefix("index '")
        .and_then(|rest| rest.strip_suffix('\''))
    {
        return index == constraint;
    }
    let columns = detail.split(',').map(str::trim);
    columns.eq(constraint.split(',').map(str::trim))
}

/// PostgreSQL's `in_failed_sql_transaction`: a statement ran in a transaction that an earlier,
/// failed statement had aborted.
pub(crate) const PG_IN_FAILED_TRANSACTION: &str = "25P02";

/// Whether `error` says that the transaction was no longer open: PostgreSQL's `25P02` (on the
/// check that rides with the commit, or on a statement after the body), or a savepoint
/// release that found [`OPEN_SAVEPOINT`] gone (MySQL, SQLite).
pub(crate) fn is_transaction_gone(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|db| db.code().as_deref() == Some(PG_IN_FAILED_TRANSACTION))
        || is_savepoint_gone(error)
}

/// `ER_SP_DOES_NOT_EXIST`: MySQL's answer to releasing a savepoint that is gone.
#[cfg(feature = "mysql")]
const MYSQL_SAVEPOINT_DOES_NOT_EXIST: u16 = 1305;

/// Whether `error` says that the savepoint `idem_open` is gone, so its transaction ended:
/// MySQL's 1305, SQLite's "no such savepoint". Every MySQL and SQLite handler transaction
/// opens that savepoint right after `BEGIN`: it lives exactly as long as the transaction.
pub(crate) fn is_savepoint_gone(error: &sqlx::Error) -> bool {
    let Some(db) = error.as_database_error() else {
        return false;
    };
    #[cfg(feature = "mysql")]
    if let Some(mysql) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return mysql.number() == MYSQL_SAVEPOINT_DOES_NOT_EXIST;
    }
    db.message().contains("no such savepoint")
}

/// A database error found in a source chain.
pub(crate) enum FoundDatabaseError<'a> {
    Sqlx(&'a sqlx::Error),
    Driver(&'a dyn sqlx::error::DatabaseError),
}

impl<'a> FoundDatabaseError<'a> {
    /// The driver's error, when the database reported one.
    pub(crate) fn database(&self) -> Option<&'a dyn sqlx::error::DatabaseError> {
        match *self {
            Self::Sqlx(sqlx::Error::Database(db)) => Some(db.as_ref()),
            Self::Sqlx(_) => None,
            Self::Driver(db) => Some(db),
        }
    }
}

/// The first `sqlx::Error` or driver database error in `error`'s source chain.
pub(crate) fn find_database_error<'a>(
    error: &'a (dyn StdError + 'static),
) -> Option<FoundDatabaseError<'a>> {
    let mut current = Some(error);
    while let Some(err) = current {
        if let Some(sqlx_error) = err.downcast_ref::<sqlx::Error>() {
            return Some(FoundDatabaseError::Sqlx(sqlx_error));
        }
        // `sqlx::Error::Database`'s source is the box itself.
        if let Some(db) = err.downcast_ref::<Box<dyn sqlx::error::DatabaseError>>() {
            return Some(FoundDatabaseError::Driver(db.as_ref()));
        }
        #[cfg(feature = "pg")]
        if let Some(db) = err.downcast_ref::<sqlx::postgres::PgDatabaseError>() {
            return Some(FoundDatabaseError::Driver(db));
        }
        #[cfg(feature = "mysql")]
        if let Some(db) = err.downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
            return Some(FoundDatabaseError::Driver(db));
        }
        #[cfg(feature = "sqlite")]
        if let Some(db) = err.downcast_ref::<sqlx::sqlite::SqliteError>() {
            return Some(FoundDatabaseError::Driver(db));
        }
        current = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use Disposition::{DeadLetter, Retry};

    /// One row per rule of the PostgreSQL table, with the SQLSTATE's name.
    #[test]
    fn postgres_sqlstates() {
        let rows = [
            ("08006", "connection_failure", Retry),
            ("08003", "connection_does_not_exist", Retry),
            ("28P01", "invalid_password", Retry),
            ("40001", "serialization_failure", Retry),
            ("40P01", "deadlock_detected", Retry),
            ("40003", "statement_completion_unknown", Retry),
            ("53300", "too_many_connections", Retry),
            ("53100", "disk_full", Retry),
            ("55P03", "lock_not_available", Retry),
            ("57014", "query_canceled", Retry),
            ("57P01", "admin_shutdown", Retry),
            ("58030", "io_error", Retry),
            ("23503", "foreign_key_violation", Retry),
            ("25P02", "in_failed_sql_transaction", Retry),
            ("25006", "read_only_sql_transaction", Retry),
            ("25P03", "idle_in_transaction_session_timeout", Retry),
            ("25P04", "transaction_timeout", Retry),
            ("72000", "snapshot_too_old", Retry),
            (
                "22021",
                "character_not_in_repertoire (NUL in text)",
                DeadLetter,
            ),
            ("22001", "string_data_right_truncation", DeadLetter),
            ("22P02", "invalid_text_representation", DeadLetter),
            ("22012", "division_by_zero", DeadLetter),
            ("23505", "unique_violation", DeadLetter),
            ("23502", "not_null_violation", DeadLetter),
            ("23514", "check_violation", DeadLetter),
            ("23P01", "exclusion_violation", DeadLetter),
            ("42703", "undefined_column", DeadLetter),
            ("42883", "undefined_function (uuid = text)", DeadLetter),
            ("42P01", "undefined_table", DeadLetter),
            ("42501", "insufficient_privilege", DeadLetter),
            ("0A000", "feature_not_supported", DeadLetter),
            ("55000", "object_not_in_prerequisite_state", DeadLetter),
            ("P0001", "raise_exception", DeadLetter),
            ("XX000", "internal_error", DeadLetter),
        ];
        for (code, name, expected) in rows {
            assert_eq!(pg_disposition(code), expected, "{code} {name}");
        }
    }

    /// One row per number of the MySQL table, and the permanent errors users meet most.
    #[test]
    fn mysql_error_numbers() {
        for (number, name) in MYSQL_RETRIED {
            assert_eq!(
                mysql_disposition(*number, "HY000"),
                Retry,
                "{number} {name}"
            );
        }
        let permanent = [
            (1062, "23000", "ER_DUP_ENTRY"),
            (1048, "23000", "ER_BAD_NULL_ERROR"),
            (1054, "42S22", "ER_BAD_FIELD_ERROR"),
            (1064, "42000", "ER_PARSE_ERROR"),
            (1146, "42S02", "ER_NO_SUCH_TABLE"),
            (1264, "22003", "ER_WARN_DATA_OUT_OF_RANGE"),
            (1292, "22007", "ER_TRUNCATED_WRONG_VALUE"),
            (1366, "22007", "ER_TRUNCATED_WRONG_VALUE_FOR_FIELD"),
            (1406, "22001", "ER_DATA_TOO_LONG"),
            (1451, "23000", "ER_ROW_IS_REFERENCED_2"),
            (3819, "HY000", "ER_CHECK_CONSTRAINT_VIOLATED"),
            (4025, "23000", "ER_CONSTRAINT_FAILED (MariaDB CHECK)"),
            (1644, "45000", "ER_SIGNAL_EXCEPTION"),
        ];
        for (number, sqlstate, name) in permanent {
            assert_eq!(
                mysql_disposition(number, sqlstate),
                DeadLetter,
                "{number} {name}"
            );
        }
        assert_eq!(mysql_disposition(9999, "08S01"), Retry, "class 08");
        assert_eq!(mysql_disposition(9999, "40001"), Retry, "class 40");
    }

    /// One row per SQLite primary result code.
    #[test]
    fn sqlite_result_codes() {
        let rows = [
            (1, "SQLITE_ERROR", DeadLetter),
            (2, "SQLITE_INTERNAL", DeadLetter),
            (3, "SQLITE_PERM", DeadLetter),
            (4, "SQLITE_ABORT", DeadLetter),
            (5, "SQLITE_BUSY", Retry),
            (517, "SQLITE_BUSY_SNAPSHOT", Retry),
            (6, "SQLITE_LOCKED", Retry),
            (7, "SQLITE_NOMEM", Retry),
            (8, "SQLITE_READONLY", Retry),
            (9, "SQLITE_INTERRUPT", Retry),
            (10, "SQLITE_IOERR", Retry),
            (11, "SQLITE_CORRUPT", DeadLetter),
            (12, "SQLITE_NOTFOUND", DeadLetter),
            (13, "SQLITE_FULL", Retry),
            (14, "SQLITE_CANTOPEN", Retry),
            (15, "SQLITE_PROTOCOL", Retry),
            (17, "SQLITE_SCHEMA", Retry),
            (18, "SQLITE_TOOBIG", DeadLetter),
            (19, "SQLITE_CONSTRAINT", DeadLetter),
            (1555, "SQLITE_CONSTRAINT_PRIMARYKEY", DeadLetter),
            (2067, "SQLITE_CONSTRAINT_UNIQUE", DeadLetter),
            (1299, "SQLITE_CONSTRAINT_NOTNULL", DeadLetter),
            (275, "SQLITE_CONSTRAINT_CHECK", DeadLetter),
            (787, "SQLITE_CONSTRAINT_FOREIGNKEY", Retry),
            (20, "SQLITE_MISMATCH", DeadLetter),
            (21, "SQLITE_MISUSE", DeadLetter),
            (25, "SQLITE_RANGE", DeadLetter),
            (26, "SQLITE_NOTADB", DeadLetter),
        ];
        for (code, name, expected) in rows {
            assert_eq!(sqlite_disposition(code), expected, "{code} {name}");
        }
    }

    #[test]
    fn sqlx_errors_without_a_database() {
        assert_eq!(classify_sqlx_error(&sqlx::Error::PoolTimedOut), Retry);
        assert_eq!(classify_sqlx_error(&sqlx::Error::PoolClosed), Retry);
        assert_eq!(classify_sqlx_error(&sqlx::Error::RowNotFound), Retry);
        assert_eq!(classify_sqlx_error(&sqlx::Error::BeginFailed), Retry);
        assert_eq!(
            classify_sqlx_error(&sqlx::Error::Io(std::io::Error::other("reset"))),
            Retry
        );
        assert_eq!(
            classify_sqlx_error(&sqlx::Error::ColumnNotFound("x".into())),
            DeadLetter
        );
        assert_eq!(
            classify_sqlx_error(&sqlx::Error::Configuration("bad url".into())),
            DeadLetter
        );
    }

    #[test]
    fn duplicate_key_names_from_both_servers() {
        assert_eq!(
            mysql_duplicate_key_name("Duplicate entry 'a-1' for key 'PRIMARY'"),
            Some("PRIMARY")
        );
        assert_eq!(
            mysql_duplicate_key_name("Duplicate entry 'a' for key 'payments.payments_order_key'"),
            Some("payments_order_key")
        );
        assert_eq!(mysql_duplicate_key_name("Deadlock found"), None);
    }

    #[test]
    fn constraint_names_match_sqlite_messages() {
        let failed = |detail: &str| format!("UNIQUE constraint failed: {detail}");
        assert!(sqlite_unique_detail_matches(
            &failed("payments.order_id"),
            "payments.order_id"
        ));
        assert!(sqlite_unique_detail_matches(&failed("t.a, t.b"), "t.a,t.b"));
        assert!(!sqlite_unique_detail_matches(&failed("t.a, t.b"), "t.a"));
        assert!(!sqlite_unique_detail_matches(
            &failed("payments.id"),
            "payments.order_id"
        ));
        assert!(sqlite_unique_detail_matches(
            &failed("index 'by_order'"),
            "by_order"
        ));
        assert!(!sqlite_unique_detail_matches(
            &failed("index 'by_order'"),
            "other"
        ));
    }
}
