//! `redis-lock`: the `lock` gate on Redis against the physical floor of the round trips it
//! needs, measured in the same run on the same connection.
//!
//! A first delivery costs two round trips (the claim script, then the marker script), a
//! duplicate one (the claim script finds the marker). The floors, on the one
//! [`ConnectionManager`] the store also uses, one task, sequential:
//!
//! - **`setnx_per_s`**: raw `SET key 1 NX PX 30000` on fresh keys: a round trip with a one-key
//!   write, the cheapest possible claim;
//! - **`marker_per_s`**: `EVALSHA` of [`scripts::COMPLETE`] (the marker script, as a raw
//!   command, no redis-rs `Script` wrapper) on keys prepared **outside the timed loop** as the
//!   claim leaves them (`HSET state lease owner <X> until …`, `PEXPIRE`), with the arguments
//!   idem sends (Redis's clock, `ttl` 1 h, no fingerprint, no result), so that every call
//!   **succeeds** (replies 1: the marker is written).
//!
//! A first delivery's limit is then `1 / (t_setnx + t_marker)` (`baseline_per_s`), a
//! duplicate's the `setnx` rate. Measured against them: idem's `lock` handler (an empty body,
//! `ttl = "1h"`, through the generated function with [`NoAck`]) on fresh keys (`idem_per_s`,
//! `first_ratio`) and on the same keys again (`dup_per_s`, `dup_ratio`), one task, sequential;
//! then with 32 tasks on the one multiplexed connection, first deliveries (`first32_per_s`)
//! against raw `SET NX PX` (`raw32_per_s`), with the target `min(35000, 0.85 × raw32)`
//! (`target32_per_s`).
//!
//! To tell the client's overhead from Redis's, the line also carries the floor with idem's own
//! claim script in place of `SET NX`: [`scripts::CLAIM`] raw on fresh keys (`claim_per_s`) and
//! on done markers (`claim_done_per_s`, a duplicate's one round trip), their two-trip limit
//! (`scripts_per_s`, `first_scripts_ratio`, `dup_script_ratio`), the two scripts raw per key
//! with 32 tasks (`scripts32_per_s`, `first32_scripts_ratio`), and the microseconds Redis itself
//! spent per message in each sequential phase (`server_us_*`, from `INFO commandstats`: the
//! top-level `SET` and `EVALSHA` time; other clients of the same Redis add to it) and the CPU
//! the benchmark process spent per message (`client_us_*`, all its threads, from
//! `/proc/self/task/*/schedstat`): on a machine whose cores the client shares with Redis, the
//! client's CPU per delivery is what the 32-task phases lose to it.
//!
//! The phases rotate order between rounds; `--messages` is per phase and run, `--tasks` does
//! not apply (1 and 32 are fixed). Keys expire by themselves (30 s for leases and raw `SET`s, an
//! hour for the markers).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_runtime::store::redis::scripts;
use idem_runtime::{NoAck, RedisStore, idempotent};
use redis::aio::ConnectionManager;

use super::{BenchMsg, BoxError, Config, Measurement, Side, bench_msg, drive, processed};

/// The concurrent phases' task count (the target is set at 32).
const CONCURRENT_TASKS: usize = 32;
/// The marker's lifetime, in the handler's `ttl` and in the floor's arguments alike.
const MARKER_TTL_MS: i64 = 3_600_000;
/// The lease the floor's prepared keys carry (the handler's default lease).
const LEASE_MS: i64 = 30_000;
/// The floor's owner token: 32 hex characters, as idem's.
const OWNER: &str = "0123456789abcdef0123456789abcdef";

/// The gate alone: an empty body, so that only idem's round trips and bookkeeping are timed.
#[idempotent(
    key = "order_id",
    store = "redis",
    strategy = "lock",
    scope = "bench.redis.lock",
    ttl = "1h"
)]
async fn redis_lock_handler(_msg: BenchMsg) -> Result<(), Infallible> {
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// One measured phase of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Raw `SET NX PX`, one task.
    SetNx,
    /// The marker script on a prepared lease, one task.
    Marker,
    /// The claim script on a fresh key, one task: what idem's claim costs on the server.
    Claim,
    /// The claim script on a done marker, one task: what a duplicate costs on the server.
    ClaimDone,
    /// idem, fresh keys, one task.
    First,
    /// idem, the keys of `First` again, one task.
    Duplicate,
    /// Raw `SET NX PX`, 32 tasks.
    Raw32,
    /// The claim script then the marker script per key, raw, 32 tasks.
    Scripts32,
    /// idem, fresh keys, 32 tasks.
    First32,
}

impl Phase {
    const COUNT: usize = 9;

    /// The floors and idem alternate who goes first; the claim on done markers follows the
    /// marker phase that wrote them, and duplicates follow the first deliveries whose keys they
    /// reuse.
    fn order(round: usize) -> [Self; Self::COUNT] {
        if round.is_multiple_of(2) {
            [
                Self::SetNx,
                Self::Marker,
                Self::ClaimDone,
                Self::Claim,
                Self::First,
                Self::Duplicate,
                Self::Raw32,
                Self::Scripts32,
                Self::First32,
            ]
        } else {
            [
                Self::First,
                Self::Duplicate,
                Self::Claim,
                Self::Marker,
                Self::ClaimDone,
                Self::SetNx,
                Self::First32,
                Self::Scripts32,
                Self::Raw32,
            ]
        }
    }

    fn tasks(self) -> usize {
        match self {
            Self::Raw32 | Self::Scripts32 | Self::First32 => CONCURRENT_TASKS,
            _ => 1,
        }
    }
}

/// One phase's totals over the rounds of a run.
#[derive(Debug, Default)]
struct Phased {
    side: Side,
    /// Microseconds Redis spent executing the phase's top-level commands (`SET`, `EVALSHA`),
    /// from `INFO commandstats`.
    server_usec: u64,
    /// Nanoseconds of CPU the benchmark process spent meanwhile, all threads.
    client_ns: u64,
}

impl Phased {
    /// Server microseconds per message (per delivery, for the phases of two round trips).
    fn server_us(&self) -> f64 {
        self.server_usec as f64 / self.side.messages.max(1) as f64
    }

    /// The client's CPU microseconds per message.
    fn client_us(&self) -> f64 {
        self.client_ns as f64 / 1000.0 / self.side.messages.max(1) as f64
    }
}

/// CPU nanoseconds this process has run so far, summed over its threads
/// (`/proc/self/task/*/schedstat`); 0 where that does not exist.
fn client_cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The SHA1s of the scripts the floors call.
#[derive(Debug, Clone)]
struct Shas {
    claim: Arc<str>,
    complete: Arc<str>,
}

/// `SET key 1 NX PX 30000`, which must set (the keys are fresh).
async fn set_nx(mut conn: ConnectionManager, key: String) -> Result<(), BoxError> {
    let reply: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg("1")
        .arg("NX")
        .arg("PX")
        .arg(LEASE_MS)
        .query_async(&mut conn)
        .await?;
    if reply.is_none() {
        return Err(format!("SET NX found `{key}` taken: keys are not unique").into());
    }
    Ok(())
}

/// The marker script on a lease of [`OWNER`], with idem's arguments (an empty "now": Redis's
/// clock, as a store without an injected clock sends); must write the marker.
async fn marker(conn: &mut ConnectionManager, sha: &str, key: &str) -> Result<(), BoxError> {
    let written: i64 = redis::cmd("EVALSHA")
        .arg(sha)
        .arg(1)
        .arg(key)
        .arg(OWNER)
        .arg("")
        .arg(MARKER_TTL_MS)
        .arg("0")
        .arg("")
        .arg("0")
        .arg("")
        .query_async(conn)
        .await?;
    if written != 1 {
        return Err(format!("the marker script refused `{key}`: was it prepared?").into());
    }
    Ok(())
}

/// The claim script in `lock` mode for [`OWNER`], with idem's arguments (an empty "now", as
/// above); must reply `expect` (`claimed` on a fresh key, `done` on a marker).
async fn claim(
    conn: &mut ConnectionManager,
    sha: &str,
    key: &str,
    expect: &str,
) -> Result<(), BoxError> {
    let reply: Vec<Option<String>> = redis::cmd("EVALSHA")
        .arg(sha)
        .arg(1)
        .arg(key)
        .arg("lock")
        .arg(OWNER)
        .arg("")
        .arg(LEASE_MS)
        .query_async(conn)
        .await?;
    if reply.first().and_then(Option::as_deref) != Some(expect) {
        return Err(format!("the claim script replied {reply:?} on `{key}`, not {expect}").into());
    }
    Ok(())
}

/// Leases on `keys` as the claim script leaves them, so that the marker script succeeds on
/// each; pipelined, outside any timed loop.
async fn prepare_leases(conn: &mut ConnectionManager, keys: &[String]) -> Result<(), BoxError> {
    let until = now_ms() + LEASE_MS;
    for chunk in keys.chunks(500) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("HSET")
                .arg(key)
                .arg("state")
                .arg("lease")
                .arg("owner")
                .arg(OWNER)
                .arg("until")
                .arg(until)
                .ignore()
                .cmd("PEXPIRE")
                .arg(key)
                .arg(LEASE_MS)
                .ignore();
        }
        pipe.query_async::<()>(conn).await?;
    }
    Ok(())
}

/// Microseconds Redis has spent in top-level `SET` and `EVALSHA` calls since its start (the
/// commands a script calls are inside its `EVALSHA`'s time).
async fn server_usec(conn: &mut ConnectionManager) -> Result<u64, BoxError> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    Ok(info
        .lines()
        .filter(|line| line.starts_with("cmdstat_set:") || line.starts_with("cmdstat_evalsha:"))
        .filter_map(|line| {
            line.split([':', ','])
                .find_map(|field| field.strip_prefix("usec="))
                .and_then(|usec| usec.parse::<u64>().ok())
        })
        .sum())
}

/// Runs one phase over `keys`.
async fn run_phase(
    phase: Phase,
    conn: &ConnectionManager,
    store: &RedisStore,
    shas: &Shas,
    keys: Vec<String>,
) -> Result<Side, BoxError> {
    let tasks = phase.tasks();
    match phase {
        Phase::SetNx | Phase::Raw32 => {
            let conn = conn.clone();
            drive(tasks, keys, move |key| set_nx(conn.clone(), key)).await
        }
        Phase::Marker => {
            let (conn, sha) = (conn.clone(), Arc::clone(&shas.complete));
            drive(tasks, keys, move |key| {
                let (mut conn, sha) = (conn.clone(), Arc::clone(&sha));
                async move { marker(&mut conn, &sha, &key).await }
            })
            .await
        }
        Phase::Claim | Phase::ClaimDone => {
            let (conn, sha) = (conn.clone(), Arc::clone(&shas.claim));
            let expect = if phase == Phase::Claim {
                "claimed"
            } else {
                "done"
            };
            drive(tasks, keys, move |key| {
                let (mut conn, sha) = (conn.clone(), Arc::clone(&sha));
                async move { claim(&mut conn, &sha, &key, expect).await }
            })
            .await
        }
        Phase::Scripts32 => {
            let (conn, shas) = (conn.clone(), shas.clone());
            drive(tasks, keys, move |key| {
                let (mut conn, shas) = (conn.clone(), shas.clone());
                async move {
                    claim(&mut conn, &shas.claim, &key, "claimed").await?;
                    marker(&mut conn, &shas.complete, &key).await
                }
            })
            .await
        }
        Phase::First | Phase::First32 => {
            let store = store.clone();
            drive(tasks, keys, move |key| {
                let store = store.clone();
                async move { processed(&redis_lock_handler(&store, bench_msg(key), NoAck).await?) }
            })
            .await
        }
        Phase::Duplicate => {
            let store = store.clone();
            drive(tasks, keys, move |key| {
                let store = store.clone();
                async move {
                    let outcome = redis_lock_handler(&store, bench_msg(key), NoAck).await?;
                    if outcome.is_duplicate() {
                        Ok(())
                    } else {
                        Err("a redelivery was processed again".into())
                    }
                }
            })
            .await
        }
    }
}

async fn load(conn: &mut ConnectionManager, source: &str) -> Result<Arc<str>, BoxError> {
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(source)
        .query_async(conn)
        .await?;
    Ok(sha.into())
}

pub(super) async fn redis_lock(config: &Config) -> Result<Measurement, BoxError> {
    let url =
        std::env::var("IDEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut conn = redis::Client::open(url.as_str())?
        .get_connection_manager()
        .await
        .map_err(|error| format!("Redis is not reachable at {url}: {error}"))?;
    let store = RedisStore::from_connection_manager(conn.clone());
    let shas = Shas {
        claim: load(&mut conn, scripts::CLAIM).await?,
        complete: load(&mut conn, scripts::COMPLETE).await?,
    };
    // Warm up, untimed: the connection, and the store's scripts (its first call loads them).
    let warm = format!("{}-redis-warm", config.run_id);
    processed(&redis_lock_handler(&store, bench_msg(warm), NoAck).await?)?;
    set_nx(conn.clone(), format!("bench:{}-warm", config.run_id)).await?;

    let per_round = config.messages.div_ceil(config.rounds);
    let mut phases: [Phased; Phase::COUNT] = Default::default();
    for round in 0..config.rounds {
        let keys = |label: &str| -> Vec<String> {
            (0..per_round)
                .map(|n| format!("{}-{label}-{round}-{n}", config.run_id))
                .collect()
        };
        // Raw keys shaped as idem's (`idem:{scope}:key`), in scopes of their own.
        let raw_keys = |label: &str| -> Vec<String> {
            keys(label)
                .iter()
                .map(|key| store.record_key("bench.redis.floor", key))
                .collect()
        };
        let first_keys = keys("redis-first");
        let marker_keys = raw_keys("marker");
        prepare_leases(&mut conn, &marker_keys).await?;
        for phase in Phase::order(round) {
            let keys = match phase {
                Phase::SetNx => raw_keys("setnx"),
                Phase::Raw32 => raw_keys("setnx32"),
                Phase::Marker | Phase::ClaimDone => marker_keys.clone(),
                Phase::Claim => raw_keys("claim"),
                Phase::Scripts32 => raw_keys("scripts32"),
                Phase::First | Phase::Duplicate => first_keys.clone(),
                Phase::First32 => keys("redis-first32"),
            };
            let before = server_usec(&mut conn).await?;
            let cpu_before = client_cpu_ns();
            let side = run_phase(phase, &conn, &store, &shas, keys).await?;
            let cpu_after = client_cpu_ns();
            let after = server_usec(&mut conn).await?;
            let phased = &mut phases[phase as usize];
            phased.side.add(side);
            phased.server_usec += after.saturating_sub(before);
            phased.client_ns += cpu_after.saturating_sub(cpu_before);
        }
    }

    let rate = |phase: Phase| phases[phase as usize].side.per_second().max(f64::EPSILON);
    let server = |phase: Phase| format!("{:.1}", phases[phase as usize].server_us());
    let client = |phase: Phase| format!("{:.1}", phases[phase as usize].client_us());
    let (setnx, marker) = (rate(Phase::SetNx), rate(Phase::Marker));
    let (claim, claim_done) = (rate(Phase::Claim), rate(Phase::ClaimDone));
    // Two round trips, back to back: the time of one of each.
    let two_trips = 1.0 / (1.0 / setnx + 1.0 / marker);
    let scripts = 1.0 / (1.0 / claim + 1.0 / marker);
    let first = rate(Phase::First);
    let dup = rate(Phase::Duplicate);
    let (first32, raw32, scripts32) = (
        rate(Phase::First32),
        rate(Phase::Raw32),
        rate(Phase::Scripts32),
    );
    let target32 = (0.85 * raw32).min(35_000.0);
    let messages = phases[Phase::First as usize].side.messages;
    let limit = Side {
        messages,
        elapsed: Duration::from_secs_f64(messages as f64 / two_trips),
        latencies_us: Vec::new(),
    };
    let extra = vec![
        ("first_ratio".into(), format!("{:.3}", first / two_trips)),
        ("dup_ratio".into(), format!("{:.3}", dup / setnx)),
        ("first32_per_s".into(), format!("{first32:.0}")),
        ("raw32_per_s".into(), format!("{raw32:.0}")),
        ("ratio32".into(), format!("{:.3}", first32 / raw32)),
        ("setnx_per_s".into(), format!("{setnx:.0}")),
        ("marker_per_s".into(), format!("{marker:.0}")),
        ("dup_per_s".into(), format!("{dup:.0}")),
        ("target32_per_s".into(), format!("{target32:.0}")),
        // The floor with idem's own claim script instead of SET NX.
        ("claim_per_s".into(), format!("{claim:.0}")),
        ("claim_done_per_s".into(), format!("{claim_done:.0}")),
        ("scripts_per_s".into(), format!("{scripts:.0}")),
        (
            "first_scripts_ratio".into(),
            format!("{:.3}", first / scripts),
        ),
        (
            "dup_script_ratio".into(),
            format!("{:.3}", dup / claim_done),
        ),
        ("scripts32_per_s".into(), format!("{scripts32:.0}")),
        (
            "first32_scripts_ratio".into(),
            format!("{:.3}", first32 / scripts32),
        ),
        // Redis's own time per message, µs.
        ("server_us_setnx".into(), server(Phase::SetNx)),
        ("server_us_claim".into(), server(Phase::Claim)),
        ("server_us_claim_done".into(), server(Phase::ClaimDone)),
        ("server_us_marker".into(), server(Phase::Marker)),
        ("server_us_first".into(), server(Phase::First)),
        ("server_us_dup".into(), server(Phase::Duplicate)),
        // The benchmark process's CPU per message, µs (per key for `scripts32`: both scripts).
        ("client_us_setnx".into(), client(Phase::SetNx)),
        ("client_us_claim".into(), client(Phase::Claim)),
        ("client_us_marker".into(), client(Phase::Marker)),
        ("client_us_first".into(), client(Phase::First)),
        ("client_us_claim_done".into(), client(Phase::ClaimDone)),
        ("client_us_dup".into(), client(Phase::Duplicate)),
        ("client_us_raw32".into(), client(Phase::Raw32)),
        ("client_us_scripts32".into(), client(Phase::Scripts32)),
        ("client_us_first32".into(), client(Phase::First32)),
        ("tasks".into(), format!("1+{CONCURRENT_TASKS}")),
    ];
    let first_side = std::mem::take(&mut phases[Phase::First as usize].side);
    Ok(Measurement {
        idem: first_side,
        baseline: limit,
        extra,
    })
}
