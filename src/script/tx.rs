//! `getTX()` calls, serviced on the async side against the caller's connection: the engine
//! thread sends a [`HostCall`] and parks until the [`HostReply`] settles the script's promise.

use crate::apply::Applier;
use crate::ident::Table;
use crate::mutation::Mutation;
use sqlx::{PgConnection, Row as _, TypeInfo as _, ValueRef as _};
use std::sync::atomic::{AtomicU64, Ordering};

/// A statement parameter: its text, or NULL. The server converts the text to the parameter's
/// type, so scripts can pass the exact decimal strings they received.
pub type Param = Option<String>;

pub enum HostCall {
    Apply {
        id: u64,
        reply: flume::Sender<HostReply>,
        muts: Vec<Mutation>,
    },
    Exec {
        id: u64,
        reply: flume::Sender<HostReply>,
        sql: String,
        params: Vec<Param>,
    },
    Query {
        id: u64,
        reply: flume::Sender<HostReply>,
        sql: String,
        params: Vec<Param>,
    },
}

/// One value of a query result row.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Bool(bool),
    /// Every other type as its text, numbers included (exact).
    Text(String),
    Json(serde_json::Value),
}

pub enum Answer {
    /// Rows written or affected.
    Done(u64),
    Rows(Vec<Vec<Cell>>),
}

pub struct HostReply {
    pub id: u64,
    /// The error text is the script's to see; it is not logged here.
    pub result: Result<Answer, String>,
}

static STATEMENT: AtomicU64 = AtomicU64::new(0);

/// A parameter as an escape-string literal (`E'…'`). Its meaning does not depend on
/// `standard_conforming_strings`: with both `\` and `'` escaped no value can end the literal,
/// whatever the session or database sets (sessions are also pinned to `on`, see `target`).
fn literal(p: &Param) -> Result<String, String> {
    match p {
        None => Ok("NULL".into()),
        // PostgreSQL text cannot hold NUL; say so instead of sending a truncated value.
        Some(s) if s.contains('\0') => Err("a statement parameter contains a NUL character".into()),
        Some(s) => Ok(format!(
            "E'{}'",
            s.replace('\\', "\\\\").replace('\'', "''")
        )),
    }
}

/// The SQL run for a script statement. The script's SQL is the operator's and trusted; its
/// parameters carry row values and are not. They go through a named prepared statement whose
/// types the server infers, as untyped literals of `EXECUTE`, so a string such as "42" reaches
/// an INT8 parameter as 42 and results come back as text for every type. One round trip for
/// all three statements. (Bound parameters would need sqlx's extended protocol, which sends
/// and receives every value in binary and so cannot keep either property.)
pub fn statement_sql(sql: &str, params: &[Param]) -> Result<String, String> {
    if params.is_empty() {
        return Ok(sql.to_string());
    }
    let args = params.iter().map(literal).collect::<Result<Vec<_>, _>>()?;
    let name = format!(
        "cdc_sink_script_{}",
        STATEMENT.fetch_add(1, Ordering::Relaxed)
    );
    Ok(format!(
        "PREPARE {name} AS {sql};\nEXECUTE {name}({});\nDEALLOCATE {name}",
        args.join(", ")
    ))
}

fn cells(row: &sqlx::postgres::PgRow) -> Vec<Cell> {
    (0..row.columns().len())
        .map(|i| {
            let Ok(v) = row.try_get_raw(i) else {
                return Cell::Null;
            };
            if v.is_null() {
                return Cell::Null;
            }
            let ty = v.type_info().name().to_ascii_uppercase();
            // The simple protocol answers in text format.
            let text = v
                .as_bytes()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            match ty.as_str() {
                "BOOL" => Cell::Bool(text == "t" || text == "true"),
                "JSON" | "JSONB" => {
                    serde_json::from_str(&text).map_or(Cell::Text(text), Cell::Json)
                }
                _ => Cell::Text(text),
            }
        })
        .collect()
}

/// Runs one call on `conn` and answers it. Boxed: the caller's future must stay `Send`, which
/// the compiler cannot prove through sqlx's executor bounds otherwise.
pub fn serve<'a>(
    call: HostCall,
    conn: &'a mut PgConnection,
    applier: &'a Applier,
    table: &'a Table,
) -> futures::future::BoxFuture<'a, ()> {
    Box::pin(async move {
        let (id, reply, result) = match call {
            HostCall::Apply { id, reply, muts } => {
                let r = applier
                    .apply(conn, table, &muts)
                    .await
                    .map(|s| Answer::Done(s.upserts + s.deletes))
                    .map_err(|e| e.to_string());
                (id, reply, r)
            }
            HostCall::Exec {
                id,
                reply,
                sql,
                params,
            } => {
                let r = match statement_sql(&sql, &params) {
                    Ok(text) => sqlx::Executor::execute(&mut *conn, sqlx::raw_sql(&text))
                        .await
                        .map(|d| Answer::Done(d.rows_affected()))
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                };
                (id, reply, r)
            }
            HostCall::Query {
                id,
                reply,
                sql,
                params,
            } => {
                let r = match statement_sql(&sql, &params) {
                    Ok(text) => sqlx::Executor::fetch_all(&mut *conn, sqlx::raw_sql(&text))
                        .await
                        .map(|rows| Answer::Rows(rows.iter().map(cells).collect()))
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                };
                (id, reply, r)
            }
        };
        // The engine side may have given up (deadline); nothing to do then.
        let _ = reply.send(HostReply { id, result });
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_become_escape_string_literals_of_a_prepared_statement() {
        assert_eq!(statement_sql("SELECT 1", &[]).unwrap(), "SELECT 1");
        let s = statement_sql(
            "SELECT $1, $2, $3",
            &[
                Some("it's".into()),
                None,
                Some(r"x\'); DROP TABLE t; --".into()),
            ],
        )
        .unwrap();
        let name = s.split_whitespace().nth(1).unwrap().to_string();
        assert_eq!(
            s,
            format!(
                "PREPARE {name} AS SELECT $1, $2, $3;\nEXECUTE {name}(E'it''s', NULL, E'x\\\\''); DROP TABLE t; --');\nDEALLOCATE {name}"
            )
        );
    }

    #[test]
    fn a_nul_in_a_parameter_is_refused() {
        let e = statement_sql("SELECT $1", &[Some("a\0b".into())]).unwrap_err();
        assert!(e.contains("NUL"), "{e}");
    }
}
