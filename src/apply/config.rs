//! Apply options: per table, asked of a [`TableConfigs`] (the userscript's `configureTable`,
//! README.md, "Userscripts"), and per process, set by flags ([`ApplyArgs`]).

use crate::ident::{Ident, Table};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Rows per statement when a table sets no `rowLimit`. Larger than the reference's 100: with
/// one array parameter per column the statement text does not grow with the row count, and the
/// database is the bottleneck, so fewer, larger statements win.
pub const DEFAULT_ROW_LIMIT: usize = 1000;

/// Options for one target table. Plain data: the userscript layer converts its JS values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableConfig {
    /// Compare-and-set columns, in tuple order: an upsert wins only with a greater tuple, and a
    /// delete carrying a `before` image only when the target row is not newer than it.
    pub cas: Vec<Ident>,
    /// Discard upserts whose column is not newer than now minus the duration.
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

/// Where the applier gets each table's options. Asked once per table, the first time the
/// applier builds that table's plan: the answer must not change afterwards (a userscript's
/// options are fixed once it is loaded).
pub trait TableConfigs: Send + Sync {
    /// The options of `table`; `None` for the defaults.
    fn table_config(&self, table: &Table) -> Option<TableConfig>;
}

/// The default `--dlqTableName`.
pub const DEFAULT_DLQ_TABLE: &str = "cdc_sink_dlq";

/// Flags of the apply step.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct ApplyArgs {
    /// Dead-letter table name inside each target schema.
    #[arg(long = "dlqTableName", env = "CDC_SINK_DLQ_TABLE_NAME", default_value = DEFAULT_DLQ_TABLE)]
    pub dlq_table_name: String,
    /// Create the dead-letter table in the target schema when it is missing.
    #[arg(
        long = "dlqAutoCreate",
        env = "CDC_SINK_DLQ_AUTO_CREATE",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub dlq_auto_create: bool,
}

impl Default for ApplyArgs {
    fn default() -> Self {
        ApplyArgs {
            dlq_table_name: DEFAULT_DLQ_TABLE.to_string(),
            dlq_auto_create: true,
        }
    }
}

impl ApplyArgs {
    pub fn validate(&self) -> Result<(), super::ApplyError> {
        if self.dlq_table_name.is_empty() {
            return Err(super::ApplyError::Config(
                "dlqTableName must not be empty".into(),
            ));
        }
        if self.dlq_table_name.contains('.') {
            return Err(super::ApplyError::Config(format!(
                "dlqTableName {:?} must be a bare table name: the table lives in each target schema",
                self.dlq_table_name
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        apply: ApplyArgs,
    }

    fn parse(args: &[&str]) -> ApplyArgs {
        let mut all = vec!["test"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect("parse").apply
    }

    #[test]
    fn dlq_flags_default_and_parse() {
        assert_eq!(parse(&[]), ApplyArgs::default());
        let a = parse(&["--dlqTableName", "conflicts", "--dlqAutoCreate=false"]);
        assert_eq!(a.dlq_table_name, "conflicts");
        assert!(!a.dlq_auto_create);
        assert!(parse(&["--dlqAutoCreate"]).dlq_auto_create);
        assert!(parse(&["--dlqAutoCreate", "true"]).dlq_auto_create);
    }

    #[test]
    fn dlq_table_names_are_bare() {
        assert!(ApplyArgs::default().validate().is_ok());
        let mut a = ApplyArgs {
            dlq_table_name: "public.dlq".into(),
            ..ApplyArgs::default()
        };
        assert_eq!(
            a.validate().unwrap_err().to_string(),
            r#"dlqTableName "public.dlq" must be a bare table name: the table lives in each target schema"#
        );
        a.dlq_table_name.clear();
        assert!(a.validate().is_err());
    }
}
