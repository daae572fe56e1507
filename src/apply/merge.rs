//! The conflict-resolution interface: what a merge function sees and may answer. Native
//! mergers (the standard three-way merge, [`super::standard::merge`]) and userscript mergers
//! both implement [`Merger`].

use crate::hlc::Hlc;
use crate::ident::Table;
use serde_json::{Map, Value};
use std::fmt;
use std::sync::Arc;

/// A row image: column (property) name to JSON value, numbers kept as exact decimal text.
pub type Row = Map<String, Value>;

/// One compare-and-set (or deadline) loser, as a merge function sees it. Property names in the
/// images are spelled as the target's columns (payload properties match them
/// case-insensitively); properties matching no column keep their name; generated and ignored
/// columns are left out. Values are JSON as the changefeed sends them: numbers as exact decimal
/// text, TIMESTAMPTZ in UTC, BYTEA as `\x` hex.
#[derive(Clone, Debug, PartialEq)]
pub struct Conflict {
    /// The incoming `before` image (changefeed `diff`), when present and not `null`.
    pub before: Option<Row>,
    /// The incoming row; `None` when the conflicting mutation is a delete.
    pub proposed: Option<Row>,
    /// The row currently in the target; `None` if it has no row for the key.
    pub target: Option<Row>,
    /// Where and when the mutation comes from.
    pub meta: ConflictMeta,
    /// Columns the standard merge could not reconcile (set when it calls its fallback).
    pub unmerged: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConflictMeta {
    pub table: Table,
    pub time: Hlc,
    /// The primary-key properties, as the row images spell them; never merged.
    pub primary_key: Vec<String>,
}

/// What to do with a conflict.
#[derive(Clone, Debug, PartialEq)]
pub enum Resolution {
    /// Write this row unconditionally, in the same transaction.
    Apply(Row),
    /// Record the original mutation in the dead-letter table under this `dlq_name`.
    Dlq(String),
    /// Discard the mutation.
    Drop,
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("unmerged data conflict in {table} at {time}: columns {columns:?}")]
    Unmerged {
        table: String,
        time: Hlc,
        columns: Vec<String>,
    },
    #[error("merge function failed: {0}")]
    Failed(String),
}

/// A merge function. Called off the async runtime's hot path with a batch of conflicts of one
/// table; answers one resolution per conflict, in order.
pub trait Merger: Send + Sync + 'static {
    fn merge(
        &self,
        conflicts: Vec<Conflict>,
    ) -> futures::future::BoxFuture<'static, Result<Vec<Resolution>, MergeError>>;
}

/// A shareable merger for [`super::TableConfig`]; equal when it is the same instance.
#[derive(Clone)]
pub struct MergeFn(pub Arc<dyn Merger>);

impl PartialEq for MergeFn {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for MergeFn {}

impl fmt::Debug for MergeFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MergeFn(..)")
    }
}
