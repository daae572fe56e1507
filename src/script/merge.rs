//! Merge functions backed by the script.

use super::Userscript;
use crate::apply::merge::{Conflict, MergeError, MergeFn, Merger, Resolution};
use futures::future::BoxFuture;

/// A table's `merge` function, or the fallback of its `standardMerge`.
pub(super) struct JsMerger {
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

/// `standardMerge(fallback)`: the native three-way merge, calling back into the script only
/// for what it cannot reconcile.
pub(super) fn standard(fallback: Option<MergeFn>) -> MergeFn {
    crate::apply::standard::merge(fallback)
}
