//! The unit of replicated change: one row version at one HLC time.

use crate::hlc::Hlc;
use crate::ident::Table;
use std::collections::BTreeMap;

/// One row change as the changefeed sent it. JSON texts are kept byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mutation {
    /// The `updated` time of the change.
    pub time: Hlc,
    /// Raw JSON array of primary-key values, the row identity.
    pub key: String,
    /// Raw JSON object of the new row; `None` for a deletion.
    pub after: Option<String>,
    /// Raw JSON object of the previous row (`diff` option); `None` when absent or `null`.
    pub before: Option<String>,
}

impl Mutation {
    pub fn is_delete(&self) -> bool {
        self.after.is_none()
    }
}

/// Mutations of one request grouped per target table, in arrival order within each table.
pub type TableBatches = BTreeMap<Table, Vec<Mutation>>;

/// Groups `(table, mutation)` pairs per table, keeping their order.
pub(crate) fn group_by_table(items: impl IntoIterator<Item = (Table, Mutation)>) -> TableBatches {
    let mut out = TableBatches::new();
    for (t, m) in items {
        out.entry(t).or_default().push(m);
    }
    out
}

/// Keeps, for each key, only the mutation with the greatest time (the later one in the slice on
/// a tie). Order of the survivors follows their first appearance.
pub(crate) fn last_version_per_key(muts: &[Mutation]) -> Vec<&Mutation> {
    let mut index: std::collections::HashMap<&str, usize> =
        std::collections::HashMap::with_capacity(muts.len());
    let mut out: Vec<&Mutation> = Vec::with_capacity(muts.len());
    for m in muts {
        match index.get(m.key.as_str()) {
            Some(&i) => {
                if m.time >= out[i].time {
                    out[i] = m;
                }
            }
            None => {
                index.insert(m.key.as_str(), out.len());
                out.push(m);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(t: i64, key: &str, v: &str) -> Mutation {
        Mutation {
            time: Hlc::new(t, 0),
            key: key.into(),
            after: Some(v.into()),
            before: None,
        }
    }

    #[test]
    fn last_version_wins_per_key() {
        let muts = [
            m(3, "[1]", "a"),
            m(1, "[2]", "b"),
            m(2, "[1]", "c"),
            m(5, "[2]", "d"),
        ];
        let kept = last_version_per_key(&muts);
        let vals: Vec<_> = kept.iter().map(|m| m.after.as_deref().unwrap()).collect();
        assert_eq!(vals, ["a", "d"]);
    }
}
