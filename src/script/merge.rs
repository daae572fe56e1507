//! Merge functions backed by the script, and the standard three-way merge they fall back from.

use super::Userscript;
use crate::apply::merge::{Conflict, MergeError, MergeFn, Merger, Resolution, Row};
use futures::future::BoxFuture;
use serde_json::Value;
use std::sync::Arc;

/// A table's `merge` function, or the fallback of its `standardMerge`.
pub struct JsMerger {
    pub script: Userscript,
    pub fallback: bool,
}

impl Merger for JsMerger {
    fn merge(
        &self,
        conflicts: Vec<Conflict>,
    ) -> BoxFuture<'static, Result<Vec<Resolution>, MergeError>> {
        let script = self.script.clone();
        let fallback = self.fallback;
        Box::pin(async move {
            script
                .merge(fallback, conflicts)
                .await
                .map_err(|e| MergeError::Failed(e.to_string()))
        })
    }
}

/// `standardMerge(fallback)` as a [`MergeFn`].
pub fn standard(fallback: Option<MergeFn>) -> MergeFn {
    // TODO(lead): switch to `crate::apply::merge::standard` once the conflicts branch lands;
    // this stand-in exists only so this branch builds and tests on its own.
    MergeFn(Arc::new(StandIn { fallback }))
}

/// STAND-IN for the native standard merge of `src/apply/` (reference §6.4), without the
/// table's column list (PK and ignored columns are not excluded; their values are equal in a
/// conflict anyway) and with plain canonical equality (no timestamp normalisation).
struct StandIn {
    fallback: Option<MergeFn>,
}

/// Canonical equality: numbers compare by decimal text, also against strings; objects ignore
/// key order (the maps are sorted); arrays compare element-wise.
fn same(a: Option<&Value>, b: Option<&Value>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => same_value(a, b),
        _ => false,
    }
}

fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_str() == y.as_str(),
        (Value::Number(x), Value::String(y)) | (Value::String(y), Value::Number(x)) => {
            x.as_str() == y
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_value(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w)))
        }
        _ => a == b,
    }
}

/// The merged row, or the sorted names of the properties that conflict.
pub fn three_way(c: &Conflict) -> Result<Row, Vec<String>> {
    let proposed = c.proposed.clone().unwrap_or_default();
    let target = match &c.target {
        Some(t) if !t.is_empty() => t,
        _ => return Ok(proposed),
    };
    let empty = Row::new();
    let before = c.before.as_ref().unwrap_or(&empty);
    let mut names: Vec<&String> = before
        .keys()
        .chain(proposed.keys())
        .chain(target.keys())
        .collect();
    names.sort();
    names.dedup();
    let mut out = target.clone();
    let mut unmerged = Vec::new();
    for n in names {
        let (b, p, t) = (before.get(n), proposed.get(n), target.get(n));
        if same(b, p) || same(t, p) {
            continue;
        }
        if t.is_none() || same(t, b) {
            match p {
                Some(v) => {
                    out.insert(n.clone(), v.clone());
                }
                None => {
                    out.remove(n);
                }
            }
        } else {
            unmerged.push(n.clone());
        }
    }
    if unmerged.is_empty() {
        Ok(out)
    } else {
        Err(unmerged)
    }
}

impl Merger for StandIn {
    fn merge(
        &self,
        conflicts: Vec<Conflict>,
    ) -> BoxFuture<'static, Result<Vec<Resolution>, MergeError>> {
        let fallback = self.fallback.clone();
        Box::pin(async move {
            let mut out: Vec<Option<Resolution>> = Vec::with_capacity(conflicts.len());
            let mut pending = Vec::new();
            let mut slots = Vec::new();
            for c in conflicts {
                if c.proposed.is_none() {
                    return Err(MergeError::Failed("no proposed data".into()));
                }
                match three_way(&c) {
                    Ok(row) => out.push(Some(Resolution::Apply(row))),
                    Err(columns) if fallback.is_none() => {
                        return Err(MergeError::Unmerged {
                            table: c.meta.table.to_string(),
                            time: c.meta.time,
                            columns,
                        })
                    }
                    Err(columns) => {
                        slots.push(out.len());
                        out.push(None);
                        pending.push(Conflict {
                            unmerged: columns,
                            ..c
                        });
                    }
                }
            }
            if let (Some(f), false) = (&fallback, pending.is_empty()) {
                let n = pending.len();
                let answers = f.0.merge(pending).await?;
                if answers.len() != n {
                    return Err(MergeError::Failed(format!(
                        "the merge fallback answered {} of {n} conflicts",
                        answers.len()
                    )));
                }
                for (slot, r) in slots.into_iter().zip(answers) {
                    out[slot] = Some(r);
                }
            }
            Ok(out
                .into_iter()
                .map(|r| r.expect("every slot is filled"))
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::merge::ConflictMeta;
    use crate::hlc::Hlc;
    use crate::ident::{Schema, Table};

    fn row(j: &str) -> Row {
        serde_json::from_str(j).unwrap()
    }

    fn conflict(before: Option<&str>, proposed: &str, target: &str) -> Conflict {
        Conflict {
            before: before.map(row),
            proposed: Some(row(proposed)),
            target: Some(row(target)),
            meta: ConflictMeta {
                table: Table::new(Schema::new("kv", "public"), "kv"),
                time: Hlc::new(1, 0),
            },
            unmerged: vec![],
        }
    }

    #[test]
    fn three_way_takes_disjoint_changes_and_reports_conflicts() {
        let c = conflict(
            Some(r#"{"k":1,"a":"x","b":"y"}"#),
            r#"{"k":1,"a":"x2","b":"y"}"#,
            r#"{"k":1,"a":"x","b":"y2"}"#,
        );
        assert_eq!(three_way(&c).unwrap(), row(r#"{"k":1,"a":"x2","b":"y2"}"#));
        let c = conflict(
            Some(r#"{"k":1,"a":"x"}"#),
            r#"{"k":1,"a":"p"}"#,
            r#"{"k":1,"a":"t"}"#,
        );
        assert_eq!(three_way(&c).unwrap_err(), vec!["a".to_string()]);
        // Numbers equal their decimal text.
        let c = conflict(None, r#"{"k":1,"n":"5"}"#, r#"{"k":"1","n":5}"#);
        assert!(three_way(&c).is_ok());
    }
}
