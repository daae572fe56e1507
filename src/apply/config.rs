//! Per-table apply options, set by the userscript's `configureTable` (§5.6).

use crate::ident::Ident;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Rows per statement when a table sets no `rowLimit`. Larger than the reference's 100: with
/// one array parameter per column the statement text does not grow with the row count, and the
/// database is the bottleneck (DESIGN §7).
pub const DEFAULT_ROW_LIMIT: usize = 1000;

/// Options for one target table. Plain data: the userscript layer converts its JS values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableConfig {
    /// Compare-and-set columns, in tuple order (conditional upserts; not applied yet).
    pub cas: Vec<Ident>,
    /// Discard upserts whose column is older than now minus the duration (not applied yet).
    pub deadlines: Vec<(Ident, Duration)>,
    /// Replacement SQL per column; `$0` stands for the incoming value cast to the column type.
    pub exprs: BTreeMap<Ident, String>,
    /// JSON column receiving the payload properties that match no column.
    pub extras: Option<Ident>,
    /// Payload properties to drop; a column of that name is never written.
    pub ignore: BTreeSet<Ident>,
    /// Maximum rows per statement.
    pub row_limit: Option<usize>,
    /// Resolves compare-and-set / deadline conflicts (requires `cas` or `deadlines`).
    pub merge: Option<super::merge::MergeFn>,
}

impl TableConfig {
    pub fn row_limit(&self) -> usize {
        self.row_limit.unwrap_or(DEFAULT_ROW_LIMIT).max(1)
    }
}
