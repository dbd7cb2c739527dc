//! The one list of the attribute's arguments, [`ARGUMENTS`]. Parsing looks every written name
//! up in it (an unknown one gets a did-you-mean from it); the "needs a value", "missing" and
//! "only applies to" errors are worded from it; and the arguments section of
//! `idem_runtime::idempotent`'s documentation is rendered from it (a unit test keeps that
//! section identical to the rendering).

use crate::config::{Mode, OnMissing, StoreKind, StrategyKind};

/// Which argument an entry of [`ARGUMENTS`] is: parsing matches on it, exhaustively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Name {
    Key,
    Store,
    Strategy,
    Scope,
    Ttl,
    Constraint,
    MaxAttempts,
    Replay,
    Fingerprint,
    Mode,
    Lease,
    FixedLease,
    SpendOnError,
    Crate,
    Table,
    Column,
    From,
    To,
    KeyColumn,
    Done,
    Early,
    OnMissing,
    Batch,
}

/// What an argument's value looks like.
#[derive(Debug)]
pub(crate) enum Shape {
    /// A string literal; the documentation shows these values.
    Text(
        #[cfg_attr(
            not(test),
            expect(dead_code, reason = "documentation, rendered by a test")
        )]
        &'static str,
    ),
    /// A string literal, one of these.
    Choice(&'static [&'static str]),
    /// A flag: `name`, or `name = true` / `name = false`.
    Flag,
    /// A positive whole number; the documentation shows these values.
    Count(
        #[cfg_attr(
            not(test),
            expect(dead_code, reason = "documentation, rendered by a test")
        )]
        &'static str,
    ),
    /// A state or a list of states; the documentation shows these values.
    States(
        #[cfg_attr(
            not(test),
            expect(dead_code, reason = "documentation, rendered by a test")
        )]
        &'static str,
    ),
}

/// Whether an argument must be written.
#[derive(Debug)]
pub(crate) enum Presence {
    /// Always; `why` (empty, or starting with `, `) follows the error's fix.
    Required { why: &'static str },
    /// With this strategy; `why` follows the error's fix.
    RequiredWith {
        strategy: StrategyKind,
        why: &'static str,
    },
    /// Never; without it, `default` (as the documentation words it).
    Optional {
        #[cfg_attr(
            not(test),
            expect(dead_code, reason = "documentation, rendered by a test")
        )]
        default: &'static str,
    },
}

/// The strategies an argument applies to.
#[derive(Debug)]
pub(crate) enum Applies {
    /// Every strategy.
    Always,
    /// Only `strategies`. Written with another, the error is the message `refusals` gives for
    /// that strategy, else "`name` only applies to `strategy = ...`; remove it".
    Only {
        strategies: &'static [StrategyKind],
        refusals: &'static [(StrategyKind, &'static str)],
    },
}

/// One argument of `#[idempotent(...)]`.
#[derive(Debug)]
pub(crate) struct Argument {
    pub(crate) id: Name,
    /// As written in the attribute.
    pub(crate) name: &'static str,
    pub(crate) shape: Shape,
    /// The argument written out, the fix-it of every error about it: `key = "order_id"`.
    pub(crate) example: &'static str,
    pub(crate) presence: Presence,
    pub(crate) applies: Applies,
    /// What it means: the documentation's "meaning" column (markdown, one line).
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "documentation, rendered by a test")
    )]
    pub(crate) doc: &'static str,
}

/// Every strategy that keeps a dedup record (all but `state_machine`).
const NOT_STATE_MACHINE: &[StrategyKind] = &[
    StrategyKind::DedupTable,
    StrategyKind::UniqueConstraint,
    StrategyKind::Lock,
    StrategyKind::Token,
];
const STATE_MACHINE_ONLY: Applies = Applies::Only {
    strategies: &[StrategyKind::StateMachine],
    refusals: &[],
};

/// Every argument, in the documentation's order.
pub(crate) const ARGUMENTS: &[Argument] = &[
    Argument {
        id: Name::Key,
        name: "key",
        shape: Shape::Text(r#"`"field"`, `"a.b"`, `"user_id, op"`, `"$message_id"`"#),
        example: r#"key = "order_id""#,
        presence: Presence::Required {
            why: ", naming the message field(s) that identify a message",
        },
        applies: Applies::Always,
        doc: "message fields that identify the message; nested paths and composites allowed. Each field's type implements [`KeyPart`](crate::KeyPart). `$message_id` is the broker's id of the message ([`Acknowledger::message_id`](crate::Acknowledger::message_id)), alone or with fields.",
    },
    Argument {
        id: Name::Store,
        name: "store",
        shape: Shape::Choice(StoreKind::NAMES),
        example: r#"store = "pg""#,
        presence: Presence::Required { why: "" },
        applies: Applies::Always,
        doc: "where the transaction runs and records live. `memory` is for unit tests only. `redis` (feature `redis`) keeps leases, markers and tokens for `lock` and `token`, and has no transaction: its handlers take only the message ([`store::redis`](crate::store::redis)).",
    },
    Argument {
        id: Name::Strategy,
        name: "strategy",
        shape: Shape::Choice(StrategyKind::NAMES),
        example: r#"strategy = "dedup_table""#,
        presence: Presence::Required { why: "" },
        applies: Applies::Always,
        doc: "how a duplicate is recognised; see [`strategy`](crate::strategy).",
    },
    Argument {
        id: Name::Scope,
        name: "scope",
        shape: Shape::Text(r#"`"billing.order_paid"`"#),
        example: r#"scope = "billing.order_paid""#,
        presence: Presence::Optional {
            default: "module path and function name; **required** on methods and generic handlers",
        },
        applies: Applies::Always,
        doc: "the key's namespace. Two handlers must never share one: the second would skip the first's messages as duplicates. The default is unique only for a free, non-generic function, so the attribute requires `scope` on a method (two types' `handle` in one module would share `module::handle`) and on a generic handler (every instantiation would share it). A handler in an `impl` block (method or associated function, generic or not) or nested in a function body, without `scope`, does not compile. Two handlers that still end up with one scope (an explicit scope copied) both fail at their first delivery with [`Error::ScopeCollision`](crate::Error::ScopeCollision), in every process, never silently: every handler of the binary is listed at compile time. Set it explicitly in services anyway: renaming or moving the function changes the default, and records written under the old scope stop counting.",
    },
    Argument {
        id: Name::Ttl,
        name: "ttl",
        shape: Shape::Text(r#"`"7d"`, `"12h"`, `"30m"`, `"90s"`, `"500ms"`"#),
        example: r#"ttl = "7d""#,
        presence: Presence::Optional { default: "forever" },
        applies: Applies::Only {
            strategies: NOT_STATE_MACHINE,
            refusals: &[(
                StrategyKind::StateMachine,
                "`ttl` expires dedup records, and `state_machine` keeps none (the status is the record): remove it",
            )],
        },
        doc: "how long a dedup record (on Redis, a done marker) counts. An expired record is taken over by the next delivery; on SQL stores delete them with the store's `purge_expired()`, Redis drops them itself.",
    },
    Argument {
        id: Name::Constraint,
        name: "constraint",
        shape: Shape::Text(r#"`"payments_order_id_key"`"#),
        example: r#"constraint = "payments_order_id_key""#,
        presence: Presence::RequiredWith {
            strategy: StrategyKind::UniqueConstraint,
            why: ", the name of the unique constraint on the key, so that a violation of any other unique index in the body is an error, not a duplicate. \
                  Find it on PostgreSQL with `\\d your_table` (or `SELECT conname FROM pg_constraint WHERE conrelid = 'your_table'::regclass AND contype = 'u'`; for a `CREATE UNIQUE INDEX`, the index's name); \
                  on MySQL/MariaDB with `SHOW INDEX FROM your_table` (`Key_name`); \
                  on SQLite write the columns as `\"your_table.column\"` (comma-separated for several), or the name of a unique index on expressions",
        },
        applies: Applies::Only {
            strategies: &[StrategyKind::UniqueConstraint],
            refusals: &[],
        },
        doc: "the constraint whose violation means \"duplicate\"; a violation of any other unique index is an ordinary error. On PostgreSQL the constraint's (or unique index's) name; on MySQL, the key (index) name, which the server reports without its table, so it must not be the name of a key in another table the body writes to (`PRIMARY` is refused); on SQLite, the columns as SQLite reports them (`\"payments.order_id\"`) or the index. The handler's error must keep the database error in its `source()` chain (`#[from] sqlx::Error`): one that keeps only its text hides the violation, and the duplicate is then retried and dead-lettered like any error, never acked.",
    },
    Argument {
        id: Name::MaxAttempts,
        name: "max_attempts",
        shape: Shape::Count("`5`"),
        example: "max_attempts = 5",
        presence: Presence::Optional { default: "`10`" },
        applies: Applies::Always,
        doc: "deliveries of one message before a retryable failure is dead-lettered (with the last error and the count). Delays between them double from 1 s up to 5 min, with jitter.",
    },
    Argument {
        id: Name::Replay,
        name: "replay",
        shape: Shape::Flag,
        example: "replay",
        presence: Presence::Optional { default: "off" },
        applies: Applies::Only {
            strategies: NOT_STATE_MACHINE,
            refusals: &[(
                StrategyKind::StateMachine,
                "`replay` needs a dedup record, and `state_machine` keeps none (the status is the record): remove it, or use `strategy = \"dedup_table\"`",
            )],
        },
        doc: "store the result (JSON) and return it to duplicates. The result type must be `Serialize + Deserialize`.",
    },
    Argument {
        id: Name::Fingerprint,
        name: "fingerprint",
        shape: Shape::Flag,
        example: "fingerprint",
        presence: Presence::Optional { default: "off" },
        applies: Applies::Only {
            strategies: NOT_STATE_MACHINE,
            refusals: &[(
                StrategyKind::StateMachine,
                "`fingerprint` needs a dedup record, and `state_machine` keeps none (the status is the record): remove it, or use `strategy = \"dedup_table\"`",
            )],
        },
        doc: "store a SHA-256 of the JSON payload; the same key with a different payload is a permanent [`Error::PayloadMismatch`](crate::Error::PayloadMismatch), dead-lettered. The message must be `Serialize`.",
    },
    Argument {
        id: Name::Mode,
        name: "mode",
        shape: Shape::Choice(Mode::NAMES),
        example: r#"mode = "observe""#,
        presence: Presence::Optional {
            default: r#"`"enforce"`"#,
        },
        applies: Applies::Only {
            strategies: &[StrategyKind::DedupTable],
            refusals: &[
                (
                    StrategyKind::UniqueConstraint,
                    "`mode` only applies to `strategy = \"dedup_table\"`: under `unique_constraint` the database's unique index is the gate, and it refuses the duplicate's write itself, so there is no way to run the body anyway without enforcing. Observe with `strategy = \"dedup_table\"` first, or adopt `unique_constraint` directly (without `mode`)",
                ),
                (
                    StrategyKind::StateMachine,
                    "`mode` only applies to `strategy = \"dedup_table\"`: under `state_machine` the guarded status update is both the gate and the business write, so it cannot be observed without being enforced. Observe with `strategy = \"dedup_table\"` first, or adopt `state_machine` directly (without `mode`)",
                ),
                (
                    StrategyKind::Lock,
                    "`mode` only applies to `strategy = \"dedup_table\"`: under `lock` a second delivery that ran anyway would run the body twice at once, which is what the lease exists to prevent; remove `mode`",
                ),
                (
                    StrategyKind::Token,
                    "`mode` only applies to `strategy = \"dedup_table\"`: a token is used once, so a delivery that ran anyway would need a token no one issued; remove `mode`",
                ),
            ],
        },
        doc: "`\"observe\"` runs the gate and writes the records exactly as `\"enforce\"` does, but a delivery the gate would drop as a duplicate is logged (a warning on the `idem` target) and counted ([`observed_duplicates`](crate::observed_duplicates)), and its body runs anyway: adopt idem on a live consumer, watch what enforcing would drop, then switch to `\"enforce\"`. Not with `unique_constraint` (the unique index refuses the duplicate's write itself) nor `state_machine` (the guarded update is the business write).",
    },
    Argument {
        id: Name::Lease,
        name: "lease",
        shape: Shape::Text(r#"`"30s"`, `"2m"`, `"500ms"`"#),
        example: r#"lease = "30s""#,
        presence: Presence::Optional {
            default: "`\"30s\"`",
        },
        applies: Applies::Only {
            strategies: &[StrategyKind::Lock],
            refusals: &[(
                StrategyKind::Token,
                "`lease` only applies to `strategy = \"lock\"`: a token is held for a fixed 30 s (`Token::LEASE`), renewed while the body runs; remove it",
            )],
        },
        doc: "how long a delivery holds the key before another may take it over (a consumer that dies mid-body blocks the message this long). Renewed every third of it while the body runs, unless `fixed_lease`. At most a day.",
    },
    Argument {
        id: Name::FixedLease,
        name: "fixed_lease",
        shape: Shape::Flag,
        example: "fixed_lease",
        presence: Presence::Optional { default: "off" },
        applies: Applies::Only {
            strategies: &[StrategyKind::Lock],
            refusals: &[],
        },
        doc: "do not renew the lease while the body runs: a body that outlives it loses it, and its delivery ends in [`Error::LeaseLost`](crate::Error::LeaseLost) without writing the done marker.",
    },
    Argument {
        id: Name::SpendOnError,
        name: "spend_on_error",
        shape: Shape::Flag,
        example: "spend_on_error",
        presence: Presence::Optional { default: "off" },
        applies: Applies::Only {
            strategies: &[StrategyKind::Token],
            refusals: &[],
        },
        doc: "a failed body spends the token instead of putting it back: its retries are dead-lettered as [`Error::UnknownToken`](crate::Error::UnknownToken). Without it, a failure restores the token so that a retry can succeed.",
    },
    Argument {
        id: Name::Crate,
        name: "crate",
        shape: Shape::Text(r#"`"idem"`"#),
        example: r#"crate = "idem""#,
        presence: Presence::Optional {
            default: r#"`"idem_runtime"`"#,
        },
        applies: Applies::Always,
        doc: "the path of this crate, if your `Cargo.toml` renames it.",
    },
    Argument {
        id: Name::Table,
        name: "table",
        shape: Shape::Text(r#"`"orders"`, `"shop.orders"`"#),
        example: r#"table = "orders""#,
        presence: Presence::RequiredWith {
            strategy: StrategyKind::StateMachine,
            why: "",
        },
        applies: STATE_MACHINE_ONLY,
        doc: "the entity's table",
    },
    Argument {
        id: Name::Column,
        name: "column",
        shape: Shape::Text(r#"`"status"`"#),
        example: r#"column = "status""#,
        presence: Presence::RequiredWith {
            strategy: StrategyKind::StateMachine,
            why: "",
        },
        applies: STATE_MACHINE_ONLY,
        doc: "its status column (text)",
    },
    Argument {
        id: Name::From,
        name: "from",
        shape: Shape::States(r#"`"pending"` or `["pending", "held"]`"#),
        example: r#"from = "pending""#,
        presence: Presence::RequiredWith {
            strategy: StrategyKind::StateMachine,
            why: "",
        },
        applies: STATE_MACHINE_ONLY,
        doc: "the states this step moves from",
    },
    Argument {
        id: Name::To,
        name: "to",
        shape: Shape::Text(r#"`"paid"`"#),
        example: r#"to = "paid""#,
        presence: Presence::RequiredWith {
            strategy: StrategyKind::StateMachine,
            why: "",
        },
        applies: STATE_MACHINE_ONLY,
        doc: "the state it moves to; never in `from`",
    },
    Argument {
        id: Name::KeyColumn,
        name: "key_column",
        shape: Shape::Text(r#"`"id"`"#),
        example: r#"key_column = "order_id""#,
        presence: Presence::Optional {
            default: "the key field's name",
        },
        applies: STATE_MACHINE_ONLY,
        doc: "the column holding the key (unique)",
    },
    Argument {
        id: Name::Done,
        name: "done",
        shape: Shape::States(r#"`["shipped"]`"#),
        example: r#"done = ["shipped"]"#,
        presence: Presence::Optional { default: "`[to]`" },
        applies: STATE_MACHINE_ONLY,
        doc: "states that mean \"already past this step\": a delivery finding one is a duplicate (`to` always is)",
    },
    Argument {
        id: Name::Early,
        name: "early",
        shape: Shape::States(r#"`["draft"]`"#),
        example: r#"early = ["draft"]"#,
        presence: Presence::Optional { default: "none" },
        applies: STATE_MACHINE_ONLY,
        doc: "states before `from`: the step arrived before its predecessor, and is retried",
    },
    Argument {
        id: Name::OnMissing,
        name: "on_missing",
        shape: Shape::Choice(OnMissing::NAMES),
        example: r#"on_missing = "dead_letter""#,
        presence: Presence::Optional {
            default: r#"`"retry"`"#,
        },
        applies: STATE_MACHINE_ONLY,
        doc: "what to do when the row does not exist yet",
    },
    Argument {
        id: Name::Batch,
        name: "batch",
        shape: Shape::Flag,
        example: "batch",
        presence: Presence::Optional { default: "off" },
        applies: Applies::Only {
            strategies: &[StrategyKind::DedupTable, StrategyKind::UniqueConstraint],
            refusals: &[
                (
                    StrategyKind::StateMachine,
                    "`batch` applies to `dedup_table` and `unique_constraint`: a `state_machine` step is one guarded update per entity, which a batch would not make cheaper; remove `batch`, or use `strategy = \"dedup_table\"`",
                ),
                (
                    StrategyKind::Lock,
                    "`batch` needs a database transaction that the gate and the body share, and Redis has none: remove `batch`, or use `strategy = \"dedup_table\"` on a SQL store",
                ),
                (
                    StrategyKind::Token,
                    "`batch` needs a database transaction that the gate and the body share, and Redis has none: remove `batch`, or use `strategy = \"dedup_table\"` on a SQL store",
                ),
            ],
        },
        doc: "handle many deliveries in one transaction: the handler takes `msgs: &[M]`, and the generated function takes `Vec<(M, impl Acknowledger)>` and returns one result per delivery. Every key is gated in one statement, a key twice in the batch is handled once, the body gets only the fresh messages, one commit, then every delivery is acked. A failing batch is rolled back and split in halves down to the failing message, which is retried or dead-lettered on its own; the rest commit. Returns `Result<(), E>`; not with `replay` nor `mode = \"observe\"`. See [`pipeline::batch`](crate::pipeline::batch).",
    },
];

/// The argument written `name`.
pub(crate) fn named(name: &str) -> Option<&'static Argument> {
    ARGUMENTS.iter().find(|argument| argument.name == name)
}

/// Every argument's name, in order.
pub(crate) fn names() -> Vec<&'static str> {
    ARGUMENTS.iter().map(|argument| argument.name).collect()
}

/// The flags, for the message about arguments that do not parse: "`replay` and `fingerprint`".
pub(crate) fn flags() -> String {
    let flags: Vec<String> = ARGUMENTS
        .iter()
        .filter(|argument| matches!(argument.shape, Shape::Flag))
        .map(|argument| format!("`{}`", argument.name))
        .collect();
    match flags.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    }
}

impl Argument {
    /// The fix for a missing argument: the example, with the other choices if it has some:
    /// `store = "pg" (or "mysql", "sqlite", "memory")`.
    pub(crate) fn fix(&self) -> String {
        let Shape::Choice(choices) = self.shape else {
            return self.example.to_owned();
        };
        let others: Vec<String> = choices
            .iter()
            .filter(|choice| !self.example.ends_with(&format!("\"{choice}\"")))
            .map(|choice| format!("\"{choice}\""))
            .collect();
        if others.is_empty() {
            self.example.to_owned()
        } else {
            format!("{} (or {})", self.example, others.join(", "))
        }
    }

    /// `Err` with the reason when the argument does not apply to `strategy`.
    pub(crate) fn check_applies_to(&self, strategy: StrategyKind) -> Result<(), String> {
        let Applies::Only {
            strategies,
            refusals,
        } = self.applies
        else {
            return Ok(());
        };
        if strategies.contains(&strategy) {
            return Ok(());
        }
        match refusals.iter().find(|(refused, _)| *refused == strategy) {
            Some((_, reason)) => Err((*reason).to_owned()),
            None => Err(format!(
                "`{}` only applies to {}; remove it",
                self.name,
                strategy_list(strategies)
            )),
        }
    }
}

/// `strategy = "a"`, or `strategy = "a"` or `"b"`.
fn strategy_list(strategies: &[StrategyKind]) -> String {
    let quoted: Vec<String> = strategies
        .iter()
        .map(|strategy| format!("\"{}\"", strategy.name()))
        .collect();
    match quoted.split_last() {
        Some((last, [])) => format!("`strategy = {last}`"),
        Some((last, rest)) => format!("`strategy = {}` or `{last}`", rest.join("` or `")),
        None => "no strategy".to_owned(),
    }
}

/// "unknown store `sqlit`; did you mean `sqlite`? (valid: ...)".
pub(crate) fn unknown(what: &str, value: &str, valid: &[&str]) -> String {
    let list = valid
        .iter()
        .map(|v| format!("`{v}`"))
        .collect::<Vec<_>>()
        .join(", ");
    match closest(value, valid) {
        Some(best) => format!("unknown {what} `{value}`; did you mean `{best}`? (valid: {list})"),
        None => format!("unknown {what} `{value}`; valid: {list}"),
    }
}

/// The valid value `value` was most likely meant to be.
pub(crate) fn closest<'a>(value: &str, valid: &[&'a str]) -> Option<&'a str> {
    valid
        .iter()
        .map(|candidate| (strsim::jaro_winkler(value, candidate), *candidate))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, candidate)| candidate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::errors::Errors;

    /// The arguments section of `idem_runtime::idempotent`'s documentation.
    const DOCS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../idem-runtime/src/idempotent.md"
    );
    const SECTION_START: &str = "# Arguments\n\n";
    const SECTION_END: &str = "\n# What the compiler checks";

    fn is_state_machine_only(argument: &Argument) -> bool {
        matches!(
            argument.applies,
            Applies::Only {
                strategies: [StrategyKind::StateMachine],
                ..
            }
        )
    }

    fn value_column(argument: &Argument) -> String {
        match argument.shape {
            Shape::Text(shown) | Shape::States(shown) | Shape::Count(shown) => shown.to_owned(),
            Shape::Choice(choices) => choices
                .iter()
                .map(|choice| format!("`\"{choice}\"`"))
                .collect::<Vec<_>>()
                .join(", "),
            Shape::Flag => "flag".to_owned(),
        }
    }

    fn default_column(argument: &Argument, in_state_machine_table: bool) -> String {
        match argument.presence {
            Presence::Required { .. } => "required".to_owned(),
            Presence::RequiredWith { .. } if in_state_machine_table => "required".to_owned(),
            Presence::RequiredWith { strategy, .. } => {
                format!("**required** with `{}`", strategy.name())
            }
            Presence::Optional { default } => default.to_owned(),
        }
    }

    fn meaning_column(argument: &Argument, in_state_machine_table: bool) -> String {
        match argument.applies {
            Applies::Only { strategies, .. } if !in_state_machine_table => {
                let names: Vec<String> = strategies
                    .iter()
                    .map(|strategy| format!("`{}`", strategy.name()))
                    .collect();
                let names = match names.split_last() {
                    Some((last, rest)) if !rest.is_empty() => {
                        format!("{} and {last}", rest.join(", "))
                    }
                    _ => names.concat(),
                };
                format!("{names} only: {}", argument.doc)
            }
            _ => argument.doc.to_owned(),
        }
    }

    fn table<'a>(arguments: impl Iterator<Item = &'a Argument>, state_machine: bool) -> String {
        let mut table =
            String::from("| argument | value | default | meaning |\n|---|---|---|---|\n");
        for argument in arguments {
            table.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                argument.name,
                value_column(argument),
                default_column(argument, state_machine),
                meaning_column(argument, state_machine),
            ));
        }
        table
    }

    /// The documentation's arguments section, from [`ARGUMENTS`].
    fn render() -> String {
        let (state_machine, common): (Vec<&Argument>, Vec<&Argument>) = ARGUMENTS
            .iter()
            .partition(|argument| is_state_machine_only(argument));
        format!(
            "{}\n`state_machine` only (see [`strategy::state_machine`](crate::strategy::state_machine)):\n\n{}",
            table(common.into_iter(), false),
            table(state_machine.into_iter(), true),
        )
    }

    /// The documentation's table of arguments is this table. After changing [`ARGUMENTS`], run
    /// `IDEM_BLESS_DOCS=1 cargo test -p idem-macros` to rewrite it, then read the diff.
    #[test]
    fn the_documentation_lists_exactly_these_arguments() {
        let docs = std::fs::read_to_string(DOCS).unwrap();
        let start = docs.find(SECTION_START).unwrap() + SECTION_START.len();
        let end = start + docs[start..].find(SECTION_END).unwrap();
        let rendered = render();
        if docs[start..end] != rendered && std::env::var_os("IDEM_BLESS_DOCS").is_some() {
            let blessed = format!("{}{rendered}{}", &docs[..start], &docs[end..]);
            std::fs::write(DOCS, blessed).unwrap();
            return;
        }
        assert!(
            docs[start..end] == rendered,
            "the arguments section of {DOCS} is not the rendering of ARGUMENTS \
             (rewrite it with IDEM_BLESS_DOCS=1 cargo test -p idem-macros); expected:\n{rendered}"
        );
    }

    #[test]
    fn each_argument_is_listed_once() {
        // Exhaustive: a new `Name` does not compile here until it is given a place.
        fn position(name: Name) -> usize {
            match name {
                Name::Key => 0,
                Name::Store => 1,
                Name::Strategy => 2,
                Name::Scope => 3,
                Name::Ttl => 4,
                Name::Constraint => 5,
                Name::MaxAttempts => 6,
                Name::Replay => 7,
                Name::Fingerprint => 8,
                Name::Mode => 9,
                Name::Lease => 10,
                Name::FixedLease => 11,
                Name::SpendOnError => 12,
                Name::Crate => 13,
                Name::Table => 14,
                Name::Column => 15,
                Name::From => 16,
                Name::To => 17,
                Name::KeyColumn => 18,
                Name::Done => 19,
                Name::Early => 20,
                Name::OnMissing => 21,
                Name::Batch => 22,
            }
        }
        let positions: Vec<usize> = ARGUMENTS.iter().map(|a| position(a.id)).collect();
        assert_eq!(positions, (0..ARGUMENTS.len()).collect::<Vec<_>>());
        let mut names = names();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ARGUMENTS.len());
    }

    /// The example of every argument is what its shape says, and parses without an error: the
    /// table and the parser agree on every argument's shape.
    #[test]
    fn every_example_parses() {
        for argument in ARGUMENTS {
            let name = argument.name;
            match argument.shape {
                Shape::Flag => assert_eq!(argument.example, name),
                Shape::Choice(choices) => assert!(
                    choices
                        .iter()
                        .any(|c| argument.example == format!("{name} = \"{c}\"")),
                    "{name}"
                ),
                _ => assert!(
                    argument.example.starts_with(&format!("{name} = ")),
                    "{name}"
                ),
            }
            let mut errors = Errors::default();
            let parsed = crate::parse::parse(argument.example.parse().unwrap(), &mut errors);
            assert!(errors.is_empty(), "{}", argument.example);
            assert!(parsed.has(argument.id), "{}", argument.example);
        }
    }

    /// A value of the wrong shape gets that shape's error, with the example as the fix.
    #[test]
    fn every_argument_refuses_a_value_of_another_shape() {
        for argument in ARGUMENTS {
            let name = argument.name;
            let (wrong, expected) = match argument.shape {
                Shape::Flag => (format!("{name} = \"yes\""), format!("`{name}` is a flag")),
                Shape::Text(_) | Shape::Choice(_) => (
                    name.to_owned(),
                    format!("`{name}` needs a value: `{}`", argument.example),
                ),
                Shape::Count(_) => (
                    format!("{name} = \"many\""),
                    format!("`{name}` takes a positive whole number"),
                ),
                Shape::States(_) => (format!("{name} = 1"), "states are".to_owned()),
            };
            let mut errors = Errors::default();
            crate::parse::parse(wrong.parse().unwrap(), &mut errors);
            let messages = errors.messages();
            assert!(
                messages.len() == 1 && messages[0].starts_with(&expected),
                "{wrong}: {messages:?}"
            );
        }
    }

    #[test]
    fn fixes_list_the_other_choices() {
        assert_eq!(
            named("store").unwrap().fix(),
            r#"store = "pg" (or "mysql", "sqlite", "memory", "redis")"#
        );
        assert_eq!(
            named("on_missing").unwrap().fix(),
            r#"on_missing = "dead_letter" (or "retry")"#
        );
        assert_eq!(named("key").unwrap().fix(), r#"key = "order_id""#);
    }

    #[test]
    fn refusals_name_the_strategies_or_give_the_reason() {
        let table = named("table").unwrap();
        assert_eq!(
            table.check_applies_to(StrategyKind::DedupTable),
            Err("`table` only applies to `strategy = \"state_machine\"`; remove it".to_owned())
        );
        assert_eq!(table.check_applies_to(StrategyKind::StateMachine), Ok(()));
        let mode = named("mode").unwrap();
        assert_eq!(mode.check_applies_to(StrategyKind::DedupTable), Ok(()));
        assert!(
            mode.check_applies_to(StrategyKind::UniqueConstraint)
                .unwrap_err()
                .contains("refuses the duplicate's write itself")
        );
        assert_eq!(
            flags(),
            "`replay`, `fingerprint`, `fixed_lease`, `spend_on_error` and `batch`"
        );
    }
}
