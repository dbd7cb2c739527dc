//! The `idem` command end to end: the built binary against the live PostgreSQL, MariaDB and
//! SQLite, its output (text and `--json`) and its exit codes. Each test works on a records
//! table of its own, so that nothing else in the database is touched.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idem_runtime::clock::{Clock, ManualClock};
use idem_runtime::sqlx;
use idem_runtime::store::{Claim, NewRecord, RecordsTable};
use idem_runtime::{Key, MySqlStore, PgStore, SqliteStore, Store};
use serde_json::Value;

const HOUR: Duration = Duration::from_secs(3600);

fn pg_url() -> String {
    std::env::var("IDEM_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn mysql_url() -> String {
    std::env::var("IDEM_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

/// A table name no other test or run uses.
fn own_table(label: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos());
    format!("idem_cli_{label}_{}_{nanos}_{n}", std::process::id())
}

/// What one run of the binary did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|error| panic!("stdout is not JSON ({error}): {self:?}"))
    }
}

/// Runs `idem ARGS` with `stdin` as its input (none: an empty stdin, as under cron).
fn idem(args: &[&str], stdin: Option<&str>) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .env_remove("DATABASE_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the idem binary");
    {
        let mut input = child.stdin.take().expect("stdin");
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).expect("write stdin");
        }
    }
    let output = child.wait_with_output().expect("wait for idem");
    Run {
        code: output.status.code().expect("exited, not killed"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs `idem -d URL --table TABLE ARGS` and checks its exit code.
fn expect(url: &str, table: &str, args: &[&str], stdin: Option<&str>, code: i32) -> Run {
    let mut all = vec!["-d", url, "--table", table];
    all.extend_from_slice(args);
    let run = idem(&all, stdin);
    assert_eq!(run.code, code, "idem {args:?} exited {}: {run:?}", run.code);
    run
}

/// `(scope, records)` from `idem --json stats`.
fn records_per_scope(stats: &Value) -> Vec<(&str, u64)> {
    stats["scopes"]
        .as_array()
        .expect("scopes")
        .iter()
        .map(|s| {
            (
                s["scope"].as_str().expect("scope"),
                s["records"].as_u64().expect("records"),
            )
        })
        .collect()
}

fn key(scope: &'static str, id: &str) -> Key {
    Key::new(scope, &[("order_id", &id)]).expect("key")
}

/// Fills the table the way handlers would: expired records, old records kept forever, young
/// ones, and one with a fingerprint and a stored result.
async fn fill<S: Store + Clone>(store: S, with_clock: impl Fn(S, ManualClock) -> S) {
    let clock = ManualClock::at(ManualClock::starting_now().now_ms() - 2 * 3_600_000);
    let old = with_clock(store.clone(), clock.clone());
    let ids = |prefix: &str, n: u32| {
        (0..n)
            .map(move |i| format!("{prefix}{i}"))
            .collect::<Vec<_>>()
    };
    let marked = |scope: &'static str, prefix: &str, n: u32| {
        ids(prefix, n).into_iter().map(move |id| key(scope, &id))
    };
    old.mark_processed(marked("cli.a", "a", 5), Some(HOUR))
        .await
        .expect("expired ones");
    old.mark_processed(marked("cli.b", "b", 3), None)
        .await
        .expect("old ones");
    // Keys that sort backwards across scopes (cli.d's after cli.e's), so that a walk which
    // compared scope and key apart would stop early.
    old.mark_processed(marked("cli.d", "z", 3), None)
        .await
        .expect("old ones elsewhere");
    old.mark_processed(marked("cli.e", "a", 3), None)
        .await
        .expect("and more");
    store
        .mark_processed(marked("cli.b", "young", 2), None)
        .await
        .expect("young ones");
    let replayed = key("cli.c", "o-1");
    let mut tx = store.begin().await.expect("begin");
    let claim = store
        .claim(
            &mut tx,
            &NewRecord {
                key: &replayed,
                fingerprint: Some("f1e2d3"),
                response: Some(r#"{"receipt":"r-1"}"#),
                now_ms: store.now_ms(),
                expires_at_ms: None,
            },
        )
        .await
        .expect("claim");
    assert_eq!(claim, Claim::Claimed);
    store.commit(tx).await.expect("commit");
}

/// Every command, in the order an operator would use them, on one database.
async fn every_command(url: &str, table: &str, fill_it: impl std::future::Future<Output = ()>) {
    let migrated = expect(url, table, &["migrate"], None, 0);
    assert!(migrated.stdout.contains("up to date"), "{migrated:?}");
    expect(url, table, &["migrate"], None, 0);
    let empty = expect(url, table, &["--json", "stats"], None, 0).json();
    assert_eq!(
        (
            empty["records"].as_u64(),
            empty["scopes"].as_array().map(Vec::len)
        ),
        (Some(0), Some(0))
    );

    fill_it.await;

    // stats: 5 + 3 + 3 + 3 + 2 + 1 records, the 5 of cli.a expired.
    let stats = expect(url, table, &["stats"], None, 0);
    assert!(
        stats.stdout.contains("17 records in 5 scopes, 5 expired"),
        "{stats:?}"
    );
    let line = stats
        .stdout
        .lines()
        .find(|line| line.starts_with("cli.a "))
        .expect("cli.a's line");
    assert_eq!(
        line.split_whitespace().take(3).collect::<Vec<_>>(),
        ["cli.a", "5", "5"]
    );
    let json = expect(url, table, &["--json", "stats"], None, 0).json();
    assert_eq!(
        (json["records"].as_u64(), json["expired"].as_u64()),
        (Some(17), Some(5))
    );
    let scopes = records_per_scope(&json);
    assert_eq!(
        scopes,
        [
            ("cli.a", 5),
            ("cli.b", 5),
            ("cli.c", 1),
            ("cli.d", 3),
            ("cli.e", 3)
        ]
    );

    // inspect: recorded (0), with its fingerprint and stored result; not recorded (1).
    let shown = expect(url, table, &["inspect", "cli.c", "o-1"], None, 0);
    assert!(
        shown.stdout.starts_with("recorded: the next delivery"),
        "{shown:?}"
    );
    assert!(shown.stdout.contains("fingerprint: f1e2d3"), "{shown:?}");
    assert!(
        shown.stdout.contains(r#"response:    {"receipt":"r-1"}"#),
        "{shown:?}"
    );
    assert!(shown.stdout.contains("expires:     never"), "{shown:?}");
    let json = expect(url, table, &["--json", "inspect", "cli.c", "o-1"], None, 0).json();
    assert_eq!(json["recorded"], true);
    assert_eq!(json["record"]["response"], r#"{"receipt":"r-1"}"#);
    assert_eq!(json["record"]["expired"], false);
    let expired = expect(url, table, &["--json", "inspect", "cli.a", "a0"], None, 0).json();
    assert_eq!(expired["record"]["expired"], true);
    let missing = expect(url, table, &["inspect", "cli.c", "o-404"], None, 1);
    assert!(missing.stdout.starts_with("not recorded"), "{missing:?}");
    assert_eq!(
        expect(
            url,
            table,
            &["--json", "inspect", "cli.c", "o-404"],
            None,
            1
        )
        .json()["recorded"],
        false
    );

    // forget: asks; no answer or "n" keeps the record (6); "y" deletes it (0); gone: 1.
    let unanswered = expect(url, table, &["forget", "cli.c", "o-1"], None, 6);
    assert!(
        unanswered.stderr.contains("[y/N]") && unanswered.stderr.contains("--yes"),
        "{unanswered:?}"
    );
    expect(url, table, &["forget", "cli.c", "o-1"], Some("n\n"), 6);
    expect(url, table, &["inspect", "cli.c", "o-1"], None, 0);
    let forgotten = expect(url, table, &["forget", "cli.c", "o-1"], Some("y\n"), 0);
    assert!(forgotten.stdout.starts_with("forgotten"), "{forgotten:?}");
    expect(url, table, &["inspect", "cli.c", "o-1"], None, 1);
    expect(url, table, &["forget", "cli.c", "o-1", "--yes"], None, 1);

    // purge: the expired records, two per batch, a plain line per batch off a terminal.
    let purged = expect(url, table, &["purge", "--batch-size", "2"], None, 0);
    assert!(purged.stdout.contains("purged 5 records"), "{purged:?}");
    let lines: Vec<&str> = purged.stderr.lines().collect();
    assert_eq!(
        lines,
        [
            "batch 1: deleted 2 records (2 in all)",
            "batch 2: deleted 2 records (4 in all)",
            "batch 3: deleted 1 record (5 in all)"
        ],
        "{purged:?}"
    );
    // by age, in one scope: asks first (6, nothing deleted), then deletes cli.b's old three.
    expect(
        url,
        table,
        &["purge", "--scope", "cli.b", "--older-than", "1h"],
        None,
        6,
    );
    let json = expect(url, table, &["--json", "stats"], None, 0).json();
    assert_eq!(json["records"].as_u64(), Some(11));
    let by_age = expect(
        url,
        table,
        &[
            "--json",
            "purge",
            "--scope",
            "cli.b",
            "--older-than",
            "1h",
            "--yes",
            "--batch-size",
            "2",
        ],
        None,
        0,
    )
    .json();
    assert_eq!(by_age["deleted"].as_u64(), Some(3), "{by_age}");
    // by age, the whole table, in windows of two keys that cross scopes: cli.d's and cli.e's
    // three each; cli.b's young ones stay.
    let all = expect(
        url,
        table,
        &["purge", "--older-than", "1h", "--batch-size", "2"],
        Some("yes\n"),
        0,
    );
    assert!(all.stdout.contains("purged 6 records"), "{all:?}");
    let json = expect(url, table, &["--json", "stats"], None, 0).json();
    let left = records_per_scope(&json);
    assert_eq!(left, [("cli.b", 2)]);

    // A table that does not exist: 4, and what to do.
    let missing = expect(url, &format!("{table}_missing"), &["stats"], None, 4);
    assert!(missing.stderr.contains("idem migrate"), "{missing:?}");
}

#[tokio::test]
async fn every_command_on_postgresql() {
    let url = pg_url();
    let table = own_table("pg");
    let records = RecordsTable::new(&table).expect("table name");
    let store = PgStore::connect(&url)
        .await
        .expect("connect")
        .with_records_table(records);
    every_command(
        &url,
        &table,
        fill(store.clone(), |s, clock| s.with_clock(clock)),
    )
    .await;
    let size = expect(&url, &table, &["--json", "stats"], None, 0).json();
    assert!(
        size["table_bytes"].as_u64().is_some_and(|bytes| bytes > 0),
        "{size}"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(store.pool())
        .await
        .expect("drop");
}

#[tokio::test]
async fn every_command_on_mariadb() {
    let url = mysql_url();
    let table = own_table("my");
    let records = RecordsTable::new(&table).expect("table name");
    let store = MySqlStore::connect(&url)
        .await
        .expect("connect")
        .with_records_table(records);
    every_command(
        &url,
        &table,
        fill(store.clone(), |s, clock| s.with_clock(clock)),
    )
    .await;
    // The mariadb:// spelling reaches the same server.
    let maria = url.replacen("mysql://", "mariadb://", 1);
    let json = expect(&maria, &table, &["--json", "stats"], None, 0).json();
    assert_eq!(json["records"].as_u64(), Some(2));
    assert!(
        json["table_bytes"].as_u64().is_some_and(|bytes| bytes > 0),
        "{json}"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(store.pool())
        .await
        .expect("drop");
}

#[tokio::test]
async fn every_command_on_sqlite() {
    let path = std::env::temp_dir().join(format!("{}.db", own_table("lite")));
    let url = format!("sqlite:{}", path.display());
    // Without `migrate`, a missing file is not created: the URL is wrong (3).
    let absent = expect(&url, "idem_records", &["stats"], None, 3);
    assert!(
        absent.stderr.contains("unable to open database file"),
        "{absent:?}"
    );
    assert!(!path.exists(), "stats must not create the file");
    let table = "idem_records";
    let migrated = expect(&url, table, &["migrate"], None, 0);
    assert!(migrated.stdout.contains("SQLite"), "{migrated:?}");
    let store = SqliteStore::open(&path).await.expect("open");
    every_command(
        &url,
        table,
        fill(store.clone(), |s, clock| s.with_clock(clock)),
    )
    .await;
    store.pool().close().await;
    let _ = std::fs::remove_file(&path);
}

#[test]
fn bad_invocations_exit_with_their_documented_codes() {
    // No URL at all: a usage error.
    let none = idem(&["stats"], None);
    assert_eq!(none.code, 2, "{none:?}");
    assert!(none.stderr.contains("DATABASE_URL"), "{none:?}");
    // Missing arguments, a batch of zero: clap's usage errors.
    assert_eq!(
        idem(&["-d", "sqlite:x.db", "inspect", "only-scope"], None).code,
        2
    );
    assert_eq!(
        idem(&["-d", "sqlite:x.db", "purge", "--batch-size", "0"], None).code,
        2
    );
    assert_eq!(
        idem(
            &["-d", "sqlite:x.db", "purge", "--older-than", "soon"],
            None
        )
        .code,
        2
    );
    // A table name idem refuses.
    let table = idem(&["-d", "sqlite:x.db", "--table", "a.b.c", "stats"], None);
    assert_eq!(table.code, 2, "{table:?}");
    // Not a database URL.
    let scheme = idem(&["-d", "redis://127.0.0.1", "stats"], None);
    assert_eq!(scheme.code, 3, "{scheme:?}");
    assert!(scheme.stderr.contains("postgres://"), "{scheme:?}");
    // Nothing listens there: refused at once, with the reason, and no password shown.
    let refused = idem(
        &["-d", "postgres://app:secret@127.0.0.1:1/test", "stats"],
        None,
    );
    assert_eq!(refused.code, 3, "{refused:?}");
    assert!(refused.stderr.contains("refused"), "{refused:?}");
    assert!(!refused.stderr.contains("secret"), "{refused:?}");
    // Credentials the server refuses.
    let denied = idem(
        &["-d", "postgres://no_such_role@127.0.0.1:5432/test", "stats"],
        None,
    );
    assert_eq!(denied.code, 3, "{denied:?}");
    assert!(denied.stderr.contains("no_such_role"), "{denied:?}");
    // --help lists the exit codes.
    let help = idem(&["--help"], None);
    assert_eq!(help.code, 0);
    assert!(
        help.stdout.contains("Exit codes:") && help.stdout.contains("6  not confirmed"),
        "{help:?}"
    );
}

/// On a terminal (a pseudo-terminal from util-linux's `script`), `purge` draws its progress
/// spinner on stderr and still ends with its summary and exit code 0.
#[tokio::test]
async fn purge_on_a_terminal_shows_progress_and_ends_cleanly() {
    let path = std::env::temp_dir().join(format!("{}.db", own_table("tty")));
    let url = format!("sqlite:{}", path.display());
    expect(&url, "idem_records", &["migrate"], None, 0);
    let store = SqliteStore::open(&path).await.expect("open");
    let past = ManualClock::at(ManualClock::starting_now().now_ms() - 2 * 3_600_000);
    let keys = (0..5)
        .map(|i| key("tty.a", &format!("k{i}")))
        .collect::<Vec<_>>();
    store
        .clone()
        .with_clock(past)
        .mark_processed(keys, Some(HOUR))
        .await
        .expect("expired records");
    store.pool().close().await;
    let command = format!(
        "{} -d {url} purge --batch-size 2 --pause 50ms",
        env!("CARGO_BIN_EXE_idem")
    );
    let output = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .output()
        .expect("run `script` (util-linux), which gives the command a terminal");
    let shown = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{shown}");
    assert!(shown.contains("purged 5 records"), "{shown}");
    assert!(
        shown.contains("records deleted, "),
        "the spinner's message: {shown}"
    );
    assert!(
        !shown.contains("batch 1: deleted"),
        "a terminal gets the spinner, not the plain lines: {shown}"
    );
    let _ = std::fs::remove_file(&path);
}
