//! The first phase: the attribute's tokens, argument by argument. Each written name is looked
//! up in [`ARGUMENTS`](crate::arguments::ARGUMENTS), its value read as the table's shape says
//! and checked on its own (a store's name, a duration, a SQL identifier). Every error is
//! collected, spanned on the offending token with the fix; what is valid is kept for
//! [`validate`](crate::config::validate).

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Ident, Lit, LitStr, Meta, Token};

use crate::arguments::{self, Argument, Name, unknown};
use crate::config::{KeyField, KeySpec, MESSAGE_ID, Mode, OnMissing, StoreKind, StrategyKind};
use crate::errors::Errors;

/// PostgreSQL truncates identifiers past 63 bytes; refuse them instead.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// Longest scope the runtime accepts (`idem_runtime::key::MAX_SCOPE_BYTES`).
const MAX_SCOPE_BYTES: usize = 200;

/// The arguments as written, each value valid on its own. A field is `None` when the argument
/// is absent or its value is wrong (the error is recorded).
#[derive(Default)]
pub(crate) struct Parsed {
    pub(crate) key: Option<KeySpec>,
    pub(crate) store: Option<(StoreKind, Span)>,
    pub(crate) strategy: Option<(StrategyKind, Span)>,
    pub(crate) scope: Option<LitStr>,
    pub(crate) ttl_millis: Option<u64>,
    pub(crate) constraint: Option<LitStr>,
    pub(crate) max_attempts: Option<u32>,
    pub(crate) replay: Option<Span>,
    pub(crate) fingerprint: Option<Span>,
    pub(crate) mode: Option<Mode>,
    pub(crate) krate: Option<syn::Path>,
    pub(crate) table: Option<String>,
    pub(crate) column: Option<String>,
    pub(crate) from: Option<(Vec<String>, Span)>,
    pub(crate) to: Option<String>,
    pub(crate) key_column: Option<String>,
    pub(crate) done: Option<Vec<String>>,
    pub(crate) early: Option<(Vec<String>, Span)>,
    pub(crate) on_missing: Option<OnMissing>,
    pub(crate) lease_millis: Option<u64>,
    pub(crate) fixed_lease: Option<Span>,
    pub(crate) spend_on_error: Option<Span>,
    pub(crate) batch: Option<Span>,
    /// Every argument written once, valid or not, in order.
    pub(crate) written: Vec<Written>,
    /// The arguments that misspelt names were most likely meant to be: not also reported
    /// missing.
    pub(crate) meant: Vec<Name>,
    /// The arguments did not parse; nothing more is said about them.
    pub(crate) unparsable: bool,
}

/// An argument as written.
pub(crate) struct Written {
    pub(crate) argument: &'static Argument,
    /// The whole `name = value`, where errors about the argument as a whole point.
    pub(crate) tokens: TokenStream,
    /// `false` for a flag written `= false`: written, but asking for nothing.
    pub(crate) effective: bool,
}

impl Parsed {
    /// Whether the argument was written (or misspelt), valid or not: an argument whose value
    /// is wrong is not also reported missing.
    pub(crate) fn has(&self, name: Name) -> bool {
        self.written.iter().any(|w| w.argument.id == name) || self.meant.contains(&name)
    }
}

/// Parses the attribute's token stream. Returns whatever was valid, with every error recorded.
pub(crate) fn parse(tokens: TokenStream, errors: &mut Errors) -> Parsed {
    let mut parsed = Parsed::default();
    let metas = match Punctuated::<Meta, Token![,]>::parse_terminated.parse2(tokens) {
        Ok(metas) => metas,
        Err(error) => {
            errors.push(syn::Error::new(
                error.span(),
                format!(
                    "{error}; arguments are `name = \"value\"` pairs or the flags {}, separated by commas",
                    arguments::flags()
                ),
            ));
            parsed.unparsable = true;
            return parsed;
        }
    };
    for meta in metas {
        let path = meta.path();
        // `crate` is a keyword, not an identifier: compare the path's text.
        let written_name = path.to_token_stream().to_string();
        let Some(argument) = arguments::named(&written_name) else {
            let names = arguments::names();
            errors.error(path.span(), unknown("argument", &written_name, &names));
            if let Some(meant) =
                arguments::closest(&written_name, &names).and_then(arguments::named)
            {
                parsed.meant.push(meant.id);
            }
            continue;
        };
        if parsed.written.iter().any(|w| w.argument.id == argument.id) {
            errors.error(
                path.span(),
                format!("duplicate argument `{}`; give it once", argument.name),
            );
            continue;
        }
        let effective = value(&mut parsed, argument, &meta, errors);
        parsed.written.push(Written {
            argument,
            tokens: meta.to_token_stream(),
            effective,
        });
    }
    parsed
}

/// Reads `argument`'s value into `parsed`. Returns `false` for a flag set to `false`.
fn value(parsed: &mut Parsed, argument: &Argument, meta: &Meta, errors: &mut Errors) -> bool {
    let lit = |errors: &mut Errors| string(meta, argument, errors);
    match argument.id {
        Name::Replay => return flag(meta, argument, errors, &mut parsed.replay),
        Name::Fingerprint => return flag(meta, argument, errors, &mut parsed.fingerprint),
        Name::FixedLease => return flag(meta, argument, errors, &mut parsed.fixed_lease),
        Name::SpendOnError => return flag(meta, argument, errors, &mut parsed.spend_on_error),
        Name::Batch => return flag(meta, argument, errors, &mut parsed.batch),
        Name::Lease => parsed.lease_millis = lit(errors).and_then(|lit| lease(&lit, errors)),
        Name::MaxAttempts => parsed.max_attempts = count(meta, argument, "deliveries", errors),
        Name::From => parsed.from = states(meta, argument, errors),
        Name::Done => parsed.done = states(meta, argument, errors).map(|(done, _)| done),
        Name::Early => parsed.early = states(meta, argument, errors),
        Name::Key => parsed.key = lit(errors).and_then(|lit| parse_key(&lit, errors)),
        Name::Store => parsed.store = choice(lit(errors), StoreKind::parse, errors),
        Name::Strategy => parsed.strategy = choice(lit(errors), StrategyKind::parse, errors),
        Name::Mode => parsed.mode = choice(lit(errors), Mode::parse, errors).map(|m| m.0),
        Name::OnMissing => {
            parsed.on_missing = choice(lit(errors), OnMissing::parse, errors).map(|m| m.0);
        }
        Name::Scope => parsed.scope = lit(errors).and_then(|lit| scope(lit, errors)),
        Name::Ttl => parsed.ttl_millis = lit(errors).and_then(|lit| ttl(&lit, errors)),
        Name::Constraint => {
            parsed.constraint = lit(errors).and_then(|lit| constraint(lit, errors));
        }
        Name::Table => {
            parsed.table = lit(errors).and_then(|lit| sql_identifier(&lit, true, errors))
        }
        Name::Column => {
            parsed.column = lit(errors).and_then(|lit| sql_identifier(&lit, false, errors));
        }
        Name::KeyColumn => {
            parsed.key_column = lit(errors).and_then(|lit| sql_identifier(&lit, false, errors));
        }
        Name::To => parsed.to = lit(errors).and_then(|lit| to(&lit, errors)),
        Name::Crate => parsed.krate = lit(errors).and_then(|lit| krate(&lit, errors)),
    }
    true
}

/// One of a fixed set of values, and where it was written.
fn choice<T>(
    lit: Option<LitStr>,
    parse: fn(&str) -> Result<T, String>,
    errors: &mut Errors,
) -> Option<(T, Span)> {
    let lit = lit?;
    match parse(&lit.value()) {
        Ok(value) => Some((value, lit.span())),
        Err(message) => {
            errors.error(lit.span(), message);
            None
        }
    }
}

fn scope(lit: LitStr, errors: &mut Errors) -> Option<LitStr> {
    let value = lit.value();
    if value.contains('\0') {
        errors.error(
            lit.span(),
            "`scope` contains a NUL character, which the dedup stores cannot hold; pick a short, stable name such as \"billing.order_paid\"",
        );
        None
    } else if value.is_empty() || value.len() > MAX_SCOPE_BYTES {
        errors.error(
            lit.span(),
            format!(
                "`scope` must be 1 to {MAX_SCOPE_BYTES} bytes; pick a short, stable name such as \"billing.order_paid\""
            ),
        );
        None
    } else {
        Some(lit)
    }
}

fn constraint(lit: LitStr, errors: &mut Errors) -> Option<LitStr> {
    let value = lit.value();
    let valid = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ',' | ' ' | '$'));
    if valid {
        Some(lit)
    } else {
        errors.error(
            lit.span(),
            "`constraint` must name a unique constraint or index, e.g. \"payments_order_id_key\" (letters, digits, `_`, `.`)",
        );
        None
    }
}

fn to(lit: &LitStr, errors: &mut Errors) -> Option<String> {
    let value = lit.value();
    if value.is_empty() {
        errors.error(
            lit.span(),
            "`to` is empty; name the state this step moves to, e.g. `to = \"paid\"`",
        );
        None
    } else {
        Some(value)
    }
}

fn krate(lit: &LitStr, errors: &mut Errors) -> Option<syn::Path> {
    let value = lit.value();
    match syn::parse_str::<syn::Path>(&value) {
        Ok(path) => Some(path),
        Err(_) => {
            errors.error(
                lit.span(),
                format!(
                    "`crate` must be a path to idem-runtime as your Cargo.toml renames it, e.g. \"idem\" or \"::my_idem\"; `{value}` is not a path"
                ),
            );
            None
        }
    }
}

/// `max_attempts = 5`: a positive integer literal (a string of one is accepted too).
fn count(meta: &Meta, argument: &Argument, unit: &str, errors: &mut Errors) -> Option<u32> {
    let hint = format!(
        "`{}` takes a positive whole number of {unit}: `{}`",
        argument.name, argument.example
    );
    let Meta::NameValue(nv) = meta else {
        errors.error(meta.span(), hint);
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
        Some(count) if count > 0 => Some(count),
        _ => {
            errors.error(nv.value.span(), hint);
            None
        }
    }
}

/// A flag: `target` is where it was written when it is set. Returns `false` when it is written
/// `= false`.
fn flag(meta: &Meta, argument: &Argument, errors: &mut Errors, target: &mut Option<Span>) -> bool {
    let name = argument.name;
    match meta {
        Meta::Path(path) => *target = Some(path.span()),
        Meta::NameValue(nv) => match &nv.value {
            Expr::Lit(ExprLit {
                lit: Lit::Bool(b), ..
            }) => {
                *target = b.value.then(|| nv.path.span());
                return b.value;
            }
            other => errors.error(
                other.span(),
                format!("`{name}` is a flag: write `{name}` or `{name} = true`"),
            ),
        },
        Meta::List(list) => errors.error(
            list.delimiter.span().join(),
            format!("`{name}` takes no list: write `{name}` or `{name} = true`"),
        ),
    }
    true
}

fn string(meta: &Meta, argument: &Argument, errors: &mut Errors) -> Option<LitStr> {
    let (name, hint) = (argument.name, argument.example);
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
fn states(meta: &Meta, argument: &Argument, errors: &mut Errors) -> Option<(Vec<String>, Span)> {
    let name = argument.name;
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
        if let Some(name) = text.strip_prefix('$') {
            if text != MESSAGE_ID {
                let hint = match crate::arguments::closest(text, &[MESSAGE_ID]) {
                    Some(best) => format!("did you mean `{best}`?"),
                    None => format!("the only one is `{MESSAGE_ID}`, the broker's message id"),
                };
                errors.error(
                    span,
                    format!(
                        "`${name}` in key `{value}` is not something the delivery carries; {hint}"
                    ),
                );
                return None;
            }
            if fields.iter().any(|f| f.message_id) {
                errors.error(
                    span,
                    format!("`{MESSAGE_ID}` appears twice in the key; list it once"),
                );
                return None;
            }
            fields.push(KeyField {
                text: text.to_owned(),
                segments: Vec::new(),
                message_id: true,
            });
            continue;
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
            message_id: false,
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

fn lease(lit: &LitStr, errors: &mut Errors) -> Option<u64> {
    let (value, span) = (lit.value(), lit.span());
    match humantime::parse_duration(&value) {
        Ok(duration) if duration.as_millis() == 0 => {
            errors.error(
                span,
                "`lease` must be longer than zero: it is how long a delivery holds the key before another may take it over, e.g. \"30s\"",
            );
            None
        }
        // At most a day: a lease is a crash's recovery time, and Redis expiries are i64 ms.
        Ok(duration) if duration.as_secs() > 86_400 => {
            errors.error(
                span,
                "`lease` is longer than a day: a consumer that dies mid-body would block the message that long; renewal keeps a slow body's lease alive, so a lease of seconds to minutes is enough",
            );
            None
        }
        Ok(duration) => u64::try_from(duration.as_millis()).ok(),
        Err(error) => {
            errors.error(
                span,
                format!(
                    "`lease = \"{value}\"` is not a duration ({error}); write a number and a unit, e.g. \"30s\", \"2m\" or \"500ms\""
                ),
            );
            None
        }
    }
}

fn ttl(lit: &LitStr, errors: &mut Errors) -> Option<u64> {
    let (value, span) = (lit.value(), lit.span());
    match humantime::parse_duration(&value) {
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
