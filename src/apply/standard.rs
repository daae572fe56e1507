//! The standard three-way merge (the userscript's `api.standardMerge`; README.md, "Conflicts: compare-and-set, merge, dead-letter queue, deletes"): take what the source changed since `before` unless the
//! target changed it too; hand anything else to a fallback merger.

use super::canonical::equal;
use super::merge::{Conflict, MergeError, MergeFn, Merger, Resolution, Row};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::BTreeSet;
use std::sync::Arc;

/// The standard three-way merge. Conflicts it cannot reconcile go to `fallback` in one
/// call, with [`Conflict::unmerged`] set; without a fallback they fail the batch. A refused
/// delete (no `proposed`) always goes to the fallback, listing the properties the target changed
/// since `before`.
pub fn merge(fallback: Option<MergeFn>) -> MergeFn {
    MergeFn(Arc::new(Standard { fallback }))
}

pub(crate) struct Standard {
    pub fallback: Option<MergeFn>,
}

/// The outcome of merging one conflict by the rules alone.
#[derive(Debug, PartialEq)]
pub(crate) enum Merged {
    Apply(Row),
    /// A delete whose row is gone already: nothing to do.
    Nothing,
    /// Unreconcilable properties, sorted.
    Unmerged(Vec<String>),
}

/// Merges one conflict. A delete (no `proposed`) never merges: its unmerged properties are
/// those the target changed since `before`.
pub(crate) fn merge_one(c: &Conflict) -> Merged {
    let key: BTreeSet<&str> = c.meta.primary_key.iter().map(String::as_str).collect();
    let empty = Row::new();
    let before = c.before.as_ref().unwrap_or(&empty);
    let target = match &c.target {
        Some(t) if !t.is_empty() => t,
        // Nothing to merge with.
        _ => {
            return match &c.proposed {
                Some(p) => Merged::Apply(p.clone()),
                None => Merged::Nothing,
            }
        }
    };
    let Some(proposed) = &c.proposed else {
        let props: BTreeSet<&str> = target
            .keys()
            .chain(before.keys())
            .map(String::as_str)
            .filter(|p| !key.contains(p))
            .collect();
        let changed = props
            .into_iter()
            .filter(|p| !equal(target.get(*p), before.get(*p)))
            .map(String::from)
            .collect();
        return Merged::Unmerged(changed);
    };
    let props: BTreeSet<&str> = before
        .keys()
        .chain(proposed.keys())
        .chain(target.keys())
        .map(String::as_str)
        .filter(|p| !key.contains(p))
        .collect();
    let mut out = target.clone();
    let mut unmerged = Vec::new();
    for p in props {
        let (b, pr, t) = (before.get(p), proposed.get(p), target.get(p));
        if equal(b, pr) || equal(t, pr) {
            // Unchanged by the source, or already there.
            continue;
        }
        if t.is_none() || equal(t, b) {
            match pr {
                Some(v) => out.insert(p.to_string(), v.clone()),
                None => out.remove(p),
            };
        } else {
            unmerged.push(p.to_string());
        }
    }
    if unmerged.is_empty() {
        Merged::Apply(out)
    } else {
        Merged::Unmerged(unmerged)
    }
}

impl Merger for Standard {
    fn merge(
        &self,
        conflicts: Vec<Conflict>,
    ) -> BoxFuture<'static, Result<Vec<Resolution>, MergeError>> {
        let mut out: Vec<Option<Resolution>> = Vec::with_capacity(conflicts.len());
        let mut rest = Vec::new();
        let mut rest_at = Vec::new();
        for mut c in conflicts {
            match merge_one(&c) {
                Merged::Apply(row) => out.push(Some(Resolution::Apply(row))),
                Merged::Nothing => out.push(Some(Resolution::Drop)),
                Merged::Unmerged(columns) => {
                    if self.fallback.is_none() {
                        return futures::future::ready(Err(MergeError::Unmerged {
                            table: c.meta.table.to_string(),
                            time: c.meta.time,
                            columns,
                        }))
                        .boxed();
                    }
                    c.unmerged = columns;
                    rest_at.push(out.len());
                    out.push(None);
                    rest.push(c);
                }
            }
        }
        let Some(fallback) = self.fallback.clone().filter(|_| !rest.is_empty()) else {
            return futures::future::ready(Ok(out.into_iter().flatten().collect())).boxed();
        };
        async move {
            let asked = rest.len();
            let answers = fallback.0.merge(rest).await?;
            if answers.len() != asked {
                return Err(MergeError::Failed(format!(
                    "the fallback answered {} resolutions for {asked} conflicts",
                    answers.len()
                )));
            }
            for (at, r) in rest_at.into_iter().zip(answers) {
                out[at] = Some(r);
            }
            Ok(out.into_iter().flatten().collect())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::merge::ConflictMeta;
    use crate::hlc::Hlc;
    use crate::ident::{Schema, Table};
    use serde_json::json;
    use std::sync::{Arc, Mutex};

    fn row(v: serde_json::Value) -> Row {
        match v {
            serde_json::Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn conflict(
        before: Option<serde_json::Value>,
        proposed: Option<serde_json::Value>,
        target: Option<serde_json::Value>,
    ) -> Conflict {
        Conflict {
            before: before.map(row),
            proposed: proposed.map(row),
            target: target.map(row),
            meta: ConflictMeta {
                table: Table::new(Schema::new("db", "public"), "t"),
                time: Hlc::new(7, 0),
                primary_key: vec!["k".into()],
            },
            unmerged: vec![],
        }
    }

    #[test]
    fn source_changes_apply_where_the_target_kept_the_before_value() {
        let c = conflict(
            Some(json!({"k": 1, "a": 1, "b": "x", "c": true})),
            Some(json!({"k": 1, "a": 2, "b": "x", "c": true})),
            Some(json!({"k": 1, "a": "1", "b": "x", "c": false})),
        );
        assert_eq!(
            merge_one(&c),
            Merged::Apply(row(json!({"k": 1, "a": 2, "b": "x", "c": false})))
        );
    }

    #[test]
    fn values_already_in_the_target_are_not_conflicts() {
        let c = conflict(
            Some(json!({"k": 1, "a": 1})),
            Some(json!({"k": 1, "a": 5})),
            Some(json!({"k": 1, "a": "5"})),
        );
        assert_eq!(merge_one(&c), Merged::Apply(row(json!({"k": 1, "a": "5"}))));
    }

    #[test]
    fn both_sides_changing_a_property_is_unmerged_and_sorted() {
        let c = conflict(
            Some(json!({"k": 1, "z": 1, "a": 1, "m": 1})),
            Some(json!({"k": 1, "z": 2, "a": 2, "m": 1})),
            Some(json!({"k": 1, "z": 3, "a": 3, "m": 9})),
        );
        assert_eq!(
            merge_one(&c),
            Merged::Unmerged(vec!["a".into(), "z".into()])
        );
    }

    #[test]
    fn without_before_every_difference_is_unmerged() {
        let c = conflict(
            None,
            Some(json!({"k": 1, "a": 1, "b": 2, "n": null})),
            Some(json!({"k": 1, "a": 1, "b": 3, "n": null})),
        );
        assert_eq!(merge_one(&c), Merged::Unmerged(vec!["b".into()]));
        let c = conflict(
            None,
            Some(json!({"k": 1, "a": 1, "new": "x"})),
            Some(json!({"k": 1, "a": "1"})),
        );
        assert_eq!(
            merge_one(&c),
            Merged::Apply(row(json!({"k": 1, "a": "1", "new": "x"}))),
            "a property the target lacks is safe to take"
        );
    }

    #[test]
    fn absent_and_null_are_different_values() {
        // The source removed `x` (absent) while the target kept the before value: removed.
        let c = conflict(
            Some(json!({"k": 1, "x": 1})),
            Some(json!({"k": 1})),
            Some(json!({"k": 1, "x": 1})),
        );
        assert_eq!(merge_one(&c), Merged::Apply(row(json!({"k": 1}))));
        // The source set null where the target changed the value: a conflict.
        let c = conflict(
            Some(json!({"k": 1, "x": 1})),
            Some(json!({"k": 1, "x": null})),
            Some(json!({"k": 1, "x": 2})),
        );
        assert_eq!(merge_one(&c), Merged::Unmerged(vec!["x".into()]));
    }

    #[test]
    fn unmapped_properties_merge_like_columns() {
        let c = conflict(
            Some(json!({"k": 1, "extra": {"a": 1, "b": 2}})),
            Some(json!({"k": 1, "extra": {"a": 1, "b": 3}, "more": [1]})),
            Some(json!({"k": 1, "extra": {"b": 2, "a": "1"}})),
        );
        assert_eq!(
            merge_one(&c),
            Merged::Apply(row(json!({"k": 1, "extra": {"a": 1, "b": 3}, "more": [1]})))
        );
    }

    #[test]
    fn key_columns_are_never_merged() {
        let c = conflict(
            None,
            Some(json!({"k": 42, "v": 1})),
            Some(json!({"k": 84, "v": 1})),
        );
        assert_eq!(merge_one(&c), Merged::Apply(row(json!({"k": 84, "v": 1}))));
    }

    #[test]
    fn a_missing_target_takes_the_proposed_row() {
        let c = conflict(None, Some(json!({"k": 1, "v": 2})), None);
        assert_eq!(merge_one(&c), Merged::Apply(row(json!({"k": 1, "v": 2}))));
        let c = conflict(None, Some(json!({"k": 1, "v": 2})), Some(json!({})));
        assert_eq!(merge_one(&c), Merged::Apply(row(json!({"k": 1, "v": 2}))));
        let c = conflict(Some(json!({"k": 1, "v": 2})), None, None);
        assert_eq!(merge_one(&c), Merged::Nothing);
    }

    #[test]
    fn a_refused_delete_lists_what_changed_since_before() {
        let c = conflict(
            Some(json!({"k": 1, "v": "a", "ts": "2024-01-01T00:00:00Z", "same": 1})),
            None,
            Some(json!({"k": 1, "v": "b", "ts": "2024-01-01T01:00:00+01:00", "same": "1", "n": 1})),
        );
        assert_eq!(
            merge_one(&c),
            Merged::Unmerged(vec!["n".into(), "v".into()])
        );
    }

    /// Records what it is asked and answers DLQ for each.
    struct Recorder(Arc<Mutex<Vec<Conflict>>>);

    impl Merger for Recorder {
        fn merge(
            &self,
            conflicts: Vec<Conflict>,
        ) -> BoxFuture<'static, Result<Vec<Resolution>, MergeError>> {
            let n = conflicts.len();
            self.0.lock().unwrap().extend(conflicts);
            futures::future::ready(Ok(vec![Resolution::Dlq("kv".into()); n])).boxed()
        }
    }

    fn block<T>(f: BoxFuture<'static, T>) -> T {
        futures::executor::block_on(f)
    }

    #[test]
    fn the_fallback_gets_only_the_unmerged_conflicts_in_one_call() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let m = super::merge(Some(MergeFn(Arc::new(Recorder(seen.clone())))));
        let ok = conflict(
            Some(json!({"k": 1, "v": 1})),
            Some(json!({"k": 1, "v": 2})),
            Some(json!({"k": 1, "v": 1})),
        );
        let bad = conflict(
            Some(json!({"k": 2, "v": 1})),
            Some(json!({"k": 2, "v": 2})),
            Some(json!({"k": 2, "v": 3})),
        );
        let got = block(m.0.merge(vec![bad.clone(), ok, bad])).unwrap();
        assert_eq!(
            got,
            vec![
                Resolution::Dlq("kv".into()),
                Resolution::Apply(row(json!({"k": 1, "v": 2}))),
                Resolution::Dlq("kv".into()),
            ]
        );
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert!(seen.iter().all(|c| c.unmerged == ["v"]));
    }

    #[test]
    fn without_fallback_an_unmerged_conflict_is_an_error_without_values() {
        let m = super::merge(None);
        let bad = conflict(
            Some(json!({"k": 2, "secret": 1})),
            Some(json!({"k": 2, "secret": 2})),
            Some(json!({"k": 2, "secret": 3})),
        );
        let err = block(m.0.merge(vec![bad])).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"unmerged data conflict in db.public.t at 7.0000000000: columns ["secret"]"#
        );
    }
}
