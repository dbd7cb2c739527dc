//! What the commands print: aligned text for people, JSON for scripts.

use std::time::{Duration, UNIX_EPOCH};

use idem_runtime::retention::PurgeProgress;
use idem_runtime::store::{RecordDetails, RecordStats};
use serde_json::json;

/// The last second humantime writes in RFC 3339: 9999-12-31T23:59:59Z.
const LAST_RFC3339_MS: u64 = 253_402_300_799_000;

/// Unix milliseconds as an RFC 3339 UTC time, to the millisecond; the raw number outside the
/// years 1970 to 9999 (an expiry of `Duration::MAX` saturates to `i64::MAX`).
pub(crate) fn time(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) if ms <= LAST_RFC3339_MS => {
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        }
        Ok(_) => format!("after the year 9999 ({ms} ms)"),
        Err(_) => format!("before 1970 ({ms} ms)"),
    }
}

/// `1234567` as `1,234,567`.
pub(crate) fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Bytes in binary units: `1.5 MiB`.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub(crate) fn stats_text(table: &str, kind: &str, stats: &RecordStats) -> String {
    let size = stats
        .table_bytes
        .map_or_else(|| "size unknown".to_owned(), bytes);
    let mut out = format!(
        "records table {table} on {kind}: {} records in {} scopes, {} expired, {size}\n",
        count(stats.records()),
        count(stats.scopes.len() as u64),
        count(stats.expired()),
    );
    if stats.scopes.is_empty() {
        return out;
    }
    let rows: Vec<[String; 5]> = stats
        .scopes
        .iter()
        .map(|scope| {
            [
                scope.scope.clone(),
                count(scope.records),
                count(scope.expired),
                time(scope.oldest_created_at_ms),
                time(scope.newest_created_at_ms),
            ]
        })
        .collect();
    let header = ["SCOPE", "RECORDS", "EXPIRED", "OLDEST", "NEWEST"].map(str::to_owned);
    let width = |column: usize| {
        std::iter::once(&header)
            .chain(&rows)
            .map(|row| row[column].chars().count())
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..5).map(width).collect();
    out.push('\n');
    for row in std::iter::once(&header).chain(&rows) {
        let line = format!(
            "{:<w0$}  {:>w1$}  {:>w2$}  {:<w3$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub(crate) fn stats_json(table: &str, stats: &RecordStats) -> serde_json::Value {
    json!({
        "table": table,
        "records": stats.records(),
        "expired": stats.expired(),
        "table_bytes": stats.table_bytes,
        "now_ms": stats.now_ms,
        "scopes": stats.scopes,
    })
}

pub(crate) fn record_text(record: &RecordDetails) -> String {
    let status = if record.expired {
        "recorded, expired: the next delivery of this message is processed again"
    } else {
        "recorded: the next delivery of this message is a duplicate (its body does not run)"
    };
    let expires = match record.expires_at_ms {
        None => "never".to_owned(),
        Some(ms) => time(ms),
    };
    let or_none = |value: &Option<String>| value.clone().unwrap_or_else(|| "none".to_owned());
    format!(
        "{status}\n\
         scope:       {}\n\
         key:         {}\n\
         created:     {}\n\
         expires:     {expires}\n\
         fingerprint: {}\n\
         response:    {}\n",
        record.scope,
        record.key,
        time(record.created_at_ms),
        or_none(&record.fingerprint),
        or_none(&record.response),
    )
}

pub(crate) fn not_recorded_text(scope: &str, key: &str) -> String {
    format!(
        "not recorded: no record of key `{key}` in scope `{scope}`: the message was never \
         processed, or its record was purged or forgotten (state_machine, and unique_constraint \
         without replay or fingerprint, keep no record)\n"
    )
}

pub(crate) fn inspect_json(
    scope: &str,
    key: &str,
    record: Option<&RecordDetails>,
) -> serde_json::Value {
    match record {
        Some(record) => json!({ "recorded": true, "record": record }),
        None => json!({ "recorded": false, "scope": scope, "key": key }),
    }
}

pub(crate) fn purge_line(progress: &PurgeProgress) -> String {
    format!(
        "batch {}: deleted {} ({} in all)",
        progress.batches,
        records(progress.last_batch),
        count(progress.deleted)
    )
}

/// `1 record`, `2 records`.
pub(crate) fn records(n: u64) -> String {
    match n {
        1 => "1 record".to_owned(),
        n => format!("{} records", count(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_like_numbers() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_000), "1,000");
        assert_eq!(count(12_345_678), "12,345,678");
        assert_eq!(bytes(512), "512 bytes");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
        assert_eq!(time(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(time(253_402_300_799_000), "9999-12-31T23:59:59.000Z");
        assert_eq!(
            time(i64::MAX),
            format!("after the year 9999 ({} ms)", i64::MAX)
        );
        assert_eq!(time(-1), "before 1970 (-1 ms)");
    }
}
