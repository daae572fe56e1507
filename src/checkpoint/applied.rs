//! Applied ranges: the time ranges of a schema that flushes applied beyond its committed
//! checkpoint.
//!
//! Flushes of one window commit out of order, and each deletes its staged rows when it commits,
//! while the checkpoint only moves over the contiguous prefix of completed flushes. A changefeed
//! redelivery of a row in a completed range that the checkpoint does not cover yet finds nothing
//! to conflict with and is staged again; if the window then fails (a poison row, the target
//! down, the lease lost, a crash), the next attempt would read that row and write an old version
//! over a newer one. So every flush that leaves the checkpoint behind records its range here, in
//! its own transaction, and a window skips staged rows inside recorded ranges. A range is
//! forgotten once the checkpoint covers it.

use super::{parse_decimal, CheckpointError};
use crate::hlc::Hlc;
use crate::ident::Schema;
use crate::stage::StagingSchema;
use crate::target::{Database, Dialect};
use sqlx::{PgConnection, Row};

/// The name of the table in the staging schema.
pub(crate) const TABLE: &str = "applied_ranges";

/// The `applied_ranges` table of a staging schema.
pub struct AppliedRanges {
    table: String,
}

/// Time ranges `(after, upto]` known to be applied, sorted and merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ranges(Vec<(Hlc, Hlc)>);

impl Ranges {
    pub(crate) fn new(mut ranges: Vec<(Hlc, Hlc)>) -> Ranges {
        ranges.retain(|(a, u)| a < u);
        ranges.sort();
        let mut merged: Vec<(Hlc, Hlc)> = Vec::with_capacity(ranges.len());
        for (a, u) in ranges {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(u),
                _ => merged.push((a, u)),
            }
        }
        Ranges(merged)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `t` lies inside one of the ranges.
    pub(crate) fn contains(&self, t: Hlc) -> bool {
        let i = self.0.partition_point(|(_, u)| *u < t);
        self.0.get(i).is_some_and(|(a, _)| *a < t)
    }
}

impl AppliedRanges {
    pub(crate) async fn open(
        db: &Database,
        staging: &StagingSchema,
    ) -> Result<AppliedRanges, CheckpointError> {
        let table = staging.object(TABLE);
        crate::target::run_ddl(db, &[ddl(db.dialect, &table)])
            .await
            .map_err(CheckpointError::Sql)?;
        Ok(AppliedRanges { table })
    }

    /// Records `(after, upto]` of `schema` as applied, inside the transaction that applied
    /// it (or, with separate staging, the one that retires it).
    pub(crate) async fn record(
        &self,
        conn: &mut PgConnection,
        schema: &Schema,
        after: Hlc,
        upto: Hlc,
    ) -> Result<(), CheckpointError> {
        sqlx::query(&record_sql(&self.table))
            .bind(schema.canonical())
            .bind(after.to_decimal())
            .bind(upto.to_decimal())
            .execute(&mut *conn)
            .await
            .map_err(CheckpointError::Sql)?;
        Ok(())
    }

    /// The recorded ranges of `schema` that end after `committed`.
    pub(crate) async fn load(
        &self,
        conn: &mut PgConnection,
        schema: &Schema,
        committed: Hlc,
    ) -> Result<Ranges, CheckpointError> {
        let rows = sqlx::query(&load_sql(&self.table))
            .bind(schema.canonical())
            .bind(committed.to_decimal())
            .fetch_all(&mut *conn)
            .await
            .map_err(CheckpointError::Sql)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let after: String = r.try_get(0).map_err(CheckpointError::Sql)?;
            let upto: String = r.try_get(1).map_err(CheckpointError::Sql)?;
            out.push((parse_decimal(&after)?, parse_decimal(&upto)?));
        }
        Ok(Ranges::new(out))
    }

    /// Forgets the ranges of `schema` that the checkpoint `upto` covers, inside the
    /// transaction that commits it.
    pub(crate) async fn forget(
        &self,
        conn: &mut PgConnection,
        schema: &Schema,
        upto: Hlc,
    ) -> Result<(), CheckpointError> {
        sqlx::query(&forget_sql(&self.table))
            .bind(schema.canonical())
            .bind(upto.to_decimal())
            .execute(&mut *conn)
            .await
            .map_err(CheckpointError::Sql)?;
        Ok(())
    }
}

fn ddl(dialect: Dialect, table: &str) -> String {
    let text = match dialect {
        Dialect::Postgres => "TEXT",
        Dialect::Cockroach => "STRING",
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (group_name {text} NOT NULL, after_hlc DECIMAL NOT NULL, \
upto_hlc DECIMAL NOT NULL, PRIMARY KEY (group_name, upto_hlc, after_hlc))"
    )
}

fn record_sql(table: &str) -> String {
    format!(
        "INSERT INTO {table} (group_name, after_hlc, upto_hlc) VALUES ($1, $2::DECIMAL, $3::DECIMAL) \
ON CONFLICT DO NOTHING"
    )
}

fn load_sql(table: &str) -> String {
    format!(
        "SELECT after_hlc::TEXT, upto_hlc::TEXT FROM {table} WHERE group_name = $1 AND upto_hlc > $2::DECIMAL"
    )
}

/// Deletes the ranges of a schema that end after a time: a checkpoint reset to it replays
/// them (`$1` group, `$2` time).
pub(super) fn reset_sql(table: &str) -> String {
    format!("DELETE FROM {table} WHERE group_name = $1 AND upto_hlc > $2::DECIMAL")
}

fn forget_sql(table: &str) -> String {
    format!("DELETE FROM {table} WHERE group_name = $1 AND upto_hlc <= $2::DECIMAL")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: i64) -> Hlc {
        Hlc::new(n, 0)
    }

    #[test]
    fn ranges_merge_and_contain_their_open_closed_interval() {
        let r = Ranges::new(vec![(h(5), h(7)), (h(1), h(3)), (h(3), h(4)), (h(9), h(9))]);
        assert_eq!(r, Ranges(vec![(h(1), h(4)), (h(5), h(7))]));
        for (t, inside) in [
            (0, false),
            (1, false),
            (2, true),
            (3, true),
            (4, true),
            (5, false),
            (6, true),
            (7, true),
            (8, false),
            (9, false),
        ] {
            assert_eq!(r.contains(h(t)), inside, "t = {t}");
        }
        assert!(!Ranges::default().contains(h(1)));
        assert!(Ranges::new(vec![(h(2), h(2))]).is_empty());
    }

    #[test]
    fn golden_applied_range_sql() {
        assert_eq!(
            ddl(Dialect::Postgres, "\"_cdc_sink\".\"applied_ranges\""),
            "CREATE TABLE IF NOT EXISTS \"_cdc_sink\".\"applied_ranges\" (group_name TEXT NOT NULL, after_hlc DECIMAL NOT NULL, upto_hlc DECIMAL NOT NULL, PRIMARY KEY (group_name, upto_hlc, after_hlc))"
        );
        assert_eq!(
            ddl(Dialect::Cockroach, "\"_cdc_sink\".\"public\".\"applied_ranges\""),
            "CREATE TABLE IF NOT EXISTS \"_cdc_sink\".\"public\".\"applied_ranges\" (group_name STRING NOT NULL, after_hlc DECIMAL NOT NULL, upto_hlc DECIMAL NOT NULL, PRIMARY KEY (group_name, upto_hlc, after_hlc))"
        );
        assert_eq!(
            record_sql("r"),
            "INSERT INTO r (group_name, after_hlc, upto_hlc) VALUES ($1, $2::DECIMAL, $3::DECIMAL) ON CONFLICT DO NOTHING"
        );
        assert_eq!(
            load_sql("r"),
            "SELECT after_hlc::TEXT, upto_hlc::TEXT FROM r WHERE group_name = $1 AND upto_hlc > $2::DECIMAL"
        );
        assert_eq!(
            forget_sql("r"),
            "DELETE FROM r WHERE group_name = $1 AND upto_hlc <= $2::DECIMAL"
        );
    }
}
