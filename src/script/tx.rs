//! `getTX()`, both halves of the bridge. On the engine thread, the object `getTX()` returns
//! turns each call into a [`HostCall`] and a pending promise, and [`settle`] answers it with
//! the [`HostReply`]; on the async side, [`serve`] runs the call against the caller's
//! connection (statements with parameters bound by type, results as cells, `apply` through
//! the applier).

use super::convert::{self, KeyCache, TableKeys};
use super::host::{arg, err, key_from_js, string_arg, with_state};
use crate::apply::Applier;
use crate::hlc::Hlc;
use crate::ident::Table;
use crate::mutation::Mutation;
use crate::target::safe;
use boa_engine::builtins::promise::ResolvingFunctions;
use boa_engine::object::builtins::{JsArray, JsPromise};
use boa_engine::object::ObjectInitializer;
use boa_engine::{
    js_string, Context, JsNativeError, JsObject, JsResult, JsString, JsValue, NativeFunction,
};
use serde_json::Value;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{PgArguments, PgTypeInfo, PgTypeKind, Postgres};
use sqlx::Either;
use sqlx::{
    Arguments as _, Column as _, PgConnection, Row as _, Statement as _, TypeInfo as _,
    ValueRef as _,
};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::{Mutex, PoisonError};

/// A statement parameter: its text, or NULL. The server converts the text to the parameter's
/// type, so scripts can pass the exact decimal strings they received.
pub(super) type Param = Option<String>;

pub(super) enum HostCall {
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
pub(super) enum Cell {
    Null,
    Bool(bool),
    /// Every other type as its text, numbers included (exact).
    Text(String),
    Json(serde_json::Value),
}

pub(super) enum Answer {
    /// Rows written or affected.
    Done(u64),
    Rows(Vec<Vec<Cell>>),
}

pub(super) struct HostReply {
    pub id: u64,
    /// The error text is the script's to see; it is not logged here.
    pub result: Result<Answer, String>,
}

// The engine thread's half: what `getTX()` gives the script. Each call becomes a `HostCall`
// and a pending promise; the worker parks until the `HostReply` settles it.

/// One column as `getTX().columns()` shows it.
#[derive(Clone, Debug)]
pub(super) struct ColumnInfo {
    pub name: String,
    pub data_type: String,
    pub primary: bool,
    pub ignored: bool,
    pub default: Option<String>,
}

/// The target transaction of the running `apply` callback.
pub(super) struct TxScope {
    pub table: Table,
    pub keys: TableKeys,
    pub columns: Vec<ColumnInfo>,
    pub host: tokio::sync::mpsc::UnboundedSender<HostCall>,
    pub reply: flume::Sender<HostReply>,
    pub next_id: u64,
    pub pending: HashMap<u64, ResolvingFunctions>,
    /// The ops handed to `apply`, to find the original mutation of an op passed back.
    pub originals: Rc<HashMap<JsObject, usize>>,
    pub muts: Rc<Vec<Mutation>>,
}

pub(super) fn get_tx(_: &JsValue, _: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    if with_state(|s| s.tx.is_none()) {
        return Err(err(
            "getTX() is only available inside a table's apply callback and the promises it starts",
        ));
    }
    let obj = ObjectInitializer::new(ctx)
        .function(
            NativeFunction::from_fn_ptr(tx_apply),
            js_string!("apply"),
            1,
        )
        .function(NativeFunction::from_fn_ptr(tx_exec), js_string!("exec"), 1)
        .function(
            NativeFunction::from_fn_ptr(tx_query),
            js_string!("query"),
            1,
        )
        .function(
            NativeFunction::from_fn_ptr(tx_columns),
            js_string!("columns"),
            0,
        )
        .function(
            NativeFunction::from_fn_ptr(tx_schema),
            js_string!("schema"),
            0,
        )
        .function(
            NativeFunction::from_fn_ptr(tx_table),
            js_string!("table"),
            0,
        )
        .build();
    Ok(obj.into())
}

fn no_tx() -> boa_engine::JsError {
    err("this transaction is over: getTX() results are only valid inside the apply callback")
}

/// Sends a call to the async side and answers with a promise settled when it replies.
fn host_call(
    ctx: &mut Context,
    make: impl FnOnce(u64, flume::Sender<HostReply>) -> HostCall,
) -> JsResult<JsValue> {
    let (promise, resolvers) = JsPromise::new_pending(ctx);
    with_state(|s| {
        let tx = s.tx.as_mut().ok_or_else(no_tx)?;
        let id = tx.next_id;
        tx.next_id += 1;
        tx.host
            .send(make(id, tx.reply.clone()))
            .map_err(|_| err("the target transaction is gone"))?;
        tx.pending.insert(id, resolvers);
        Ok::<_, boa_engine::JsError>(())
    })?;
    Ok(promise.into())
}

fn tx_apply(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let (table, keys, originals, muts) = with_state(|s| {
        s.tx.as_ref()
            .map(|t| {
                (
                    t.table.clone(),
                    t.keys.clone(),
                    t.originals.clone(),
                    t.muts.clone(),
                )
            })
            .ok_or_else(no_tx)
    })?;
    let converted = ops_to_mutations(&arg(args, 0), &table, &keys, &originals, &muts, ctx)?;
    host_call(ctx, |id, reply| HostCall::Apply {
        id,
        reply,
        muts: converted,
    })
}

fn params(args: &[JsValue], ctx: &mut Context) -> JsResult<Vec<Param>> {
    let mut out = Vec::new();
    for v in args.iter().skip(1) {
        out.push(if v.is_null_or_undefined() {
            None
        } else if let Some(s) = v.as_string() {
            Some(s.to_std_string_escaped())
        } else if v.is_object() {
            let j = convert::from_js(v, None, ctx, 0)?;
            match j {
                Value::String(s) => Some(s),
                other => Some(other.to_string()),
            }
        } else {
            Some(v.to_string(ctx)?.to_std_string_escaped())
        });
    }
    Ok(out)
}

fn tx_exec(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let sql = string_arg(args, 0, "exec: the SQL")?;
    let params = params(args, ctx)?;
    host_call(ctx, |id, reply| HostCall::Exec {
        id,
        reply,
        sql,
        params,
    })
}

fn tx_query(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let sql = string_arg(args, 0, "query: the SQL")?;
    let params = params(args, ctx)?;
    host_call(ctx, |id, reply| HostCall::Query {
        id,
        reply,
        sql,
        params,
    })
}

fn tx_columns(_: &JsValue, _: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let cols = with_state(|s| s.tx.as_ref().map(|t| t.columns.clone()).ok_or_else(no_tx))?;
    let mut items = Vec::with_capacity(cols.len());
    for c in cols {
        let o = JsObject::with_object_proto(ctx.intrinsics());
        o.create_data_property_or_throw(js_string!("name"), JsString::from(c.name.as_str()), ctx)?;
        o.create_data_property_or_throw(
            js_string!("type"),
            JsString::from(c.data_type.as_str()),
            ctx,
        )?;
        o.create_data_property_or_throw(js_string!("primary"), c.primary, ctx)?;
        o.create_data_property_or_throw(js_string!("ignored"), c.ignored, ctx)?;
        let d: JsValue = c
            .default
            .as_deref()
            .map_or(JsValue::null(), |d| JsString::from(d).into());
        o.create_data_property_or_throw(js_string!("defaultExpr"), d, ctx)?;
        items.push(o.into());
    }
    Ok(JsArray::from_iter(items, ctx).into())
}

fn tx_schema(_: &JsValue, _: &[JsValue], _: &mut Context) -> JsResult<JsValue> {
    let s = with_state(|s| {
        s.tx.as_ref()
            .map(|t| t.table.schema.quoted())
            .ok_or_else(no_tx)
    })?;
    Ok(JsString::from(s.as_str()).into())
}

fn tx_table(_: &JsValue, _: &[JsValue], _: &mut Context) -> JsResult<JsValue> {
    let s = with_state(|s| s.tx.as_ref().map(|t| t.table.quoted()).ok_or_else(no_tx))?;
    Ok(JsString::from(s.as_str()).into())
}

/// JS values of a query result row.
pub(super) fn cell_to_js(c: &Cell, ctx: &mut Context) -> JsResult<JsValue> {
    Ok(match c {
        Cell::Null => JsValue::null(),
        Cell::Bool(b) => JsValue::from(*b),
        Cell::Text(s) => JsString::from(s.as_str()).into(),
        Cell::Json(v) => {
            let mut keys = KeyCache::default();
            convert::to_js(v, ctx, &mut keys)?
        }
    })
}

/// Settles the promise of host call `id`.
pub(super) fn settle(reply: HostReply, ctx: &mut Context) -> JsResult<()> {
    let Some(resolvers) = with_state(|s| s.tx.as_mut().and_then(|t| t.pending.remove(&reply.id)))
    else {
        return Ok(());
    };
    match reply.result {
        Ok(Answer::Done(n)) => {
            resolvers
                .resolve
                .call(&JsValue::undefined(), &[JsValue::from(n as f64)], ctx)?;
        }
        Ok(Answer::Rows(rows)) => {
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let mut cells = Vec::with_capacity(r.len());
                for c in r {
                    cells.push(cell_to_js(c, ctx)?);
                }
                out.push(JsArray::from_iter(cells, ctx).into());
            }
            let arr: JsValue = JsArray::from_iter(out, ctx).into();
            resolvers.resolve.call(&JsValue::undefined(), &[arr], ctx)?;
        }
        Err(msg) => {
            let e = JsNativeError::error().with_message(msg).into_opaque(ctx);
            resolvers
                .reject
                .call(&JsValue::undefined(), &[e.into()], ctx)?;
        }
    }
    Ok(())
}

/// `ApplyOp[]` back to mutations of `table`. Ops that came from the batch keep their time.
pub(super) fn ops_to_mutations(
    ops: &JsValue,
    table: &Table,
    keys: &TableKeys,
    originals: &HashMap<JsObject, usize>,
    muts: &[Mutation],
    ctx: &mut Context,
) -> JsResult<Vec<Mutation>> {
    let arr = ops
        .as_object()
        .filter(|o| o.is_array())
        .ok_or_else(|| err("apply: expects an array of operations"))?;
    let len = arr.get(js_string!("length"), ctx)?.to_length(ctx)?;
    let mut out = Vec::with_capacity(len as usize);
    for i in 0..len {
        let op = arr
            .get(i, ctx)?
            .as_object()
            .ok_or_else(|| err(format!("apply: operation {i} is not an object")))?;
        let base = originals.get(&op).map(|&j| &muts[j]);
        let action = op.get(js_string!("action"), ctx)?;
        let action = action
            .as_string()
            .map(|s| s.to_std_string_escaped())
            .unwrap_or_default();
        let time = match base {
            Some(b) => b.time,
            None => op_time(&op, ctx)?,
        };
        let parse = |raw: Option<&String>| -> Option<serde_json::Map<String, Value>> {
            raw.and_then(|r| serde_json::from_str(r).ok())
        };
        let before_v = op.get(js_string!("before"), ctx)?;
        let before = if before_v.is_null_or_undefined() {
            None
        } else {
            let hints = parse(base.and_then(|b| b.before.as_ref()));
            let doc = convert::doc_from_js(&before_v, hints.as_ref(), Some(keys), ctx)?;
            Some(Value::Object(doc).to_string())
        };
        match action.as_str() {
            "upsert" => {
                let data = op.get(js_string!("data"), ctx)?;
                let hints = parse(base.and_then(|b| b.after.as_ref()));
                let doc = convert::doc_from_js(&data, hints.as_ref(), Some(keys), ctx)
                    .map_err(|_| err(format!("apply: upsert {i} needs a data document")))?;
                let key = convert::key_of(&doc, keys).map_err(|c| {
                    err(format!(
                        "apply: upsert {i} for {table} omitted value for PK column {c}"
                    ))
                })?;
                out.push(Mutation {
                    time,
                    key,
                    after: Some(Value::Object(doc).to_string()),
                    before,
                });
            }
            "delete" => {
                let pk = op.get(js_string!("pk"), ctx)?;
                let key = if pk.is_null_or_undefined() {
                    base.map(|b| b.key.clone())
                        .ok_or_else(|| err(format!("apply: delete {i} needs a pk array")))?
                } else {
                    let hint: Option<Value> = base.and_then(|b| serde_json::from_str(&b.key).ok());
                    key_from_js(&pk, hint.as_ref(), keys, ctx)?
                };
                out.push(Mutation {
                    time,
                    key,
                    after: None,
                    before,
                });
            }
            other => {
                return Err(err(format!(
                    "apply: operation {i} has action {other:?}; expected \"upsert\" or \"delete\""
                )))
            }
        }
    }
    Ok(out)
}

/// The HLC of an op built by the script, from `meta.updated` or `meta.nanos`/`logical`.
fn op_time(op: &JsObject, ctx: &mut Context) -> JsResult<Hlc> {
    let meta = op.get(js_string!("meta"), ctx)?;
    if let Some(m) = meta.as_object() {
        let updated = m.get(js_string!("updated"), ctx)?;
        if let Some(s) = updated.as_string() {
            if let Ok(t) = s.to_std_string_escaped().parse::<Hlc>() {
                return Ok(t);
            }
        }
        let nanos = m.get(js_string!("nanos"), ctx)?.to_number(ctx)?;
        let logical = m.get(js_string!("logical"), ctx)?.to_number(ctx)?;
        if nanos.is_finite() && logical.is_finite() {
            return Ok(Hlc::new(nanos as i64, logical as i32));
        }
    }
    Err(err(
        "apply: an operation needs meta.updated or meta.nanos and meta.logical",
    ))
}

// The caller's half: each `HostCall` runs on the caller's connection, inside its transaction.

/// Refuses a parameter PostgreSQL cannot hold, instead of sending a truncated value.
fn check_params(params: &[Param]) -> Result<(), String> {
    match params
        .iter()
        .position(|p| p.as_deref().is_some_and(|s| s.contains('\0')))
    {
        Some(i) => Err(format!(
            "statement parameter ${} contains a NUL character, which PostgreSQL text cannot hold",
            i + 1
        )),
        None => Ok(()),
    }
}

const BOOL: u32 = 16;
const NAME: u32 = 19;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const TEXT: u32 = 25;
const OID: u32 = 26;
const JSON: u32 = 114;
const UNKNOWN: u32 = 705;
const BPCHAR: u32 = 1042;
const VARCHAR: u32 = 1043;
const JSONB: u32 = 3802;

/// How values of a type travel in binary format, the only one sqlx binds and reads.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Wire {
    /// The text itself (text types, enums, json).
    Text,
    /// A version byte, then the text.
    Jsonb,
    /// Anything else: the server converts from or to text.
    Other,
}

fn wire(ty: &PgTypeInfo) -> Wire {
    if let PgTypeKind::Domain(base) = ty.kind() {
        return wire(base);
    }
    if matches!(ty.kind(), PgTypeKind::Enum(_)) {
        return Wire::Text;
    }
    match ty.oid().map(|o| o.0) {
        Some(TEXT | VARCHAR | BPCHAR | NAME | UNKNOWN | JSON) => Wire::Text,
        Some(JSONB) => Wire::Jsonb,
        _ => Wire::Other,
    }
}

/// A value already in a type's binary format, bound under that type's OID.
struct Raw {
    oid: Oid,
    bytes: Option<Vec<u8>>,
}

impl sqlx::Type<Postgres> for Raw {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(Oid(UNKNOWN))
    }
    fn compatible(_: &PgTypeInfo) -> bool {
        true
    }
}

impl sqlx::Encode<'_, Postgres> for Raw {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        match &self.bytes {
            None => Ok(sqlx::encode::IsNull::Yes),
            Some(b) => {
                buf.extend_from_slice(b);
                Ok(sqlx::encode::IsNull::No)
            }
        }
    }
    fn produces(&self) -> Option<PgTypeInfo> {
        Some(PgTypeInfo::with_oid(self.oid))
    }
}

/// The binary form of the plainest integer and boolean texts, which the server would read the
/// same way; anything else (spaces, other spellings, out of range) is left to the server.
fn plain_binary(oid: u32, s: &str) -> Option<Vec<u8>> {
    let digits = |s: &str| {
        let body = s.strip_prefix('-').unwrap_or(s);
        !body.is_empty() && body.len() <= 19 && body.bytes().all(|b| b.is_ascii_digit())
    };
    match oid {
        INT2 if digits(s) => s.parse::<i16>().ok().map(|v| v.to_be_bytes().to_vec()),
        INT4 if digits(s) => s.parse::<i32>().ok().map(|v| v.to_be_bytes().to_vec()),
        INT8 if digits(s) => s.parse::<i64>().ok().map(|v| v.to_be_bytes().to_vec()),
        BOOL => match s {
            "true" | "t" => Some(vec![1]),
            "false" | "f" => Some(vec![0]),
            _ => None,
        },
        _ => None,
    }
}

/// SQL names of types by OID, for the casts that convert values; OIDs do not change while a
/// type exists.
static TYPE_NAMES: Mutex<BTreeMap<u32, String>> = Mutex::new(BTreeMap::new());

async fn type_names(conn: &mut PgConnection, oids: &[u32]) -> Result<Vec<String>, sqlx::Error> {
    let missing: Vec<i64> = {
        let known = TYPE_NAMES.lock().unwrap_or_else(PoisonError::into_inner);
        oids.iter()
            .filter(|o| !known.contains_key(o))
            .map(|&o| i64::from(o))
            .collect()
    };
    if !missing.is_empty() {
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT o, pg_catalog.format_type(o::pg_catalog.oid, NULL) FROM unnest($1::int8[]) AS o",
        )
        .bind(&missing)
        .fetch_all(&mut *conn)
        .await?;
        let mut known = TYPE_NAMES.lock().unwrap_or_else(PoisonError::into_inner);
        for (o, name) in rows {
            known.insert(o as u32, name);
        }
    }
    let known = TYPE_NAMES.lock().unwrap_or_else(PoisonError::into_inner);
    Ok(oids
        .iter()
        .map(|o| known.get(o).cloned().unwrap_or_else(|| "text".into()))
        .collect())
}

/// The script's parameters as bound values of the types the server inferred for `sql`: text
/// types take the text as it is; other types are converted from text by the server (one
/// statement, itself with bound parameters), so "42" reaches an INT8 parameter as 42, as a
/// literal would.
async fn bind_params(
    conn: &mut PgConnection,
    sql: &str,
    params: &[Param],
) -> Result<PgArguments, sqlx::Error> {
    let stmt = sqlx::Executor::prepare(&mut *conn, sql).await?;
    let types: Vec<PgTypeInfo> = match stmt.parameters() {
        Some(Either::Left(t)) => t.to_vec(),
        _ => Vec::new(),
    };
    if types.len() != params.len() {
        return Err(sqlx::Error::Protocol(format!(
            "the statement takes {} parameters, the script passed {}",
            types.len(),
            params.len()
        )));
    }
    let mut raws: Vec<Raw> = Vec::with_capacity(params.len());
    let mut convert = Vec::new();
    for (i, (p, ty)) in params.iter().zip(&types).enumerate() {
        let oid = ty.oid().unwrap_or(Oid(UNKNOWN));
        let bytes = match (p, wire(ty)) {
            (None, _) => None,
            (Some(s), Wire::Text) => Some(s.as_bytes().to_vec()),
            (Some(s), Wire::Jsonb) => Some([&[1u8][..], s.as_bytes()].concat()),
            (Some(s), Wire::Other) => match plain_binary(oid.0, s) {
                Some(b) => Some(b),
                None => {
                    convert.push(i);
                    None
                }
            },
        };
        raws.push(Raw { oid, bytes });
    }
    if !convert.is_empty() {
        let oids: Vec<u32> = convert.iter().map(|&i| raws[i].oid.0).collect();
        let names = type_names(conn, &oids).await?;
        let casts: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(n, name)| format!("${}::pg_catalog.text::{name}", n + 1))
            .collect();
        let text = format!("SELECT {}", casts.join(", "));
        let mut q = sqlx::query(&text);
        for &i in &convert {
            q = q.bind(params[i].as_deref());
        }
        let row = q.fetch_one(&mut *conn).await?;
        for (n, &i) in convert.iter().enumerate() {
            let v = row.try_get_raw(n)?;
            raws[i].bytes = v.as_bytes().ok().map(<[u8]>::to_vec);
        }
    }
    let mut args = PgArguments::default();
    for r in raws {
        args.add(r).map_err(sqlx::Error::Encode)?;
    }
    Ok(args)
}

/// Query results as cells. Rows arrive in binary format: text, JSON, booleans and integers
/// are read here, every other type is turned into its text by the server (exact for numerics
/// and timestamps), a chunk of rows per statement.
async fn result_cells(
    conn: &mut PgConnection,
    rows: &[sqlx::postgres::PgRow],
) -> Result<Vec<Vec<Cell>>, sqlx::Error> {
    let mut out: Vec<Vec<Cell>> = Vec::with_capacity(rows.len());
    // (row, column, oid, bytes) of values the server must render.
    let mut pending: Vec<(usize, usize, Oid, Vec<u8>)> = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        let mut cells = Vec::with_capacity(row.columns().len());
        for (c, col) in row.columns().iter().enumerate() {
            let v = row.try_get_raw(c)?;
            let Some(bytes) = (!v.is_null()).then(|| v.as_bytes().ok()).flatten() else {
                cells.push(Cell::Null);
                continue;
            };
            let ty = col.type_info();
            let oid = ty.oid().map_or(0, |o| o.0);
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            let int = |b: &[u8]| -> Option<String> {
                Some(match b.len() {
                    2 => i16::from_be_bytes(b.try_into().ok()?).to_string(),
                    4 if oid == OID => u32::from_be_bytes(b.try_into().ok()?).to_string(),
                    4 => i32::from_be_bytes(b.try_into().ok()?).to_string(),
                    8 => i64::from_be_bytes(b.try_into().ok()?).to_string(),
                    _ => return None,
                })
            };
            let cell = match (oid, wire(ty)) {
                (BOOL, _) => Some(Cell::Bool(bytes.first().is_some_and(|b| *b != 0))),
                (INT2 | INT4 | INT8 | OID, _) => int(bytes).map(Cell::Text),
                (JSON, _) => Some(json_cell(text(bytes))),
                (_, Wire::Jsonb) => Some(json_cell(text(bytes.get(1..).unwrap_or_default()))),
                (_, Wire::Text) => Some(Cell::Text(text(bytes))),
                _ => None,
            };
            match cell {
                Some(cell) => cells.push(cell),
                None => {
                    pending.push((r, c, ty.oid().unwrap_or(Oid(UNKNOWN)), bytes.to_vec()));
                    cells.push(Cell::Null);
                }
            }
        }
        out.push(cells);
    }
    // Bind parameters per statement stay far below PostgreSQL's 65,535.
    for chunk in pending.chunks(1_000) {
        let casts: Vec<String> = (1..=chunk.len())
            .map(|n| format!("${n}::pg_catalog.text"))
            .collect();
        let text = format!("SELECT {}", casts.join(", "));
        let mut q = sqlx::query(&text);
        for (_, _, oid, bytes) in chunk {
            q = q.bind(Raw {
                oid: *oid,
                bytes: Some(bytes.clone()),
            });
        }
        let row = q.fetch_one(&mut *conn).await?;
        for (n, (r, c, _, _)) in chunk.iter().enumerate() {
            let s: Option<String> = row.try_get(n)?;
            out[*r][*c] = s.map_or(Cell::Null, Cell::Text);
        }
    }
    Ok(out)
}

fn json_cell(text: String) -> Cell {
    serde_json::from_str(&text).map_or(Cell::Text(text), Cell::Json)
}

/// Results of a statement without parameters, sent as it is (simple protocol, text format).
fn text_cells(row: &sqlx::postgres::PgRow) -> Vec<Cell> {
    (0..row.columns().len())
        .map(|i| {
            let Ok(v) = row.try_get_raw(i) else {
                return Cell::Null;
            };
            if v.is_null() {
                return Cell::Null;
            }
            let ty = v.type_info().name().to_ascii_uppercase();
            let text = v
                .as_bytes()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            match ty.as_str() {
                "BOOL" => Cell::Bool(text == "t" || text == "true"),
                "JSON" | "JSONB" => json_cell(text),
                _ => Cell::Text(text),
            }
        })
        .collect()
}

/// A script statement (its errors name SQLSTATE and names, never quoted values, since a script
/// may log or rethrow them): without parameters it is sent as it is; with them, through the
/// extended protocol with bound values (never spliced into the SQL text).
async fn exec(conn: &mut PgConnection, sql: &str, params: &[Param]) -> Result<u64, String> {
    check_params(params)?;
    if params.is_empty() {
        return sqlx::Executor::execute(&mut *conn, sqlx::raw_sql(sql))
            .await
            .map(|d| d.rows_affected())
            .map_err(|e| safe(&e).to_string());
    }
    let args = bind_params(conn, sql, params)
        .await
        .map_err(|e| safe(&e).to_string())?;
    sqlx::query_with(sql, args)
        .execute(&mut *conn)
        .await
        .map(|d| d.rows_affected())
        .map_err(|e| safe(&e).to_string())
}

async fn query(
    conn: &mut PgConnection,
    sql: &str,
    params: &[Param],
) -> Result<Vec<Vec<Cell>>, String> {
    check_params(params)?;
    if params.is_empty() {
        return sqlx::Executor::fetch_all(&mut *conn, sqlx::raw_sql(sql))
            .await
            .map(|rows| rows.iter().map(text_cells).collect())
            .map_err(|e| safe(&e).to_string());
    }
    let args = bind_params(conn, sql, params)
        .await
        .map_err(|e| safe(&e).to_string())?;
    let rows = sqlx::query_with(sql, args)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| safe(&e).to_string())?;
    result_cells(conn, &rows)
        .await
        .map_err(|e| safe(&e).to_string())
}

/// Runs one call on `conn` and answers it. Boxed: the caller's future must stay `Send`, which
/// the compiler cannot prove through sqlx's executor bounds otherwise.
pub(super) fn serve<'a>(
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
                let r = exec(conn, &sql, &params).await.map(Answer::Done);
                (id, reply, r)
            }
            HostCall::Query {
                id,
                reply,
                sql,
                params,
            } => {
                let r = query(conn, &sql, &params).await.map(Answer::Rows);
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
    fn only_the_plainest_integers_and_booleans_skip_the_server() {
        assert_eq!(plain_binary(INT8, "42"), Some(42i64.to_be_bytes().to_vec()));
        assert_eq!(
            plain_binary(INT8, "-9223372036854775808"),
            Some(i64::MIN.to_be_bytes().to_vec())
        );
        assert_eq!(
            plain_binary(INT4, "-7"),
            Some((-7i32).to_be_bytes().to_vec())
        );
        assert_eq!(
            plain_binary(INT2, "40000"),
            None,
            "out of range: the server says so"
        );
        for odd in [" 1", "+1", "1_000", "", "-", "1.0", "0x10"] {
            assert_eq!(plain_binary(INT8, odd), None, "{odd:?}");
        }
        assert_eq!(plain_binary(BOOL, "true"), Some(vec![1]));
        assert_eq!(plain_binary(BOOL, "yes"), None);
        assert_eq!(plain_binary(TEXT, "1"), None);
    }

    #[test]
    fn a_nul_in_a_parameter_is_refused_naming_it() {
        let e = check_params(&[None, Some("ok".into()), Some("a\0b".into())]).unwrap_err();
        assert!(e.contains("$3") && e.contains("NUL"), "{e}");
        assert!(check_params(&[None, Some(r"x\'); --".into())]).is_ok());
    }
}
