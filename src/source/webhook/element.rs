//! One changefeed row (a webhook payload element or an ndjson line) → one mutation.

use super::json::{is_empty_array, kind, string_value, Kind, Object};
use super::{PrimaryKeys, WebhookError};
use crate::hlc::Hlc;
use crate::ident::{Ident, Schema, Table};
use crate::mutation::Mutation;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// How strictly an element's properties are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// Webhook table feed: every field CockroachDB can emit is accepted, anything else refused.
    Strict,
    /// ndjson table feed: unused properties are ignored, as in the reference.
    Lenient,
    /// CDC query (`envelope=wrapped`): only `after`, `before`, `updated` are read.
    Query,
}

/// The properties we use, with JSON `null` already folded into `None`.
#[derive(Default)]
pub(crate) struct Fields<'a> {
    after: Option<&'a RawValue>,
    before: Option<&'a RawValue>,
    key: Option<&'a RawValue>,
    topic: Option<Cow<'a, str>>,
    updated: Option<Cow<'a, str>>,
}

impl<'a> Fields<'a> {
    /// Reads a raw value that must be a JSON object.
    pub(crate) fn read(raw: &'a RawValue, dialect: Dialect) -> Result<Fields<'a>, WebhookError> {
        if kind(raw) != Kind::Object {
            return Err(WebhookError::ElementNotObject);
        }
        let obj = Object::parse(raw.get()).map_err(WebhookError::json)?;
        Fields::from_object(obj, dialect)
    }

    pub(crate) fn from_object(obj: Object<'a>, dialect: Dialect) -> Result<Self, WebhookError> {
        // Checked first so that a bare-envelope row gets the helpful message, whatever it holds.
        if dialect == Dialect::Query && obj.0.iter().any(|(k, _)| k == "__crdb__") {
            return Err(WebhookError::BareEnvelope);
        }
        let mut f = Fields::default();
        let mut seen = [false; 5];
        for (name, value) in obj.0 {
            let (slot, field): (usize, &'static str) = match (name.as_ref(), dialect) {
                ("after", _) => (0, "after"),
                ("before", _) => (1, "before"),
                ("key", Dialect::Strict | Dialect::Lenient) => (2, "key"),
                ("topic", Dialect::Strict) => (3, "topic"),
                ("updated", _) => (4, "updated"),
                // Emitted with the `mvcc_timestamp` option; nothing downstream needs it.
                ("mvcc_timestamp", Dialect::Strict) => continue,
                (_, Dialect::Lenient | Dialect::Query) => continue,
                (other, Dialect::Strict) => {
                    return Err(WebhookError::UnknownField(other.to_string()))
                }
            };
            if std::mem::replace(&mut seen[slot], true) {
                return Err(WebhookError::DuplicateField(field.to_string()));
            }
            match slot {
                0 => f.after = object_or_null(value, field)?,
                1 => f.before = object_or_null(value, field)?,
                2 => {
                    f.key = match kind(value) {
                        Kind::Null => None,
                        Kind::Array => Some(value),
                        _ => {
                            return Err(WebhookError::WrongType {
                                field,
                                expected: "a JSON array",
                            })
                        }
                    }
                }
                3 => f.topic = string_or_null(value, field)?,
                _ => f.updated = string_or_null(value, field)?,
            }
        }
        Ok(f)
    }

    /// The `updated` time; `missing` is the error for an absent or empty one.
    fn time(&self, missing: WebhookError) -> Result<Hlc, WebhookError> {
        let text = match &self.updated {
            Some(s) if !s.is_empty() => s,
            _ => return Err(missing),
        };
        let time: Hlc = text.parse().map_err(WebhookError::BadTime)?;
        if time.is_zero() {
            return Err(WebhookError::ZeroTime);
        }
        Ok(time)
    }

    fn into_mutation(self, time: Hlc, key: String) -> Mutation {
        Mutation {
            time,
            key,
            after: self.after.map(|v| v.get().to_string()),
            before: self.before.map(|v| v.get().to_string()),
        }
    }
}

fn object_or_null<'a>(
    v: &'a RawValue,
    field: &'static str,
) -> Result<Option<&'a RawValue>, WebhookError> {
    match kind(v) {
        Kind::Null => Ok(None),
        Kind::Object => Ok(Some(v)),
        _ => Err(WebhookError::WrongType {
            field,
            expected: "a JSON object or null",
        }),
    }
}

fn string_or_null<'a>(
    v: &'a RawValue,
    field: &'static str,
) -> Result<Option<Cow<'a, str>>, WebhookError> {
    let wrong = || WebhookError::WrongType {
        field,
        expected: "a string",
    };
    match kind(v) {
        Kind::Null => Ok(None),
        Kind::String => string_value(v).map(Some).map_err(|_| wrong()),
        _ => Err(wrong()),
    }
}

/// The row identity: a non-empty JSON array, kept byte for byte.
fn table_key(key: Option<&RawValue>) -> Result<String, WebhookError> {
    let key = key.ok_or(WebhookError::MissingKey)?;
    if is_empty_array(key) {
        return Err(WebhookError::EmptyKey);
    }
    Ok(key.get().to_string())
}

/// A webhook table-feed element: the table comes from its `topic`, re-rooted in `schema`.
pub(crate) fn webhook_table_row(
    schema: &Schema,
    f: Fields<'_>,
) -> Result<(Table, Mutation), WebhookError> {
    let time = f.time(WebhookError::MissingUpdated)?;
    let topic = f.topic.as_deref().unwrap_or("");
    if topic.is_empty() {
        return Err(WebhookError::EmptyTableName);
    }
    let table = Table::parse_in(schema, topic).map_err(WebhookError::TableName)?;
    let key = table_key(f.key)?;
    Ok((table, f.into_mutation(time, key)))
}

/// An ndjson table-feed line; a deletion without a key is dropped (`None`).
pub(crate) fn ndjson_table_row(f: Fields<'_>) -> Result<Option<Mutation>, WebhookError> {
    let time = f.time(WebhookError::MissingUpdated)?;
    let keyless = f.key.is_none_or(is_empty_array);
    if f.after.is_none() && keyless {
        return Ok(None);
    }
    let key = table_key(f.key)?;
    Ok(Some(f.into_mutation(time, key)))
}

/// The target of a CDC-query feed, whose rows carry no key: it is built from the table's
/// primary-key columns, looked up once per request.
pub(crate) struct QueryTarget<'p> {
    pub(crate) table: Table,
    pks: &'p dyn PrimaryKeys,
    columns: Option<Vec<Ident>>,
}

impl<'p> QueryTarget<'p> {
    pub(crate) fn new(table: Table, pks: &'p dyn PrimaryKeys) -> Self {
        QueryTarget {
            table,
            pks,
            columns: None,
        }
    }

    fn primary_key(&mut self) -> Result<&[Ident], WebhookError> {
        if self.columns.is_none() {
            let cols = self
                .pks
                .primary_key(&self.table)
                .ok_or_else(|| WebhookError::TableNotFound(self.table.clone()))?;
            if cols.is_empty() {
                return Err(WebhookError::NoPrimaryKey(self.table.clone()));
            }
            self.columns = Some(cols);
        }
        Ok(self.columns.as_deref().unwrap_or_default())
    }

    /// Upsert when `after` is set, delete when only `before` is, dropped when neither is.
    pub(crate) fn row(&mut self, f: Fields<'_>) -> Result<Option<Mutation>, WebhookError> {
        let time = f.time(WebhookError::QueryMissingUpdated)?;
        let Some(image) = f.after.or(f.before) else {
            return Ok(None);
        };
        let key = build_key(image, self.primary_key()?)?;
        Ok(Some(f.into_mutation(time, key)))
    }
}

/// `[v1,v2,…]` from the image's primary-key properties (case-insensitive names), each value's
/// JSON kept exactly but compacted.
fn build_key(image: &RawValue, columns: &[Ident]) -> Result<String, WebhookError> {
    let obj = Object::parse(image.get()).map_err(WebhookError::json)?;
    let mut key = String::with_capacity(2 + 8 * columns.len());
    key.push('[');
    for (i, col) in columns.iter().enumerate() {
        // An exact spelling wins over a case-insensitive match.
        let value = obj
            .0
            .iter()
            .find(|(k, _)| k == col.raw())
            .or_else(|| obj.0.iter().find(|(k, _)| Ident::new(k.as_ref()) == *col))
            .map(|(_, v)| *v)
            .ok_or_else(|| WebhookError::MissingPrimaryKey(col.raw().to_string()))?;
        if i > 0 {
            key.push(',');
        }
        super::json::push_compact(&mut key, value.get());
    }
    key.push(']');
    Ok(key)
}
