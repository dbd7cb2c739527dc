//! Parsing and validating the attribute's arguments. Every error is collected, each spanned on
//! the offending token with a fix, so one compile shows them all.

use proc_macro2::Span;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Ident, Lit, LitStr, Meta, Token};

use crate::errors::Errors;

/// Arguments every strategy takes (some only meaningful for one, checked in `validate`).
const COMMON_ARGUMENTS: &[&str] = &[
    "key",
    "store",
    "strategy",
    "scope",
    "ttl",
    "constraint",
    "replay",
    "fingerprint",
    "max_attempts",
    "mode",
    "crate",
];

/// Arguments that only `state_machine` takes.
const STATE_MACHINE_ARGUMENTS: &[&str] = &[
    "table",
    "column",
    "key_column",
    "from",
    "to",
    "done",
    "early",
    "on_missing",
];

/// Every argument name, for "unknown argument" and its suggestion.
fn all_arguments() -> Vec<&'static str> {
    COMMON_ARGUMENTS
        .iter()
        .chain(STATE_MACHINE_ARGUMENTS)
        .copied()
        .collect()
}

/// PostgreSQL truncates identifiers past 63 bytes; refuse them instead.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// Longest scope the runtime accepts (`idem_runtime::key::MAX_SCOPE_BYTES`).
const MAX_SCOPE_BYTES: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreKind {
    Pg,
    MySql,
    Sqlite,
    Memory,
}

impl StoreKind {
    const NAMES: &'static [&'static str] = &["pg", "mysql", "sqlite", "memory"];

    fn parse(value: &str) -> Result<Self, String> {
        match value {
            "pg" => Ok(Self::Pg),
            "mysql" => Ok(Self::MySql),
            "sqlite" => Ok(Self::Sqlite),
            "memory" => Ok(Self::Memory),
            "mariadb" => Err(format!(
                "unknown store `{value}`; use `mysql` for MariaDB and MySQL"
            )),
            "postgres" | "postgresql" | "postgre" | "psql" => {
                Err(format!("unknown store `{value}`; use `pg` for PostgreSQL"))
            }
            "sqlite3" => Err(format!("unknown store `{value}`; use `sqlite`")),
            "redis" => Err(format!(
                "store `{value}` is not supported yet; supported stores: `pg`, `mysql`, `sqlite`, `memory`"
            )),
            other => Err(unknown("store", other, Self::NAMES)),
        }
    }

    pub(crate) fn type_name(self) -> &'static str {
        match self {
            Self::Pg => "PgStore",
            Self::MySql => "MySqlStore",
            Self::Sqlite => "SqliteStore",
            Self::Memory => "MemoryStore",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StrategyKind {
    DedupTable,
    UniqueConstraint,
    StateMachine,
}

impl StrategyKind {
    const NAMES: &'static [&'static str] = &["dedup_table", "unique_constraint", "state_machine"];

    fn parse(value: &str) -> Result<Self, String> {
        match value {
            "dedup_table" => Ok(Self::DedupTable),
            "unique_constraint" => Ok(Self::UniqueConstraint),
            "state_machine" => Ok(Self::StateMachine),
            "lock" | "token" | "offset" | "natural" => Err(format!(
                "strategy `{value}` is not implemented yet; available: `dedup_table`, `unique_constraint`, `state_machine`"
            )),
            other => Err(unknown("strategy", other, Self::NAMES)),
        }
    }
}

/// One part of the key: a field path on the message, e.g. `order.id`.
#[derive(Debug, Clone)]
pub(crate) struct KeyField {
    /// The path as written, e.g. `"order.id"`: the field's name in key errors at runtime.
    pub(crate) text: String,
    /// Its segments, each spanned on the key literal.
    pub(crate) segments: Vec<syn::Member>,
}

#[derive(Debug, Clone)]
pub(crate) struct KeySpec {
    pub(crate) fields: Vec<KeyField>,
    pub(crate) span: Span,
}

/// Validated arguments. Options are `None` when absent or invalid (the error is recorded).
#[derive(Debug, Default)]
pub(crate) struct Args {
    pub(crate) key: Option<KeySpec>,
    pub(crate) store: Option<(StoreKind, Span)>,
    pub(crate) strategy: Option<(StrategyKind, Span)>,
    pub(crate) scope: Option<LitStr>,
    pub(crate) ttl_millis: Option<u64>,
    pub(crate) ttl_span: Option<Span>,
    pub(crate) constraint: Option<(LitStr, Span)>,
    pub(crate) replay: Option<Span>,
    pub(crate) fingerprint: Option<Span>,
    /// `max_attempts = N`: deliveries before a retryable failure is dead-lettered.
    pub(crate) max_attempts: Option<(u32, Span)>,
    /// `mode = "observe"`.
    pub(crate) observe: Option<Span>,
    pub(crate) krate: Option<syn::Path>,
    /// Every argument written, valid or not: an invalid one is not also reported missing.
    pub(crate) present: Vec<String>,
    /// The arguments did not parse; nothing more is said about them.
    pub(crate) unparsable: bool,
    /// `state_machine`: the table, status column and key column, as written.
    pub(crate) table: Option<(String, Span)>,
    pub(crate) column: Option<(String, Span)>,
    pub(crate) key_column: Option<(String, Span)>,
    /// `state_machine`: the states this step moves from, and to.
    pub(crate) from: Option<(Vec<String>, Span)>,
    pub(crate) to: Option<(String, Span)>,
    /// `state_machine`: states that mean "already past this step".
    pub(crate) done: Option<(Vec<String>, Span)>,
    /// `state_machine`: states that mean "this step is early".
    pub(crate) early: Option<(Vec<String>, Span)>,
    /// `state_machine`: `on_missing = "dead_letter"`.
    pub(crate) dead_letter_missing: Option<Span>,
    /// Where each state-machine argument was written, for "only applies to" errors.
    pub(crate) state_machine_spans: Vec<(String, Span)>,
}

fn unknown(what: &str, value: &str, valid: &[&str]) -> String {
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

fn closest<'a>(value: &str, valid: &[&'a str]) -> Option<&'a str> {
    valid
        .iter()
        .map(|candidate| (strsim::jaro_winkler(value, candidate), *candidate))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, candidate)| candidate)
}

/// Parses the attribute's token stream. Returns whatever was valid, with every error recorded.
pub(crate) fn parse(tokens: proc_macro2::TokenStream, errors: &mut Errors) -> Args {
    let mut args = Args::default();
    let metas = match Punctuated::<Meta, Token![,]>::parse_terminated.parse2(tokens) {
        Ok(metas) => metas,
        Err(error) => {
            errors.push(syn::Error::new(
                error.span(),
                format!(
                    "{error}; arguments are `name = \"value\"` pairs or the flags `replay` and `fingerprint`, separated by commas"
                ),
            ));
            args.unparsable = true;
            return args;
        }
    };
    let arguments = all_arguments();
    for meta in metas {
        let path = meta.path();
        let name = path
            .get_ident()
            .map(Ident::to_string)
            .or_else(|| {
                // `crate` is a keyword: it parses as a path segment, not an ident.
                path.segments
                    .first()
                    .filter(|_| path.segments.len() == 1)
                    .map(|s| s.ident.to_string())
            })
            .unwrap_or_default();
        if !arguments.contains(&name.as_str()) {
            let shown = quote::ToTokens::to_token_stream(path).to_string();
            errors.error(path.span(), unknown("argument", &shown, &arguments));
            // A misspelt argument is not also reported missing.
            if let Some(meant) = closest(&shown, &arguments) {
                args.present.push(meant.to_owned());
            }
            continue;
        }
        if args.present.contains(&name) {
            errors.error(
                path.span(),
                format!("duplicate argument `{name}`; give it once"),
            );
            continue;
        }
        args.present.push(name.clone());
        if STATE_MACHINE_ARGUMENTS.contains(&name.as_str()) {
            args.state_machine_spans.push((name.clone(), path.span()));
        }
        match name.as_str() {
            "replay" => args.replay = flag(&meta, errors),
            "max_attempts" => args.max_attempts = attempts(&meta, errors),
            "fingerprint" => args.fingerprint = flag(&meta, errors),
            "from" | "done" | "early" => {
                let states = state_list(&meta, &name, errors);
                match name.as_str() {
                    "from" => args.from = states,
                    "done" => args.done = states,
                    _ => args.early = states,
                }
            }
            _ => {
                let Some(lit) = string_value(&meta, &name, errors) else {
                    continue;
                };
                apply(&mut args, &name, &lit, errors);
            }
        }
    }
    args
}

fn apply(args: &mut Args, name: &str, lit: &LitStr, errors: &mut Errors) {
    let value = lit.value();
    let span = lit.span();
    match name {
        "key" => args.key = parse_key(lit, errors),
        "store" => match StoreKind::parse(&value) {
            Ok(kind) => args.store = Some((kind, span)),
            Err(message) => errors.error(span, message),
        },
        "strategy" => match StrategyKind::parse(&value) {
            Ok(kind) => args.strategy = Some((kind, span)),
            Err(message) => errors.error(span, message),
        },
        "scope" => {
            if value.contains('\0') {
                errors.error(
                    span,
                    "`scope` contains a NUL character, which the dedup stores cannot hold; pick a short, stable name such as \"billing.order_paid\"",
                );
            } else if value.is_empty() || value.len() > MAX_SCOPE_BYTES {
                errors.error(
                    span,
                    format!(
                        "`scope` must be 1 to {MAX_SCOPE_BYTES} bytes; pick a short, stable name such as \"billing.order_paid\""
                    ),
                );
            } else {
                args.scope = Some(lit.clone());
            }
        }
        "ttl" => {
            args.ttl_span = Some(span);
            args.ttl_millis = parse_ttl(&value, span, errors);
        }
        "constraint" => {
            let valid = !value.is_empty()
                && value.chars().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ',' | ' ' | '$')
                });
            if valid {
                args.constraint = Some((lit.clone(), span));
            } else {
                errors.error(
                    span,
                    "`constraint` must name a unique constraint or index, e.g. \"payments_order_id_key\" (letters, digits, `_`, `.`)",
                );
            }
        }
        "table" => args.table = sql_identifier(lit, true, errors).map(|v| (v, span)),
        "column" => args.column = sql_identifier(lit, false, errors).map(|v| (v, span)),
        "key_column" => args.key_column = sql_identifier(lit, false, errors).map(|v| (v, span)),
        "to" => {
            if value.is_empty() {
                errors.error(span, "`to` is empty; name the state this step moves to, e.g. `to = \"paid\"`");
            } else {
                args.to = Some((value, span));
            }
        }
        "mode" => match value.as_str() {
            "enforce" => {}
            "observe" => args.observe = Some(span),
            other => errors.error(span, unknown("`mode`", other, &["enforce", "observe"])),
        },
        "on_missing" => match value.as_str() {
            "retry" => {}
            "dead_letter" => args.dead_letter_missing = Some(span),
            other => errors.error(span, unknown("`on_missing` value", other, &["retry", "dead_letter"])),
        },
        "crate" => match syn::parse_str::<syn::Path>(&value) {
            Ok(path) => args.krate = Some(path),
            Err(_) => errors.error(
                span,
                format!(
                    "`crate` must be a path to idem-runtime as your Cargo.toml renames it, e.g. \"idem\" or \"::my_idem\"; `{value}` is not a path"
                ),
            ),
        },
        _ => unreachable!("every name in all_arguments() is handled"),
    }
}

/// `max_attempts = 5`: a positive integer literal (a string of one is accepted too).
fn attempts(meta: &Meta, errors: &mut Errors) -> Option<(u32, Span)> {
    const HINT: &str =
        "`max_attempts` takes a positive whole number of deliveries: `max_attempts = 5`";
    let Meta::NameValue(nv) = meta else {
        errors.error(meta.span(), HINT);
        return None;
    };
    let parsed = match &nv.value {
        Expr::Lit(ExprLit {
            lit: Lit::Int(int), ..
        }) => int.base10_parse::<u32>().ok(),
        Expr::Lit(ExprLit {
            lit: Lit::Str(text),
            ..
        }) => text.value().trim().parse::<u32>().ok(),
        _ => None,
    };
    match parsed {
        Some(attempts) if attempts > 0 => Some((attempts, nv.value.span())),
        _ => {
            errors.error(nv.value.span(), HINT);
            None
        }
    }
}

fn flag(meta: &Meta, errors: &mut Errors) -> Option<Span> {
    match meta {
        Meta::Path(path) => Some(path.span()),
        Meta::NameValue(nv) => match &nv.value {
            Expr::Lit(ExprLit {
                lit: Lit::Bool(b), ..
            }) => b.value.then(|| nv.path.span()),
            other => {
                let name = quote::ToTokens::to_token_stream(&nv.path).to_string();
                errors.error(
                    other.span(),
                    format!("`{name}` is a flag: write `{name}` or `{name} = true`"),
                );
                None
            }
        },
        Meta::List(list) => {
            let name = quote::ToTokens::to_token_stream(&list.path).to_string();
            errors.error(
                list.delimiter.span().join(),
                format!("`{name}` takes no list: write `{name}` or `{name} = true`"),
            );
            None
        }
    }
}

fn string_value(meta: &Meta, name: &str, errors: &mut Errors) -> Option<LitStr> {
    let hint = match name {
        "key" => "key = \"order_id\"",
        "store" => "store = \"pg\"",
        "strategy" => "strategy = \"dedup_table\"",
        "scope" => "scope = \"billing.order_paid\"",
        "ttl" => "ttl = \"7d\"",
        "constraint" => "constraint = \"payments_order_id_key\"",
        "table" => "table = \"orders\"",
        "column" => "column = \"status\"",
        "key_column" => "key_column = \"order_id\"",
        "to" => "to = \"paid\"",
        "on_missing" => "on_missing = \"dead_letter\"",
        "max_attempts" => "max_attempts = 5",
        "mode" => "mode = \"observe\"",
        _ => "crate = \"idem\"",
    };
    match meta {
        Meta::NameValue(nv) => match &nv.value {
            Expr::Lit(ExprLit {
                lit: Lit::Str(lit), ..
            }) => Some(lit.clone()),
            other => {
                errors.error(
                    other.span(),
                    format!("`{name}` takes a string literal: `{hint}`"),
                );
                None
            }
        },
        Meta::Path(path) => {
            errors.error(path.span(), format!("`{name}` needs a value: `{hint}`"));
            None
        }
        Meta::List(list) => {
            errors.error(
                list.delimiter.span().join(),
                format!("`{name}` takes a string literal, not a list: `{hint}`"),
            );
            None
        }
    }
}

/// `from = "pending"` or `from = ["pending", "held"]`: non-empty string literals.
fn state_list(meta: &Meta, name: &str, errors: &mut Errors) -> Option<(Vec<String>, Span)> {
    let hint = format!("`{name} = \"pending\"` or `{name} = [\"pending\", \"held\"]`");
    let Meta::NameValue(nv) = meta else {
        errors.error(
            meta.span(),
            format!("`{name}` needs a state or a list of states: {hint}"),
        );
        return None;
    };
    let literals: Vec<&Expr> = match &nv.value {
        Expr::Array(array) => array.elems.iter().collect(),
        single => vec![single],
    };
    let mut states = Vec::new();
    for literal in literals {
        match literal {
            Expr::Lit(ExprLit {
                lit: Lit::Str(state),
                ..
            }) if !state.value().is_empty() => states.push(state.value()),
            other => {
                errors.error(
                    other.span(),
                    format!("states are non-empty strings, as stored in the status column: {hint}"),
                );
                return None;
            }
        }
    }
    if states.is_empty() {
        errors.error(nv.value.span(), format!("`{name}` lists no state: {hint}"));
        return None;
    }
    Some((states, nv.value.span()))
}

/// A table or column name: `[A-Za-z_][A-Za-z0-9_]*` (and `schema.table` for tables), at most
/// 63 bytes a part. The runtime quotes it; this keeps anything but a name out of the SQL text.
fn sql_identifier(lit: &LitStr, allow_schema: bool, errors: &mut Errors) -> Option<String> {
    let value = lit.value();
    let parts: Vec<&str> = value.split('.').collect();
    let well_formed = (parts.len() == 1 || (allow_schema && parts.len() == 2))
        && parts.iter().all(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
                && part.len() <= MAX_IDENTIFIER_BYTES
        });
    if well_formed {
        Some(value)
    } else {
        let shape = if allow_schema {
            "`orders` or `shop.orders`"
        } else {
            "`status`"
        };
        errors.error(
            lit.span(),
            format!(
                "`{value}` is not a SQL identifier: use letters, digits and `_`, starting with a letter or `_`, at most {MAX_IDENTIFIER_BYTES} bytes, e.g. {shape}"
            ),
        );
        None
    }
}

fn parse_key(lit: &LitStr, errors: &mut Errors) -> Option<KeySpec> {
    let span = lit.span();
    let value = lit.value();
    if value.trim().is_empty() {
        errors.error(
            span,
            "`key` is empty; name the message field(s) that identify it, e.g. `key = \"order_id\"` (an empty key would make every message a duplicate of the first)",
        );
        return None;
    }
    let mut fields: Vec<KeyField> = Vec::new();
    for part in value.split(',') {
        let text = part.trim();
        if text.is_empty() {
            errors.error(
                span,
                "`key` has an empty part; separate field paths with commas: `key = \"user_id, op\"`",
            );
            return None;
        }
        let mut segments = Vec::new();
        for segment in text.split('.') {
            let segment = segment.trim();
            let member = if let Ok(index) = segment.parse::<u32>() {
                syn::Member::Unnamed(syn::Index { index, span })
            } else if is_identifier(segment) {
                syn::Member::Named(Ident::new(segment, span))
            } else {
                errors.error(
                    span,
                    format!(
                        "`{segment}` in key `{value}` is not a field name; use field paths such as \"order_id\", \"order.id\" or \"user_id, op\""
                    ),
                );
                return None;
            };
            segments.push(member);
        }
        if fields.iter().any(|f| f.text == text) {
            errors.error(
                span,
                format!("`{text}` appears twice in the key; list each field once"),
            );
            return None;
        }
        fields.push(KeyField {
            text: text.to_owned(),
            segments,
        });
    }
    Some(KeySpec { fields, span })
}

fn is_identifier(text: &str) -> bool {
    let mut chars = text.chars();
    let starts_well = chars.next().is_some_and(|c| c.is_alphabetic() || c == '_');
    starts_well
        && chars.all(|c| c.is_alphanumeric() || c == '_')
        && text != "_"
        && syn::parse_str::<Ident>(text).is_ok()
}

fn parse_ttl(value: &str, span: Span, errors: &mut Errors) -> Option<u64> {
    match humantime::parse_duration(value) {
        Ok(duration) if duration.as_millis() == 0 => {
            errors.error(
                span,
                "`ttl` must be longer than zero; omit it to keep records forever",
            );
            None
        }
        Ok(duration) => match u64::try_from(duration.as_millis()) {
            Ok(millis) => Some(millis),
            Err(_) => {
                errors.error(span, "`ttl` is too long; omit it to keep records forever");
                None
            }
        },
        Err(error) => {
            errors.error(
                span,
                format!(
                    "`ttl = \"{value}\"` is not a duration ({error}); write a number and a unit, e.g. \"7d\", \"12h\", \"30m\", \"90s\" or \"500ms\""
                ),
            );
            None
        }
    }
}

/// Checks between arguments: what is required, and what fits together.
pub(crate) fn validate(args: &Args, attribute_span: Span, errors: &mut Errors) {
    let missing = |name: &str, example: &str| {
        format!("missing `{name}`; add `{example}` to #[idempotent(...)]")
    };
    if args.unparsable {
        return;
    }
    let absent = |name: &str| !args.present.iter().any(|p| p == name);
    if absent("key") {
        errors.error(attribute_span, missing("key", "key = \"<message field>\""));
    }
    if absent("store") {
        errors.error(
            attribute_span,
            missing(
                "store",
                "store = \"pg\" (or \"mysql\", \"sqlite\", \"memory\")",
            ),
        );
    }
    if absent("strategy") {
        errors.error(
            attribute_span,
            missing(
                "strategy",
                "strategy = \"dedup_table\" (or \"unique_constraint\")",
            ),
        );
    }
    if let (Some((StoreKind::Memory, _)), Some((StrategyKind::UniqueConstraint, span))) =
        (args.store, args.strategy)
    {
        errors.error(
            span,
            "`unique_constraint` needs a database whose unique index can reject the duplicate; the `memory` store has none: use `strategy = \"dedup_table\"`, or `store = \"pg\"` / `\"sqlite\"`",
        );
    }
    validate_state_machine(args, attribute_span, errors);
    if let Some((StrategyKind::UniqueConstraint, span)) = args.strategy
        && absent("constraint")
        && !matches!(args.store, Some((StoreKind::Memory, _)))
    {
        errors.error(
            span,
            "`unique_constraint` needs `constraint = \"...\"`, the name of the unique constraint on the key, so that a violation of any other unique index in the body is an error, not a duplicate. \
             Find it on PostgreSQL with `\\d your_table` (or `SELECT conname FROM pg_constraint WHERE conrelid = 'your_table'::regclass AND contype = 'u'`; for a `CREATE UNIQUE INDEX`, the index's name); \
             on MySQL/MariaDB with `SHOW INDEX FROM your_table` (`Key_name`); \
             on SQLite write the columns as `\"your_table.column\"` (comma-separated for several), or the name of a unique index on expressions",
        );
    }
    if let (Some((StoreKind::MySql, _)), Some((name, span))) = (args.store, &args.constraint)
        && name.value().eq_ignore_ascii_case("PRIMARY")
    {
        errors.error(
            *span,
            "on MySQL/MariaDB the error names the key but not its table, so `PRIMARY` would match a primary-key violation in any table the body writes to; put a named unique key on the key column (`CONSTRAINT payments_order_id_key UNIQUE (order_id)`) and name it",
        );
    }
    if let (Some(span), Some((strategy, _))) = (args.observe, args.strategy) {
        match strategy {
            StrategyKind::DedupTable => {}
            StrategyKind::UniqueConstraint => errors.error(
                span,
                "`mode = \"observe\"` needs a gate that can let a duplicate through, and under `unique_constraint` the database's unique index is the gate: it refuses the duplicate's write itself. Observe with `strategy = \"dedup_table\"` first, or adopt `unique_constraint` directly",
            ),
            StrategyKind::StateMachine => errors.error(
                span,
                "`mode = \"observe\"` cannot apply to `state_machine`: the guarded status update is both the gate and the business write, so it cannot be observed without being enforced. Observe with `strategy = \"dedup_table\"` first, or adopt `state_machine` directly",
            ),
        }
    }
    if let Some((_, span)) = &args.constraint
        && !matches!(
            args.strategy,
            Some((StrategyKind::UniqueConstraint, _)) | None
        )
    {
        errors.error(
            *span,
            "`constraint` only applies to `strategy = \"unique_constraint\"`; remove it",
        );
    }
}

fn validate_state_machine(args: &Args, attribute_span: Span, errors: &mut Errors) {
    let Some((StrategyKind::StateMachine, strategy_span)) = args.strategy else {
        if args.strategy.is_some() {
            for (name, span) in &args.state_machine_spans {
                errors.error(
                    *span,
                    format!("`{name}` only applies to `strategy = \"state_machine\"`; remove it"),
                );
            }
        }
        return;
    };
    for (name, present, example) in [
        ("table", args.table.is_some(), "table = \"orders\""),
        ("column", args.column.is_some(), "column = \"status\""),
        ("from", args.from.is_some(), "from = \"pending\""),
        ("to", args.to.is_some(), "to = \"paid\""),
    ] {
        if !present && !args.present.iter().any(|p| p == name) {
            errors.error(
                attribute_span,
                format!("`state_machine` needs `{name}`; add `{example}` to #[idempotent(...)]"),
            );
        }
    }
    if let (Some((from, span)), Some((to, _))) = (&args.from, &args.to)
        && from.contains(to)
    {
        errors.error(
            *span,
            format!("`from` contains `{to}`, the state this step moves to; a transition must change the state: remove `{to}` from `from` (and list it in `done` if it means \"already done\")"),
        );
    }
    if let Some((early, span)) = &args.early {
        let taken: Vec<&String> = early
            .iter()
            .filter(|state| {
                args.to.as_ref().is_some_and(|(to, _)| to == *state)
                    || args
                        .from
                        .as_ref()
                        .is_some_and(|(from, _)| from.contains(state))
                    || args
                        .done
                        .as_ref()
                        .is_some_and(|(done, _)| done.contains(state))
            })
            .collect();
        if let Some(state) = taken.first() {
            errors.error(
                *span,
                format!("`early` lists `{state}`, which is also in `from`, `to` or `done`; a state has one meaning per step: `early` is for states before `from`"),
            );
        }
    }
    if let Some((StoreKind::Memory, _)) = args.store {
        errors.error(
            strategy_span,
            "`state_machine` moves a status column in a database table; the `memory` store has none: use `store = \"pg\"`, `\"mysql\"` or `\"sqlite\"`",
        );
    }
    for (span, name) in [(args.replay, "replay"), (args.fingerprint, "fingerprint")] {
        if let Some(span) = span {
            errors.error(
                span,
                format!("`{name}` needs a dedup record, and `state_machine` keeps none (the status is the record): remove it, or use `strategy = \"dedup_table\"`"),
            );
        }
    }
    if let Some(span) = args.ttl_span {
        errors.error(
            span,
            "`ttl` expires dedup records, and `state_machine` keeps none (the status is the record): remove it",
        );
    }
    if let Some(key) = &args.key {
        if key.fields.len() > 1 {
            errors.error(
                key.span,
                "`state_machine` finds the row by one key column: key on one field (and set `key_column` if its column is named differently)",
            );
        } else if args.key_column.is_none()
            && key
                .fields
                .first()
                .and_then(|f| f.segments.last())
                .is_some_and(|m| matches!(m, syn::Member::Unnamed(_)))
        {
            errors.error(
                key.span,
                "the key is a tuple field, which names no column: set `key_column = \"...\"`",
            );
        }
    }
}
