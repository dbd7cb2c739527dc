//! The command line: every command, argument and environment variable, as `--help` shows them.

use std::time::Duration;

use clap::{Parser, Subcommand};
use idem_runtime::retention::DEFAULT_BATCH_SIZE;

const EXIT_CODES: &str = "\
Exit codes:
  0  done (inspect: the message is recorded; forget: its record was deleted)
  1  inspect, forget: no record for this scope and key
  2  usage: a bad argument, no database URL
  3  cannot connect: a bad URL, an unreachable server, refused credentials
  4  the records table does not exist (run `idem migrate`, or pass --table)
  5  another database error
  6  not confirmed (answer `y`, or pass --yes)";

/// Create, inspect, forget and purge idem's dedup records.
///
/// Works on the records table of an idem service (idem_records unless --table names another),
/// on PostgreSQL, MySQL/MariaDB or SQLite. Scopes and keys are the `scope` and `key` fields of
/// the handler's `idem.handle` log span. Expiry is judged by this host's clock: run it where the
/// clock is synchronised, as the service's is.
#[derive(Debug, Parser)]
#[command(name = "idem", version, after_help = EXIT_CODES)]
pub(crate) struct Cli {
    /// The database: postgres://user@host/db, mysql://… or mariadb://…, sqlite:path/to/file.db
    #[arg(
        short = 'd',
        long,
        env = "DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    pub(crate) database_url: Option<String>,

    /// The records table, `name` or `schema.name`, as given to `with_records_table`.
    #[arg(long, global = true, default_value = "idem_records")]
    pub(crate) table: String,

    /// Print JSON instead of text, for scripts.
    #[arg(long, global = true)]
    pub(crate) json: bool,

    /// How long to wait for the database to accept a connection (`10s`, `1m`).
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) connect_timeout: Duration,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create the records table and its expiry index if missing, or bring an older one up to
    /// date: the same SQL as the crate's migrations and `Store::migrate()`. Safe to run twice.
    Migrate,
    /// Records per scope, expired records, the oldest and newest, and the table's size.
    Stats,
    /// Whether a message is recorded: when, with which fingerprint, with which replayed result.
    Inspect {
        /// The handler's scope, e.g. billing.order_paid.
        #[arg(allow_hyphen_values = true)]
        scope: String,
        /// The encoded key, as the handler's logs show it (`-1` is a key, not an option).
        #[arg(allow_hyphen_values = true)]
        key: String,
    },
    /// Delete one message's record, so that its next delivery is processed again.
    ///
    /// Only the record goes: the business rows the first delivery wrote stay.
    Forget {
        /// The handler's scope.
        #[arg(allow_hyphen_values = true)]
        scope: String,
        /// The encoded key.
        #[arg(allow_hyphen_values = true)]
        key: String,
        /// Do not ask for confirmation.
        #[arg(short = 'y', long)]
        yes: bool,
    },
    /// Delete expired records in bounded batches, each committed on its own.
    ///
    /// With --older-than, also every record created longer ago than that, expired or not: a
    /// redelivery of such a message is processed again (this asks for confirmation).
    Purge {
        /// Only this scope's records.
        #[arg(long, allow_hyphen_values = true)]
        scope: Option<String>,
        /// Also delete every record created longer ago than this (`30d`, `12h`).
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<Duration>,
        /// The pause between batches, leaving the database to the live path (`0s`: full speed).
        #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
        pause: Duration,
        /// Records per batch (one statement, one transaction).
        #[arg(long, default_value_t = DEFAULT_BATCH_SIZE, value_parser = clap::value_parser!(u32).range(1..))]
        batch_size: u32,
        /// Do not ask for confirmation.
        #[arg(short = 'y', long)]
        yes: bool,
    },
}
