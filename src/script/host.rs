//! The `cdc-sink@v1` module (alias `replicator@v1`) and `console`, as seen from JS. What the
//! script registers lives in a per-thread [`State`]: each engine thread owns one Context. The
//! object `getTX()` returns is in [`tx`], beside the side that runs its statements.

use super::config::{Captured, DeletesTo, MergeKind, SourceOptions, TableName, TableOptions};
use super::convert::{self, Keymap, TableKeys};
use super::tx::{self, TxScope};
use crate::ident::{Ident, Schema, Table};
use boa_engine::module::{Module, SyntheticModuleInitializer};
use boa_engine::object::ObjectInitializer;
use boa_engine::property::{Attribute, PropertyKey};
use boa_engine::{
    js_string, Context, JsNativeError, JsObject, JsResult, JsString, JsValue, NativeFunction,
};
use serde_json::Value;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

/// The names the host module exports.
pub(super) const EXPORTS: [&str; 7] = [
    "configureSource",
    "configureTable",
    "getTX",
    "randomUUID",
    "replicationKey",
    "setOptions",
    "standardMerge",
];

/// JS functions a source registered.
#[derive(Default, Clone)]
pub(super) struct SourceFns {
    pub dispatch: Option<JsObject>,
    pub deletes_to: Option<JsObject>,
}

/// JS functions a table registered.
#[derive(Default, Clone)]
pub(super) struct TableFns {
    pub map: Option<JsObject>,
    pub delete_key: Option<JsObject>,
    pub merge: Option<JsObject>,
    pub fallback: Option<JsObject>,
    pub apply: Option<JsObject>,
}

/// The tables `replicationKey` can name while a batch's callbacks run.
#[derive(Clone)]
pub(super) struct KeyScope {
    /// Where bare table names resolve.
    pub schema: Schema,
    pub keymap: Arc<Keymap>,
}

#[derive(Default)]
pub(super) struct State {
    /// The script's file name, for logs.
    pub script: String,
    pub known_flags: Vec<String>,
    /// Configuration calls are only allowed while the top level runs.
    pub top_level: bool,
    /// A replacement worker re-running the top level: its console output was seen already.
    pub quiet: bool,
    pub captured: Captured,
    pub sources: HashMap<String, SourceFns>,
    pub tables: Vec<(TableName, TableFns)>,
    /// `standardMerge(...)` results and their fallbacks.
    pub markers: Vec<(JsObject, Option<JsObject>)>,
    pub tx: Option<TxScope>,
    pub keys: Option<KeyScope>,
}

thread_local! {
    pub static STATE: RefCell<State> = RefCell::new(State::default());
}

pub(super) fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    STATE.with(|s| f(&mut s.borrow_mut()))
}

/// The functions registered for `t` (most specific name).
pub(super) fn table_fns(t: &Table) -> Option<TableFns> {
    with_state(|s| {
        s.tables
            .iter()
            .filter(|(n, _)| n.matches(t))
            .max_by_key(|(n, _)| n.parts())
            .map(|(_, f)| f.clone())
    })
}

pub(super) fn source_fns(name: &str) -> Option<SourceFns> {
    with_state(|s| s.sources.get(&name.to_lowercase()).cloned())
}

pub(super) fn err(msg: impl Into<String>) -> boa_engine::JsError {
    JsNativeError::typ().with_message(msg.into()).into()
}

pub(super) fn arg(args: &[JsValue], i: usize) -> JsValue {
    args.get(i).cloned().unwrap_or_default()
}

pub(super) fn string_arg(args: &[JsValue], i: usize, what: &str) -> JsResult<String> {
    arg(args, i)
        .as_string()
        .map(|s| s.to_std_string_escaped())
        .ok_or_else(|| err(format!("{what} must be a string")))
}

fn function(v: &JsValue, what: &str) -> JsResult<Option<JsObject>> {
    if v.is_null_or_undefined() {
        return Ok(None);
    }
    v.as_callable()
        .map(Some)
        .ok_or_else(|| err(format!("{what} must be a function")))
}

fn require_top_level(what: &str) -> JsResult<()> {
    if with_state(|s| s.top_level) {
        Ok(())
    } else {
        Err(err(format!(
            "{what} can only be called while the script's top level runs"
        )))
    }
}

/// Own string-keyed properties with their values.
fn entries(obj: &JsObject, ctx: &mut Context) -> JsResult<Vec<(String, JsValue)>> {
    let mut out = Vec::new();
    for key in obj.own_property_keys(ctx)? {
        let name = match &key {
            PropertyKey::String(s) => s.to_std_string_escaped(),
            PropertyKey::Index(i) => i.get().to_string(),
            PropertyKey::Symbol(_) => continue,
        };
        out.push((name, obj.get(key, ctx)?));
    }
    Ok(out)
}

fn configure_source(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    require_top_level("configureSource")?;
    let name = string_arg(args, 0, "configureSource: the source name")?;
    let props = arg(args, 1).as_object().ok_or_else(|| {
        err(format!(
            "configureSource({name}): the options must be an object"
        ))
    })?;
    let mut opts = SourceOptions {
        name: name.clone(),
        dispatch: false,
        deletes_to: None,
        target: None,
        recurse: false,
    };
    let mut fns = SourceFns::default();
    for (k, v) in entries(&props, ctx)? {
        let what = format!("configureSource({name}).{k}");
        match k.as_str() {
            "dispatch" => {
                fns.dispatch = function(&v, &what)?;
                opts.dispatch = fns.dispatch.is_some();
            }
            "deletesTo" => {
                if let Some(s) = v.as_string() {
                    opts.deletes_to = Some(DeletesTo::Table(s.to_std_string_escaped()));
                } else if !v.is_null_or_undefined() {
                    fns.deletes_to = function(&v, &format!("{what} (a table name or)"))?;
                    opts.deletes_to = Some(DeletesTo::Function);
                }
            }
            "target" => {
                if !v.is_null_or_undefined() {
                    let t = v
                        .as_string()
                        .ok_or_else(|| err(format!("{what} must be a table name")))?
                        .to_std_string_escaped();
                    TableName::parse(&t).map_err(|e| err(format!("{what}: {e}")))?;
                    opts.target = Some(t);
                }
            }
            "recurse" => opts.recurse = v.to_boolean(),
            _ => return Err(err(format!("configureSource({name}): unknown option {k}"))),
        }
    }
    if opts.dispatch && opts.target.is_some() {
        return Err(err(format!(
            "configureSource({name}): use either dispatch or target, not both"
        )));
    }
    if !opts.dispatch && opts.target.is_none() {
        return Err(err(format!(
            "configureSource({name}): needs a dispatch function or a target table"
        )));
    }
    with_state(|s| {
        let key = name.to_lowercase();
        s.sources.insert(key.clone(), fns);
        s.captured.sources.insert(key, opts);
    });
    Ok(JsValue::undefined())
}

fn idents(v: &JsValue, what: &str, ctx: &mut Context) -> JsResult<Vec<Ident>> {
    let obj = v
        .as_object()
        .filter(|o| o.is_array())
        .ok_or_else(|| err(format!("{what} must be an array of column names")))?;
    let len = obj.get(js_string!("length"), ctx)?.to_length(ctx)?;
    let mut out = Vec::new();
    for i in 0..len {
        let c = obj.get(i, ctx)?;
        let c = c
            .as_string()
            .ok_or_else(|| err(format!("{what} must be an array of column names")))?;
        out.push(Ident::new(c.to_std_string_escaped()));
    }
    Ok(out)
}

fn configure_table(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    require_top_level("configureTable")?;
    let raw = string_arg(args, 0, "configureTable: the table name")?;
    let name = TableName::parse(&raw).map_err(|e| err(format!("configureTable: {e}")))?;
    let props = arg(args, 1).as_object().ok_or_else(|| {
        err(format!(
            "configureTable({raw}): the options must be an object"
        ))
    })?;
    let mut opts = TableOptions::default();
    let mut fns = TableFns::default();
    for (k, v) in entries(&props, ctx)? {
        let what = format!("configureTable({raw}).{k}");
        if v.is_null_or_undefined() {
            continue;
        }
        match k.as_str() {
            "cas" => opts.cas = idents(&v, &what, ctx)?,
            "deadlines" => {
                let o = v
                    .as_object()
                    .ok_or_else(|| err(format!("{what} must map columns to durations")))?;
                for (c, d) in entries(&o, ctx)? {
                    let d = d
                        .as_string()
                        .ok_or_else(|| {
                            err(format!("{what}.{c} must be a duration such as \"10m\""))
                        })?
                        .to_std_string_escaped();
                    let d = crate::config::parse_duration(&d)
                        .map_err(|e| err(format!("{what}.{c}: {e}")))?;
                    opts.deadlines.push((Ident::new(c), d));
                }
            }
            "exprs" => {
                let o = v
                    .as_object()
                    .ok_or_else(|| err(format!("{what} must map columns to SQL expressions")))?;
                for (c, e) in entries(&o, ctx)? {
                    let e = e
                        .as_string()
                        .ok_or_else(|| err(format!("{what}.{c} must be a string")))?;
                    opts.exprs.insert(Ident::new(c), e.to_std_string_escaped());
                }
            }
            "extras" => {
                let c = v
                    .as_string()
                    .ok_or_else(|| err(format!("{what} must be a column name")))?;
                opts.extras = Some(Ident::new(c.to_std_string_escaped()));
            }
            "ignore" => {
                let o = v
                    .as_object()
                    .ok_or_else(|| err(format!("{what} must map columns to true")))?;
                for (c, b) in entries(&o, ctx)? {
                    if b.to_boolean() {
                        opts.ignore.insert(Ident::new(c));
                    }
                }
            }
            "rowLimit" => {
                let n = v
                    .as_number()
                    .filter(|n| *n >= 1.0 && n.fract() == 0.0)
                    .ok_or_else(|| err(format!("{what} must be a positive integer")))?;
                opts.row_limit = Some(n as usize);
            }
            "merge" => {
                let obj = v.as_object().ok_or_else(|| {
                    err(format!("{what} must be a function or standardMerge(...)"))
                })?;
                let marker = with_state(|s| {
                    s.markers
                        .iter()
                        .find(|(m, _)| *m == obj)
                        .map(|(_, f)| f.clone())
                });
                match marker {
                    Some(fallback) => {
                        opts.merge = MergeKind::Standard {
                            fallback: fallback.is_some(),
                        };
                        fns.fallback = fallback;
                    }
                    None => {
                        fns.merge = function(&v, &what)?;
                        opts.merge = MergeKind::Function;
                    }
                }
            }
            "map" => {
                fns.map = function(&v, &what)?;
                opts.map = true;
            }
            "deleteKey" => {
                fns.delete_key = function(&v, &what)?;
                opts.delete_key = true;
            }
            "apply" => {
                fns.apply = function(&v, &what)?;
                opts.apply = true;
            }
            _ => return Err(err(format!("configureTable({raw}): unknown option {k}"))),
        }
    }
    with_state(|s| {
        s.captured.tables.retain(|(n, _)| *n != name);
        s.captured.tables.push((name.clone(), opts));
        s.tables.retain(|(n, _)| *n != name);
        s.tables.push((name, fns));
    });
    Ok(JsValue::undefined())
}

fn standard_merge(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let fallback = function(&arg(args, 0), "standardMerge: the fallback")?;
    let marker = JsObject::with_object_proto(ctx.intrinsics());
    marker.create_data_property_or_throw(js_string!("standardMerge"), true, ctx)?;
    with_state(|s| s.markers.push((marker.clone(), fallback)));
    Ok(marker.into())
}

/// `replicationKey(table, doc)`: the key the sink stages `doc` under in `table`, built as
/// dispatch builds the keys of the documents it returns.
fn replication_key(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let scope = with_state(|s| s.keys.clone()).ok_or_else(|| {
        err("replicationKey() is only available inside dispatch, deletesTo, map, deleteKey, merge and apply callbacks")
    })?;
    let name = string_arg(args, 0, "replicationKey: the table")?;
    let table =
        Table::parse_in(&scope.schema, &name).map_err(|e| err(format!("replicationKey: {e}")))?;
    let keys = scope.keymap.get(&table).ok_or_else(|| {
        err(format!(
            "replicationKey: table {table} is not in the target schema"
        ))
    })?;
    let doc = arg(args, 1);
    if !doc
        .as_object()
        .is_some_and(|o| !o.is_array() && !o.is_callable())
    {
        return Err(err("replicationKey: the document must be a plain object"));
    }
    let doc = convert::doc_from_js(&doc, None, Some(keys), ctx)?;
    let key = convert::key_of(&doc, keys).map_err(|c| {
        err(format!(
            "replicationKey: the document has no value for primary-key column {c} of {table}"
        ))
    })?;
    Ok(JsString::from(key.as_str()).into())
}

fn random_uuid(_: &JsValue, _: &[JsValue], _: &mut Context) -> JsResult<JsValue> {
    Ok(JsString::from(uuid::Uuid::new_v4().to_string().as_str()).into())
}

fn set_options(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let obj = arg(args, 0)
        .as_object()
        .ok_or_else(|| err("setOptions: expects an object of flag names to values"))?;
    for (k, v) in entries(&obj, ctx)? {
        let known = with_state(|s| s.known_flags.iter().find(|f| **f == k).cloned());
        let Some(flag) = known else {
            return Err(err(format!("setOptions: unknown flag {k:?}")));
        };
        let value = v.to_string(ctx)?.to_std_string_escaped();
        with_state(|s| {
            s.captured.options.retain(|(f, _)| *f != flag);
            s.captured.options.push((flag, value));
        });
    }
    Ok(JsValue::undefined())
}

/// A key array from JS, as JSON array text; `hint` is the original key.
pub(super) fn key_from_js(
    v: &JsValue,
    hint: Option<&Value>,
    keys: &TableKeys,
    ctx: &mut Context,
) -> JsResult<String> {
    let j = convert::from_js(v, hint, ctx, 0)?;
    let Value::Array(mut items) = j else {
        return Err(err("a key must be an array of values"));
    };
    if items.len() != keys.pk.len() {
        return Err(err(format!(
            "a key must have {} values (the primary key), got {}",
            keys.pk.len(),
            items.len()
        )));
    }
    for (v, c) in items.iter_mut().zip(&keys.pk) {
        if let Value::String(s) = v {
            if keys.numeric.contains(&c.to_lowercase()) {
                if let Ok(n) = s.parse::<serde_json::Number>() {
                    *v = Value::Number(n);
                }
            }
        }
    }
    Ok(Value::Array(items).to_string())
}

fn console_line(args: &[JsValue], ctx: &mut Context) -> String {
    let mut s = String::new();
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        match a.as_string() {
            Some(x) => s.push_str(&x.to_std_string_escaped()),
            None => match a.to_string(ctx) {
                Ok(x) if !a.is_object() => s.push_str(&x.to_std_string_escaped()),
                _ => s.push_str(&a.display().to_string()),
            },
        }
    }
    s
}

macro_rules! console_fn {
    ($name:ident, $level:ident) => {
        fn $name(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
            if tracing::enabled!(target: "cdc_sink::userscript", tracing::Level::$level) {
                let (quiet, script) = with_state(|s| (s.quiet && s.top_level, s.script.clone()));
                if !quiet {
                    let line = console_line(args, ctx);
                    tracing::event!(target: "cdc_sink::userscript", tracing::Level::$level, script = %script, "{line}");
                }
            }
            Ok(JsValue::undefined())
        }
    };
}

console_fn!(console_trace, TRACE);
console_fn!(console_debug, DEBUG);
console_fn!(console_info, INFO);
console_fn!(console_warn, WARN);
console_fn!(console_error, ERROR);

/// Installs `console` and the Date prelude in a fresh Context.
pub(super) fn install_globals(ctx: &mut Context) -> JsResult<()> {
    let console = ObjectInitializer::new(ctx)
        .function(
            NativeFunction::from_fn_ptr(console_info),
            js_string!("log"),
            0,
        )
        .function(
            NativeFunction::from_fn_ptr(console_info),
            js_string!("info"),
            0,
        )
        .function(
            NativeFunction::from_fn_ptr(console_warn),
            js_string!("warn"),
            0,
        )
        .function(
            NativeFunction::from_fn_ptr(console_error),
            js_string!("error"),
            0,
        )
        .function(
            NativeFunction::from_fn_ptr(console_debug),
            js_string!("debug"),
            0,
        )
        .function(
            NativeFunction::from_fn_ptr(console_trace),
            js_string!("trace"),
            0,
        )
        .build();
    ctx.register_global_property(js_string!("console"), console, Attribute::all())?;
    ctx.eval(boa_engine::Source::from_bytes(DATE_PRELUDE))?;
    Ok(())
}

/// CockroachDB writes timestamps with up to nine fractional digits, which the engine's date
/// parser refuses: keep milliseconds, the precision of a JS Date.
const DATE_PRELUDE: &str = r#"(() => {
  const D = globalThis.Date;
  const trim = (s) => typeof s === "string"
    ? s.replace(/^(\s*[+-]?\d{4,6}-\d\d-\d\d[T ]\d\d:\d\d:\d\d\.\d{3})\d+/, "$1")
    : s;
  const parse = D.parse;
  const HostDate = function Date(...args) {
    if (!new.target) return D();
    if (args.length === 1) return new D(trim(args[0]));
    return new D(...args);
  };
  Object.setPrototypeOf(HostDate, D);
  HostDate.prototype = D.prototype;
  Object.defineProperty(D.prototype, "constructor", { value: HostDate, writable: true, configurable: true });
  HostDate.parse = (s) => parse(trim(s));
  HostDate.UTC = D.UTC;
  HostDate.now = D.now;
  globalThis.Date = HostDate;
})();"#;

/// The host module: one instance per Context, shared by both module names.
pub(super) fn host_module(ctx: &mut Context) -> Module {
    let fns = ObjectInitializer::new(ctx)
        .function(
            NativeFunction::from_fn_ptr(configure_source),
            js_string!("configureSource"),
            2,
        )
        .function(
            NativeFunction::from_fn_ptr(configure_table),
            js_string!("configureTable"),
            2,
        )
        .function(
            NativeFunction::from_fn_ptr(tx::get_tx),
            js_string!("getTX"),
            0,
        )
        .function(
            NativeFunction::from_fn_ptr(random_uuid),
            js_string!("randomUUID"),
            0,
        )
        .function(
            NativeFunction::from_fn_ptr(replication_key),
            js_string!("replicationKey"),
            2,
        )
        .function(
            NativeFunction::from_fn_ptr(set_options),
            js_string!("setOptions"),
            1,
        )
        .function(
            NativeFunction::from_fn_ptr(standard_merge),
            js_string!("standardMerge"),
            1,
        )
        .build();
    let names: Vec<JsString> = EXPORTS.iter().map(|n| JsString::from(*n)).collect();
    Module::synthetic(
        &names,
        SyntheticModuleInitializer::from_copy_closure_with_captures(
            |m, fns, ctx| {
                for n in EXPORTS {
                    let name = JsString::from(n);
                    let f = fns.get(name.clone(), ctx)?;
                    m.set_export(&name, f)?;
                }
                Ok(())
            },
            fns,
        ),
        None,
        None,
        ctx,
    )
}
