//! The dead-letter queue, in the Go cdc-sink's table layout: one table per target schema receiving the
//! mutations a merge function sent there, written in the apply transaction.

use super::{sql, Applier, ApplyError, SchemaInfo};
use crate::ident::{Ident, Schema, Table};
use crate::metrics::{DLQ_MUTATIONS, LABEL_DLQ, LABEL_SCHEMA, LABEL_TABLE};
use crate::mutation::Mutation;
use crate::target::{self, Dialect};
use sqlx::PgConnection;
use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError};

/// A dead-letter table known to exist with the required columns.
#[derive(Debug)]
pub(crate) struct DlqTable {
    pub table: Table,
    insert_sql: String,
    /// Whether it has the optional [`sql::DLQ_SOURCE_TABLE`] column, which is then filled.
    source_table: bool,
    /// The schema load this was read from: a later load (a column added meanwhile) reads it
    /// again.
    from: Arc<SchemaInfo>,
}

/// The columns of `required` that `have` lacks, in the order of `required`.
pub(crate) fn missing_columns<'a>(have: &[Ident], required: &[&'a str]) -> Vec<&'a str> {
    required
        .iter()
        .filter(|r| !have.contains(&Ident::new(**r)))
        .copied()
        .collect()
}

impl Applier {
    /// The dead-letter table of `schema`: from cache, else looked up (reloading the schema
    /// once), else created when `--dlqAutoCreate` allows it.
    pub(crate) async fn dlq_table(
        &self,
        conn: &mut PgConnection,
        schema: &Schema,
    ) -> Result<Arc<DlqTable>, ApplyError> {
        let mut info = self.schemas().current(Some(&mut *conn), schema).await?;
        if let Some(t) = self
            .inner
            .dlqs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(schema)
            .filter(|t| Arc::ptr_eq(&t.from, &info))
        {
            return Ok(t.clone());
        }
        let wanted = Table::new(schema.clone(), self.inner.options.dlq_table_name.as_str());
        if info.table(&wanted).is_none() {
            // Perhaps created since the schema was loaded.
            info = self.schemas().load(Some(&mut *conn), schema).await?;
        }
        if info.table(&wanted).is_none() {
            let uuid = self.uuid_default(conn).await?;
            let ddl = sql::dlq_create(self.dialect(), &wanted, uuid);
            if !self.inner.options.dlq_auto_create {
                return Err(ApplyError::DlqMissing {
                    table: wanted.to_string(),
                    ddl,
                });
            }
            self.create_dlq(&wanted, &ddl).await?;
            info = self.schemas().refresh(schema).await?;
        }
        let Some(ts) = info.table(&wanted) else {
            return Err(ApplyError::UnknownTable(wanted.to_string()));
        };
        let have: Vec<Ident> = ts.columns.iter().map(|c| c.name.clone()).collect();
        let missing = missing_columns(&have, &sql::DLQ_COLUMNS);
        if !missing.is_empty() {
            return Err(ApplyError::DlqColumns {
                table: ts.table.to_string(),
                missing: missing.join(", "),
            });
        }
        let source_table = have.contains(&Ident::new(sql::DLQ_SOURCE_TABLE));
        let dlq = Arc::new(DlqTable {
            insert_sql: sql::dlq_insert(self.dialect(), &ts.table, source_table),
            table: ts.table.clone(),
            source_table,
            from: info.clone(),
        });
        self.inner
            .dlqs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(schema.clone(), dlq.clone());
        Ok(dlq)
    }

    /// Forgets the dead-letter table of `schema` (after a write to it failed).
    pub(crate) fn forget_dlq(&self, schema: &Schema) {
        self.inner
            .dlqs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(schema);
    }

    /// Whether `gen_random_uuid()` is built in: CockroachDB, PostgreSQL 13 and later.
    async fn uuid_default(&self, conn: &mut PgConnection) -> Result<bool, ApplyError> {
        if self.dialect() == Dialect::Cockroach {
            return Ok(true);
        }
        let version: i64 = sqlx::query_scalar("SELECT current_setting('server_version_num')::INT8")
            .fetch_one(conn)
            .await
            .map_err(|error| ApplyError::Write {
                table: self.inner.options.dlq_table_name.clone(),
                error,
            })?;
        Ok(version >= 130_000)
    }

    /// Creates the table on its own connection, committed at once, so a rolled-back batch
    /// does not undo it and CockroachDB does not mix the DDL into the apply transaction.
    /// Concurrent creators (other instances) are handled by [`target::run_ddl`].
    async fn create_dlq(&self, table: &Table, ddl: &str) -> Result<(), ApplyError> {
        target::run_ddl(&self.inner.target, &[ddl.to_string()])
            .await
            .map_err(|error| ApplyError::DlqCreate {
                table: table.to_string(),
                error,
            })?;
        tracing::info!(table = %table, "created the dead-letter queue table");
        Ok(())
    }

    /// Inserts `items` (dlq name, mutation) into the dead-letter table of `table`'s schema
    /// through `conn`; counts them per queue name and logs one line.
    pub(crate) async fn dead_letter(
        &self,
        conn: &mut PgConnection,
        table: &Table,
        items: &[(String, &Mutation)],
    ) -> Result<(), ApplyError> {
        if items.is_empty() {
            return Ok(());
        }
        let dlq = self.dlq_table(conn, &table.schema).await?;
        let mut names = Vec::with_capacity(items.len());
        let mut nanos = Vec::with_capacity(items.len());
        let mut logical = Vec::with_capacity(items.len());
        let mut after = Vec::with_capacity(items.len());
        let mut before = Vec::with_capacity(items.len());
        for (name, m) in items {
            names.push(name.as_str());
            nanos.push(m.time.nanos().to_string());
            logical.push(m.time.logical().to_string());
            after.push(m.after.as_deref().unwrap_or("null"));
            before.push(m.before.as_deref().unwrap_or("null"));
        }
        let mut insert = sqlx::query(&dlq.insert_sql)
            .bind(&names)
            .bind(&nanos)
            .bind(&logical)
            .bind(&after)
            .bind(&before);
        if dlq.source_table {
            insert = insert.bind(vec![table.name.canonical(); items.len()]);
        }
        let written = insert.execute(&mut *conn).await;
        if let Err(error) = written {
            self.forget_dlq(&table.schema);
            return Err(ApplyError::Write {
                table: dlq.table.to_string(),
                error,
            });
        }
        let mut per_name: BTreeMap<&str, u64> = BTreeMap::new();
        for (name, _) in items {
            *per_name.entry(name.as_str()).or_default() += 1;
        }
        for (name, n) in &per_name {
            metrics::counter!(
                DLQ_MUTATIONS,
                LABEL_SCHEMA => table.schema.to_string(),
                LABEL_TABLE => table.name.raw().to_string(),
                LABEL_DLQ => name.to_string()
            )
            .increment(*n);
        }
        tracing::info!(table = %table, dlq = %dlq.table, mutations = items.len(),
            queues = per_name.len(), "conflicting mutations written to the dead-letter queue");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_dlq_columns_are_listed_in_reference_order() {
        let have: Vec<Ident> = ["event", "DATA_AFTER", "dlq_name"]
            .into_iter()
            .map(Ident::new)
            .collect();
        assert_eq!(
            missing_columns(&have, &sql::DLQ_COLUMNS),
            ["source_nanos", "source_logical", "data_before"]
        );
    }
}
