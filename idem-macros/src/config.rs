//! The second phase: what the parsed arguments mean together. [`validate`] checks what is
//! required, what applies to the strategy and what fits together, and returns a [`Config`] only
//! when every check passed; the expansion reads nothing else.

use proc_macro2::Span;
use syn::LitStr;

use crate::arguments::{ARGUMENTS, Presence, unknown};
use crate::errors::Errors;
use crate::parse::Parsed;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreKind {
    Pg,
    MySql,
    Sqlite,
    Memory,
    Redis,
}

impl StoreKind {
    pub(crate) const NAMES: &'static [&'static str] = &["pg", "mysql", "sqlite", "memory", "redis"];

    pub(crate) fn parse(value: &str) -> Result<Self, String> {
        match value {
            "pg" => Ok(Self::Pg),
            "mysql" => Ok(Self::MySql),
            "sqlite" => Ok(Self::Sqlite),
            "memory" => Ok(Self::Memory),
            "redis" => Ok(Self::Redis),
            "mariadb" => Err(format!(
                "unknown store `{value}`; use `mysql` for MariaDB and MySQL"
            )),
            "postgres" | "postgresql" | "postgre" | "psql" => {
                Err(format!("unknown store `{value}`; use `pg` for PostgreSQL"))
            }
            "sqlite3" => Err(format!("unknown store `{value}`; use `sqlite`")),
            other => Err(unknown("store", other, Self::NAMES)),
        }
    }

    pub(crate) fn type_name(self) -> &'static str {
        match self {
            Self::Pg => "PgStore",
            Self::MySql => "MySqlStore",
            Self::Sqlite => "SqliteStore",
            Self::Memory => "MemoryStore",
            Self::Redis => "RedisStore",
        }
    }

    /// Whether the store runs a transaction the body shares (every store but Redis).
    pub(crate) fn has_transaction(self) -> bool {
        self != Self::Redis
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StrategyKind {
    DedupTable,
    UniqueConstraint,
    StateMachine,
    Lock,
    Token,
}

impl StrategyKind {
    pub(crate) const NAMES: &'static [&'static str] = &[
        "dedup_table",
        "unique_constraint",
        "state_machine",
        "lock",
        "token",
    ];

    pub(crate) fn parse(value: &str) -> Result<Self, String> {
        match value {
            "dedup_table" => Ok(Self::DedupTable),
            "unique_constraint" => Ok(Self::UniqueConstraint),
            "state_machine" => Ok(Self::StateMachine),
            "lock" => Ok(Self::Lock),
            "token" => Ok(Self::Token),
            "offset" | "natural" => Err(format!(
                "strategy `{value}` is not implemented yet; available: `dedup_table`, `unique_constraint`, `state_machine`, `lock`, `token`"
            )),
            other => Err(unknown("strategy", other, Self::NAMES)),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::DedupTable => "dedup_table",
            Self::UniqueConstraint => "unique_constraint",
            Self::StateMachine => "state_machine",
            Self::Lock => "lock",
            Self::Token => "token",
        }
    }

    /// `Err` with the reason when `store` cannot run this strategy.
    fn check_runs_on(self, store: StoreKind) -> Result<(), &'static str> {
        match (self, store) {
            (Self::UniqueConstraint, StoreKind::Memory) => Err(
                "`unique_constraint` needs a database whose unique index can reject the duplicate; the `memory` store has none: use `strategy = \"dedup_table\"`, or `store = \"pg\"` / `\"sqlite\"`",
            ),
            (Self::StateMachine, StoreKind::Memory) => Err(
                "`state_machine` moves a status column in a database table; the `memory` store has none: use `store = \"pg\"`, `\"mysql\"` or `\"sqlite\"`",
            ),
            (Self::DedupTable, StoreKind::Redis) => Err(
                "`dedup_table` writes its record in the body's database transaction, and Redis cannot share one: on `store = \"redis\"` use `strategy = \"lock\"` (a fenced lease, then a done marker) or `\"token\"`; to commit the record with the body's SQL writes, keep `dedup_table` on `store = \"pg\"`, `\"mysql\"` or `\"sqlite\"`",
            ),
            (Self::UniqueConstraint, StoreKind::Redis) => Err(
                "`unique_constraint` needs a database whose unique index rejects the duplicate's write; Redis has none: use `strategy = \"lock\"` or `\"token\"` on `store = \"redis\"`, or `unique_constraint` on `store = \"pg\"`, `\"mysql\"` or `\"sqlite\"`",
            ),
            (Self::StateMachine, StoreKind::Redis) => Err(
                "`state_machine` moves a status column in a database table; Redis has none: use `strategy = \"lock\"` or `\"token\"` on `store = \"redis\"`, or `state_machine` on `store = \"pg\"`, `\"mysql\"` or `\"sqlite\"`",
            ),
            (Self::Lock | Self::Token, store) if store != StoreKind::Redis => Err(
                "`lock` and `token` keep their leases, markers and tokens in Redis: use `store = \"redis\"` (feature `redis`); on a SQL store, `dedup_table` gives the same guarantee inside the body's transaction",
            ),
            _ => Ok(()),
        }
    }
}

/// `mode = "enforce"` (the default) or `mode = "observe"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Enforce,
    /// The gate runs and records, but a delivery it would drop as a duplicate runs anyway.
    Observe,
}

impl Mode {
    pub(crate) const NAMES: &'static [&'static str] = &["enforce", "observe"];

    pub(crate) fn parse(value: &str) -> Result<Self, String> {
        match value {
            "enforce" => Ok(Self::Enforce),
            "observe" => Ok(Self::Observe),
            other => Err(unknown("`mode` value", other, Self::NAMES)),
        }
    }
}

/// `state_machine`: what a delivery for a row that does not exist yet does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnMissing {
    Retry,
    DeadLetter,
}

impl OnMissing {
    pub(crate) const NAMES: &'static [&'static str] = &["retry", "dead_letter"];

    pub(crate) fn parse(value: &str) -> Result<Self, String> {
        match value {
            "retry" => Ok(Self::Retry),
            "dead_letter" => Ok(Self::DeadLetter),
            other => Err(unknown("`on_missing` value", other, Self::NAMES)),
        }
    }
}

/// One part of the key: a field path on the message, e.g. `order.id`.
#[derive(Debug, Clone)]
pub(crate) struct KeyField {
    /// The path as written, e.g. `"order.id"`: the field's name in key errors at runtime.
    pub(crate) text: String,
    /// Its segments, each spanned on the key literal. Empty for `$message_id`.
    pub(crate) segments: Vec<syn::Member>,
    /// `$message_id`: the broker's id of the delivery, not a message field.
    pub(crate) message_id: bool,
}

/// The spelling of the broker's message id in `key`.
pub(crate) const MESSAGE_ID: &str = "$message_id";

impl KeySpec {
    /// Whether the key includes the broker's message id.
    pub(crate) fn uses_message_id(&self) -> bool {
        self.fields.iter().any(|field| field.message_id)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct KeySpec {
    pub(crate) fields: Vec<KeyField>,
    /// The key literal, where errors about its fields are reported.
    pub(crate) span: Span,
}

/// A valid attribute: everything the expansion needs, nothing left to decide.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) key: KeySpec,
    pub(crate) store: StoreKind,
    /// `None`: the default scope, the module path and the function's name.
    pub(crate) scope: Option<LitStr>,
    pub(crate) ttl_millis: Option<u64>,
    pub(crate) max_attempts: Option<u32>,
    /// Where `replay` was written, to report a result that is not serde there.
    pub(crate) replay: Option<Span>,
    /// Where `fingerprint` was written, to report a message that is not `Serialize` there.
    pub(crate) fingerprint: Option<Span>,
    /// `crate = "..."`; `None`: `::idem_runtime`.
    pub(crate) krate: Option<syn::Path>,
    pub(crate) mode: Mode,
    pub(crate) strategy: StrategyConfig,
}

impl Config {
    /// Whether the body shares a transaction with the gate (every store but Redis).
    pub(crate) fn has_transaction(&self) -> bool {
        self.store.has_transaction()
    }
}

/// The strategy, with its own settings.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "one per attribute, built once and read by reference"
)]
pub(crate) enum StrategyConfig {
    DedupTable,
    UniqueConstraint {
        constraint: LitStr,
    },
    StateMachine {
        table: String,
        column: String,
        /// The key's only field, compared with `key_column`.
        key_field: KeyField,
        /// As written, or the key field's name.
        key_column: String,
        from: Vec<String>,
        to: String,
        done: Vec<String>,
        early: Vec<String>,
        on_missing: OnMissing,
    },
    Lock {
        /// `lease`; `None`: the runtime's default.
        lease_millis: Option<u64>,
        fixed_lease: bool,
    },
    Token {
        spend_on_error: bool,
    },
}

/// Checks between arguments: what is required, what applies to the strategy, and what fits
/// together. `Some` only when nothing at all was wrong; on `None`, every reason was reported.
pub(crate) fn validate(
    parsed: Parsed,
    attribute_span: Span,
    errors: &mut Errors,
) -> Option<Config> {
    if parsed.unparsable {
        return None;
    }
    for argument in ARGUMENTS {
        if let Presence::Required { why } = argument.presence
            && !parsed.has(argument.id)
        {
            errors.error(
                attribute_span,
                format!(
                    "missing `{}`; add `{}` to #[idempotent(...)]{why}",
                    argument.name,
                    argument.fix()
                ),
            );
        }
    }
    if let Some((strategy, strategy_span)) = parsed.strategy {
        for written in parsed.written.iter().filter(|written| written.effective) {
            if let Err(reason) = written.argument.check_applies_to(strategy) {
                errors.spanned(&written.tokens, reason);
            }
        }
        let runs = match parsed.store {
            Some((store, _)) => strategy.check_runs_on(store),
            None => Ok(()),
        };
        match runs {
            Err(reason) => errors.error(strategy_span, reason),
            // Only a strategy the store can run asks for its own arguments.
            Ok(()) => {
                for argument in ARGUMENTS {
                    if let Presence::RequiredWith {
                        strategy: with,
                        why,
                    } = argument.presence
                        && with == strategy
                        && !parsed.has(argument.id)
                    {
                        errors.error(
                            strategy_span,
                            format!(
                                "`{}` needs `{}`; add `{}` to #[idempotent(...)]{why}",
                                strategy.name(),
                                argument.name,
                                argument.fix()
                            ),
                        );
                    }
                }
            }
        }
    }
    if let (Some((StoreKind::MySql, _)), Some(constraint)) = (parsed.store, &parsed.constraint)
        && constraint.value().eq_ignore_ascii_case("PRIMARY")
    {
        errors.error(
            constraint.span(),
            "on MySQL/MariaDB the error names the key but not its table, so `PRIMARY` would match a primary-key violation in any table the body writes to; put a named unique key on the key column (`CONSTRAINT payments_order_id_key UNIQUE (order_id)`) and name it",
        );
    }
    if parsed.batch.is_some() {
        batch(&parsed, errors);
    }
    let strategy = match parsed.strategy {
        Some((StrategyKind::DedupTable, _)) => Some(StrategyConfig::DedupTable),
        Some((StrategyKind::UniqueConstraint, _)) => parsed
            .constraint
            .clone()
            .map(|constraint| StrategyConfig::UniqueConstraint { constraint }),
        Some((StrategyKind::StateMachine, _)) => state_machine(&parsed, errors),
        Some((StrategyKind::Lock, _)) => Some(StrategyConfig::Lock {
            lease_millis: parsed.lease_millis,
            fixed_lease: parsed.fixed_lease.is_some(),
        }),
        Some((StrategyKind::Token, _)) => token(&parsed, errors),
        None => None,
    };
    if !errors.is_empty() {
        return None;
    }
    Some(Config {
        key: parsed.key?,
        store: parsed.store?.0,
        scope: parsed.scope,
        ttl_millis: parsed.ttl_millis,
        max_attempts: parsed.max_attempts,
        replay: parsed.replay,
        fingerprint: parsed.fingerprint,
        krate: parsed.krate,
        // The documented default, decided here: the expansion takes every setting as given.
        mode: parsed.mode.unwrap_or(Mode::Enforce),
        strategy: strategy?,
    })
}

/// What `batch` does not go with.
fn batch(parsed: &Parsed, errors: &mut Errors) {
    if let Some(replay) = parsed.replay {
        errors.error(
            replay,
            "`replay` returns each message's own result to its duplicates, and a `batch` body returns one result for many messages: remove `replay` (or `batch`)",
        );
    }
    if parsed.mode == Some(Mode::Observe)
        && let Some(mode) = parsed
            .written
            .iter()
            .find(|written| written.argument.id == crate::arguments::Name::Mode)
    {
        errors.spanned(
            &mode.tokens,
            "`mode = \"observe\"` is for adopting idem on a handler of one message at a time; a `batch` handler is new code: remove `mode` (or `batch`)",
        );
    }
}

/// `token`'s settings: the key is the token, one field the client sends back.
fn token(parsed: &Parsed, errors: &mut Errors) -> Option<StrategyConfig> {
    let key = parsed.key.as_ref()?;
    if key.uses_message_id() {
        errors.error(
            key.span,
            "`token` keys on the token the client sends back in the message; `$message_id` is the broker's id, which no one issued: key on the message field that carries the token",
        );
        return None;
    }
    if key.fields.len() != 1 {
        errors.error(
            key.span,
            "`token` keys on one field, the token the client sends back (issued by `RedisStore::issue_token`): `key = \"token\"`",
        );
        return None;
    }
    Some(StrategyConfig::Token {
        spend_on_error: parsed.spend_on_error.is_some(),
    })
}

/// `state_machine`'s settings, checked together; `None` when one is missing or wrong.
fn state_machine(parsed: &Parsed, errors: &mut Errors) -> Option<StrategyConfig> {
    if let (Some((from, span)), Some(to)) = (&parsed.from, &parsed.to)
        && from.contains(to)
    {
        errors.error(
            *span,
            format!("`from` contains `{to}`, the state this step moves to; a transition must change the state: remove `{to}` from `from` (and list it in `done` if it means \"already done\")"),
        );
    }
    if let Some((early, span)) = &parsed.early {
        let taken = early.iter().find(|state| {
            parsed.to.as_ref() == Some(*state)
                || parsed
                    .from
                    .as_ref()
                    .is_some_and(|(from, _)| from.contains(state))
                || parsed
                    .done
                    .as_ref()
                    .is_some_and(|done| done.contains(state))
        });
        if let Some(state) = taken {
            errors.error(
                *span,
                format!("`early` lists `{state}`, which is also in `from`, `to` or `done`; a state has one meaning per step: `early` is for states before `from`"),
            );
        }
    }
    let key = parsed.key.as_ref()?;
    let [key_field] = key.fields.as_slice() else {
        errors.error(
            key.span,
            "`state_machine` finds the row by one key column: key on one field (and set `key_column` if its column is named differently)",
        );
        return None;
    };
    if key_field.message_id {
        errors.error(
            key.span,
            "`state_machine` finds the business row by a message field; `$message_id` is the broker's id, not a column value: key on the field that names the row",
        );
        return None;
    }
    let key_column = match (&parsed.key_column, key_field.segments.last()) {
        (Some(key_column), _) => key_column.clone(),
        (None, Some(syn::Member::Named(field))) => field.to_string(),
        (None, Some(syn::Member::Unnamed(_)) | None) => {
            errors.error(
                key.span,
                "the key is a tuple field, which names no column: set `key_column = \"...\"`",
            );
            return None;
        }
    };
    // `done`, `early` and `on_missing` default as documented: `[to]` (the runtime always counts
    // `to`), none, and retry.
    Some(StrategyConfig::StateMachine {
        table: parsed.table.clone()?,
        column: parsed.column.clone()?,
        key_field: key_field.clone(),
        key_column,
        from: parsed.from.clone()?.0,
        to: parsed.to.clone()?,
        done: parsed.done.clone().unwrap_or_default(),
        early: parsed
            .early
            .clone()
            .map(|(early, _)| early)
            .unwrap_or_default(),
        on_missing: parsed.on_missing.unwrap_or(OnMissing::Retry),
    })
}
