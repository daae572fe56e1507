//! Immediate mode: each request is applied at once in one target transaction, and a resolved
//! timestamp is recorded and committed at once (nothing is staged).

use super::parts::{Parts, SequenceError};
use super::write::write_ordered;
use crate::hlc::Hlc;
use crate::ident::Schema;
use crate::mutation::TableBatches;

/// Applies one request in a single target transaction.
pub(super) async fn apply(
    parts: &Parts,
    schema: &Schema,
    batches: &TableBatches,
) -> Result<(), SequenceError> {
    let info = parts.applier.schemas().schema(schema).await?;
    let mut tx = parts.target.begin().await.map_err(SequenceError::Sql)?;
    write_ordered(
        &parts.applier,
        parts.script.as_ref(),
        &mut tx,
        &info,
        batches,
    )
    .await?;
    tx.commit().await.map_err(SequenceError::Sql)?;
    Ok(())
}

/// Records and commits a resolved timestamp.
pub(super) async fn resolved(parts: &Parts, schema: &Schema, ts: Hlc) -> Result<(), SequenceError> {
    parts.checkpoints.advance(schema, ts).await?;
    let mut tx = parts
        .stager
        .database()
        .begin()
        .await
        .map_err(SequenceError::Sql)?;
    parts.checkpoints.commit(&mut tx, schema, ts).await?;
    tx.commit().await.map_err(SequenceError::Sql)?;
    parts.checkpoints.committed(schema, ts);
    Ok(())
}
