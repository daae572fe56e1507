//! Payload properties → column parameter arrays: one plan per table shape and
//! configuration, turning a batch of mutations into statement-sized chunks.

use super::canonical::normalise_timestamp;
use super::config::TableConfig;
use super::merge::Row;
use super::schema::TableSchema;
use super::sql::{self, ColumnSql, Conditions, Param};
use super::value::{base_type, to_param, Kind};
use super::{ApplyError, ApplyStats};
use crate::hlc::Hlc;
use crate::ident::Ident;
use crate::mutation::{last_version_per_key, Mutation};
use crate::target::Dialect;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// What becomes of a payload property, by lower-cased name.
#[derive(Clone, Copy, Debug)]
enum Prop {
    /// Fills the upsert slot with this index.
    Slot(usize),
    /// Generated or ignored: silently dropped.
    Drop,
}

/// One written column of an upsert.
#[derive(Debug)]
struct Slot {
    name: Ident,
    kind: Kind,
    /// Index of the value parameter.
    value: Option<usize>,
    /// Index of the presence-flag parameter (columns with a DEFAULT).
    flag: Option<usize>,
    /// PK columns must be present in every upsert.
    required: bool,
    /// `TIMESTAMPTZ`: read back in the session's zone, reported in UTC.
    zoned: bool,
}

/// One PK column of a delete.
#[derive(Debug)]
struct KeySlot {
    kind: Kind,
    value: Option<usize>,
}

/// One statement's worth of parameter arrays, in parameter order.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub arrays: Vec<Array>,
    pub rows: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Array {
    Text(Vec<Option<String>>),
    Bool(Vec<bool>),
}

/// A whole `apply` call, converted and validated before anything is written.
#[derive(Debug)]
pub(crate) struct Batch {
    pub deletes: Vec<Chunk>,
    /// Deletes checked against the CAS columns of their `before` image.
    pub guarded: Vec<Chunk>,
    pub upserts: Vec<Chunk>,
    pub stats: ApplyStats,
    /// Times of the surviving mutations, for the age metric.
    pub times: Vec<Hlc>,
    /// Offset in the input of each row of `guarded` and of `upserts`, in chunk order.
    pub guarded_rows: Vec<usize>,
    pub upsert_rows: Vec<usize>,
}

/// The statements and mappings of a table with compare-and-set columns or deadlines.
#[derive(Debug)]
pub(crate) struct Conditional {
    /// Writes the winners; returns the 1-based positions of the losers.
    pub upsert_sql: String,
    /// Reads the current rows of losers by their written key columns, locking them.
    pub read_sql: String,
    read_params: Vec<Param>,
    /// Per read parameter: the upsert slot and the delete key position it comes from.
    read_keys: Vec<(usize, usize)>,
    /// CAS-guarded deletes (only with CAS columns).
    pub guard_sql: Option<String>,
    guard_params: Vec<Param>,
    /// Per CAS column taking a parameter: its lower-cased name and kind.
    guard_cas: Vec<(String, Kind)>,
}

/// The SQL and column mapping of one table under one configuration.
#[derive(Debug)]
pub(crate) struct Plan {
    pub schema: Arc<TableSchema>,
    pub config: Arc<TableConfig>,
    pub upsert_sql: String,
    pub delete_sql: String,
    pub conditional: Option<Conditional>,
    upsert_params: Vec<Param>,
    delete_params: Vec<Param>,
    props: HashMap<String, Prop>,
    slots: Vec<Slot>,
    keys: Vec<KeySlot>,
    extras: Option<usize>,
    row_limit: usize,
}

fn missing(what: &str, name: &Ident, schema: &TableSchema) -> ApplyError {
    ApplyError::Config(format!(
        "{what} column name {name} not found in table {}",
        schema.table
    ))
}

impl Plan {
    pub(crate) fn new(
        dialect: Dialect,
        schema: Arc<TableSchema>,
        config: Arc<TableConfig>,
    ) -> Result<Plan, ApplyError> {
        for c in &config.cas {
            schema.column(c).ok_or_else(|| missing("cas", c, &schema))?;
        }
        for (c, _) in &config.deadlines {
            schema
                .column(c)
                .ok_or_else(|| missing("deadline", c, &schema))?;
        }
        for c in config.exprs.keys() {
            schema
                .column(c)
                .ok_or_else(|| missing("expression", c, &schema))?;
        }
        if let Some(c) = &config.extras {
            schema
                .column(c)
                .ok_or_else(|| missing("extras", c, &schema))?;
        }
        let conditional = !config.cas.is_empty() || !config.deadlines.is_empty();
        if config.merge.is_some() && !conditional {
            return Err(ApplyError::Config(format!(
                "a merge function is defined for {}, but no CAS or Deadline columns are defined to trigger it",
                schema.table
            )));
        }

        let mut props = HashMap::new();
        let mut slots = Vec::new();
        let mut cols = Vec::new();
        let mut upsert_params = Vec::new();
        let mut extras = None;
        for c in &schema.columns {
            if c.ignored || config.ignore.contains(&c.name) {
                props.insert(c.name.canonical(), Prop::Drop);
                continue;
            }
            let expr = config.exprs.get(&c.name).cloned();
            let value = expr.as_ref().is_none_or(|e| e.contains("$0")).then(|| {
                upsert_params.push(Param::Text);
                upsert_params.len() - 1
            });
            let flag = match (&c.default, c.primary) {
                (Some(_), false) => {
                    upsert_params.push(Param::Bool);
                    Some(upsert_params.len() - 1)
                }
                _ => None,
            };
            let index = slots.len();
            if config.extras.as_ref() == Some(&c.name) {
                extras = Some(index);
            } else {
                props.insert(c.name.canonical(), Prop::Slot(index));
            }
            slots.push(Slot {
                name: c.name.clone(),
                kind: Kind::of(&c.data_type),
                value,
                flag,
                required: c.primary,
                zoned: base_type(&c.data_type) == "TIMESTAMPTZ",
            });
            cols.push(ColumnSql {
                name: c.name.clone(),
                data_type: c.data_type.clone(),
                expr,
                value: value.map(|p| p + 1),
                default: flag.zip(c.default.clone()).map(|(p, d)| (p + 1, d)),
            });
        }
        for name in &config.ignore {
            props.entry(name.canonical()).or_insert(Prop::Drop);
        }

        let mut keys = Vec::new();
        let mut key_cols = Vec::new();
        let mut delete_params = Vec::new();
        for c in schema.primary_key() {
            let expr = config.exprs.get(&c.name).cloned();
            let value = expr.as_ref().is_none_or(|e| e.contains("$0")).then(|| {
                delete_params.push(Param::Text);
                delete_params.len() - 1
            });
            keys.push(KeySlot {
                kind: Kind::of(&c.data_type),
                value,
            });
            key_cols.push(ColumnSql {
                name: c.name.clone(),
                data_type: c.data_type.clone(),
                expr,
                value: value.map(|p| p + 1),
                default: None,
            });
        }

        let pk: Vec<Ident> = schema.primary_key().map(|c| c.name.clone()).collect();
        let conditional = if conditional {
            Some(Conditional::new(
                dialect,
                &schema,
                &config,
                &pk,
                &cols,
                &upsert_params,
                &slots,
                &key_cols,
                &delete_params,
            )?)
        } else {
            None
        };
        Ok(Plan {
            upsert_sql: sql::upsert(dialect, &schema.table, &pk, &cols, &upsert_params),
            delete_sql: sql::delete(dialect, &schema.table, &key_cols, &delete_params),
            conditional,
            row_limit: config.row_limit(),
            schema,
            config,
            upsert_params,
            delete_params,
            props,
            slots,
            keys,
            extras,
        })
    }

    fn table(&self) -> String {
        self.schema.table.to_string()
    }

    /// De-duplicates (last version per key wins), validates and converts a batch.
    pub(crate) fn prepare(&self, muts: &[Mutation]) -> Result<Batch, ApplyError> {
        let mut latest = last_version_per_key(muts);
        if self.conditional.is_some() {
            // Conditional statements lock the rows they lose on; a stable order keeps two
            // writers of overlapping batches from deadlocking.
            latest.sort_by(|a, b| a.key.cmp(&b.key));
        }
        let offset = |m: &Mutation| {
            muts.iter()
                .position(|x| std::ptr::eq(x, m))
                .unwrap_or_default()
        };
        let guard = self.conditional.as_ref().filter(|c| c.guard_sql.is_some());
        let no_params: &[Param] = &[];
        let guard_params = guard.map_or(no_params, |g| g.guard_params.as_slice());
        let mut deletes = Builder::new(&self.delete_params, self.row_limit);
        let mut guarded = Builder::new(guard_params, self.row_limit);
        let mut upserts = Builder::new(&self.upsert_params, self.row_limit);
        let mut times = Vec::with_capacity(latest.len());
        let mut guarded_rows = Vec::new();
        let mut upsert_rows = Vec::new();
        let mut present: Vec<Option<&RawValue>> = Vec::with_capacity(self.slots.len());
        for m in latest {
            times.push(m.time);
            match (&m.after, guard, &m.before) {
                (None, Some(g), Some(before)) => {
                    self.delete_row(m, &mut guarded)?;
                    g.guard_values(before, &mut guarded)
                        .map_err(|e| e.at(self.table(), offset(m)))?;
                    guarded_rows.push(offset(m));
                }
                (None, _, _) => self.delete_row(m, &mut deletes)?,
                (Some(after), _, _) => {
                    self.upsert_row(after, &mut present, &mut upserts)
                        .map_err(|e| e.at(self.table(), offset(m)))?;
                    upsert_rows.push(offset(m));
                }
            }
        }
        let (deletes, d) = deletes.finish();
        let (guarded, g) = guarded.finish();
        let (upserts, u) = upserts.finish();
        Ok(Batch {
            deletes,
            guarded,
            upserts,
            stats: ApplyStats {
                upserts: u as u64,
                deletes: (d + g) as u64,
                ..ApplyStats::default()
            },
            times,
            guarded_rows,
            upsert_rows,
        })
    }

    /// Converts rows chosen by a merge function for an unconditional upsert.
    pub(crate) fn prepare_rows(&self, rows: &[Row]) -> Result<Vec<Chunk>, ApplyError> {
        let mut upserts = Builder::new(&self.upsert_params, self.row_limit);
        let mut present = Vec::with_capacity(self.slots.len());
        let texts: Vec<String> = rows
            .iter()
            .map(|r| serde_json::to_string(r).unwrap_or_default())
            .collect();
        for (i, text) in texts.iter().enumerate() {
            self.upsert_row(text, &mut present, &mut upserts)
                .map_err(|e| match e.at(self.table(), i) {
                    ApplyError::Drift { table, detail, .. } => {
                        ApplyError::MergedRow { table, detail }
                    }
                    ApplyError::Payload { table, detail } => {
                        ApplyError::MergedRow { table, detail }
                    }
                    other => other,
                })?;
        }
        Ok(upserts.finish().0)
    }

    /// Parses a delete's key, checking its length.
    fn key<'a>(&self, m: &'a Mutation) -> Result<Vec<&'a RawValue>, ApplyError> {
        let key: Vec<&RawValue> =
            serde_json::from_str(&m.key).map_err(|e| ApplyError::Payload {
                table: self.table(),
                detail: format!("invalid key: {}", json_error(&e)),
            })?;
        if key.len() != self.keys.len() {
            return Err(ApplyError::KeyLength {
                table: self.table(),
                received: key.len(),
                expected: self.keys.len(),
                key: m.key.clone(),
                time: m.time,
            });
        }
        Ok(key)
    }

    fn delete_row(&self, m: &Mutation, out: &mut Builder) -> Result<(), ApplyError> {
        let key = self.key(m)?;
        out.row();
        for (slot, v) in self.keys.iter().zip(key) {
            if let Some(p) = slot.value {
                let text = to_param(slot.kind, v).map_err(|e| ApplyError::Payload {
                    table: self.table(),
                    detail: format!("invalid key: {}", json_error(&e)),
                })?;
                out.text(p, text);
            }
        }
        Ok(())
    }

    /// The property of a payload object that fills `slot`, matched as the upsert matches it.
    fn slot_of(&self, name: &str) -> Option<Prop> {
        match self.props.get(name) {
            Some(p) => Some(*p),
            None => self.props.get(&name.to_lowercase()).copied(),
        }
    }

    /// The read parameters locating the target row of a mutation (an upsert's key columns
    /// from its payload, a delete's from its key).
    pub(crate) fn read_key(&self, m: &Mutation) -> Result<Vec<Option<String>>, ApplyError> {
        let Some(cond) = &self.conditional else {
            return Ok(Vec::new());
        };
        let invalid = |e: serde_json::Error| ApplyError::Payload {
            table: self.table(),
            detail: format!("invalid key: {}", json_error(&e)),
        };
        match &m.after {
            Some(after) => {
                let obj: HashMap<String, &RawValue> =
                    serde_json::from_str(after).map_err(invalid)?;
                let mut by_slot: HashMap<usize, &RawValue> = HashMap::new();
                for (k, v) in &obj {
                    if let Some(Prop::Slot(i)) = self.slot_of(k) {
                        by_slot.insert(i, v);
                    }
                }
                cond.read_keys
                    .iter()
                    .map(|(slot, _)| match by_slot.get(slot) {
                        Some(v) => to_param(self.slots[*slot].kind, v).map_err(invalid),
                        None => Ok(None),
                    })
                    .collect()
            }
            None => {
                let key = self.key(m)?;
                cond.read_keys
                    .iter()
                    .map(|(_, k)| to_param(self.keys[*k].kind, key[*k]).map_err(invalid))
                    .collect()
            }
        }
    }

    /// A payload or `before` image as a merge function sees it: property names spelled as the
    /// columns they fill, generated and ignored properties left out.
    pub(crate) fn image(&self, json: &str) -> Result<Row, ApplyError> {
        let obj: Row = serde_json::from_str(json).map_err(|e| ApplyError::Payload {
            table: self.table(),
            detail: format!("invalid row image: {}", json_error(&e)),
        })?;
        let mut out = Row::new();
        for (k, v) in obj {
            match self.slot_of(&k) {
                Some(Prop::Slot(i)) => {
                    out.insert(self.slots[i].name.raw().to_string(), v);
                }
                Some(Prop::Drop) => {}
                None => {
                    out.insert(k, v);
                }
            }
        }
        Ok(out)
    }

    /// The written primary-key columns, as images spell them.
    pub(crate) fn primary_key(&self) -> Vec<String> {
        self.slots
            .iter()
            .filter(|s| s.required)
            .map(|s| s.name.raw().to_string())
            .collect()
    }

    /// A target row read by [`Conditional::read_sql`] as a merge function sees it: JSON as the
    /// changefeed would send it, the extras column spread into its properties.
    pub(crate) fn target_image(&self, texts: Vec<Option<String>>) -> Result<Row, ApplyError> {
        let mut out = Row::new();
        for (i, (slot, text)) in self.slots.iter().zip(texts).enumerate() {
            let v: Value = match text {
                None => Value::Null,
                Some(t) => serde_json::from_str(&t).map_err(|e| ApplyError::Payload {
                    table: self.table(),
                    detail: format!("unreadable target value: {}", json_error(&e)),
                })?,
            };
            if Some(i) == self.extras {
                if let Value::Object(extra) = v {
                    out.extend(extra);
                }
                continue;
            }
            let v = match v {
                Value::String(s) if slot.zoned => {
                    Value::String(normalise_timestamp(&s).unwrap_or(s))
                }
                v => v,
            };
            out.insert(slot.name.raw().to_string(), v);
        }
        Ok(out)
    }

    fn upsert_row<'a>(
        &self,
        after: &'a str,
        present: &mut Vec<Option<&'a RawValue>>,
        out: &mut Builder,
    ) -> Result<(), RowError> {
        let obj: HashMap<String, &'a RawValue> =
            serde_json::from_str(after).map_err(|e| RowError::Json(json_error(&e)))?;
        present.clear();
        present.resize(self.slots.len(), None);
        let mut unmapped: BTreeMap<&str, &RawValue> = BTreeMap::new();
        for (k, v) in &obj {
            let prop = match self.props.get(k.as_str()) {
                Some(p) => Some(p),
                None => self.props.get(&k.to_lowercase()),
            };
            match prop {
                Some(Prop::Slot(i)) => present[*i] = Some(v),
                Some(Prop::Drop) => {}
                None => {
                    unmapped.insert(k, v);
                }
            }
        }
        if self.extras.is_none() && !unmapped.is_empty() {
            let names: Vec<&str> = unmapped.keys().copied().collect();
            return Err(RowError::Drift(format!(
                "unexpected columns: {}",
                names.join(", ")
            )));
        }
        let absent: Vec<&str> = self
            .slots
            .iter()
            .zip(present.iter())
            .filter(|(s, p)| s.required && p.is_none())
            .map(|(s, _)| s.name.raw())
            .collect();
        if !absent.is_empty() {
            return Err(RowError::Drift(format!(
                "missing PK columns: {}",
                absent.join(", ")
            )));
        }
        out.row();
        for (i, slot) in self.slots.iter().enumerate() {
            let (is_present, text) = if Some(i) == self.extras {
                if unmapped.is_empty() {
                    (false, None)
                } else {
                    let doc = serde_json::to_string(&unmapped)
                        .map_err(|e| RowError::Json(json_error(&e)))?;
                    (true, Some(doc))
                }
            } else {
                match present[i] {
                    Some(v) if slot.value.is_some() => (
                        true,
                        to_param(slot.kind, v).map_err(|e| RowError::Json(json_error(&e)))?,
                    ),
                    Some(_) => (true, None),
                    None => (false, None),
                }
            };
            if let Some(p) = slot.value {
                out.text(p, text);
            }
            if let Some(p) = slot.flag {
                out.flag(p, is_present);
            }
        }
        Ok(())
    }
}

impl Conditional {
    #[allow(clippy::too_many_arguments)]
    fn new(
        dialect: Dialect,
        schema: &TableSchema,
        config: &TableConfig,
        pk: &[Ident],
        cols: &[ColumnSql],
        upsert_params: &[Param],
        slots: &[Slot],
        key_cols: &[ColumnSql],
        delete_params: &[Param],
    ) -> Result<Conditional, ApplyError> {
        let mut deadlines = config.deadlines.clone();
        deadlines.sort_by(|a, b| a.0.cmp(&b.0));
        for (c, _) in &deadlines {
            if !slots.iter().any(|s| &s.name == c) {
                return Err(ApplyError::Config(format!(
                    "deadline column {c} of table {} is not written (generated or ignored)",
                    schema.table
                )));
            }
        }
        let cond = Conditions {
            cas: config.cas.clone(),
            deadlines,
        };
        let upsert_sql =
            sql::conditional_upsert(dialect, &schema.table, pk, cols, upsert_params, &cond);

        // The target row of a loser is found by its written key columns.
        let mut read_cols = Vec::new();
        let mut read_params = Vec::new();
        let mut read_keys = Vec::new();
        for (i, slot) in slots.iter().enumerate().filter(|(_, s)| s.required) {
            let mut c = cols[i].clone();
            c.default = None;
            if slot.value.is_some() {
                read_params.push(Param::Text);
                c.value = Some(read_params.len());
                let k = schema
                    .primary_key()
                    .position(|p| p.name == slot.name)
                    .unwrap_or_default();
                read_keys.push((i, k));
            }
            read_cols.push(c);
        }
        let names: Vec<Ident> = slots.iter().map(|s| s.name.clone()).collect();
        let read_sql = sql::read_locked(dialect, &schema.table, &read_cols, &read_params, &names);

        let (mut guard_sql, mut guard_params, mut guard_cas) = (None, Vec::new(), Vec::new());
        if !config.cas.is_empty() {
            guard_params = delete_params.to_vec();
            let mut cas_cols = Vec::new();
            for name in &config.cas {
                let column = schema.column(name).ok_or_else(|| {
                    ApplyError::Config(format!(
                        "cas column name {name} not found in table {}",
                        schema.table
                    ))
                })?;
                let expr = config.exprs.get(name).cloned();
                let value = expr.as_ref().is_none_or(|e| e.contains("$0")).then(|| {
                    guard_params.push(Param::Text);
                    guard_cas.push((column.name.canonical(), Kind::of(&column.data_type)));
                    guard_params.len()
                });
                cas_cols.push(ColumnSql {
                    name: column.name.clone(),
                    data_type: column.data_type.clone(),
                    expr,
                    value,
                    default: None,
                });
            }
            guard_sql = Some(sql::guarded_delete(
                dialect,
                &schema.table,
                key_cols,
                &cas_cols,
                &guard_params,
            ));
        }
        Ok(Conditional {
            upsert_sql,
            read_sql,
            read_params,
            read_keys,
            guard_sql,
            guard_params,
            guard_cas,
        })
    }

    pub(crate) fn read_params(&self) -> &[Param] {
        &self.read_params
    }

    /// Appends the CAS values of a delete's `before` image to the current guarded row; an
    /// absent property compares as NULL (so the delete is refused).
    fn guard_values(&self, before: &str, out: &mut Builder) -> Result<(), RowError> {
        let obj: HashMap<String, &RawValue> =
            serde_json::from_str(before).map_err(|e| RowError::Json(json_error(&e)))?;
        let first = out.params.len() - self.guard_cas.len();
        for (i, (name, kind)) in self.guard_cas.iter().enumerate() {
            let v = obj
                .iter()
                .find(|(k, _)| k.as_str() == name || k.to_lowercase() == *name)
                .map(|(_, v)| *v);
            let text = match v {
                Some(v) => to_param(*kind, v).map_err(|e| RowError::Json(json_error(&e)))?,
                None => None,
            };
            out.text(first + i, text);
        }
        Ok(())
    }
}

/// A JSON error without the value it stumbled on: serde's messages for data errors quote it
/// (`invalid type: string "…"`), and these texts reach logs and answers.
fn json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Data => "a value of the wrong shape",
        Category::Syntax => "malformed JSON",
        Category::Eof => "truncated JSON",
        Category::Io => "unreadable JSON",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

/// A row-level failure, placed in its table and offset by [`RowError::at`].
enum RowError {
    Json(String),
    Drift(String),
}

impl RowError {
    fn at(self, table: String, offset: usize) -> ApplyError {
        match self {
            RowError::Json(detail) => ApplyError::Payload {
                table,
                detail: format!("payload object offset {offset}: {detail}"),
            },
            RowError::Drift(detail) => ApplyError::Drift {
                table,
                offset,
                detail,
            },
        }
    }
}

/// Accumulates rows into chunks of at most `limit` rows.
struct Builder<'p> {
    params: &'p [Param],
    limit: usize,
    done: Vec<Chunk>,
    current: Option<Chunk>,
    total: usize,
}

impl<'p> Builder<'p> {
    fn new(params: &'p [Param], limit: usize) -> Self {
        Builder {
            params,
            limit,
            done: Vec::new(),
            current: None,
            total: 0,
        }
    }

    /// Starts a row, opening a new chunk when the current one is full.
    fn row(&mut self) {
        if self.current.as_ref().is_some_and(|c| c.rows >= self.limit) {
            self.done.extend(self.current.take());
        }
        let limit = self.limit;
        let params = self.params;
        let chunk = self.current.get_or_insert_with(|| Chunk {
            arrays: params
                .iter()
                .map(|p| match p {
                    Param::Text => Array::Text(Vec::with_capacity(limit.min(1024))),
                    Param::Bool => Array::Bool(Vec::with_capacity(limit.min(1024))),
                })
                .collect(),
            rows: 0,
        });
        chunk.rows += 1;
        self.total += 1;
    }

    fn text(&mut self, param: usize, v: Option<String>) {
        if let Some(Array::Text(a)) = self.current.as_mut().and_then(|c| c.arrays.get_mut(param)) {
            a.push(v);
        }
    }

    fn flag(&mut self, param: usize, v: bool) {
        if let Some(Array::Bool(a)) = self.current.as_mut().and_then(|c| c.arrays.get_mut(param)) {
            a.push(v);
        }
    }

    fn finish(mut self) -> (Vec<Chunk>, usize) {
        self.done.extend(self.current.take());
        (self.done, self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::schema::Column;
    use crate::ident::{Schema, Table};

    fn column(name: &str, primary: bool, ty: &str, default: Option<&str>, ignored: bool) -> Column {
        Column {
            name: Ident::new(name),
            primary,
            data_type: ty.into(),
            default: default.map(String::from),
            ignored,
        }
    }

    fn schema() -> Arc<TableSchema> {
        Arc::new(TableSchema {
            table: Table::new(Schema::new("db", "public"), "t"),
            columns: vec![
                column("pk0", true, "INT8", None, false),
                column("Pk1", true, "TEXT", None, false),
                column("d", false, "INT8", Some("42"), false),
                column("g", false, "INT8", None, true),
                column("v", false, "TEXT", None, false),
                column("x", false, "JSONB", None, false),
            ],
        })
    }

    fn plan(cfg: TableConfig) -> Result<Plan, ApplyError> {
        Plan::new(Dialect::Postgres, schema(), Arc::new(cfg))
    }

    fn up(t: i64, key: &str, after: &str) -> Mutation {
        Mutation {
            time: Hlc::new(t, 0),
            key: key.into(),
            after: Some(after.into()),
            before: None,
        }
    }

    fn del(t: i64, key: &str) -> Mutation {
        Mutation {
            time: Hlc::new(t, 0),
            key: key.into(),
            after: None,
            before: None,
        }
    }

    fn text(a: &Array) -> Vec<Option<&str>> {
        match a {
            Array::Text(v) => v.iter().map(|s| s.as_deref()).collect(),
            Array::Bool(_) => panic!("not text"),
        }
    }

    #[test]
    fn properties_match_columns_case_insensitively_and_absence_selects_the_default() {
        let p = plan(TableConfig::default()).unwrap();
        assert_eq!(
            p.upsert_sql,
            r#"INSERT INTO "public"."t" AS x ("pk0", "Pk1", "d", "v", "x") SELECT d.p1::INT8, d.p2::TEXT, CASE WHEN d.p4 THEN d.p3::INT8 ELSE 42 END, d.p5::TEXT, d.p6::JSONB FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BOOL[], $5::TEXT[], $6::TEXT[]) AS d(p1, p2, p3, p4, p5, p6) ON CONFLICT ("pk0", "Pk1") DO UPDATE SET "d" = excluded."d", "v" = excluded."v", "x" = excluded."x""#
        );
        let muts = [
            up(
                1,
                r#"[1,"a"]"#,
                r#"{"PK0":1,"pk1":"a","D":7,"v":"x","G":99,"x":{"b":[1,2e1]}}"#,
            ),
            up(1, r#"[2,"b"]"#, r#"{"pk0":2,"pk1":"b","d":null}"#),
            up(1, r#"[3,"c"]"#, r#"{"pk0":3,"pk1":"c"}"#),
        ];
        let b = p.prepare(&muts).unwrap();
        assert_eq!(b.upserts.len(), 1);
        let a = &b.upserts[0].arrays;
        assert_eq!(text(&a[0]), [Some("1"), Some("2"), Some("3")]);
        assert_eq!(text(&a[1]), [Some("a"), Some("b"), Some("c")]);
        assert_eq!(text(&a[2]), [Some("7"), None, None]);
        assert_eq!(a[3], Array::Bool(vec![true, true, false]));
        assert_eq!(text(&a[4]), [Some("x"), None, None]);
        assert_eq!(text(&a[5]), [Some(r#"{"b":[1,2e1]}"#), None, None]);
        assert_eq!(
            b.stats,
            ApplyStats {
                upserts: 3,
                ..ApplyStats::default()
            }
        );
    }

    #[test]
    fn unexpected_properties_are_schema_drift() {
        let p = plan(TableConfig::default()).unwrap();
        let muts = [
            up(1, "[1,\"a\"]", r#"{"pk0":1,"pk1":"a"}"#),
            up(1, "[2,\"a\"]", r#"{"pk0":2,"pk1":"a","zz":1,"Aa":2}"#),
        ];
        assert_eq!(
            p.prepare(&muts).unwrap_err().to_string(),
            "schema drift detected in db.public.t at payload object offset 1: unexpected columns: Aa, zz"
        );
    }

    #[test]
    fn missing_key_columns_are_schema_drift() {
        let p = plan(TableConfig::default()).unwrap();
        let muts = [up(1, "[1]", r#"{"pk0":1,"v":"x"}"#)];
        assert_eq!(
            p.prepare(&muts).unwrap_err().to_string(),
            "schema drift detected in db.public.t at payload object offset 0: missing PK columns: Pk1"
        );
        // An explicit null counts as present.
        assert!(p
            .prepare(&[up(1, "[1]", r#"{"pk0":1,"pk1":null}"#)])
            .is_ok());
    }

    #[test]
    fn delete_keys_must_cover_the_whole_key() {
        let p = plan(TableConfig::default()).unwrap();
        let err = p.prepare(&[del(5, "[1]")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "schema drift detected in db.public.t: inconsistent number of key columns: received 1 expect 2: key [1]@5.0000000000"
        );
        let b = p.prepare(&[del(5, r#"[1,"a"]"#)]).unwrap();
        assert_eq!(text(&b.deletes[0].arrays[0]), [Some("1")]);
        assert_eq!(text(&b.deletes[0].arrays[1]), [Some("a")]);
    }

    #[test]
    fn extras_collect_unmapped_properties_sorted() {
        let p = plan(TableConfig {
            extras: Some(Ident::new("X")),
            ..Default::default()
        })
        .unwrap();
        let muts = [
            up(
                1,
                "[1,\"a\"]",
                r#"{"pk0":1,"pk1":"a","heretofore":"unseen","are":"OK","x":5}"#,
            ),
            up(1, "[2,\"a\"]", r#"{"pk0":2,"pk1":"a"}"#),
        ];
        let b = p.prepare(&muts).unwrap();
        assert_eq!(
            text(&b.upserts[0].arrays[5]),
            [Some(r#"{"are":"OK","heretofore":"unseen","x":5}"#), None]
        );
    }

    #[test]
    fn ignored_properties_and_columns_are_dropped() {
        let p = plan(TableConfig {
            ignore: ["v", "nosuch"].into_iter().map(Ident::new).collect(),
            ..Default::default()
        })
        .unwrap();
        assert!(!p.upsert_sql.contains(r#""v""#), "{}", p.upsert_sql);
        let b = p
            .prepare(&[up(
                1,
                "[1,\"a\"]",
                r#"{"pk0":1,"pk1":"a","v":"x","NoSuch":1}"#,
            )])
            .unwrap();
        assert_eq!(b.upserts[0].arrays.len(), 5);
    }

    #[test]
    fn last_version_per_key_wins_and_deletes_come_first() {
        let p = plan(TableConfig {
            row_limit: Some(2),
            ..Default::default()
        })
        .unwrap();
        let muts = [
            up(3, "[1,\"a\"]", r#"{"pk0":1,"pk1":"a","v":"new"}"#),
            up(1, "[1,\"a\"]", r#"{"pk0":1,"pk1":"a","v":"old"}"#),
            up(1, "[2,\"a\"]", r#"{"pk0":2,"pk1":"a"}"#),
            del(2, "[2,\"a\"]"),
            up(1, "[3,\"a\"]", r#"{"pk0":3,"pk1":"a"}"#),
            up(1, "[4,\"a\"]", r#"{"pk0":4,"pk1":"a"}"#),
        ];
        let b = p.prepare(&muts).unwrap();
        assert_eq!(
            b.stats,
            ApplyStats {
                upserts: 3,
                deletes: 1,
                ..ApplyStats::default()
            }
        );
        assert_eq!(b.deletes.len(), 1);
        assert_eq!(b.upserts.iter().map(|c| c.rows).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(text(&b.upserts[0].arrays[4]), [Some("new"), None]);
    }

    #[test]
    fn expressions_without_placeholder_take_no_parameter() {
        let p = plan(TableConfig {
            exprs: [
                (Ident::new("v"), "'fixed'".to_string()),
                (Ident::new("pk0"), "2 * $0".to_string()),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        })
        .unwrap();
        assert!(
            p.upsert_sql.contains("(2 * (d.p1::INT8))::INT8"),
            "{}",
            p.upsert_sql
        );
        assert!(p.upsert_sql.contains("('fixed')::TEXT"), "{}", p.upsert_sql);
        assert_eq!(
            p.delete_sql,
            r#"DELETE FROM "public"."t" WHERE ("pk0", "Pk1") IN (SELECT (2 * (d.p1::INT8))::INT8, d.p2::TEXT FROM unnest($1::TEXT[], $2::TEXT[]) AS d(p1, p2))"#
        );
        let b = p
            .prepare(&[up(1, "[1,\"a\"]", r#"{"pk0":1,"pk1":"a","v":"x"}"#)])
            .unwrap();
        assert_eq!(b.upserts[0].arrays.len(), 5);
    }

    #[test]
    fn configured_columns_must_exist() {
        let err = plan(TableConfig {
            extras: Some(Ident::new("nope")),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "extras column name nope not found in table db.public.t"
        );
        let err = plan(TableConfig {
            cas: vec![Ident::new("nope")],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cas column name nope not found in table db.public.t"
        );
        let err = plan(TableConfig {
            deadlines: vec![(Ident::new("g"), std::time::Duration::from_secs(1))],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "deadline column g of table db.public.t is not written (generated or ignored)"
        );
    }

    #[test]
    fn a_merge_function_needs_cas_or_deadlines() {
        let err = plan(TableConfig {
            merge: Some(crate::apply::standard::merge(None)),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "a merge function is defined for db.public.t, but no CAS or Deadline columns are defined to trigger it"
        );
    }

    #[test]
    fn malformed_payloads_are_errors_not_panics() {
        let p = plan(TableConfig::default()).unwrap();
        for after in ["", "[1]", "{", r#"{"pk0":1,"pk1":"a","v":"\ud800"}"#, "42"] {
            let _ = p.prepare(&[up(1, "[1,\"a\"]", after)]);
        }
        assert!(p.prepare(&[del(1, "{}")]).is_err());
        assert!(p.prepare(&[del(1, "not json")]).is_err());
    }

    #[test]
    fn payload_errors_say_where_but_not_what_value() {
        let p = plan(TableConfig::default()).unwrap();
        for (key, after) in [
            (r#""secret-1""#, None),
            ("[1,\"a\"]", Some(r#"["secret-2"]"#)),
            ("[1,\"a\"]", Some(r#"{"pk0":1,"pk1":"a","v":"secret-3\u"}"#)),
        ] {
            let m = match after {
                Some(a) => up(1, key, a),
                None => del(1, key),
            };
            let e = p.prepare(&[m]).unwrap_err().to_string();
            assert!(e.contains("line 1 column"), "{e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn conditional_plans_route_deletes_with_before_through_the_guard_in_key_order() {
        let p = plan(TableConfig {
            cas: vec![Ident::new("D")],
            ..Default::default()
        })
        .unwrap();
        let cond = p.conditional.as_ref().expect("conditional");
        assert!(cond.guard_sql.is_some());
        let mut guarded = del(5, r#"[2,"b"]"#);
        guarded.before = Some(r#"{"pk0":2,"PK1":"b","d":4}"#.into());
        let mut no_cas = del(5, r#"[1,"a"]"#);
        no_cas.before = Some(r#"{"pk0":1,"pk1":"a"}"#.into());
        let muts = [
            up(1, r#"[9,"z"]"#, r#"{"pk0":9,"pk1":"z"}"#),
            guarded,
            del(5, r#"[3,"c"]"#),
            no_cas,
            up(1, r#"[8,"y"]"#, r#"{"pk0":8,"pk1":"y"}"#),
        ];
        let b = p.prepare(&muts).unwrap();
        assert_eq!(b.deletes.iter().map(|c| c.rows).sum::<usize>(), 1);
        // Key order: [1,"a"] before [2,"b"]; an absent CAS property compares as NULL.
        assert_eq!(b.guarded_rows, [3, 1]);
        let g = &b.guarded[0].arrays;
        assert_eq!(text(&g[0]), [Some("1"), Some("2")]);
        assert_eq!(text(&g[2]), [None, Some("4")]);
        assert_eq!(b.upsert_rows, [4, 0]);
        assert_eq!(b.stats.deletes, 3);
    }

    #[test]
    fn conflict_images_use_column_spellings_and_target_values_as_a_changefeed_sends_them() {
        let p = plan(TableConfig {
            extras: Some(Ident::new("x")),
            deadlines: vec![(Ident::new("d"), std::time::Duration::from_secs(1))],
            ..Default::default()
        })
        .unwrap();
        let img = p
            .image(r#"{"PK0":1,"pk1":"a","G":5,"V":"x","other":true}"#)
            .unwrap();
        assert_eq!(
            serde_json::to_string(&img).unwrap(),
            r#"{"Pk1":"a","other":true,"pk0":1,"v":"x"}"#
        );
        assert_eq!(p.primary_key(), ["pk0", "Pk1"]);
        let target = p
            .target_image(vec![
                Some("1".into()),
                Some(r#""a""#.into()),
                None,
                Some(r#""x""#.into()),
                Some(r#"{"other":false}"#.into()),
            ])
            .unwrap();
        assert_eq!(
            serde_json::to_string(&target).unwrap(),
            r#"{"Pk1":"a","d":null,"other":false,"pk0":1,"v":"x"}"#
        );
        let key = p
            .read_key(&up(1, "[1]", r#"{"PK0":7,"pk1":"q","v":"x"}"#))
            .unwrap();
        assert_eq!(key, [Some("7".to_string()), Some("q".to_string())]);
        let key = p.read_key(&del(1, r#"[7,"q"]"#)).unwrap();
        assert_eq!(key, [Some("7".to_string()), Some("q".to_string())]);
    }

    #[test]
    fn zoned_timestamps_read_back_in_utc() {
        let schema = Arc::new(TableSchema {
            table: Table::new(Schema::new("db", "public"), "t"),
            columns: vec![
                column("k", true, "INT8", None, false),
                column("ts", false, "TIMESTAMPTZ", None, false),
                column("local", false, "TIMESTAMP", None, false),
            ],
        });
        let cfg = TableConfig {
            cas: vec![Ident::new("ts")],
            ..Default::default()
        };
        let p = Plan::new(Dialect::Postgres, schema, Arc::new(cfg)).unwrap();
        let target = p
            .target_image(vec![
                Some("1".into()),
                Some(r#""2024-01-01T05:30:00.5+05:30""#.into()),
                Some(r#""2024-01-01T05:30:00.5""#.into()),
            ])
            .unwrap();
        assert_eq!(
            target.get("ts"),
            Some(&serde_json::json!("2024-01-01T00:00:00.5Z"))
        );
        assert_eq!(
            target.get("local"),
            Some(&serde_json::json!("2024-01-01T05:30:00.5"))
        );
    }
}
