//! `idem`: create, inspect, forget and purge idem's dedup records from a terminal or a script.
//!
//! ```text
//! idem -d postgres://postgres@127.0.0.1/test migrate
//! idem -d postgres://… stats
//! idem -d postgres://… inspect billing.order_paid o-1
//! idem -d postgres://… forget billing.order_paid o-1
//! idem -d postgres://… purge --scope billing.order_paid --older-than 30d
//! ```
//!
//! Text for people by default, `--json` for scripts; the exit codes are listed by
//! `idem --help` and in the README's "Operating" section.

/// `println!` to stdout, quietly giving up when the reader has gone (`idem stats | head`): a
/// closed pipe is not an error of the command.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `print!` to stdout, like [`say!`].
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}

mod args;
mod database;
mod error;
mod render;

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use idem_runtime::retention::PurgeOptions;
use idem_runtime::store::RecordsTable;

use crate::args::{Cli, Command};
use crate::database::{Database, Open};
use crate::error::{CliError, display_table};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("idem: {error}");
            error.exit_code()
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let url = cli.database_url.clone().ok_or(CliError::NoUrl)?;
    let table = RecordsTable::parse(&cli.table).map_err(|source| CliError::BadTable {
        table: cli.table.clone(),
        source,
    })?;
    let open = match cli.command {
        Command::Migrate => Open::CreatingSqliteFile,
        _ => Open::Existing,
    };
    let shown = display_table(&table);
    let database = Database::connect(&url, table.clone(), cli.connect_timeout, open).await?;
    let sql = |error| CliError::from_sqlx(error, &table, &url);
    let print_json = |value: serde_json::Value| say!("{value:#}");

    match cli.command {
        Command::Migrate => {
            database.migrate().await.map_err(sql)?;
            if cli.json {
                print_json(serde_json::json!({ "table": shown, "migrated": true }));
            } else {
                say!("records table {shown} on {} is up to date", database.kind());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats => {
            let stats = database.stats().await.map_err(sql)?;
            if cli.json {
                print_json(render::stats_json(&shown, &stats));
            } else {
                say_raw!("{}", render::stats_text(&shown, database.kind(), &stats));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { scope, key } => {
            let record = database.inspect(&scope, &key).await.map_err(sql)?;
            if cli.json {
                print_json(render::inspect_json(&scope, &key, record.as_ref()));
            } else {
                match &record {
                    Some(record) => say_raw!("{}", render::record_text(record)),
                    None => say_raw!("{}", render::not_recorded_text(&scope, &key)),
                }
            }
            Ok(found(record.is_some()))
        }
        Command::Forget { scope, key, yes } => {
            let Some(record) = database.inspect(&scope, &key).await.map_err(sql)? else {
                if cli.json {
                    print_json(
                        serde_json::json!({ "forgotten": false, "scope": scope, "key": key }),
                    );
                } else {
                    say_raw!("{}", render::not_recorded_text(&scope, &key));
                }
                return Ok(found(false));
            };
            if !yes {
                eprint!("{}", render::record_text(&record));
                confirm(
                    "Forget this record? The next delivery of its message runs the handler again.",
                )?;
            }
            let forgotten = database.forget(&scope, &key).await.map_err(sql)?;
            if cli.json {
                print_json(
                    serde_json::json!({ "forgotten": forgotten, "scope": scope, "key": key }),
                );
            } else if forgotten {
                say!("forgotten: key `{key}` in scope `{scope}`; its next delivery is processed");
            } else {
                say!("already gone: key `{key}` in scope `{scope}` was deleted meanwhile");
            }
            Ok(found(forgotten))
        }
        Command::Purge {
            scope,
            older_than,
            pause,
            batch_size,
            yes,
        } => {
            let mut options = PurgeOptions::new()
                .batch_size(batch_size)
                .pause_between_batches(pause);
            if let Some(scope) = &scope {
                options = options.in_scope(scope.clone());
            }
            if let Some(age) = older_than {
                options = options.older_than(age);
                if !yes {
                    confirm(&format!(
                        "Delete every record of {} created more than {} ago, live ones too? \
                         A redelivery of their messages will be processed again.",
                        scope
                            .as_deref()
                            .map_or_else(|| format!("table {shown}"), |s| format!("scope `{s}`")),
                        humantime::format_duration(age)
                    ))?;
                }
            }
            let done = purge(&database, &options, cli.json).await.map_err(sql)?;
            if cli.json {
                print_json(serde_json::json!({
                    "table": shown,
                    "scope": scope,
                    "deleted": done.deleted,
                    "batches": done.batches,
                }));
            } else {
                say!(
                    "purged {} from {shown} in {} batches",
                    render::records(done.deleted),
                    done.batches
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Exit code 0 when the record was there, 1 when it was not (like `grep`).
fn found(found: bool) -> ExitCode {
    if found {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Asks `question` (ending with its full stop) on stderr and reads the answer from stdin (a terminal, or a pipe: `echo y |
/// idem …`); anything but `y` or `yes` declines, and so does an empty stdin.
fn confirm(question: &str) -> Result<(), CliError> {
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(CliError::NotConfirmed),
    }
}

/// Runs the purge with a progress bar on a terminal, a plain line per batch on stderr
/// otherwise.
async fn purge(
    database: &Database,
    options: &PurgeOptions,
    json: bool,
) -> Result<idem_runtime::retention::PurgeProgress, idem_runtime::sqlx::Error> {
    if std::io::stderr().is_terminal() && !json {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        let done = database
            .purge(options, |progress| {
                bar.set_message(format!(
                    "{} records deleted, {} batches",
                    render::count(progress.deleted),
                    progress.batches
                ));
            })
            .await;
        bar.finish_and_clear();
        done
    } else {
        database
            .purge(options, |progress| {
                eprintln!("{}", render::purge_line(progress))
            })
            .await
    }
}
