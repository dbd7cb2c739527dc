//! The name of the table that holds the dedup records: [`RecordsTable`].

use std::fmt;
use std::str::FromStr;

#[cfg(any(feature = "pg", feature = "mysql", feature = "sqlite"))]
use sqlx::{AssertSqlSafe, SqlSafeStr as _, SqlStr};

/// The longest schema name accepted, in bytes: PostgreSQL's limit (MySQL allows 64).
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// The suffix of the expiry index's name: `<table>_expires_at_ms`.
const EXPIRY_INDEX_SUFFIX: &str = "_expires_at_ms";

/// The longest table name accepted, in bytes: 49, so that the expiry index's name,
/// `<table>_expires_at_ms`, fits in [`MAX_IDENTIFIER_BYTES`].
pub const MAX_TABLE_NAME_BYTES: usize = MAX_IDENTIFIER_BYTES - EXPIRY_INDEX_SUFFIX.len();

/// Which part of a records table's name an [`InvalidIdentifier`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IdentifierPart {
    /// The schema (PostgreSQL schema, MySQL database, SQLite attached database).
    Schema,
    /// The table's own name.
    Table,
}

impl fmt::Display for IdentifierPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Schema => "schema name",
            Self::Table => "table name",
        })
    }
}

/// A records table's name that idem refuses, with what was wrong. Accepted: ASCII letters,
/// digits and `_`, starting with a letter or `_`; at most [`MAX_TABLE_NAME_BYTES`] bytes for
/// the table and [`MAX_IDENTIFIER_BYTES`] for the schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidIdentifier {
    /// The part is empty (`""`, or `"billing."` in [`RecordsTable::parse`]).
    #[error(
        "the records table's {part} is empty; use ASCII letters, digits and `_`, starting with a letter or `_`, such as `idem_records`"
    )]
    Empty {
        /// Which part.
        part: IdentifierPart,
    },
    /// The part is longer than its limit.
    #[error(
        "the records table's {part} `{identifier}` is {len} bytes long; at most {max} are accepted{reason}",
        len = identifier.len(),
        reason = if *part == IdentifierPart::Table {
            " (so that its expiry index, `<table>_expires_at_ms`, fits the 63 bytes PostgreSQL allows)"
        } else {
            ""
        }
    )]
    TooLong {
        /// Which part.
        part: IdentifierPart,
        /// The part as given.
        identifier: String,
        /// The limit, in bytes.
        max: usize,
    },
    /// The part holds a character other than an ASCII letter, digit or `_`.
    #[error(
        "the records table's {part} `{identifier}` contains {character:?}; only ASCII letters, digits and `_` are accepted (idem quotes the name, so reserved words need no escaping)"
    )]
    Character {
        /// Which part.
        part: IdentifierPart,
        /// The part as given.
        identifier: String,
        /// The first character refused.
        character: char,
    },
    /// The part starts with a digit.
    #[error(
        "the records table's {part} `{identifier}` starts with a digit; start it with a letter or `_`"
    )]
    LeadingDigit {
        /// Which part.
        part: IdentifierPart,
        /// The part as given.
        identifier: String,
    },
    /// [`RecordsTable::parse`] found more than one `.`.
    #[error(
        "`{input}` has more than one `.`; write `table` or `schema.table`, such as `billing.idem_records`"
    )]
    TooManyParts {
        /// The text given.
        input: String,
    },
}

fn validate(part: IdentifierPart, identifier: &str) -> Result<Box<str>, InvalidIdentifier> {
    let max = match part {
        IdentifierPart::Schema => MAX_IDENTIFIER_BYTES,
        IdentifierPart::Table => MAX_TABLE_NAME_BYTES,
    };
    let Some(first) = identifier.chars().next() else {
        return Err(InvalidIdentifier::Empty { part });
    };
    if let Some(character) = identifier
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
    {
        return Err(InvalidIdentifier::Character {
            part,
            identifier: identifier.to_owned(),
            character,
        });
    }
    if first.is_ascii_digit() {
        return Err(InvalidIdentifier::LeadingDigit {
            part,
            identifier: identifier.to_owned(),
        });
    }
    if identifier.len() > max {
        return Err(InvalidIdentifier::TooLong {
            part,
            identifier: identifier.to_owned(),
            max,
        });
    }
    Ok(identifier.into())
}

/// The table that holds a SQL store's dedup records: a name, optionally in a schema.
///
/// By default the SQL stores keep their records in `idem_records`, in the connection's default
/// schema (PostgreSQL's `search_path`, MySQL's current database, SQLite's `main`). A service
/// that keeps idem's table elsewhere gives each store a `RecordsTable` with
/// `with_records_table` (for instance
/// [`PgStore::with_records_table`](crate::store::pg::PgStore::with_records_table)):
///
/// ```
/// use idem_runtime::store::RecordsTable;
///
/// # fn main() -> Result<(), idem_runtime::store::InvalidIdentifier> {
/// let table = RecordsTable::new("dedup_records")?.in_schema("billing")?;
/// assert_eq!(table, RecordsTable::parse("billing.dedup_records")?);
/// assert_eq!(table.to_string(), "billing.dedup_records");
/// assert_eq!(table.expiry_index_name(), "dedup_records_expires_at_ms");
/// # Ok(()) }
/// ```
///
/// Each part is checked when the value is built (see [`InvalidIdentifier`] for what is
/// accepted) and quoted in every statement (double quotes on PostgreSQL and SQLite, backticks
/// on MySQL), so a reserved word is a valid name and the case is kept: on PostgreSQL,
/// `Dedup` and `dedup` are two tables, and your own queries must quote a name that is not
/// all lower case.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordsTable {
    schema: Option<Box<str>>,
    name: Box<str>,
}

impl RecordsTable {
    /// The default table's name.
    pub const DEFAULT_NAME: &'static str = "idem_records";

    /// The table `name`, in the connection's default schema.
    ///
    /// # Errors
    ///
    /// [`InvalidIdentifier`] when `name` is empty, longer than [`MAX_TABLE_NAME_BYTES`], holds
    /// anything but ASCII letters, digits and `_`, or starts with a digit.
    pub fn new(name: &str) -> Result<Self, InvalidIdentifier> {
        Ok(Self {
            schema: None,
            name: validate(IdentifierPart::Table, name)?,
        })
    }

    /// The same table, in `schema` (a PostgreSQL schema, a MySQL database, an attached SQLite
    /// database). The schema must exist: `migrate()` creates the table, not the schema.
    ///
    /// # Errors
    ///
    /// [`InvalidIdentifier`] when `schema` is empty, longer than [`MAX_IDENTIFIER_BYTES`],
    /// holds anything but ASCII letters, digits and `_`, or starts with a digit.
    pub fn in_schema(self, schema: &str) -> Result<Self, InvalidIdentifier> {
        Ok(Self {
            schema: Some(validate(IdentifierPart::Schema, schema)?),
            name: self.name,
        })
    }

    /// Reads `table` or `schema.table` (unquoted; each part as [`new`](Self::new) and
    /// [`in_schema`](Self::in_schema) accept it), for a name taken from configuration.
    ///
    /// ```
    /// use idem_runtime::store::{InvalidIdentifier, RecordsTable};
    ///
    /// assert_eq!(RecordsTable::parse("idem_records"), Ok(RecordsTable::default()));
    /// assert!(matches!(
    ///     RecordsTable::parse("billing.idem records"),
    ///     Err(InvalidIdentifier::Character { character: ' ', .. })
    /// ));
    /// ```
    ///
    /// # Errors
    ///
    /// [`InvalidIdentifier`] for an invalid part, or more than one `.`.
    pub fn parse(qualified: &str) -> Result<Self, InvalidIdentifier> {
        match qualified.split_once('.') {
            None => Self::new(qualified),
            Some((_, name)) if name.contains('.') => Err(InvalidIdentifier::TooManyParts {
                input: qualified.to_owned(),
            }),
            Some((schema, name)) => Self::new(name)?.in_schema(schema),
        }
    }

    /// The table's name, unquoted.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The schema, unquoted; `None` for the connection's default.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The name of the index on `expires_at_ms` that `migrate()` creates next to the table:
    /// `<table>_expires_at_ms` (in the table's schema).
    pub fn expiry_index_name(&self) -> String {
        format!("{}{EXPIRY_INDEX_SUFFIX}", self.name)
    }

    /// Whether this is `idem_records` in the connection's default schema, the table whose
    /// statements are the shipped ones, unchanged.
    pub fn is_default(&self) -> bool {
        self.schema.is_none() && &*self.name == Self::DEFAULT_NAME
    }

    /// `statement`, written for the default table, for this one in `dialect`: every
    /// `idem_records` becomes the quoted (and schema-qualified) table, every
    /// `idem_records_expires_at_ms` the quoted index name. Comments, string literals and
    /// quoted identifiers are left alone. For the default table, `statement` itself.
    #[cfg(any(feature = "pg", feature = "mysql", feature = "sqlite"))]
    pub(crate) fn rewrite(&self, statement: &'static str, dialect: Dialect) -> SqlStr {
        if self.is_default() {
            SqlStr::from_static(statement)
        } else {
            let rewritten = std::sync::Arc::<str>::from(self.rewrite_text(statement, dialect));
            AssertSqlSafe(rewritten).into_sql_str()
        }
    }

    /// The text of [`rewrite`](Self::rewrite).
    pub(crate) fn rewrite_text(&self, statement: &str, dialect: Dialect) -> String {
        if self.is_default() {
            return statement.to_owned();
        }
        let quote = |identifier: &str| {
            let q = dialect.quote();
            format!("{q}{identifier}{q}")
        };
        let qualify = |identifier: &str| match &self.schema {
            Some(schema) => format!("{}.{}", quote(schema), quote(identifier)),
            None => quote(identifier),
        };
        let table = qualify(&self.name);
        // SQLite names the schema on the index and forbids it on the table after `ON`;
        // PostgreSQL forbids it on the index (which lives in its table's schema); MySQL's
        // index is declared inside `CREATE TABLE`.
        let (index, table_after_on) = match dialect {
            Dialect::Sqlite => (qualify(&self.expiry_index_name()), quote(&self.name)),
            Dialect::Postgres | Dialect::MySql => (quote(&self.expiry_index_name()), table.clone()),
        };
        let default_index = format!("{}{EXPIRY_INDEX_SUFFIX}", Self::DEFAULT_NAME);

        let mut out = String::with_capacity(statement.len() + 32);
        let mut previous_word = "";
        let mut rest = statement;
        while let Some(c) = rest.chars().next() {
            let token_len = if c.is_ascii_alphanumeric() || c == '_' {
                let len = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                let word = &rest[..len];
                if word == Self::DEFAULT_NAME {
                    if previous_word.eq_ignore_ascii_case("ON") {
                        out.push_str(&table_after_on);
                    } else {
                        out.push_str(&table);
                    }
                } else if word == default_index {
                    out.push_str(&index);
                } else {
                    out.push_str(word);
                }
                previous_word = word;
                rest = &rest[len..];
                continue;
            } else if rest.starts_with("--") {
                rest.find('\n').unwrap_or(rest.len())
            } else if rest.starts_with("/*") {
                rest.find("*/").map_or(rest.len(), |end| end + 2)
            } else if matches!(c, '\'' | '"' | '`') {
                // To the closing quote; a doubled quote inside reads as two literals, which
                // leaves the text as it was.
                rest[1..].find(c).map_or(rest.len(), |end| end + 2)
            } else {
                c.len_utf8()
            };
            out.push_str(&rest[..token_len]);
            rest = &rest[token_len..];
        }
        out
    }
}

impl Default for RecordsTable {
    /// `idem_records`, in the connection's default schema.
    fn default() -> Self {
        Self {
            schema: None,
            name: Self::DEFAULT_NAME.into(),
        }
    }
}

impl fmt::Display for RecordsTable {
    /// `schema.table` or `table`, unquoted (as [`RecordsTable::parse`] reads it).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(schema) = &self.schema {
            write!(f, "{schema}.")?;
        }
        f.write_str(&self.name)
    }
}

impl FromStr for RecordsTable {
    type Err = InvalidIdentifier;

    /// As [`RecordsTable::parse`].
    fn from_str(qualified: &str) -> Result<Self, Self::Err> {
        Self::parse(qualified)
    }
}

/// The SQL dialect a statement is rewritten for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Postgres,
    MySql,
    Sqlite,
}

impl Dialect {
    fn quote(self) -> char {
        match self {
            Self::MySql => '`',
            Self::Postgres | Self::Sqlite => '"',
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_letters_digits_and_underscores() {
        for name in [
            "idem_records",
            "_x",
            "Dedup2",
            "a",
            &"t".repeat(MAX_TABLE_NAME_BYTES),
        ] {
            let table = RecordsTable::new(name).expect(name);
            assert_eq!(table.name(), name);
            assert_eq!(table.schema(), None);
        }
        let table = RecordsTable::new("t")
            .and_then(|t| t.in_schema(&"s".repeat(MAX_IDENTIFIER_BYTES)))
            .expect("a 63-byte schema");
        assert_eq!(table.schema().map(str::len), Some(63));
    }

    #[test]
    fn refuses_each_kind_of_invalid_identifier_with_what_is_accepted() {
        type Expected = fn(&InvalidIdentifier) -> bool;
        let cases: [(&str, Expected, &str); 6] = [
            (
                "",
                |e| {
                    matches!(
                        e,
                        InvalidIdentifier::Empty {
                            part: IdentifierPart::Table
                        }
                    )
                },
                "use ASCII letters, digits and `_`",
            ),
            (
                "idem-records",
                |e| matches!(e, InvalidIdentifier::Character { character: '-', .. }),
                "only ASCII letters, digits and `_` are accepted",
            ),
            (
                "rëcords",
                |e| {
                    matches!(
                        e,
                        InvalidIdentifier::Character {
                            character: 'ë', ..
                        }
                    )
                },
                "contains 'ë'",
            ),
            (
                "x\"; DROP TABLE y; --",
                |e| matches!(e, InvalidIdentifier::Character { character: '"', .. }),
                "contains '\"'",
            ),
            (
                "1records",
                |e| matches!(e, InvalidIdentifier::LeadingDigit { .. }),
                "start it with a letter or `_`",
            ),
            (
                &"t".repeat(MAX_TABLE_NAME_BYTES + 1),
                |e| matches!(e, InvalidIdentifier::TooLong { max: 49, .. }),
                "is 50 bytes long; at most 49 are accepted (so that its expiry index",
            ),
        ];
        for (name, is_expected, says) in cases {
            let error = RecordsTable::new(name).expect_err(name);
            assert!(is_expected(&error), "{name:?}: {error:?}");
            assert!(error.to_string().contains(says), "{name:?}: {error}");
        }
    }

    #[test]
    fn refuses_invalid_schemas_and_qualified_names() {
        let long = "s".repeat(MAX_IDENTIFIER_BYTES + 1);
        let error = RecordsTable::default().in_schema(&long).unwrap_err();
        assert!(
            matches!(
                &error,
                InvalidIdentifier::TooLong {
                    part: IdentifierPart::Schema,
                    max: 63,
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(
            error
                .to_string()
                .starts_with("the records table's schema name"),
            "{error}"
        );
        assert_eq!(
            RecordsTable::parse("billing."),
            Err(InvalidIdentifier::Empty {
                part: IdentifierPart::Table
            })
        );
        assert_eq!(
            RecordsTable::parse(".idem_records"),
            Err(InvalidIdentifier::Empty {
                part: IdentifierPart::Schema
            })
        );
        let error = RecordsTable::parse("a.b.c").unwrap_err();
        assert_eq!(
            error,
            InvalidIdentifier::TooManyParts {
                input: "a.b.c".into()
            }
        );
        assert!(
            error
                .to_string()
                .contains("write `table` or `schema.table`"),
            "{error}"
        );
        assert!(matches!(
            "billing.\"x\"".parse::<RecordsTable>(),
            Err(InvalidIdentifier::Character { character: '"', .. })
        ));
    }

    #[test]
    fn parse_display_and_default_agree() {
        let table = RecordsTable::parse("billing.dedup").expect("valid");
        assert_eq!((table.schema(), table.name()), (Some("billing"), "dedup"));
        assert_eq!(table.to_string(), "billing.dedup");
        assert_eq!(table.to_string().parse::<RecordsTable>(), Ok(table.clone()));
        assert!(!table.is_default());
        assert!(RecordsTable::default().is_default());
        assert!(
            RecordsTable::new("idem_records")
                .expect("valid")
                .is_default()
        );
        assert!(
            !RecordsTable::default()
                .in_schema("public")
                .expect("valid")
                .is_default()
        );
    }

    #[test]
    fn the_default_table_keeps_the_statements_unchanged() {
        let sql = "SELECT fingerprint FROM idem_records WHERE scope = $1";
        let rewritten = RecordsTable::default().rewrite(sql, Dialect::Postgres);
        assert_eq!(rewritten.as_str(), sql);
    }

    #[test]
    fn a_custom_table_is_quoted_and_qualified_in_each_dialect() {
        let table = RecordsTable::parse("billing.Order").expect("valid");
        let create = "CREATE TABLE IF NOT EXISTS idem_records (x INT);\n\
            CREATE INDEX IF NOT EXISTS idem_records_expires_at_ms ON idem_records (expires_at_ms)";
        assert_eq!(
            table.rewrite_text(create, Dialect::Postgres),
            "CREATE TABLE IF NOT EXISTS \"billing\".\"Order\" (x INT);\n\
            CREATE INDEX IF NOT EXISTS \"Order_expires_at_ms\" ON \"billing\".\"Order\" (expires_at_ms)"
        );
        assert_eq!(
            table.rewrite_text(create, Dialect::Sqlite),
            "CREATE TABLE IF NOT EXISTS \"billing\".\"Order\" (x INT);\n\
            CREATE INDEX IF NOT EXISTS \"billing\".\"Order_expires_at_ms\" ON \"Order\" (expires_at_ms)"
        );
        assert_eq!(
            table.rewrite_text(
                "CREATE TABLE idem_records (KEY idem_records_expires_at_ms (expires_at_ms))",
                Dialect::MySql
            ),
            "CREATE TABLE `billing`.`Order` (KEY `Order_expires_at_ms` (expires_at_ms))"
        );
    }

    #[test]
    fn only_whole_identifiers_outside_comments_and_literals_are_rewritten() {
        let table = RecordsTable::new("dedup").expect("valid");
        let sql = "-- idem_records, in a comment\n\
            /* idem_records */ SELECT 'idem_records', \"idem_records\", idem_records_old, \
            my_idem_records, idem_records.scope FROM idem_records";
        assert_eq!(
            table.rewrite_text(sql, Dialect::Postgres),
            "-- idem_records, in a comment\n\
            /* idem_records */ SELECT 'idem_records', \"idem_records\", idem_records_old, \
            my_idem_records, \"dedup\".scope FROM \"dedup\""
        );
        // A name that contains the default one is rewritten once, not again.
        let table = RecordsTable::new("idem_records_v2").expect("valid");
        assert_eq!(
            table.rewrite_text(
                "ON idem_records (a); idem_records_expires_at_ms",
                Dialect::Postgres
            ),
            "ON \"idem_records_v2\" (a); \"idem_records_v2_expires_at_ms\""
        );
    }
}
