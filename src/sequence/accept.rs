//! Which rows of a request are new: rows at or below the committed checkpoint were applied
//! already (redeliveries, or a second changefeed or an older cursor on the schema), and in
//! best-effort mode rows at or below the newest resolved timestamp are redeliveries too.

use crate::hlc::Hlc;
use crate::ident::Schema;
use crate::metrics as m;
use crate::mutation::{Mutation, TableBatches};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long ingest trusts this process's view of a committed checkpoint before reading it
/// again: the lease holder's view is always fresh, the others' would otherwise lag.
pub(super) const COMMITTED_MAX_AGE: Duration = Duration::from_secs(2);

/// At most one "dropped below the checkpoint" line per schema per this long.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

/// Per schema, rows dropped below the committed checkpoint since the last log line.
#[derive(Default)]
pub(super) struct DropLog {
    schemas: Mutex<HashMap<Schema, (Option<Instant>, u64)>>,
}

impl DropLog {
    /// Counts `rows` dropped for `schema` at `now`; returns the count to log when a line is
    /// due (the rows since the last line, these included).
    pub(super) fn note(&self, schema: &Schema, rows: u64, now: Instant) -> Option<u64> {
        let mut schemas = self.schemas.lock().expect("poisoned");
        let (last, pending) = schemas.entry(schema.clone()).or_default();
        *pending += rows;
        if last.is_some_and(|t| now.saturating_duration_since(t) < DROP_LOG_EVERY) {
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(pending))
    }
}

/// Counts `below` rows of `schema` dropped at or below the checkpoint `committed`, logging
/// at most one line per schema per period.
pub(super) fn dropped(log: &DropLog, schema: &Schema, below: u64, committed: Hlc) {
    if below == 0 {
        return;
    }
    metrics::counter!(m::STAGE_BELOW_CHECKPOINT, m::LABEL_SCHEMA => schema.to_string())
        .increment(below);
    if let Some(rows) = log.note(schema, below, Instant::now()) {
        tracing::warn!(schema = %schema, rows, checkpoint = %committed, "dropped rows at or below the committed checkpoint (redeliveries, or a second changefeed or an older cursor on this schema)");
    }
}

/// The mutations of `batches` later than `resolved`. A changefeed sends a resolved timestamp
/// only once everything at or before it was acknowledged, so a row at or below a recorded one is
/// a redelivery. Best-effort mode drops them: it writes straight to the target, where an old
/// version would overwrite a newer one that nothing staged could protect.
pub(super) fn after_resolved(batches: &TableBatches, resolved: Hlc) -> TableBatches {
    batches
        .iter()
        .map(|(t, muts)| {
            let later: Vec<Mutation> = muts.iter().filter(|m| m.time > resolved).cloned().collect();
            (t.clone(), later)
        })
        .filter(|(_, muts)| !muts.is_empty())
        .collect()
}

pub(super) fn count(batches: &TableBatches) -> usize {
    batches.values().map(Vec::len).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_log_writes_one_line_per_schema_per_period() {
        let log = DropLog::default();
        let a = Schema::parse("db.a").unwrap();
        let b = Schema::parse("db.b").unwrap();
        let t0 = Instant::now();
        assert_eq!(log.note(&a, 3, t0), Some(3));
        assert_eq!(log.note(&a, 2, t0 + Duration::from_secs(1)), None);
        assert_eq!(log.note(&b, 7, t0 + Duration::from_secs(2)), Some(7));
        assert_eq!(log.note(&a, 4, t0 + Duration::from_secs(9)), None);
        // The next line carries every row since the last one.
        assert_eq!(log.note(&a, 1, t0 + Duration::from_secs(10)), Some(7));
        assert_eq!(log.note(&a, 1, t0 + Duration::from_secs(11)), None);
    }
}
