//! Every SQL text the applier sends, for both dialects, in one place.
//!
//! Write statements bind one array parameter per column and `unnest` them into rows, so a
//! statement carries any number of rows and its text (hence its prepared plan) depends only on
//! the table shape.

use super::value::base_type;
use crate::ident::{Ident, Schema, Table};
use crate::target::Dialect;
use std::borrow::Cow;
use std::fmt::Write;
use std::time::Duration;

/// The element type of an array parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Param {
    /// Values as text, cast in SQL.
    Text,
    /// Presence flags selecting a column's DEFAULT.
    Bool,
}

/// One target column as a statement writes (or matches) it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ColumnSql {
    pub name: Ident,
    pub data_type: String,
    /// Configured replacement expression (`$0` = the incoming value).
    pub expr: Option<String>,
    /// 1-based number of the value parameter, when the column takes one.
    pub value: Option<usize>,
    /// 1-based number of the presence-flag parameter and the DEFAULT written when it is false.
    pub default: Option<(usize, String)>,
}

/// The table name as each dialect resolves it (PostgreSQL only sees the connected database).
pub(super) fn table_name(dialect: Dialect, table: &Table) -> String {
    match dialect {
        Dialect::Postgres => table.quoted_in_db(),
        Dialect::Cockroach => table.quoted(),
    }
}

/// The type to cast text to. Two short names are SQL keywords that imply a length of one and
/// would silently truncate on an explicit cast (`'101'::BIT` is `1`), so we cast to the
/// unbounded relative and let the assignment cast check the length.
fn cast_type(data_type: &str) -> Cow<'_, str> {
    let base = base_type(data_type);
    let (elem, array) = match base.strip_suffix("[]") {
        Some(e) => (e, "[]"),
        None => (base, ""),
    };
    let collate = &data_type[base.len()..];
    match elem {
        "BIT" => Cow::Owned(format!("VARBIT{array}{collate}")),
        "CHAR" => Cow::Owned(format!("\"char\"{array}{collate}")),
        _ => Cow::Borrowed(data_type),
    }
}

/// The typed value of text expression `src` for a column of `data_type`.
fn cast(dialect: Dialect, src: &str, data_type: &str) -> String {
    let base = base_type(data_type);
    match base {
        "GEOGRAPHY" => match dialect {
            Dialect::Cockroach => format!("st_geogfromgeojson({src}::JSONB)"),
            Dialect::Postgres => format!("st_geomfromgeojson({src}::JSONB)::GEOGRAPHY"),
        },
        "GEOMETRY" => format!("st_geomfromgeojson({src}::JSONB)"),
        // Arrays of user-defined types (enums) need the element text parsed first.
        _ if base.ends_with("[]") && base.contains('.') => format!("{src}::TEXT[]::{data_type}"),
        _ => format!("{src}::{}", cast_type(data_type)),
    }
}

/// The SELECT-list expression producing a column's value from the unnested row `d`.
fn value_expr(dialect: Dialect, c: &ColumnSql) -> String {
    let value = c
        .value
        .map(|p| cast(dialect, &format!("d.p{p}"), &c.data_type));
    let v = match (&c.expr, value) {
        (Some(e), Some(v)) => format!(
            "({})::{}",
            e.replace("$0", &format!("({v})")),
            cast_type(&c.data_type)
        ),
        (Some(e), None) => format!("({e})::{}", cast_type(&c.data_type)),
        (None, Some(v)) => v,
        (None, None) => "NULL".to_string(),
    };
    match &c.default {
        Some((flag, default)) => format!("CASE WHEN d.p{flag} THEN {v} ELSE {default} END"),
        None => v,
    }
}

/// `SELECT <exprs> FROM unnest($1::TEXT[], …) AS d(p1, …)`.
fn select_unnest(dialect: Dialect, cols: &[ColumnSql], params: &[Param]) -> String {
    let mut s = String::from("SELECT ");
    for (i, c) in cols.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&value_expr(dialect, c));
    }
    s.push_str(" FROM unnest(");
    for (i, p) in params.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let ty = match p {
            Param::Text => "TEXT[]",
            Param::Bool => "BOOL[]",
        };
        let _ = write!(s, "${}::{ty}", i + 1);
    }
    s.push_str(") AS d(");
    for i in 1..=params.len() {
        if i > 1 {
            s.push_str(", ");
        }
        let _ = write!(s, "p{i}");
    }
    s.push(')');
    s
}

fn name_list<'a>(names: impl IntoIterator<Item = &'a Ident>) -> String {
    names
        .into_iter()
        .map(Ident::quoted)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Inserts or replaces rows. `pk` is the whole primary key (the conflict target); `cols` the
/// written columns, PK columns first.
pub(super) fn upsert(
    dialect: Dialect,
    table: &Table,
    pk: &[Ident],
    cols: &[ColumnSql],
    params: &[Param],
) -> String {
    let target = table_name(dialect, table);
    let names = name_list(cols.iter().map(|c| &c.name));
    let select = select_unnest(dialect, cols, params);
    match dialect {
        // UPSERT has exactly the semantics we need (listed columns replaced, others kept) and
        // is CockroachDB's fast path.
        Dialect::Cockroach => format!("UPSERT INTO {target} ({names}) {select}"),
        Dialect::Postgres => {
            let update: Vec<String> = cols
                .iter()
                .filter(|c| !pk.contains(&c.name))
                .map(|c| format!("{0} = excluded.{0}", c.name.quoted()))
                .collect();
            let action = if update.is_empty() {
                "DO NOTHING".to_string()
            } else {
                format!("DO UPDATE SET {}", update.join(", "))
            };
            format!(
                "INSERT INTO {target} AS x ({names}) {select} ON CONFLICT ({}) {action}",
                name_list(pk)
            )
        }
    }
}

/// Deletes rows by primary key; `pk` lists every PK column (generated ones too).
pub(super) fn delete(
    dialect: Dialect,
    table: &Table,
    pk: &[ColumnSql],
    params: &[Param],
) -> String {
    format!(
        "DELETE FROM {} WHERE ({}) IN ({})",
        table_name(dialect, table),
        name_list(pk.iter().map(|c| &c.name)),
        select_unnest(dialect, pk, params)
    )
}

/// `unnest(…) WITH ORDINALITY AS d(p1, …, i)`: the rows plus their 1-based position.
fn unnest_numbered(params: &[Param]) -> String {
    let mut s = String::from("unnest(");
    for (i, p) in params.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let ty = match p {
            Param::Text => "TEXT[]",
            Param::Bool => "BOOL[]",
        };
        let _ = write!(s, "${}::{ty}", i + 1);
    }
    s.push_str(") WITH ORDINALITY AS d(");
    for i in 1..=params.len() {
        let _ = write!(s, "p{i}, ");
    }
    s.push_str("i)");
    s
}

/// `(a."x", a."y")`: a row of qualified columns.
fn row_of<'a>(alias: &str, names: impl IntoIterator<Item = &'a Ident>) -> String {
    let cols: Vec<String> = names
        .into_iter()
        .map(|n| format!("{alias}.{}", n.quoted()))
        .collect();
    format!("({})", cols.join(", "))
}

/// `(a.c1, a.c3)`: a row of the numbered values of a CTE.
fn row_of_numbered(alias: &str, prefix: &str, positions: &[usize]) -> String {
    let cols: Vec<String> = positions
        .iter()
        .map(|p| format!("{alias}.{prefix}{p}"))
        .collect();
    format!("({})", cols.join(", "))
}

/// A deadline rendered as an interval both dialects parse (`'600 seconds'`, `'0.25 seconds'`).
fn interval(d: Duration) -> String {
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        return format!("'{} seconds'::INTERVAL", d.as_secs());
    }
    let frac = format!("{nanos:09}");
    format!(
        "'{}.{} seconds'::INTERVAL",
        d.as_secs(),
        frac.trim_end_matches('0')
    )
}

/// What a conditional upsert checks before writing a row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Conditions {
    /// Compare-and-set columns, in tuple order.
    pub cas: Vec<Ident>,
    /// Columns that must be newer than now minus the duration, sorted by name.
    pub deadlines: Vec<(Ident, Duration)>,
}

/// The compare-and-set / deadline upsert. Rows whose deadline passed are not written;
/// an existing row is replaced only when the incoming CAS tuple is strictly greater (SQL row
/// comparison, so NULLs and equal tuples lose). On PostgreSQL `ON CONFLICT DO UPDATE` compares
/// against the latest committed version and locks the row even when the comparison fails, so
/// the outcome holds under concurrent writers and the losers stay locked for the merge.
///
/// Returns the 1-based position (`i`) of each row that was not written, and whether it is a
/// conflict (it has a target row); expired rows without a target row vanish silently.
pub(super) fn conditional_upsert(
    dialect: Dialect,
    table: &Table,
    pk: &[Ident],
    cols: &[ColumnSql],
    params: &[Param],
    cond: &Conditions,
) -> String {
    let target = table_name(dialect, table);
    let position = |name: &Ident| cols.iter().position(|c| &c.name == name).map(|p| p + 1);
    let mut src = String::from("SELECT d.i");
    for (i, c) in cols.iter().enumerate() {
        let _ = write!(src, ", {} AS c{}", value_expr(dialect, c), i + 1);
    }
    let _ = write!(src, " FROM {}", unnest_numbered(params));

    let live: Vec<String> = cond
        .deadlines
        .iter()
        .filter_map(|(name, d)| {
            position(name).map(|p| format!("src.c{p} > now() - {}", interval(*d)))
        })
        .collect();
    let live = (!live.is_empty()).then(|| format!("({})", live.join(" AND ")));

    let written_pk: Vec<&Ident> = cols
        .iter()
        .map(|c| &c.name)
        .filter(|n| pk.contains(n))
        .collect();
    let pk_positions: Vec<usize> = written_pk.iter().filter_map(|n| position(n)).collect();
    let names = name_list(cols.iter().map(|c| &c.name));
    let values: Vec<String> = (1..=cols.len()).map(|p| format!("src.c{p}")).collect();
    let mut update: Vec<String> = cols
        .iter()
        .filter(|c| !pk.contains(&c.name))
        .map(|c| format!("{0} = excluded.{0}", c.name.quoted()))
        .collect();
    if update.is_empty() {
        // A key-only table: a no-op update still reports (and locks) the existing row.
        if let Some(first) = written_pk.first() {
            update.push(format!("{0} = excluded.{0}", first.quoted()));
        }
    }
    let mut won = format!(
        "INSERT INTO {target} AS x ({names}) SELECT {} FROM src",
        values.join(", ")
    );
    if let Some(live) = &live {
        let _ = write!(won, " WHERE {live}");
    }
    let _ = write!(
        won,
        " ON CONFLICT ({}) DO UPDATE SET {}",
        name_list(pk),
        update.join(", ")
    );
    if !cond.cas.is_empty() {
        let _ = write!(
            won,
            " WHERE {} > {}",
            row_of("excluded", &cond.cas),
            row_of("x", &cond.cas)
        );
    }
    let _ = write!(won, " RETURNING {}", {
        let r: Vec<String> = written_pk
            .iter()
            .map(|n| format!("x.{}", n.quoted()))
            .collect();
        r.join(", ")
    });

    let src_key = row_of_numbered("src", "c", &pk_positions);
    let conflict = match &live {
        Some(live) => format!(
            "({live} IS TRUE OR EXISTS (SELECT 1 FROM {target} AS x WHERE {} = {src_key}))",
            row_of("x", written_pk.iter().copied())
        ),
        // A live row that was not written lost against an existing row.
        None => "TRUE".to_string(),
    };
    format!(
        "WITH src AS ({src}), won AS ({won}) SELECT src.i, {conflict} FROM src WHERE NOT EXISTS \
         (SELECT 1 FROM won WHERE {} = {src_key})",
        row_of("won", written_pk.iter().copied())
    )
}

/// Reads the current rows for keys `key` (1-based positions `i` of the keys sent), locking
/// them for the rest of the transaction. Each row comes back as one array of `to_jsonb` texts,
/// in the order of `read`; `ARRAY[…]` has no argument limit, unlike `jsonb_build_array`.
pub(super) fn read_locked(
    dialect: Dialect,
    table: &Table,
    key: &[ColumnSql],
    params: &[Param],
    read: &[Ident],
) -> String {
    let mut k = String::from("SELECT d.i");
    for (i, c) in key.iter().enumerate() {
        let _ = write!(k, ", {} AS c{}", value_expr(dialect, c), i + 1);
    }
    let _ = write!(k, " FROM {}", unnest_numbered(params));
    let values: Vec<String> = read
        .iter()
        .map(|n| format!("to_jsonb(x.{})::TEXT", n.quoted()))
        .collect();
    let positions: Vec<usize> = (1..=key.len()).collect();
    format!(
        "SELECT k.i, ARRAY[{}] FROM ({k}) AS k JOIN {} AS x ON {} = {} FOR UPDATE OF x",
        values.join(", "),
        table_name(dialect, table),
        row_of("x", key.iter().map(|c| &c.name)),
        row_of_numbered("k", "c", &positions)
    )
}

/// Deletes rows by key only when the target row's CAS tuple is not newer than the one of the
/// delete's `before` image, so that in active-active replication a delete cannot remove a row the other side has updated since. `cas` are the CAS columns with their parameters
/// (the `before` values). Returns the 1-based position of each delete that removed nothing, and
/// whether it is a conflict: a target row newer than `before` (or a NULL comparison) refused it.
pub(super) fn guarded_delete(
    dialect: Dialect,
    table: &Table,
    key: &[ColumnSql],
    cas: &[ColumnSql],
    params: &[Param],
) -> String {
    let target = table_name(dialect, table);
    let mut k = String::from("SELECT d.i");
    for (i, c) in key.iter().enumerate() {
        let _ = write!(k, ", {} AS c{}", value_expr(dialect, c), i + 1);
    }
    for (i, c) in cas.iter().enumerate() {
        let _ = write!(k, ", {} AS v{}", value_expr(dialect, c), i + 1);
    }
    let _ = write!(k, " FROM {}", unnest_numbered(params));
    let key_row = row_of_numbered("k", "c", &(1..=key.len()).collect::<Vec<_>>());
    let x_key = row_of("x", key.iter().map(|c| &c.name));
    format!(
        "WITH k AS ({k}), gone AS (DELETE FROM {target} AS x USING k WHERE {x_key} = {key_row} \
         AND {} <= {} RETURNING k.i) SELECT k.i, EXISTS (SELECT 1 FROM {target} AS x WHERE {x_key} = {key_row}) \
         FROM k WHERE NOT EXISTS (SELECT 1 FROM gone WHERE gone.i = k.i)",
        row_of("x", cas.iter().map(|c| &c.name)),
        row_of_numbered("k", "v", &(1..=cas.len()).collect::<Vec<_>>()),
    )
}

/// The columns a dead-letter table must have, in the order errors list them.
pub(super) const DLQ_COLUMNS: [&str; 5] = [
    "dlq_name",
    "source_nanos",
    "source_logical",
    "data_after",
    "data_before",
];

/// The optional column naming the table a dead-letter row came from (in the queue's schema,
/// lower-cased). Tables created before it existed, or by hand from the reference's DDL, lack
/// it and keep working without it.
pub(super) const DLQ_SOURCE_TABLE: &str = "source_table";

/// Writes dead-letter rows from five text arrays (name, nanos, logical, after, before) and,
/// when `source_table`, a sixth with the table each came from.
pub(super) fn dlq_insert(dialect: Dialect, table: &Table, source_table: bool) -> String {
    let (col, val, arr, alias) = if source_table {
        (", \"source_table\"", ", d.p6", ", $6::TEXT[]", ", p6")
    } else {
        ("", "", "", "")
    };
    format!(
        "INSERT INTO {} (\"dlq_name\", \"source_nanos\", \"source_logical\", \"data_after\", \"data_before\"{col}) \
         SELECT d.p1, d.p2::INT8, d.p3::INT8, d.p4::JSONB, d.p5::JSONB{val} \
         FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[]{arr}) AS d(p1, p2, p3, p4, p5{alias})",
        table_name(dialect, table)
    )
}

/// The dead-letter table. `uuid` is false on PostgreSQL before 13, which has no built-in
/// `gen_random_uuid()`.
pub(super) fn dlq_create(dialect: Dialect, table: &Table, uuid: bool) -> String {
    let event = if uuid {
        "event UUID NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY"
    } else {
        "event BIGSERIAL PRIMARY KEY"
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {} ({event}, dlq_name TEXT NOT NULL, \
         source_nanos INT8 NOT NULL, source_logical INT8 NOT NULL, data_after JSONB NOT NULL, \
         data_before JSONB NOT NULL, dlq_time TIMESTAMPTZ NOT NULL DEFAULT now(), \
         source_table TEXT)",
        table_name(dialect, table)
    )
}

fn catalog_prefix(dialect: Dialect, schema: &Schema, catalog: &str) -> String {
    match dialect {
        Dialect::Postgres => catalog.to_string(),
        Dialect::Cockroach => format!("{}.{catalog}", schema.db.quoted()),
    }
}

/// Every column of every base table in schema `$1` (matched case-insensitively) with its PK
/// position, type parts, default and generation. Rows:
/// `(catalog, schema, table, column, pk_position, data_type, udt_catalog, udt_schema, udt_name,
/// collation, default, is_generated)`.
pub(super) fn columns_query(dialect: Dialect, schema: &Schema) -> String {
    let is = catalog_prefix(dialect, schema, "information_schema");
    format!(
        "SELECT t.table_catalog::TEXT, t.table_schema::TEXT, t.table_name::TEXT, c.column_name::TEXT, \
         k.ordinal_position::INT8, c.data_type::TEXT, c.udt_catalog::TEXT, c.udt_schema::TEXT, \
         c.udt_name::TEXT, c.collation_name::TEXT, c.column_default::TEXT, c.is_generated::TEXT \
         FROM {is}.tables AS t \
         JOIN {is}.columns AS c ON c.table_catalog = t.table_catalog AND c.table_schema = t.table_schema \
         AND c.table_name = t.table_name \
         LEFT JOIN {is}.table_constraints AS tc ON tc.table_catalog = t.table_catalog \
         AND tc.table_schema = t.table_schema AND tc.table_name = t.table_name \
         AND tc.constraint_type = 'PRIMARY KEY' \
         LEFT JOIN {is}.key_column_usage AS k ON k.constraint_catalog = tc.constraint_catalog \
         AND k.constraint_schema = tc.constraint_schema AND k.constraint_name = tc.constraint_name \
         AND k.table_name = t.table_name AND k.column_name = c.column_name \
         WHERE t.table_type = 'BASE TABLE' AND lower(t.table_schema) = lower($1) \
         ORDER BY t.table_name, c.column_name"
    )
}

/// Foreign keys between tables of schema `$1`: rows `(child, parent)`. Read from pg_catalog
/// because constraint names are only unique per table, which makes the information_schema
/// joins ambiguous.
pub(super) fn foreign_keys_query(dialect: Dialect, schema: &Schema) -> String {
    let pg = catalog_prefix(dialect, schema, "pg_catalog");
    format!(
        "SELECT c.relname::TEXT, p.relname::TEXT FROM {pg}.pg_constraint AS k \
         JOIN {pg}.pg_class AS c ON c.oid = k.conrelid \
         JOIN {pg}.pg_namespace AS cn ON cn.oid = c.relnamespace \
         JOIN {pg}.pg_class AS p ON p.oid = k.confrelid \
         JOIN {pg}.pg_namespace AS pn ON pn.oid = p.relnamespace \
         WHERE k.contype = 'f' AND lower(cn.nspname) = lower($1) AND lower(pn.nspname) = lower($1)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const PG: Dialect = Dialect::Postgres;
    const CRDB: Dialect = Dialect::Cockroach;

    fn table() -> Table {
        Table::new(Schema::new("db", "sch"), "t")
    }

    fn col(name: &str, ty: &str, value: usize) -> ColumnSql {
        ColumnSql {
            name: Ident::new(name),
            data_type: ty.into(),
            expr: None,
            value: Some(value),
            default: None,
        }
    }

    fn pk(names: &[&str]) -> Vec<Ident> {
        names.iter().map(|n| Ident::new(*n)).collect()
    }

    #[test]
    fn upsert_binds_one_array_per_column() {
        let cols = [col("k", "INT8", 1), col("v", "BYTEA", 2)];
        let params = [Param::Text, Param::Text];
        assert_eq!(
            upsert(PG, &table(), &pk(&["k"]), &cols, &params),
            r#"INSERT INTO "sch"."t" AS x ("k", "v") SELECT d.p1::INT8, d.p2::BYTEA FROM unnest($1::TEXT[], $2::TEXT[]) AS d(p1, p2) ON CONFLICT ("k") DO UPDATE SET "v" = excluded."v""#
        );
        assert_eq!(
            upsert(CRDB, &table(), &pk(&["k"]), &cols, &params),
            r#"UPSERT INTO "db"."sch"."t" ("k", "v") SELECT d.p1::INT8, d.p2::BYTEA FROM unnest($1::TEXT[], $2::TEXT[]) AS d(p1, p2)"#
        );
    }

    #[test]
    fn upsert_of_a_pk_only_table_does_nothing_on_conflict() {
        let cols = [col("a", "TEXT", 1), col("B", "INT8", 2)];
        let params = [Param::Text, Param::Text];
        assert_eq!(
            upsert(PG, &table(), &pk(&["a", "B"]), &cols, &params),
            r#"INSERT INTO "sch"."t" AS x ("a", "B") SELECT d.p1::TEXT, d.p2::INT8 FROM unnest($1::TEXT[], $2::TEXT[]) AS d(p1, p2) ON CONFLICT ("a", "B") DO NOTHING"#
        );
        assert_eq!(
            upsert(CRDB, &table(), &pk(&["a", "B"]), &cols, &params),
            r#"UPSERT INTO "db"."sch"."t" ("a", "B") SELECT d.p1::TEXT, d.p2::INT8 FROM unnest($1::TEXT[], $2::TEXT[]) AS d(p1, p2)"#
        );
    }

    #[test]
    fn upsert_selects_the_default_by_presence_flag() {
        let mut d = col("d", "INT8", 3);
        d.default = Some((4, "42".into()));
        let mut ts = col("ts", "TIMESTAMPTZ", 5);
        ts.default = Some((6, "now()".into()));
        let cols = [col("pk0", "TEXT", 1), col("v", "TEXT", 2), d, ts];
        let params = [
            Param::Text,
            Param::Text,
            Param::Text,
            Param::Bool,
            Param::Text,
            Param::Bool,
        ];
        assert_eq!(
            upsert(PG, &table(), &pk(&["pk0"]), &cols, &params),
            r#"INSERT INTO "sch"."t" AS x ("pk0", "v", "d", "ts") SELECT d.p1::TEXT, d.p2::TEXT, CASE WHEN d.p4 THEN d.p3::INT8 ELSE 42 END, CASE WHEN d.p6 THEN d.p5::TIMESTAMPTZ ELSE now() END FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BOOL[], $5::TEXT[], $6::BOOL[]) AS d(p1, p2, p3, p4, p5, p6) ON CONFLICT ("pk0") DO UPDATE SET "v" = excluded."v", "d" = excluded."d", "ts" = excluded."ts""#
        );
        assert_eq!(
            upsert(CRDB, &table(), &pk(&["pk0"]), &cols, &params),
            r#"UPSERT INTO "db"."sch"."t" ("pk0", "v", "d", "ts") SELECT d.p1::TEXT, d.p2::TEXT, CASE WHEN d.p4 THEN d.p3::INT8 ELSE 42 END, CASE WHEN d.p6 THEN d.p5::TIMESTAMPTZ ELSE now() END FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BOOL[], $5::TEXT[], $6::BOOL[]) AS d(p1, p2, p3, p4, p5, p6)"#
        );
    }

    #[test]
    fn upsert_applies_configured_expressions() {
        let mut k = col("k", "INT8", 1);
        k.expr = Some("2 * $0".into());
        let constant = ColumnSql {
            name: Ident::new("c"),
            data_type: "TEXT".into(),
            expr: Some("'fixed'".into()),
            value: None,
            default: Some((2, "'dflt'::text".into())),
        };
        let mut v = col("v", "TEXT", 3);
        v.expr = Some("upper($0) || $0".into());
        let cols = [k, constant, v];
        let params = [Param::Text, Param::Bool, Param::Text];
        assert_eq!(
            upsert(PG, &table(), &pk(&["k"]), &cols, &params),
            r#"INSERT INTO "sch"."t" AS x ("k", "c", "v") SELECT (2 * (d.p1::INT8))::INT8, CASE WHEN d.p2 THEN ('fixed')::TEXT ELSE 'dflt'::text END, (upper((d.p3::TEXT)) || (d.p3::TEXT))::TEXT FROM unnest($1::TEXT[], $2::BOOL[], $3::TEXT[]) AS d(p1, p2, p3) ON CONFLICT ("k") DO UPDATE SET "c" = excluded."c", "v" = excluded."v""#
        );
        assert_eq!(
            upsert(CRDB, &table(), &pk(&["k"]), &cols, &params),
            r#"UPSERT INTO "db"."sch"."t" ("k", "c", "v") SELECT (2 * (d.p1::INT8))::INT8, CASE WHEN d.p2 THEN ('fixed')::TEXT ELSE 'dflt'::text END, (upper((d.p3::TEXT)) || (d.p3::TEXT))::TEXT FROM unnest($1::TEXT[], $2::BOOL[], $3::TEXT[]) AS d(p1, p2, p3)"#
        );
    }

    #[test]
    fn upsert_casts_special_types() {
        let cols = [
            col("k", "UUID", 1),
            col("geog", "GEOGRAPHY", 2),
            col("geom", "GEOMETRY", 3),
            col("e", r#""db"."sch"."MyEnum""#, 4),
            col("ea", r#""db"."sch"."MyEnum"[]"#, 5),
            col("s", r#"TEXT COLLATE "C""#, 6),
            col("b", "BIT", 7),
            col("ba", "BIT[]", 8),
            col("ch", "CHAR", 9),
            col("j", "JSONB", 10),
            col("ia", "INT8[]", 11),
        ];
        let params = [Param::Text; 11];
        let select = r#"SELECT d.p1::UUID, st_geomfromgeojson(d.p2::JSONB)::GEOGRAPHY, st_geomfromgeojson(d.p3::JSONB), d.p4::"db"."sch"."MyEnum", d.p5::TEXT[]::"db"."sch"."MyEnum"[], d.p6::TEXT COLLATE "C", d.p7::VARBIT, d.p8::VARBIT[], d.p9::"char", d.p10::JSONB, d.p11::INT8[] FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::TEXT[], $10::TEXT[], $11::TEXT[]) AS d(p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11)"#;
        assert_eq!(
            upsert(PG, &table(), &pk(&["k"]), &cols, &params),
            format!(
                r#"INSERT INTO "sch"."t" AS x ("k", "geog", "geom", "e", "ea", "s", "b", "ba", "ch", "j", "ia") {select} ON CONFLICT ("k") DO UPDATE SET "geog" = excluded."geog", "geom" = excluded."geom", "e" = excluded."e", "ea" = excluded."ea", "s" = excluded."s", "b" = excluded."b", "ba" = excluded."ba", "ch" = excluded."ch", "j" = excluded."j", "ia" = excluded."ia""#
            )
        );
        let crdb_select = select.replace(
            "st_geomfromgeojson(d.p2::JSONB)::GEOGRAPHY",
            "st_geogfromgeojson(d.p2::JSONB)",
        );
        assert_eq!(
            upsert(CRDB, &table(), &pk(&["k"]), &cols, &params),
            format!(
                r#"UPSERT INTO "db"."sch"."t" ("k", "geog", "geom", "e", "ea", "s", "b", "ba", "ch", "j", "ia") {crdb_select}"#
            )
        );
    }

    #[test]
    fn identifiers_are_quoted_as_the_catalog_spells_them() {
        let t = Table::new(Schema::new("My\"Db", "Sch"), "Odd\"Name");
        let cols = [col("K\"ey", "INT8", 1), col("Val", "TEXT", 2)];
        let params = [Param::Text, Param::Text];
        assert_eq!(
            upsert(PG, &t, &pk(&["K\"ey"]), &cols, &params),
            r#"INSERT INTO "Sch"."Odd""Name" AS x ("K""ey", "Val") SELECT d.p1::INT8, d.p2::TEXT FROM unnest($1::TEXT[], $2::TEXT[]) AS d(p1, p2) ON CONFLICT ("K""ey") DO UPDATE SET "Val" = excluded."Val""#
        );
        assert_eq!(
            upsert(CRDB, &t, &pk(&["K\"ey"]), &cols, &params),
            r#"UPSERT INTO "My""Db"."Sch"."Odd""Name" ("K""ey", "Val") SELECT d.p1::INT8, d.p2::TEXT FROM unnest($1::TEXT[], $2::TEXT[]) AS d(p1, p2)"#
        );
    }

    #[test]
    fn delete_matches_the_whole_key() {
        let cols = [col("k", "INT8", 1)];
        assert_eq!(
            delete(PG, &table(), &cols, &[Param::Text]),
            r#"DELETE FROM "sch"."t" WHERE ("k") IN (SELECT d.p1::INT8 FROM unnest($1::TEXT[]) AS d(p1))"#
        );
        assert_eq!(
            delete(CRDB, &table(), &cols, &[Param::Text]),
            r#"DELETE FROM "db"."sch"."t" WHERE ("k") IN (SELECT d.p1::INT8 FROM unnest($1::TEXT[]) AS d(p1))"#
        );
        let mut b = col("b", "INT8", 2);
        b.expr = Some("2 * $0".into());
        let cols = [col("a", "TEXT", 1), b, col("g", "INT8", 3)];
        let params = [Param::Text; 3];
        assert_eq!(
            delete(PG, &table(), &cols, &params),
            r#"DELETE FROM "sch"."t" WHERE ("a", "b", "g") IN (SELECT d.p1::TEXT, (2 * (d.p2::INT8))::INT8, d.p3::INT8 FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[]) AS d(p1, p2, p3))"#
        );
        assert_eq!(
            delete(CRDB, &table(), &cols, &params),
            r#"DELETE FROM "db"."sch"."t" WHERE ("a", "b", "g") IN (SELECT d.p1::TEXT, (2 * (d.p2::INT8))::INT8, d.p3::INT8 FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[]) AS d(p1, p2, p3))"#
        );
    }

    #[test]
    fn introspection_reads_the_schema_database() {
        let s = Schema::new("Db", "public");
        let pg = columns_query(PG, &s);
        assert!(pg.contains(" FROM information_schema.tables AS t "), "{pg}");
        assert!(
            pg.contains(" JOIN information_schema.key_column_usage AS k "),
            "{pg}"
        );
        let crdb = columns_query(CRDB, &s);
        assert_eq!(
            crdb,
            pg.replace("information_schema.", "\"Db\".information_schema.")
        );
        assert_eq!(
            columns_query(PG, &s),
            "SELECT t.table_catalog::TEXT, t.table_schema::TEXT, t.table_name::TEXT, c.column_name::TEXT, \
             k.ordinal_position::INT8, c.data_type::TEXT, c.udt_catalog::TEXT, c.udt_schema::TEXT, \
             c.udt_name::TEXT, c.collation_name::TEXT, c.column_default::TEXT, c.is_generated::TEXT \
             FROM information_schema.tables AS t \
             JOIN information_schema.columns AS c ON c.table_catalog = t.table_catalog AND c.table_schema = t.table_schema \
             AND c.table_name = t.table_name \
             LEFT JOIN information_schema.table_constraints AS tc ON tc.table_catalog = t.table_catalog \
             AND tc.table_schema = t.table_schema AND tc.table_name = t.table_name \
             AND tc.constraint_type = 'PRIMARY KEY' \
             LEFT JOIN information_schema.key_column_usage AS k ON k.constraint_catalog = tc.constraint_catalog \
             AND k.constraint_schema = tc.constraint_schema AND k.constraint_name = tc.constraint_name \
             AND k.table_name = t.table_name AND k.column_name = c.column_name \
             WHERE t.table_type = 'BASE TABLE' AND lower(t.table_schema) = lower($1) \
             ORDER BY t.table_name, c.column_name"
        );
        assert_eq!(
            foreign_keys_query(PG, &s),
            "SELECT c.relname::TEXT, p.relname::TEXT FROM pg_catalog.pg_constraint AS k \
             JOIN pg_catalog.pg_class AS c ON c.oid = k.conrelid \
             JOIN pg_catalog.pg_namespace AS cn ON cn.oid = c.relnamespace \
             JOIN pg_catalog.pg_class AS p ON p.oid = k.confrelid \
             JOIN pg_catalog.pg_namespace AS pn ON pn.oid = p.relnamespace \
             WHERE k.contype = 'f' AND lower(cn.nspname) = lower($1) AND lower(pn.nspname) = lower($1)"
        );
        assert_eq!(
            foreign_keys_query(CRDB, &s),
            foreign_keys_query(PG, &s).replace("pg_catalog.", "\"Db\".pg_catalog.")
        );
    }

    fn cas_cols() -> (Vec<ColumnSql>, Vec<Param>) {
        let mut ts = col("ts", "TIMESTAMPTZ", 4);
        ts.default = Some((5, "now()".into()));
        let cols = vec![
            col("k", "INT8", 1),
            col("v", "TEXT", 2),
            col("ver", "INT8", 3),
            ts,
            col("at", "TIMESTAMPTZ", 6),
        ];
        let mut params = vec![Param::Text; 6];
        params[4] = Param::Bool;
        (cols, params)
    }

    #[test]
    fn cas_upsert_writes_greater_tuples_and_returns_the_losers() {
        let (cols, params) = cas_cols();
        let cond = Conditions {
            cas: vec![Ident::new("ver")],
            deadlines: vec![],
        };
        assert_eq!(
            conditional_upsert(PG, &table(), &pk(&["k"]), &cols, &params, &cond),
            r#"WITH src AS (SELECT d.i, d.p1::INT8 AS c1, d.p2::TEXT AS c2, d.p3::INT8 AS c3, CASE WHEN d.p5 THEN d.p4::TIMESTAMPTZ ELSE now() END AS c4, d.p6::TIMESTAMPTZ AS c5 FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BOOL[], $6::TEXT[]) WITH ORDINALITY AS d(p1, p2, p3, p4, p5, p6, i)), won AS (INSERT INTO "sch"."t" AS x ("k", "v", "ver", "ts", "at") SELECT src.c1, src.c2, src.c3, src.c4, src.c5 FROM src ON CONFLICT ("k") DO UPDATE SET "v" = excluded."v", "ver" = excluded."ver", "ts" = excluded."ts", "at" = excluded."at" WHERE (excluded."ver") > (x."ver") RETURNING x."k") SELECT src.i, TRUE FROM src WHERE NOT EXISTS (SELECT 1 FROM won WHERE (won."k") = (src.c1))"#
        );
        assert_eq!(
            conditional_upsert(CRDB, &table(), &pk(&["k"]), &cols, &params, &cond),
            r#"WITH src AS (SELECT d.i, d.p1::INT8 AS c1, d.p2::TEXT AS c2, d.p3::INT8 AS c3, CASE WHEN d.p5 THEN d.p4::TIMESTAMPTZ ELSE now() END AS c4, d.p6::TIMESTAMPTZ AS c5 FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BOOL[], $6::TEXT[]) WITH ORDINALITY AS d(p1, p2, p3, p4, p5, p6, i)), won AS (INSERT INTO "db"."sch"."t" AS x ("k", "v", "ver", "ts", "at") SELECT src.c1, src.c2, src.c3, src.c4, src.c5 FROM src ON CONFLICT ("k") DO UPDATE SET "v" = excluded."v", "ver" = excluded."ver", "ts" = excluded."ts", "at" = excluded."at" WHERE (excluded."ver") > (x."ver") RETURNING x."k") SELECT src.i, TRUE FROM src WHERE NOT EXISTS (SELECT 1 FROM won WHERE (won."k") = (src.c1))"#
        );
    }

    #[test]
    fn deadlines_filter_rows_and_report_expired_ones_with_a_target_row() {
        let (cols, params) = cas_cols();
        let cond = Conditions {
            cas: vec![Ident::new("ver"), Ident::new("v")],
            deadlines: vec![
                (Ident::new("at"), Duration::from_millis(1500)),
                (Ident::new("ts"), Duration::from_secs(600)),
            ],
        };
        assert_eq!(
            conditional_upsert(PG, &table(), &pk(&["k"]), &cols, &params, &cond),
            r#"WITH src AS (SELECT d.i, d.p1::INT8 AS c1, d.p2::TEXT AS c2, d.p3::INT8 AS c3, CASE WHEN d.p5 THEN d.p4::TIMESTAMPTZ ELSE now() END AS c4, d.p6::TIMESTAMPTZ AS c5 FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BOOL[], $6::TEXT[]) WITH ORDINALITY AS d(p1, p2, p3, p4, p5, p6, i)), won AS (INSERT INTO "sch"."t" AS x ("k", "v", "ver", "ts", "at") SELECT src.c1, src.c2, src.c3, src.c4, src.c5 FROM src WHERE (src.c5 > now() - '1.5 seconds'::INTERVAL AND src.c4 > now() - '600 seconds'::INTERVAL) ON CONFLICT ("k") DO UPDATE SET "v" = excluded."v", "ver" = excluded."ver", "ts" = excluded."ts", "at" = excluded."at" WHERE (excluded."ver", excluded."v") > (x."ver", x."v") RETURNING x."k") SELECT src.i, ((src.c5 > now() - '1.5 seconds'::INTERVAL AND src.c4 > now() - '600 seconds'::INTERVAL) IS TRUE OR EXISTS (SELECT 1 FROM "sch"."t" AS x WHERE (x."k") = (src.c1))) FROM src WHERE NOT EXISTS (SELECT 1 FROM won WHERE (won."k") = (src.c1))"#
        );
        assert_eq!(
            conditional_upsert(CRDB, &table(), &pk(&["k"]), &cols, &params, &cond),
            r#"WITH src AS (SELECT d.i, d.p1::INT8 AS c1, d.p2::TEXT AS c2, d.p3::INT8 AS c3, CASE WHEN d.p5 THEN d.p4::TIMESTAMPTZ ELSE now() END AS c4, d.p6::TIMESTAMPTZ AS c5 FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BOOL[], $6::TEXT[]) WITH ORDINALITY AS d(p1, p2, p3, p4, p5, p6, i)), won AS (INSERT INTO "db"."sch"."t" AS x ("k", "v", "ver", "ts", "at") SELECT src.c1, src.c2, src.c3, src.c4, src.c5 FROM src WHERE (src.c5 > now() - '1.5 seconds'::INTERVAL AND src.c4 > now() - '600 seconds'::INTERVAL) ON CONFLICT ("k") DO UPDATE SET "v" = excluded."v", "ver" = excluded."ver", "ts" = excluded."ts", "at" = excluded."at" WHERE (excluded."ver", excluded."v") > (x."ver", x."v") RETURNING x."k") SELECT src.i, ((src.c5 > now() - '1.5 seconds'::INTERVAL AND src.c4 > now() - '600 seconds'::INTERVAL) IS TRUE OR EXISTS (SELECT 1 FROM "db"."sch"."t" AS x WHERE (x."k") = (src.c1))) FROM src WHERE NOT EXISTS (SELECT 1 FROM won WHERE (won."k") = (src.c1))"#
        );
        let only = Conditions {
            cas: vec![],
            deadlines: vec![(Ident::new("ts"), Duration::from_secs(3600))],
        };
        assert_eq!(
            conditional_upsert(PG, &table(), &pk(&["k"]), &cols, &params, &only),
            r#"WITH src AS (SELECT d.i, d.p1::INT8 AS c1, d.p2::TEXT AS c2, d.p3::INT8 AS c3, CASE WHEN d.p5 THEN d.p4::TIMESTAMPTZ ELSE now() END AS c4, d.p6::TIMESTAMPTZ AS c5 FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BOOL[], $6::TEXT[]) WITH ORDINALITY AS d(p1, p2, p3, p4, p5, p6, i)), won AS (INSERT INTO "sch"."t" AS x ("k", "v", "ver", "ts", "at") SELECT src.c1, src.c2, src.c3, src.c4, src.c5 FROM src WHERE (src.c4 > now() - '3600 seconds'::INTERVAL) ON CONFLICT ("k") DO UPDATE SET "v" = excluded."v", "ver" = excluded."ver", "ts" = excluded."ts", "at" = excluded."at" RETURNING x."k") SELECT src.i, ((src.c4 > now() - '3600 seconds'::INTERVAL) IS TRUE OR EXISTS (SELECT 1 FROM "sch"."t" AS x WHERE (x."k") = (src.c1))) FROM src WHERE NOT EXISTS (SELECT 1 FROM won WHERE (won."k") = (src.c1))"#
        );
        assert_eq!(
            conditional_upsert(CRDB, &table(), &pk(&["k"]), &cols, &params, &only),
            r#"WITH src AS (SELECT d.i, d.p1::INT8 AS c1, d.p2::TEXT AS c2, d.p3::INT8 AS c3, CASE WHEN d.p5 THEN d.p4::TIMESTAMPTZ ELSE now() END AS c4, d.p6::TIMESTAMPTZ AS c5 FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BOOL[], $6::TEXT[]) WITH ORDINALITY AS d(p1, p2, p3, p4, p5, p6, i)), won AS (INSERT INTO "db"."sch"."t" AS x ("k", "v", "ver", "ts", "at") SELECT src.c1, src.c2, src.c3, src.c4, src.c5 FROM src WHERE (src.c4 > now() - '3600 seconds'::INTERVAL) ON CONFLICT ("k") DO UPDATE SET "v" = excluded."v", "ver" = excluded."ver", "ts" = excluded."ts", "at" = excluded."at" RETURNING x."k") SELECT src.i, ((src.c4 > now() - '3600 seconds'::INTERVAL) IS TRUE OR EXISTS (SELECT 1 FROM "db"."sch"."t" AS x WHERE (x."k") = (src.c1))) FROM src WHERE NOT EXISTS (SELECT 1 FROM won WHERE (won."k") = (src.c1))"#
        );
    }

    #[test]
    fn cas_upsert_of_a_key_only_table_still_reports_existing_rows() {
        let cols = [col("a", "TEXT", 1), col("b", "INT8", 2)];
        let params = [Param::Text, Param::Text];
        let cond = Conditions {
            cas: vec![Ident::new("b")],
            deadlines: vec![],
        };
        assert_eq!(
            conditional_upsert(PG, &table(), &pk(&["a", "b"]), &cols, &params, &cond),
            r#"WITH src AS (SELECT d.i, d.p1::TEXT AS c1, d.p2::INT8 AS c2 FROM unnest($1::TEXT[], $2::TEXT[]) WITH ORDINALITY AS d(p1, p2, i)), won AS (INSERT INTO "sch"."t" AS x ("a", "b") SELECT src.c1, src.c2 FROM src ON CONFLICT ("a", "b") DO UPDATE SET "a" = excluded."a" WHERE (excluded."b") > (x."b") RETURNING x."a", x."b") SELECT src.i, TRUE FROM src WHERE NOT EXISTS (SELECT 1 FROM won WHERE (won."a", won."b") = (src.c1, src.c2))"#
        );
        assert_eq!(
            conditional_upsert(CRDB, &table(), &pk(&["a", "b"]), &cols, &params, &cond),
            r#"WITH src AS (SELECT d.i, d.p1::TEXT AS c1, d.p2::INT8 AS c2 FROM unnest($1::TEXT[], $2::TEXT[]) WITH ORDINALITY AS d(p1, p2, i)), won AS (INSERT INTO "db"."sch"."t" AS x ("a", "b") SELECT src.c1, src.c2 FROM src ON CONFLICT ("a", "b") DO UPDATE SET "a" = excluded."a" WHERE (excluded."b") > (x."b") RETURNING x."a", x."b") SELECT src.i, TRUE FROM src WHERE NOT EXISTS (SELECT 1 FROM won WHERE (won."a", won."b") = (src.c1, src.c2))"#
        );
    }

    #[test]
    fn losers_are_read_back_as_json_and_locked() {
        let key = [col("k", "INT8", 1)];
        let read = pk(&["k", "v", "ver"]);
        assert_eq!(
            read_locked(PG, &table(), &key, &[Param::Text], &read),
            r#"SELECT k.i, ARRAY[to_jsonb(x."k")::TEXT, to_jsonb(x."v")::TEXT, to_jsonb(x."ver")::TEXT] FROM (SELECT d.i, d.p1::INT8 AS c1 FROM unnest($1::TEXT[]) WITH ORDINALITY AS d(p1, i)) AS k JOIN "sch"."t" AS x ON (x."k") = (k.c1) FOR UPDATE OF x"#
        );
        assert_eq!(
            read_locked(CRDB, &table(), &key, &[Param::Text], &read),
            r#"SELECT k.i, ARRAY[to_jsonb(x."k")::TEXT, to_jsonb(x."v")::TEXT, to_jsonb(x."ver")::TEXT] FROM (SELECT d.i, d.p1::INT8 AS c1 FROM unnest($1::TEXT[]) WITH ORDINALITY AS d(p1, i)) AS k JOIN "db"."sch"."t" AS x ON (x."k") = (k.c1) FOR UPDATE OF x"#
        );
    }

    #[test]
    fn guarded_deletes_compare_the_before_image() {
        let key = [col("k", "INT8", 1), col("g", "INT8", 2)];
        let cas = [col("ver", "INT8", 3), col("ts", "TIMESTAMPTZ", 4)];
        let params = [Param::Text; 4];
        assert_eq!(
            guarded_delete(PG, &table(), &key, &cas, &params),
            r#"WITH k AS (SELECT d.i, d.p1::INT8 AS c1, d.p2::INT8 AS c2, d.p3::INT8 AS v1, d.p4::TIMESTAMPTZ AS v2 FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[]) WITH ORDINALITY AS d(p1, p2, p3, p4, i)), gone AS (DELETE FROM "sch"."t" AS x USING k WHERE (x."k", x."g") = (k.c1, k.c2) AND (x."ver", x."ts") <= (k.v1, k.v2) RETURNING k.i) SELECT k.i, EXISTS (SELECT 1 FROM "sch"."t" AS x WHERE (x."k", x."g") = (k.c1, k.c2)) FROM k WHERE NOT EXISTS (SELECT 1 FROM gone WHERE gone.i = k.i)"#
        );
        assert_eq!(
            guarded_delete(CRDB, &table(), &key, &cas, &params),
            r#"WITH k AS (SELECT d.i, d.p1::INT8 AS c1, d.p2::INT8 AS c2, d.p3::INT8 AS v1, d.p4::TIMESTAMPTZ AS v2 FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[]) WITH ORDINALITY AS d(p1, p2, p3, p4, i)), gone AS (DELETE FROM "db"."sch"."t" AS x USING k WHERE (x."k", x."g") = (k.c1, k.c2) AND (x."ver", x."ts") <= (k.v1, k.v2) RETURNING k.i) SELECT k.i, EXISTS (SELECT 1 FROM "db"."sch"."t" AS x WHERE (x."k", x."g") = (k.c1, k.c2)) FROM k WHERE NOT EXISTS (SELECT 1 FROM gone WHERE gone.i = k.i)"#
        );
    }

    #[test]
    fn dead_letter_table_statements() {
        let dlq = Table::new(Schema::new("db", "sch"), "cdc_sink_dlq");
        assert_eq!(
            dlq_insert(PG, &dlq, false),
            r#"INSERT INTO "sch"."cdc_sink_dlq" ("dlq_name", "source_nanos", "source_logical", "data_after", "data_before") SELECT d.p1, d.p2::INT8, d.p3::INT8, d.p4::JSONB, d.p5::JSONB FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[]) AS d(p1, p2, p3, p4, p5)"#
        );
        assert_eq!(
            dlq_insert(CRDB, &dlq, false),
            r#"INSERT INTO "db"."sch"."cdc_sink_dlq" ("dlq_name", "source_nanos", "source_logical", "data_after", "data_before") SELECT d.p1, d.p2::INT8, d.p3::INT8, d.p4::JSONB, d.p5::JSONB FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[]) AS d(p1, p2, p3, p4, p5)"#
        );
        assert_eq!(
            dlq_insert(PG, &dlq, true),
            r#"INSERT INTO "sch"."cdc_sink_dlq" ("dlq_name", "source_nanos", "source_logical", "data_after", "data_before", "source_table") SELECT d.p1, d.p2::INT8, d.p3::INT8, d.p4::JSONB, d.p5::JSONB, d.p6 FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[]) AS d(p1, p2, p3, p4, p5, p6)"#
        );
        assert_eq!(
            dlq_create(PG, &dlq, true),
            r#"CREATE TABLE IF NOT EXISTS "sch"."cdc_sink_dlq" (event UUID NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY, dlq_name TEXT NOT NULL, source_nanos INT8 NOT NULL, source_logical INT8 NOT NULL, data_after JSONB NOT NULL, data_before JSONB NOT NULL, dlq_time TIMESTAMPTZ NOT NULL DEFAULT now(), source_table TEXT)"#
        );
        assert_eq!(
            dlq_create(PG, &dlq, false),
            r#"CREATE TABLE IF NOT EXISTS "sch"."cdc_sink_dlq" (event BIGSERIAL PRIMARY KEY, dlq_name TEXT NOT NULL, source_nanos INT8 NOT NULL, source_logical INT8 NOT NULL, data_after JSONB NOT NULL, data_before JSONB NOT NULL, dlq_time TIMESTAMPTZ NOT NULL DEFAULT now(), source_table TEXT)"#
        );
        assert_eq!(
            dlq_create(CRDB, &dlq, true),
            r#"CREATE TABLE IF NOT EXISTS "db"."sch"."cdc_sink_dlq" (event UUID NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY, dlq_name TEXT NOT NULL, source_nanos INT8 NOT NULL, source_logical INT8 NOT NULL, data_after JSONB NOT NULL, data_before JSONB NOT NULL, dlq_time TIMESTAMPTZ NOT NULL DEFAULT now(), source_table TEXT)"#
        );
    }

    #[test]
    fn intervals_render_in_seconds() {
        assert_eq!(
            interval(Duration::from_secs(600)),
            "'600 seconds'::INTERVAL"
        );
        assert_eq!(
            interval(Duration::from_millis(250)),
            "'0.25 seconds'::INTERVAL"
        );
        assert_eq!(
            interval(Duration::from_nanos(1_000_000_001)),
            "'1.000000001 seconds'::INTERVAL"
        );
    }
}
