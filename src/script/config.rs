//! What a script's top level configured, as plain `Send` data for the async side. The JS
//! functions themselves stay on the engine threads; this only records which exist.

use crate::ident::{parse_dotted, Ident, Table};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::time::Duration;

/// A table name as the script wrote it: `table`, `db.table` / `schema.table` or
/// `db.schema.table`, compared case-insensitively.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName(pub Vec<Ident>);

impl TableName {
    pub fn parse(s: &str) -> Result<TableName, String> {
        let parts = parse_dotted(s).map_err(|e| e.to_string())?;
        if parts.len() > 3 {
            return Err(format!("{s:?} has more than three name parts"));
        }
        Ok(TableName(parts))
    }

    /// Whether this name designates `t`. Two parts match `db.table` (CockroachDB's reading)
    /// as well as `schema.table` (PostgreSQL's).
    pub fn matches(&self, t: &Table) -> bool {
        match self.0.as_slice() {
            [n] => *n == t.name,
            [a, n] => *n == t.name && (*a == t.schema.db || *a == t.schema.schema),
            [d, s, n] => *n == t.name && *d == t.schema.db && *s == t.schema.schema,
            _ => false,
        }
    }

    /// How specific the name is; the most specific configuration wins.
    pub fn parts(&self) -> usize {
        self.0.len()
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_char('.')?;
            }
            f.write_str(p.raw())?;
        }
        Ok(())
    }
}

/// Where deletes of a source go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeletesTo {
    /// A table name; empty means the row's own table.
    Table(String),
    /// A function of the sparse key document.
    Function,
}

/// `configureSource(name, …)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceOptions {
    /// As written (e.g. `kv.public`).
    pub name: String,
    pub dispatch: bool,
    pub deletes_to: Option<DeletesTo>,
    /// `{target: table}`: everything goes to one table.
    pub target: Option<String>,
    pub recurse: bool,
}

/// How a table resolves conflicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MergeKind {
    #[default]
    None,
    /// `merge: (op) => …`.
    Function,
    /// `standardMerge(fallback?)`.
    Standard { fallback: bool },
}

/// `configureTable(name, …)`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TableOptions {
    pub cas: Vec<Ident>,
    pub deadlines: Vec<(Ident, Duration)>,
    pub exprs: BTreeMap<Ident, String>,
    pub extras: Option<Ident>,
    pub ignore: BTreeSet<Ident>,
    pub row_limit: Option<usize>,
    pub merge: MergeKind,
    pub map: bool,
    pub delete_key: bool,
    pub apply: bool,
}

/// Everything the top level configured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Captured {
    /// `setOptions`, in call order (a later value for the same flag replaces the earlier one).
    pub options: Vec<(String, String)>,
    /// Keyed by lower-cased source name.
    pub sources: BTreeMap<String, SourceOptions>,
    /// In configuration order; configuring a name again replaces its options.
    pub tables: Vec<(TableName, TableOptions)>,
}

impl Captured {
    pub fn source(&self, name: &str) -> Option<&SourceOptions> {
        self.sources.get(&name.to_lowercase())
    }

    /// The options of the most specific name matching `t`.
    pub fn table(&self, t: &Table) -> Option<(&TableName, &TableOptions)> {
        self.tables
            .iter()
            .filter(|(n, _)| n.matches(t))
            .max_by_key(|(n, _)| n.parts())
            .map(|(n, o)| (n, o))
    }

    /// A stable, readable rendering (`cdc-sink userscript check`, golden tests).
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.options {
            let _ = writeln!(s, "option {k} = {v:?}");
        }
        for src in self.sources.values() {
            let mut parts = Vec::new();
            if src.dispatch {
                parts.push("dispatch".to_string());
            }
            match &src.deletes_to {
                Some(DeletesTo::Table(t)) => parts.push(format!("deletesTo {t:?}")),
                Some(DeletesTo::Function) => parts.push("deletesTo function".into()),
                None => {}
            }
            if let Some(t) = &src.target {
                parts.push(format!("target {t:?}"));
            }
            if src.recurse {
                parts.push("recurse".into());
            }
            let _ = writeln!(s, "source {}: {}", src.name, parts.join(", "));
        }
        for (name, t) in &self.tables {
            let mut parts = Vec::new();
            if !t.cas.is_empty() {
                parts.push(format!("cas [{}]", join(t.cas.iter().map(|c| c.raw()))));
            }
            if !t.deadlines.is_empty() {
                let d = t
                    .deadlines
                    .iter()
                    .map(|(c, d)| format!("{}={}", c.raw(), crate::config::format_duration(*d)));
                parts.push(format!("deadlines {{{}}}", join(d)));
            }
            if !t.exprs.is_empty() {
                let e = t.exprs.iter().map(|(c, e)| format!("{}={e:?}", c.raw()));
                parts.push(format!("exprs {{{}}}", join(e)));
            }
            if let Some(x) = &t.extras {
                parts.push(format!("extras {}", x.raw()));
            }
            if !t.ignore.is_empty() {
                parts.push(format!(
                    "ignore [{}]",
                    join(t.ignore.iter().map(|c| c.raw()))
                ));
            }
            if let Some(n) = t.row_limit {
                parts.push(format!("rowLimit {n}"));
            }
            match t.merge {
                MergeKind::None => {}
                MergeKind::Function => parts.push("merge function".into()),
                MergeKind::Standard { fallback: false } => parts.push("merge standard".into()),
                MergeKind::Standard { fallback: true } => {
                    parts.push("merge standard(fallback)".into())
                }
            }
            for (on, what) in [
                (t.map, "map"),
                (t.delete_key, "deleteKey"),
                (t.apply, "apply"),
            ] {
                if on {
                    parts.push(what.into());
                }
            }
            let _ = writeln!(s, "table {name}: {}", parts.join(", "));
        }
        s
    }
}

fn join<'a>(items: impl Iterator<Item = impl AsRef<str> + 'a>) -> String {
    items
        .map(|s| s.as_ref().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ident::Schema;

    #[test]
    fn table_names_match_like_the_reference() {
        let t = Table::new(Schema::new("kv", "public"), "KV");
        assert!(TableName::parse("kv").unwrap().matches(&t));
        assert!(TableName::parse("kv.kv").unwrap().matches(&t));
        assert!(TableName::parse("public.kv").unwrap().matches(&t));
        assert!(TableName::parse("KV.PUBLIC.kv").unwrap().matches(&t));
        assert!(!TableName::parse("kv.other.kv").unwrap().matches(&t));
        assert!(!TableName::parse("other").unwrap().matches(&t));
        assert!(TableName::parse("a.b.c.d").is_err());
    }
}
