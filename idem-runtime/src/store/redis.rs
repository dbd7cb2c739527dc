//! Redis (`store = "redis"`, feature `redis`): leases and single-use tokens, for handlers whose
//! effects do not live in one SQL database.
//!
//! # What Redis can and cannot promise
//!
//! Redis cannot take part in your database's transaction. Under
//! [`lock`](crate::strategy::lock) it gives **one execution at a time** (a fenced lease) and
//! **dedup after success** (a done marker written once the body returned `Ok`), not atomicity
//! with the body's writes: a process that dies after its body's effects but before the marker
//! (or whose marker write is lost with the connection) leaves a lease that expires, and the
//! redelivery runs the body again. Where money moves in a SQL database, gate there instead:
//! [`dedup_table`](crate::strategy::dedup_table) or
//! [`unique_constraint`](crate::strategy::unique_constraint) commit the record with the effect.
//! Redis fits a body whose effects are themselves idempotent or tolerant of a rare second run
//! (a call to a payment provider that takes its own idempotency key, a cache fill, an e-mail).
//!
//! **Without persistence**, a Redis restart forgets every marker and token: a redelivery after
//! it runs the body again (`lock`), or finds its token unknown and is dead-lettered (`token`).
//! Run Redis with AOF (`appendonly yes`, `appendfsync everysec` loses at most a second of
//! markers) or accept that window. A restart in the middle of a delivery is an ordinary
//! retryable error ([`Error::Redis`](crate::Error::Redis)): the message is requeued, never
//! acked, and handled when Redis is back.
//!
//! # Records
//!
//! One hash per key, at `<prefix>:{<scope>}:<key>` (prefix `idem` by default). The braces are
//! a Redis Cluster hash tag: a scope's records live on one slot, so a script could read several
//! of them; [`without_hash_tag`](RedisStore::without_hash_tag) leaves the tag out (every script
//! here touches one key, so neither layout needs the other; Redis Cluster itself is not supported
//! yet, see below). Fields:
//!
//! | field | meaning |
//! |---|---|
//! | `state` | `lease` (a delivery is running the body), `done` (processed), `issued` (a token not yet used) |
//! | `owner`, `until` | the lease's owner token and deadline (Unix ms, Redis's clock), while `state = lease` |
//! | `created` | when the marker was written (Unix ms) |
//! | `fp`, `resp` | the payload fingerprint (`fingerprint`) and the JSON result (`replay`) |
//! | `expires` | when a marker or an unused token stops counting (Unix ms); absent: never |
//!
//! Deadlines are read from Redis's own clock (`TIME`, inside the scripts), so every consumer
//! compares them on one clock and no skew between hosts makes a live lease look expired
//! ([`with_clock`](RedisStore::with_clock) injects a [`ManualClock`](crate::clock::ManualClock)
//! in tests instead). Each key also carries a Redis expiry, so that nothing outlives its purpose
//! if no delivery comes back.
//!
//! # What the lease does and does not guarantee
//!
//! A lease gives one execution at a time *while it holds*. Renewal runs on the body's task:
//! a body that blocks its thread, or a Redis outage longer than two thirds of the lease, can let
//! it lapse, and another delivery may then take the key over while the first body still runs
//! (the first is not cancelled; its loss is logged). The fence then decides what is recorded:
//! a body that succeeds writes the done marker unless another delivery holds a *live* lease
//! (then [`Error::LeaseLost`](crate::Error::LeaseLost), requeued, nothing written); a marker
//! that is already there makes it an ordinary ack. A key whose lease lapsed with no one taking
//! it over is simply marked done: the body did run, and the marker stops redeliveries from
//! running it again. Set `lease` well above the body's longest run (renewal makes a short one
//! safe only while the body yields).
//!
//! A cancelled delivery (its future dropped) leaves its lease: redeliveries are requeued as in
//! progress until it expires (`lease`, 30 s by default), then the next one runs the body.
//!
//! # Deployment
//!
//! `RedisStore` talks to one Redis server (or a proxy in front of several) through
//! [`ConnectionManager`]: Redis Cluster is not supported yet (the keys' hash tag is ready for
//! it), nor is a Sentinel fail-over tested (a marker acknowledged by the old primary and lost
//! in the switch lets the body run again). For `rediss://` URLs, enable a TLS feature of the
//! `redis` crate in your own `Cargo.toml` (for example `tokio-rustls-comp`).
//!
//! # Round trips
//!
//! Each step is one `EVALSHA` of a script that both decides and writes: a first delivery costs
//! two (claim, then marker), a duplicate one, a failure two (claim, then release). A long body
//! adds one renewal every third of its lease.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{RedisError, Script, Value};

use crate::clock::{Clock, SharedClock};
use crate::store::StoredRecord;

/// The Lua scripts the store runs, for review and for benchmarks that measure their floor.
///
/// Each takes the record's key as `KEYS[1]`; their arguments are documented in the source.
pub mod scripts {
    /// The scripts' "now" (`clock(arg)`): the caller's clock when it sends one, else Redis's
    /// own (`TIME`), so that every consumer compares deadlines on one clock.
    macro_rules! lua_clock {
        () => {
            r"local function clock(arg)
  local now = tonumber(arg)
  if now then return now end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"
        };
    }

    /// `expire_lease(key, mode, lease)`: a lock's key lives as long as its lease; a token's is
    /// only lengthened to it (its own expiry may be later).
    macro_rules! lua_expire_lease {
        () => {
            r"local function expire_lease(key, mode, lease)
  if mode == 'lock' then
    redis.call('PEXPIRE', key, lease)
  else
    local pttl = redis.call('PTTL', key)
    if pttl >= 0 and pttl < lease then
      redis.call('PEXPIRE', key, lease)
    end
  end
end
"
        };
    }

    /// Claims a key (a lease for `ARGV[2]`, the owner token, until `ARGV[3]` + `ARGV[4]` ms;
    /// `ARGV[3]` empty: now by Redis's clock) and
    /// reports what was there: `{'claimed', previous state}`, `{'done', created, fp, resp}`,
    /// `{'busy', remaining ms}` or `{'unknown'}` (`token` mode: no usable token). `ARGV[1]` is
    /// `lock` or `token`: a lock claims a missing key, a token only an `issued` one.
    pub const CLAIM: &str = concat!(
        lua_clock!(),
        lua_expire_lease!(),
        r"local key = KEYS[1]
local mode = ARGV[1]
local now = clock(ARGV[3])
local lease = tonumber(ARGV[4])
local r = redis.call('HMGET', key, 'state', 'until', 'created', 'fp', 'resp', 'expires')
local state = r[1]
local expires = tonumber(r[6])
if state and state ~= 'lease' and expires and expires <= now then
  redis.call('DEL', key)
  state = false
end
if state == 'done' then
  return {'done', r[3] or '0', r[4], r[5]}
elseif state == 'lease' then
  local held = tonumber(r[2]) or 0
  if held > now then
    return {'busy', tostring(held - now)}
  end
  if mode == 'token' and expires and expires <= now then
    redis.call('DEL', key)
    return {'unknown'}
  end
elseif not state then
  if mode == 'token' then
    return {'unknown'}
  end
elseif state ~= 'issued' then
  return redis.error_reply('idem: the record at ' .. key .. ' has an unknown state; delete it')
end
redis.call('HSET', key, 'state', 'lease', 'owner', ARGV[2], 'until', now + lease)
expire_lease(key, mode, lease)
return {'claimed', state or 'none'}
"
    );

    /// Records that the body of owner `ARGV[1]` succeeded: a done marker created at `ARGV[2]`
    /// (empty: Redis's clock), kept `ARGV[3]` ms (`0`: forever), with the fingerprint `ARGV[5]`
    /// when `ARGV[4]` is `1` and the result `ARGV[7]` when `ARGV[6]` is `1`. Returns 1 when
    /// written; 2 when a live done marker is there already (nothing is written); 0 when
    /// another owner holds a live lease (the fence: nothing is written). The key missing (the
    /// lease expired and no one took it), an unused token (put back by a failed twin) or an
    /// expired lease are all overwritten: this delivery's body did run, and a marker stops
    /// its redeliveries from running it again.
    pub const COMPLETE: &str = concat!(
        lua_clock!(),
        r"local key = KEYS[1]
local now = clock(ARGV[2])
local r = redis.call('HMGET', key, 'state', 'owner', 'until', 'expires')
local expires = tonumber(r[4])
if r[1] == 'done' and not (expires and expires <= now) then
  return 2
end
if r[1] == 'lease' and r[2] ~= ARGV[1] and (tonumber(r[3]) or 0) > now then
  return 0
end
redis.call('DEL', key)
redis.call('HSET', key, 'state', 'done', 'created', now)
if ARGV[4] == '1' then redis.call('HSET', key, 'fp', ARGV[5]) end
if ARGV[6] == '1' then redis.call('HSET', key, 'resp', ARGV[7]) end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('HSET', key, 'expires', now + ttl)
  redis.call('PEXPIRE', key, ttl)
end
return 1
"
    );

    /// Ends the lease of owner `ARGV[1]` after a failure: deletes the key, or with `ARGV[2]`
    /// = `restore` puts an unused token back (`issued`, its expiry kept). Returns 1, or 0 when
    /// the lease is not this owner's (nothing is touched).
    pub const RELEASE: &str = r"
local key = KEYS[1]
local r = redis.call('HMGET', key, 'state', 'owner')
if r[1] ~= 'lease' or r[2] ~= ARGV[1] then
  return 0
end
if ARGV[2] == 'restore' then
  redis.call('HSET', key, 'state', 'issued')
  redis.call('HDEL', key, 'owner', 'until')
else
  redis.call('DEL', key)
end
return 1
";

    /// Extends the lease of owner `ARGV[1]` to `ARGV[2]` (empty: Redis's clock) + `ARGV[3]` ms
    /// (`ARGV[4]`: `lock` or
    /// `token`, as in [`CLAIM`]). Returns 1, or 0 when the lease is no longer this owner's.
    pub const EXTEND: &str = concat!(
        lua_clock!(),
        lua_expire_lease!(),
        r"local key = KEYS[1]
local r = redis.call('HMGET', key, 'state', 'owner')
if r[1] ~= 'lease' or r[2] ~= ARGV[1] then
  return 0
end
local lease = tonumber(ARGV[3])
redis.call('HSET', key, 'until', clock(ARGV[2]) + lease)
expire_lease(key, ARGV[4], lease)
return 1
"
    );

    /// Issues a token: an `issued` record created at `ARGV[1]` (empty: Redis's clock),
    /// expiring `ARGV[2]` ms later.
    /// Returns 1, or 0 when the key exists already (nothing is touched).
    pub const ISSUE: &str = concat!(
        lua_clock!(),
        r"local key = KEYS[1]
if redis.call('EXISTS', key) == 1 then
  return 0
end
local now = clock(ARGV[1])
local ttl = tonumber(ARGV[2])
redis.call('HSET', key, 'state', 'issued', 'created', now, 'expires', now + ttl)
redis.call('PEXPIRE', key, ttl)
return 1
"
    );
}

fn script(cell: &'static std::sync::OnceLock<Script>, source: &'static str) -> &'static Script {
    cell.get_or_init(|| Script::new(source))
}

macro_rules! script {
    ($name:ident) => {{
        static CELL: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
        script(&CELL, scripts::$name)
    }};
}

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "idem";

/// Why the Redis store could not be set up or used outside a handler.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisStoreError {
    /// Redis answered with an error, or could not be reached.
    #[error("redis store: {0}")]
    Redis(#[from] RedisError),
    /// The key prefix is empty or holds a character that would make keys ambiguous.
    #[error(
        "invalid redis key prefix `{0}`: use 1 to 64 printable ASCII characters without spaces, `:`, `{{` or `}}` (e.g. `idem` or `billing-idem`)"
    )]
    InvalidPrefix(String),
    /// A token's lifetime must be at least a millisecond.
    #[error("a token's ttl must be at least 1 ms; got {0:?}")]
    InvalidTokenTtl(Duration),
    /// The random token collided with an existing key twice in a row (never in practice).
    #[error(
        "could not issue a token in scope `{0}`: the random tokens collided with existing keys"
    )]
    TokenCollision(String),
}

/// Dedup records, leases and tokens in Redis. Cloning is cheap and shares the connection.
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_runtime::store::redis::RedisStoreError> {
/// use idem_runtime::RedisStore;
///
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?.with_prefix("billing")?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: Arc<str>,
    hash_tag: bool,
    /// `None`: Redis's own clock (`TIME`, in the scripts).
    clock: Option<SharedClock>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("hash_tag", &self.hash_tag)
            .finish_non_exhaustive()
    }
}

impl super::sealed::Sealed for RedisStore {}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LeaseClaim {
    /// The lease is ours.
    Ours,
    /// A done marker: an earlier delivery succeeded.
    Done(StoredRecord),
    /// Another owner's live lease, for this much longer.
    Busy(Duration),
    /// `token` mode: no usable token (never issued, expired, or spent).
    Unknown,
}

/// Whether a lease is a plain lock or a token being used: what a claim may take, and what a
/// release puts back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseMode {
    /// `lock`: a missing key is free.
    Lock,
    /// `token`: only an issued token is free; `restore` puts it back after a failure.
    Token {
        /// Put the token back after a failure (else it is spent).
        restore: bool,
    },
}

impl LeaseMode {
    fn as_arg(self) -> &'static str {
        match self {
            Self::Lock => "lock",
            Self::Token { .. } => "token",
        }
    }
}

/// What [`RedisStore::complete`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completion {
    /// The done marker is written.
    Written,
    /// A done marker was there already (a twin that took the expired lease over succeeded).
    AlreadyDone,
    /// Another delivery holds a live lease: nothing written.
    Refused,
}

/// What a done marker holds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Marker<'a> {
    pub(crate) ttl: Option<Duration>,
    pub(crate) fingerprint: Option<&'a str>,
    pub(crate) response: Option<&'a str>,
}

/// 1 to 64 printable ASCII characters, none of which would blur where the prefix ends or move
/// the hash tag.
fn is_valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= 64
        && prefix
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b':' | b'{' | b'}'))
}

/// Escapes the characters that would let a scope's end be mistaken (`:` in keys without the
/// hash tag, `}` in keys with it) or move the hash tag (`{`), and the escape itself.
fn escape_scope(scope: &str) -> std::borrow::Cow<'_, str> {
    if !scope.contains(['\\', ':', '{', '}']) {
        return std::borrow::Cow::Borrowed(scope);
    }
    let mut escaped = String::with_capacity(scope.len() + 4);
    for c in scope.chars() {
        if matches!(c, '\\' | ':' | '{' | '}') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    std::borrow::Cow::Owned(escaped)
}

/// The longest expiry the store sets: 100 years (Redis refuses one whose deadline overflows).
const MAX_EXPIRY_MS: i64 = 100 * 365 * 24 * 3_600_000;

fn millis(duration: Duration) -> i64 {
    // At least 1: Redis refuses an expiry of 0.
    i64::try_from(duration.as_millis())
        .unwrap_or(i64::MAX)
        .clamp(1, MAX_EXPIRY_MS)
}

fn unexpected(what: &str, reply: &Value) -> RedisError {
    RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected reply from an idem script",
        format!("{what}: {reply:?}"),
    ))
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) => Some(text.clone()),
        Value::Int(number) => Some(number.to_string()),
        _ => None,
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`; `rediss://` needs a TLS feature of `redis`) through redis-rs's
    /// [`ConnectionManager`], which reconnects by itself after a failure.
    pub async fn connect(url: &str) -> Result<Self, RedisStoreError> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(Self::from_connection_manager(conn))
    }

    /// A store on a connection manager you configured (timeouts, retries, RESP3).
    pub fn from_connection_manager(conn: ConnectionManager) -> Self {
        Self {
            conn,
            prefix: Arc::from(DEFAULT_PREFIX),
            hash_tag: true,
            clock: None,
        }
    }

    /// Keys start with `prefix` instead of `idem`: `billing:{scope}:key`.
    pub fn with_prefix(mut self, prefix: &str) -> Result<Self, RedisStoreError> {
        if !is_valid_prefix(prefix) {
            return Err(RedisStoreError::InvalidPrefix(prefix.to_owned()));
        }
        self.prefix = Arc::from(prefix);
        Ok(self)
    }

    /// Keys without the `{scope}` hash tag (`idem:scope:key`): on Redis Cluster a scope's
    /// records spread over every node instead of one slot.
    #[must_use]
    pub fn without_hash_tag(mut self) -> Self {
        self.hash_tag = false;
        self
    }

    /// Reads "now" from `clock` instead of Redis's own clock, and waits on it between lease
    /// renewals (tests move a [`ManualClock`](crate::clock::ManualClock) past a lease or a
    /// `ttl`, and advancing it is what wakes a renewal). In production, keep
    /// the default: every consumer then compares deadlines on the one clock of the Redis
    /// server, and no skew between hosts can make a live lease look expired.
    #[must_use]
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Now, Unix milliseconds: the injected clock's, or this host's wall clock (the scripts
    /// read Redis's own clock when no clock is injected).
    pub fn now_ms(&self) -> i64 {
        self.clock.as_ref().map_or_else(
            || crate::clock::SystemClock.now_ms(),
            |clock| clock.now_ms(),
        )
    }

    /// Waits `duration` on the store's clock: real time, or until an injected clock is advanced
    /// past it (the lease renewal waits here, so tests drive it with a `ManualClock`). The
    /// deadline is fixed when this is called, not when the future is first polled.
    pub(crate) fn sleep(&self, duration: Duration) -> crate::clock::Sleep<'_> {
        match &self.clock {
            Some(clock) => clock.sleep(duration),
            None => Box::pin(tokio::time::sleep(duration)),
        }
    }

    /// "Now" as the scripts take it: the injected clock's, or empty for Redis's own.
    fn now_arg(&self) -> String {
        self.clock
            .as_ref()
            .map(|clock| clock.now_ms().to_string())
            .unwrap_or_default()
    }

    /// The connection, for your own commands (it is shared: do not block it with `BLPOP`).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The Redis key of `key` (encoded, as [`Key::value`](crate::Key::value)) in `scope`.
    ///
    /// ```no_run
    /// # async fn demo(store: idem_runtime::RedisStore) {
    /// assert_eq!(store.record_key("billing.charge", "o-1"), "idem:{billing.charge}:o-1");
    /// # }
    /// ```
    /// A scope holding `\`, `:`, `{` or `}` has them escaped with `\`, so that no two
    /// (scope, key) pairs share a Redis key (the key is already escaped the same way).
    pub fn record_key(&self, scope: &str, key: &str) -> String {
        let scope = escape_scope(scope);
        if self.hash_tag {
            format!("{}:{{{scope}}}:{key}", self.prefix)
        } else {
            format!("{}:{scope}:{key}", self.prefix)
        }
    }

    /// Mints a token for a `strategy = "token"` handler in `scope`, usable once within `ttl`.
    /// Hand it to the client, which sends it with its request or message (in the field the
    /// handler's `key` names): a random UUID (v4, from the operating system's random source),
    /// hyphenated, so that the message may carry it as a `String` or a `uuid::Uuid`.
    ///
    /// ```no_run
    /// # async fn demo(store: idem_runtime::RedisStore) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    ///
    /// let token = store.issue_token("payments.charge", Duration::from_secs(15 * 60)).await?;
    /// // return `token` with the checkout form; the charge message carries it back
    /// # Ok(()) }
    /// ```
    pub async fn issue_token(&self, scope: &str, ttl: Duration) -> Result<String, RedisStoreError> {
        if ttl.is_zero() {
            return Err(RedisStoreError::InvalidTokenTtl(ttl));
        }
        for _ in 0..2 {
            // Hyphenated: what `KeyPart` writes for a `uuid::Uuid` field too.
            let token = uuid::Uuid::new_v4().hyphenated().to_string();
            let issued: i64 = script!(ISSUE)
                .key(self.record_key(scope, &token))
                .arg(self.now_arg())
                .arg(millis(ttl))
                .invoke_async(&mut self.conn.clone())
                .await?;
            if issued == 1 {
                return Ok(token);
            }
        }
        Err(RedisStoreError::TokenCollision(scope.to_owned()))
    }

    /// Deletes the record of `key` in `scope` (a marker, a lease or a token), so that the next
    /// delivery of its message runs the body again (`lock`) or finds no token (`token`).
    /// Returns whether there was one.
    pub async fn forget(&self, scope: &str, key: &str) -> Result<bool, RedisStoreError> {
        let deleted: i64 = redis::cmd("DEL")
            .arg(self.record_key(scope, key))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(deleted > 0)
    }

    /// One round trip: claims `key` for `owner` for `lease`, or reports what holds it.
    pub(crate) async fn claim(
        &self,
        mode: LeaseMode,
        key: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<LeaseClaim, RedisError> {
        let reply: Value = script!(CLAIM)
            .key(key)
            .arg(mode.as_arg())
            .arg(owner)
            .arg(self.now_arg())
            .arg(millis(lease))
            .invoke_async(&mut self.conn.clone())
            .await?;
        parse_claim(&reply)
    }

    /// One round trip: records that `owner`'s body succeeded (see [`scripts::COMPLETE`]).
    pub(crate) async fn complete(
        &self,
        key: &str,
        owner: &str,
        marker: &Marker<'_>,
    ) -> Result<Completion, RedisError> {
        let ttl = marker.ttl.map_or(0, millis);
        let written: i64 = script!(COMPLETE)
            .key(key)
            .arg(owner)
            .arg(self.now_arg())
            .arg(ttl)
            .arg(if marker.fingerprint.is_some() {
                "1"
            } else {
                "0"
            })
            .arg(marker.fingerprint.unwrap_or(""))
            .arg(if marker.response.is_some() { "1" } else { "0" })
            .arg(marker.response.unwrap_or(""))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(match written {
            1 => Completion::Written,
            2 => Completion::AlreadyDone,
            _ => Completion::Refused,
        })
    }

    /// One round trip: ends `owner`'s lease after a failure. `false`: it was not `owner`'s.
    pub(crate) async fn release(
        &self,
        mode: LeaseMode,
        key: &str,
        owner: &str,
    ) -> Result<bool, RedisError> {
        let how = match mode {
            LeaseMode::Token { restore: true } => "restore",
            LeaseMode::Token { restore: false } | LeaseMode::Lock => "delete",
        };
        let released: i64 = script!(RELEASE)
            .key(key)
            .arg(owner)
            .arg(how)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(released == 1)
    }

    /// One round trip: extends `owner`'s lease to `lease` from now. `false`: it is lost.
    pub(crate) async fn extend(
        &self,
        mode: LeaseMode,
        key: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, RedisError> {
        let extended: i64 = script!(EXTEND)
            .key(key)
            .arg(owner)
            .arg(self.now_arg())
            .arg(millis(lease))
            .arg(mode.as_arg())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(extended == 1)
    }
}

/// The claim script's reply.
fn parse_claim(reply: &Value) -> Result<LeaseClaim, RedisError> {
    let Value::Array(items) = reply else {
        return Err(unexpected("claim", reply));
    };
    let field = |index: usize| items.get(index).and_then(text);
    match field(0).as_deref() {
        Some("claimed") => Ok(LeaseClaim::Ours),
        Some("unknown") => Ok(LeaseClaim::Unknown),
        Some("busy") => {
            let remaining = field(1)
                .and_then(|ms| ms.parse::<u64>().ok())
                .ok_or_else(|| unexpected("claim", reply))?;
            Ok(LeaseClaim::Busy(Duration::from_millis(remaining)))
        }
        Some("done") => Ok(LeaseClaim::Done(StoredRecord {
            created_at_ms: field(1).and_then(|ms| ms.parse().ok()).unwrap_or(0),
            fingerprint: field(2),
            response: field(3),
        })),
        _ => Err(unexpected("claim", reply)),
    }
}

/// A fresh owner token: unique per delivery, so that only this delivery can write its marker or
/// release its lease.
pub(crate) fn owner_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn claim_replies_parse() {
        assert_eq!(
            parse_claim(&Value::Array(vec![bulk("claimed"), bulk("none")])).unwrap(),
            LeaseClaim::Ours
        );
        assert_eq!(
            parse_claim(&Value::Array(vec![bulk("busy"), bulk("1500")])).unwrap(),
            LeaseClaim::Busy(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_claim(&Value::Array(vec![bulk("unknown")])).unwrap(),
            LeaseClaim::Unknown
        );
        assert_eq!(
            parse_claim(&Value::Array(vec![
                bulk("done"),
                bulk("42"),
                Value::Nil,
                bulk("{\"a\":1}")
            ]))
            .unwrap(),
            LeaseClaim::Done(StoredRecord {
                fingerprint: None,
                response: Some("{\"a\":1}".into()),
                created_at_ms: 42
            })
        );
        assert!(parse_claim(&Value::Int(1)).is_err());
        assert!(parse_claim(&Value::Array(vec![bulk("busy"), bulk("soon")])).is_err());
        assert!(parse_claim(&Value::Array(vec![])).is_err());
    }

    #[test]
    fn prefixes_are_checked() {
        for bad in ["", "a:b", "a{b", "a}b", "a b", "é", &"x".repeat(65)] {
            assert!(!is_valid_prefix(bad), "{bad:?}");
        }
        for good in ["idem", "billing-idem", "a.b_c", &"x".repeat(64)] {
            assert!(is_valid_prefix(good), "{good:?}");
        }
    }

    #[test]
    fn expiries_are_at_least_a_millisecond() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
        assert_eq!(millis(Duration::MAX), MAX_EXPIRY_MS);
    }

    #[test]
    fn scopes_are_escaped_so_that_keys_never_collide() {
        assert_eq!(escape_scope("billing.charge"), "billing.charge");
        assert_eq!(escape_scope("a:b"), "a\\:b");
        assert_eq!(escape_scope("a}:{b\\"), "a\\}\\:\\{b\\\\");
        // scope "a:b" + key "c" and scope "a" + composite key "b:c" stay apart without the tag.
        let plain = |scope: &str, key: &str| format!("idem:{}:{key}", escape_scope(scope));
        assert_ne!(plain("a:b", "c"), plain("a", "b:c"));
        let tagged = |scope: &str, key: &str| format!("idem:{{{}}}:{key}", escape_scope(scope));
        assert_ne!(tagged("a}:{b", "c"), tagged("a", "{b}:c"));
    }
}
