//! The bookkeeping of concurrent flushes within one window, kept free of I/O so it can be
//! tested on its own: cutting a page into flushes, the per-key lock set, and the contiguous
//! prefix of completed flushes up to which the checkpoint may be committed.

use crate::hlc::Hlc;
use crate::mutation::Mutation;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// One flush's share of a page: rows with time in `(after, upto]`, whole timestamps only.
#[derive(Debug)]
pub(super) struct Slice {
    pub after: Hlc,
    pub upto: Hlc,
    /// `(table index, mutation)`, in time order.
    pub rows: Vec<(usize, Mutation)>,
}

/// Cuts the rows of a page (complete up to `cut`, all later than `after`) into slices of about
/// `flush_size` rows without ever splitting a source timestamp. The slices are contiguous and
/// the last one ends at `cut` (it may be empty: the checkpoint still moves to `cut`).
pub(super) fn slices(
    rows: Vec<(usize, Mutation)>,
    after: Hlc,
    cut: Hlc,
    flush_size: usize,
) -> Vec<Slice> {
    let mut groups: BTreeMap<Hlc, Vec<(usize, Mutation)>> = BTreeMap::new();
    for (t, mu) in rows {
        groups.entry(mu.time).or_default().push((t, mu));
    }
    let mut out = Vec::new();
    let mut from = after;
    let mut rows: Vec<(usize, Mutation)> = Vec::new();
    for (time, group) in groups {
        rows.extend(group);
        if rows.len() >= flush_size && time < cut {
            out.push(Slice {
                after: from,
                upto: time,
                rows: std::mem::take(&mut rows),
            });
            from = time;
        }
    }
    out.push(Slice {
        after: from,
        upto: cut,
        rows,
    });
    out
}

/// The lock identity of a row: its table and key, hashed. A collision only makes two flushes
/// wait for each other needlessly; it never lets them reorder.
pub(super) fn lock_key(table: usize, key: &str) -> u64 {
    let mut h = DefaultHasher::new();
    table.hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

/// The (table, key) pairs held by in-flight flushes.
#[derive(Debug, Default)]
pub(super) struct KeyLocks {
    held: HashMap<u64, u64>,
}

impl KeyLocks {
    /// No in-flight flush holds any of `keys`.
    pub(super) fn free(&self, keys: &[u64]) -> bool {
        keys.iter().all(|k| !self.held.contains_key(k))
    }

    /// Takes `keys` for flush `idx`; the caller checked [`KeyLocks::free`].
    pub(super) fn take(&mut self, idx: u64, keys: &[u64]) {
        for k in keys {
            let prev = self.held.insert(*k, idx);
            debug_assert!(prev.is_none(), "key taken twice");
        }
    }

    pub(super) fn release(&mut self, keys: &[u64]) {
        for k in keys {
            self.held.remove(k);
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// Which flushes of a window are done, and how far the checkpoint may go: to the end of the
/// longest run of completed flushes that starts at the committed checkpoint.
#[derive(Debug)]
pub(super) struct Progress {
    /// Flushes not yet folded into `prefix`: index → (upto, done).
    pending: BTreeMap<u64, (Hlc, bool)>,
    /// Everything at or before it is applied.
    prefix: Hlc,
    /// The checkpoint as last committed.
    committed: Hlc,
}

impl Progress {
    pub(super) fn new(committed: Hlc) -> Progress {
        Progress {
            pending: BTreeMap::new(),
            prefix: committed,
            committed,
        }
    }

    /// Registers flush `idx` (indexes increase in time order) ending at `upto`.
    pub(super) fn push(&mut self, idx: u64, upto: Hlc) {
        self.pending.insert(idx, (upto, false));
    }

    /// Marks flush `idx` done and extends the prefix over every done flush at its front.
    pub(super) fn done(&mut self, idx: u64) {
        if let Some(e) = self.pending.get_mut(&idx) {
            e.1 = true;
        }
        while let Some(e) = self.pending.first_entry() {
            if !e.get().1 {
                break;
            }
            self.prefix = e.remove().0;
        }
    }

    /// Some flush registered before `idx` has not finished.
    pub(super) fn pending_before(&self, idx: u64) -> bool {
        self.pending.range(..idx).any(|(_, (_, done))| !done)
    }

    /// Some registered flush has not finished.
    pub(super) fn any_pending(&self) -> bool {
        self.pending.values().any(|(_, done)| !done)
    }

    pub(super) fn prefix(&self) -> Hlc {
        self.prefix
    }

    pub(super) fn committed(&self) -> Hlc {
        self.committed
    }

    pub(super) fn set_committed(&mut self, at: Hlc) {
        self.committed = self.committed.max(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(t: i64, key: &str) -> (usize, Mutation) {
        (
            0,
            Mutation {
                time: Hlc::new(t, 0),
                key: key.into(),
                after: Some("{}".into()),
                before: None,
            },
        )
    }

    #[test]
    fn slices_keep_timestamps_whole_and_cover_the_page_contiguously() {
        // Three rows at t=2 make the first slice overshoot; nothing of t=2 leaks into the next.
        let rows = vec![
            row(1, "[1]"),
            row(2, "[2]"),
            row(2, "[3]"),
            row(2, "[4]"),
            row(3, "[5]"),
            row(4, "[6]"),
            row(5, "[7]"),
        ];
        let s = slices(rows, Hlc::new(0, 0), Hlc::new(9, 0), 2);
        let shape: Vec<(i64, i64, usize)> = s
            .iter()
            .map(|s| (s.after.nanos(), s.upto.nanos(), s.rows.len()))
            .collect();
        assert_eq!(shape, vec![(0, 2, 4), (2, 4, 2), (4, 9, 1)]);
        for sl in &s {
            assert!(sl
                .rows
                .iter()
                .all(|(_, m)| m.time > sl.after && m.time <= sl.upto));
        }
    }

    #[test]
    fn an_empty_page_is_one_empty_slice_to_the_cut() {
        let s = slices(Vec::new(), Hlc::new(3, 0), Hlc::new(7, 0), 10);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].after, s[0].upto), (Hlc::new(3, 0), Hlc::new(7, 0)));
        assert!(s[0].rows.is_empty());
    }

    #[test]
    fn rows_at_the_cut_stay_in_the_last_slice() {
        let rows = vec![row(1, "[1]"), row(2, "[2]")];
        let s = slices(rows, Hlc::new(0, 0), Hlc::new(2, 0), 1);
        let shape: Vec<(i64, i64, usize)> = s
            .iter()
            .map(|s| (s.after.nanos(), s.upto.nanos(), s.rows.len()))
            .collect();
        assert_eq!(shape, vec![(0, 1, 1), (1, 2, 1)]);
    }

    #[test]
    fn a_key_held_by_an_in_flight_flush_blocks_later_flushes_until_released() {
        let mut locks = KeyLocks::default();
        let a = [lock_key(0, "[1]"), lock_key(0, "[2]")];
        let b = [lock_key(0, "[3]")];
        let c = [lock_key(0, "[2]"), lock_key(0, "[4]")];
        assert_ne!(
            lock_key(0, "[1]"),
            lock_key(1, "[1]"),
            "tables are part of the key"
        );
        locks.take(0, &a);
        assert!(locks.free(&b));
        locks.take(1, &b);
        assert!(!locks.free(&c));
        locks.release(&a);
        assert!(locks.free(&c));
        locks.release(&b);
        assert!(locks.is_empty());
    }

    #[test]
    fn the_prefix_moves_only_over_contiguous_completed_flushes() {
        let t = |n| Hlc::new(n, 0);
        let mut p = Progress::new(t(0));
        for i in 0..4 {
            p.push(i, t(i as i64 + 1));
        }
        p.done(2);
        p.done(1);
        assert_eq!(p.prefix(), t(0), "flush 0 still runs");
        assert!(p.pending_before(3));
        assert!(!p.pending_before(0));
        p.done(0);
        assert_eq!(p.prefix(), t(3));
        assert!(!p.pending_before(3));
        assert!(p.any_pending());
        p.done(3);
        assert_eq!(p.prefix(), t(4));
        assert!(!p.any_pending());
        assert_eq!(p.committed(), t(0));
        p.set_committed(t(4));
        p.set_committed(t(2));
        assert_eq!(p.committed(), t(4), "the checkpoint never moves back");
    }
}
