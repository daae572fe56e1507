//! One boa Context with the script loaded ([`Engine`]) and the work an engine thread runs on
//! it ([`Work`]): one method per hook (`dispatch` and `deletesTo`, `map` and `deleteKey`,
//! `merge`, `apply`) that turns rows into JS values, calls the script and turns its results
//! back into mutations, resolutions or `getTX()` calls.

use super::config::{Captured, DeletesTo};
use super::convert::{self, KeyCache, Keymap, TableKeys};
use super::host::{self, with_state, KeyScope, State};
use super::jobs::Jobs;
use super::loader::{js_error, Loader, Sources};
use super::tx::{self, ColumnInfo, HostCall, HostReply, TxScope};
use super::{ScriptError, LOOP_LIMIT, RECURSION_LIMIT};
use crate::apply::merge::{Conflict, Resolution, Row};
use crate::hlc::Hlc;
use crate::ident::{Schema, Table};
use crate::mutation::Mutation;
use boa_engine::builtins::promise::PromiseState;
use boa_engine::job::JobExecutor as _;
use boa_engine::object::builtins::JsArray;
use boa_engine::property::PropertyKey;
use boa_engine::{
    js_string, Context, JsError, JsNativeError, JsObject, JsResult, JsString, JsValue,
};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// Table names a dispatch returned, resolved.
type Routes<'k> = Vec<(JsString, Table, &'k TableKeys)>;

/// The document handed to `dispatch`, to recognise it coming back unchanged.
struct Input<'a> {
    doc: &'a JsObject,
    created: &'a convert::Created,
}

/// One mutation a dispatch produced; `None` parts are the input row's own (its table, key,
/// document text), moved rather than copied when only one output uses them.
struct Routed {
    table: Option<Table>,
    key: Option<String>,
    after: Option<Option<String>>,
}

/// Turns the outputs of one input row into mutations, moving the row's parts into their last
/// user and cloning them for the others.
fn finish(table: Table, m: Mutation, routed: &mut Vec<Routed>, out: &mut Vec<(Table, Mutation)>) {
    let last_table = routed.iter().rposition(|r| r.table.is_none());
    let last_key = routed.iter().rposition(|r| r.key.is_none());
    let last_after = routed.iter().rposition(|r| r.after.is_none());
    let last = routed.len().wrapping_sub(1);
    let Mutation {
        time,
        key,
        after,
        before,
    } = m;
    let (mut table, mut key, mut after, mut before) =
        (Some(table), Some(key), Some(after), Some(before));
    fn take<T: Clone>(slot: &mut Option<T>, last: bool) -> T {
        if last { slot.take() } else { slot.clone() }
            .expect("each part is taken once, by its last user")
    }
    for (i, r) in routed.drain(..).enumerate() {
        let t = r
            .table
            .unwrap_or_else(|| take(&mut table, last_table == Some(i)));
        out.push((
            t,
            Mutation {
                time,
                key: r.key.unwrap_or_else(|| take(&mut key, last_key == Some(i))),
                after: r
                    .after
                    .unwrap_or_else(|| take(&mut after, last_after == Some(i))),
                before: take(&mut before, i == last),
            },
        ));
    }
}

/// A merge knows its table's primary key from the conflicts; a key column is numeric when an
/// image holds a number there (the changefeed writes numeric columns as numbers).
fn merge_keymap(table: &Table, conflicts: &[Conflict]) -> Keymap {
    let pk = conflicts
        .first()
        .map(|c| c.meta.primary_key.clone())
        .unwrap_or_default();
    let numeric = pk
        .iter()
        .filter(|c| {
            conflicts.iter().any(|x| {
                [&x.before, &x.proposed, &x.target]
                    .into_iter()
                    .flatten()
                    .any(|row| matches!(convert::column(row, c), Some(Value::Number(_))))
            })
        })
        .map(|c| c.to_lowercase())
        .collect();
    Keymap::from([(table.clone(), TableKeys { pk, numeric })])
}

/// The input document's JSON, parsed on first use (only results that differ from the input
/// need it).
enum Hints<'a> {
    Raw(&'a str),
    Parsed(Map<String, Value>),
}

impl Hints<'_> {
    fn get(&mut self) -> JsResult<&Map<String, Value>> {
        if let Hints::Raw(raw) = *self {
            *self = Hints::Parsed(convert::hints(raw)?);
        }
        match self {
            Hints::Parsed(m) => Ok(m),
            Hints::Raw(_) => unreachable!("parsed above"),
        }
    }
}

/// One Context with the script loaded.
pub(super) struct Engine {
    ctx: Context,
    jobs: Rc<Jobs>,
    sources: Arc<Sources>,
    captured: Captured,
    keys: KeyCache,
    /// Reused from document to document.
    created: convert::Created,
    getters: convert::RowGetters,
    /// Shared `meta` objects per table and source.
    metas: Vec<(Table, Option<Box<str>>, JsObject)>,
}

/// Where the answer to one piece of work goes.
pub(super) type Reply<T> = tokio::sync::oneshot::Sender<Result<T, ScriptError>>;

/// Work for an engine thread.
pub(super) enum Work {
    Dispatch {
        source: String,
        schema: Schema,
        batch: Vec<(Table, Mutation)>,
        keymap: Arc<Keymap>,
        reply: Reply<Vec<(Table, Mutation)>>,
    },
    Map {
        table: Table,
        muts: Vec<Mutation>,
        keys: TableKeys,
        /// Every table of the schema, for `replicationKey`.
        keymap: Arc<Keymap>,
        reply: Reply<Vec<Mutation>>,
    },
    Merge {
        table: Table,
        fallback: bool,
        conflicts: Vec<Conflict>,
        reply: Reply<Vec<Resolution>>,
    },
    Apply {
        table: Table,
        muts: Vec<Mutation>,
        keys: TableKeys,
        /// Every table of the schema, for `replicationKey`.
        keymap: Arc<Keymap>,
        columns: Vec<ColumnInfo>,
        host: tokio::sync::mpsc::UnboundedSender<HostCall>,
        reply: Reply<()>,
    },
}

impl Engine {
    /// A fresh Context that has run the script's top level.
    pub(super) fn start(
        sources: Arc<Sources>,
        known_flags: Vec<String>,
        quiet: bool,
    ) -> Result<Engine, ScriptError> {
        let jobs = Rc::new(Jobs::default());
        let loader = Rc::new(Loader::new(sources.clone()));
        let mut ctx = Context::builder()
            .job_executor(jobs.clone())
            .module_loader(loader.clone())
            .build()
            .map_err(|e| ScriptError::Engine(e.to_string()))?;
        ctx.runtime_limits_mut()
            .set_loop_iteration_limit(LOOP_LIMIT);
        ctx.runtime_limits_mut()
            .set_recursion_limit(RECURSION_LIMIT);
        host::install_globals(&mut ctx).map_err(|e| ScriptError::Engine(e.to_string()))?;
        with_state(|s| {
            *s = State {
                script: sources.name.clone(),
                known_flags,
                top_level: true,
                quiet,
                ..State::default()
            }
        });
        let main = loader.module(&sources.main, &mut ctx)?;
        let promise = main.load_link_evaluate(&mut ctx);
        let ran = jobs.clone().run_jobs(&mut ctx);
        let outcome = match (ran, promise.state()) {
            (_, PromiseState::Fulfilled(_)) => Ok(()),
            (_, PromiseState::Rejected(v)) => Err(JsError::from_opaque(v)),
            (Err(e), PromiseState::Pending) => Err(e),
            (Ok(()), PromiseState::Pending) => Err(JsNativeError::error()
                .with_message(
                    "the top level never finished (awaiting a promise that never settles)",
                )
                .into()),
        };
        with_state(|s| s.top_level = false);
        if let Err(e) = outcome {
            if let Some(precise) = loader.take_error() {
                return Err(precise);
            }
            let err = js_error(&sources, "loading the script".into(), e, &mut ctx);
            // Link errors (a missing export) carry no position: name the main file at least.
            return Err(match err {
                ScriptError::Js {
                    context,
                    file: None,
                    message,
                    ..
                } => ScriptError::Js {
                    context,
                    file: Some(sources.main.display().to_string()),
                    line: 0,
                    column: 0,
                    message,
                },
                other => other,
            });
        }
        let captured = with_state(|s| s.captured.clone());
        let getters = convert::RowGetters::new(&mut ctx);
        Ok(Engine {
            ctx,
            jobs,
            sources,
            captured,
            keys: KeyCache::default(),
            created: convert::Created::default(),
            getters,
            metas: Vec::new(),
        })
    }

    pub(super) fn captured(&self) -> &Captured {
        &self.captured
    }

    fn error(&mut self, context: impl Into<String>, e: JsError) -> ScriptError {
        js_error(&self.sources, context.into(), e, &mut self.ctx)
    }

    /// Runs one piece of work; `finished` is called just before its answer is sent, so what
    /// the worker records about the job is in place when the caller sees the answer.
    pub(super) fn run(&mut self, work: Work, deadline: Instant, finished: &mut dyn FnMut()) {
        // What `replicationKey` knows while the work's callbacks run.
        let scope = |schema: &Schema, keymap: Arc<Keymap>| {
            with_state(|s| {
                s.keys = Some(KeyScope {
                    schema: schema.clone(),
                    keymap,
                })
            })
        };
        match work {
            Work::Dispatch {
                source,
                schema,
                batch,
                keymap,
                reply,
            } => {
                scope(&schema, keymap.clone());
                let r = self.dispatch(&source, &schema, batch, &keymap);
                with_state(|s| s.keys = None);
                finished();
                let _ = reply.send(r);
            }
            Work::Map {
                table,
                muts,
                keys,
                keymap,
                reply,
            } => {
                scope(&table.schema, keymap);
                let r = self.map(&table, muts, &keys);
                with_state(|s| s.keys = None);
                finished();
                let _ = reply.send(r);
            }
            Work::Merge {
                table,
                fallback,
                conflicts,
                reply,
            } => {
                scope(&table.schema, Arc::new(merge_keymap(&table, &conflicts)));
                let r = self.merge(&table, fallback, conflicts);
                with_state(|s| s.keys = None);
                finished();
                let _ = reply.send(r);
            }
            Work::Apply {
                table,
                muts,
                keys,
                keymap,
                columns,
                host,
                reply,
            } => {
                scope(&table.schema, keymap);
                let r = self.apply(&table, muts, keys, columns, host, deadline);
                with_state(|s| {
                    s.tx = None;
                    s.keys = None;
                });
                finished();
                let _ = reply.send(r);
            }
        }
    }

    /// The shared `meta` of `table`'s rows (see [`convert::shared_meta`]), describing the row
    /// at `time` until the next call.
    fn row_meta(
        &mut self,
        table: &Table,
        time: Hlc,
        source: Option<&str>,
    ) -> Result<JsObject, ScriptError> {
        convert::set_row_time(time);
        let hit = self
            .metas
            .iter()
            .position(|(t, s, _)| t == table && s.as_deref() == source);
        if let Some(i) = hit {
            return Ok(self.metas[i].2.clone());
        }
        let names = (
            self.keys.get(table.name.raw()),
            self.keys.schema(&table.schema),
        );
        let o = convert::shared_meta(names, source, &self.getters, &mut self.ctx, &mut self.keys)
            .map_err(|e| ScriptError::Engine(e.to_string()))?;
        if self.metas.len() >= 256 {
            self.metas.clear();
        }
        self.metas
            .push((table.clone(), source.map(Into::into), o.clone()));
        Ok(o)
    }

    pub(super) fn dispatch(
        &mut self,
        source: &str,
        schema: &Schema,
        batch: Vec<(Table, Mutation)>,
        keymap: &Keymap,
    ) -> Result<Vec<(Table, Mutation)>, ScriptError> {
        let opts = self
            .captured
            .source(source)
            .cloned()
            .ok_or_else(|| ScriptError::NotConfigured(format!("source {source}")))?;
        if let Some(target) = &opts.target {
            let t =
                Table::parse_in(schema, target).map_err(|e| ScriptError::Config(e.to_string()))?;
            return Ok(batch.into_iter().map(|(_, m)| (t.clone(), m)).collect());
        }
        let fns = host::source_fns(source).unwrap_or_default();
        let ctxname = |t: &Table, m: &Mutation| format!("dispatch of {t} at {}", m.time);
        let mut out = Vec::with_capacity(batch.len());
        let mut routes = Routes::new();
        let mut routed = Vec::new();
        for (table, m) in batch {
            let meta = self.row_meta(&table, m.time, Some(&opts.name))?;
            match (&m.after, &opts.deletes_to) {
                (Some(after), _) => {
                    let Some(f) = &fns.dispatch else {
                        out.push((table, m));
                        continue;
                    };
                    let mut created = std::mem::take(&mut self.created);
                    let doc =
                        convert::doc_to_js(after, &mut self.ctx, &mut self.keys, &mut created)
                            .map_err(|e| self.error(ctxname(&table, &m), e))?;
                    let r = f
                        .call(
                            &JsValue::undefined(),
                            &[doc.clone().into(), meta.into()],
                            &mut self.ctx,
                        )
                        .map_err(|e| self.error(ctxname(&table, &m), e))?;
                    let input = Some(Input {
                        doc: &doc,
                        created: &created,
                    });
                    let mut hints = Hints::Raw(after);
                    self.route(
                        &r,
                        &mut hints,
                        input,
                        &table,
                        schema,
                        keymap,
                        &mut routes,
                        &m,
                        &mut routed,
                    )
                    .map_err(|e| self.error(ctxname(&table, &m), e))?;
                    self.created = created;
                    finish(table, m, &mut routed, &mut out);
                }
                (None, None) => out.push((table, m)),
                (None, Some(DeletesTo::Table(name))) if name.is_empty() => out.push((table, m)),
                (None, Some(DeletesTo::Table(name))) => {
                    let t = Table::parse_in(schema, name)
                        .map_err(|e| ScriptError::Config(format!("deletesTo: {e}")))?;
                    out.push((t, m));
                }
                (None, Some(DeletesTo::Function)) => {
                    let Some(f) = &fns.deletes_to else {
                        out.push((table, m));
                        continue;
                    };
                    let keys = keymap
                        .get(&table)
                        .ok_or_else(|| ScriptError::UnknownTable(table.to_string()))?;
                    let vals: Vec<Value> = serde_json::from_str(&m.key)
                        .map_err(|e| ScriptError::Engine(format!("invalid key: {e}")))?;
                    let mut doc = Map::new();
                    for (c, v) in keys.pk.iter().zip(vals) {
                        doc.insert(c.clone(), v);
                    }
                    let what = || format!("deletesTo of {table} at {}", m.time);
                    let d = convert::object_to_js(&doc, &mut self.ctx, &mut self.keys)
                        .map_err(|e| self.error(what(), e))?;
                    let r = f
                        .call(
                            &JsValue::undefined(),
                            &[d.into(), meta.into()],
                            &mut self.ctx,
                        )
                        .map_err(|e| self.error(what(), e))?;
                    let mut hints = Hints::Parsed(doc);
                    self.route(
                        &r,
                        &mut hints,
                        None,
                        &table,
                        schema,
                        keymap,
                        &mut routes,
                        &m,
                        &mut routed,
                    )
                    .map_err(|e| self.error(what(), e))?;
                    finish(table, m, &mut routed, &mut out);
                }
            }
        }
        Ok(out)
    }

    /// Turns a `{table: [doc…]}` result into mutations. For a delete, the documents are keys.
    #[allow(clippy::too_many_arguments)]
    fn route<'k>(
        &mut self,
        r: &JsValue,
        hints: &mut Hints<'_>,
        input: Option<Input<'_>>,
        from: &Table,
        schema: &Schema,
        keymap: &'k Keymap,
        routes: &mut Routes<'k>,
        m: &Mutation,
        routed: &mut Vec<Routed>,
    ) -> JsResult<()> {
        if r.is_null_or_undefined() {
            return Ok(());
        }
        let Some(obj) = r.as_object().filter(|o| !o.is_array()) else {
            return Err(convert::type_error(
                "expected an object of table names to documents, or null",
            ));
        };
        for key in convert::own_keys(&obj, &mut self.ctx)? {
            // Names repeat from row to row: resolve each once per batch.
            let known = match &key {
                PropertyKey::String(s) => routes.iter().find(|(n, _, _)| n == s),
                _ => None,
            };
            let (table, keys) = match known {
                Some((_, t, k)) => (Cow::Borrowed(t), *k),
                None => {
                    let name = match &key {
                        PropertyKey::String(s) => s.to_std_string_escaped(),
                        PropertyKey::Index(i) => i.get().to_string(),
                        PropertyKey::Symbol(_) => continue,
                    };
                    let table = Table::parse_in(schema, &name)
                        .map_err(|e| convert::type_error(e.to_string()))?;
                    let keys = keymap.get(&table).ok_or_else(|| {
                        convert::type_error(format!(
                            "returned table {table}, which is not in the target schema"
                        ))
                    })?;
                    if let (PropertyKey::String(s), true) = (&key, routes.len() < 64) {
                        routes.push((s.clone(), table.clone(), keys));
                    }
                    (Cow::Owned(table), keys)
                }
            };
            let docs = convert::get(&obj, &key, &mut self.ctx)?;
            if docs.is_null_or_undefined() {
                continue;
            }
            let same_table = *table == *from;
            let mut emit = |this: &mut Self, d: JsValue| -> JsResult<()> {
                if let (Some(i), Some(o), true) = (&input, d.as_object(), m.after.is_some()) {
                    if o == *i.doc && convert::unmodified(&o, i.created) {
                        let key = if same_table {
                            None
                        } else {
                            Some(convert::key_of(hints.get()?, keys).map_err(|c| {
                                convert::type_error(format!(
                                    "omitted value for PK column {c} of {table}"
                                ))
                            })?)
                        };
                        routed.push(Routed {
                            table: (!same_table).then(|| table.clone().into_owned()),
                            key,
                            after: None,
                        });
                        return Ok(());
                    }
                }
                let doc = convert::doc_from_js(&d, Some(hints.get()?), Some(keys), &mut this.ctx)?;
                let k = convert::key_of(&doc, keys).map_err(|c| {
                    convert::type_error(format!("omitted value for PK column {c} of {table}"))
                })?;
                let after = m.after.as_ref().map(|_| Value::Object(doc).to_string());
                routed.push(Routed {
                    table: (!same_table).then(|| table.clone().into_owned()),
                    key: Some(k),
                    after: Some(after),
                });
                Ok(())
            };
            for d in convert::elements(docs, &mut self.ctx)? {
                emit(self, d)?;
            }
        }
        Ok(())
    }

    pub(super) fn map(
        &mut self,
        table: &Table,
        muts: Vec<Mutation>,
        keys: &TableKeys,
    ) -> Result<Vec<Mutation>, ScriptError> {
        let fns = host::table_fns(table).unwrap_or_default();
        if fns.map.is_none() && fns.delete_key.is_none() {
            return Ok(muts);
        }
        let mut out = Vec::with_capacity(muts.len());
        for m in muts {
            let what = |kind: &str| format!("{kind} of {table} at {}", m.time);
            match (&m.after, &fns.map, &fns.delete_key) {
                (Some(after), Some(f), _) => {
                    let meta = self.row_meta(table, m.time, None)?;
                    let mut created = std::mem::take(&mut self.created);
                    let doc =
                        convert::doc_to_js(after, &mut self.ctx, &mut self.keys, &mut created)
                            .map_err(|e| self.error(what("map"), e))?;
                    let r = f
                        .call(
                            &JsValue::undefined(),
                            &[doc.clone().into(), meta.into()],
                            &mut self.ctx,
                        )
                        .map_err(|e| self.error(what("map"), e))?;
                    let same = r
                        .as_object()
                        .is_some_and(|o| o == doc && convert::unmodified(&o, &created));
                    self.created = created;
                    if r.is_null_or_undefined() || r.as_boolean() == Some(false) {
                        continue;
                    }
                    // Handed back untouched: the row stays as it was.
                    if same {
                        out.push(m);
                        continue;
                    }
                    let hints = convert::hints(after).map_err(|e| self.error(what("map"), e))?;
                    let doc = convert::doc_from_js(&r, Some(&hints), Some(keys), &mut self.ctx)
                        .map_err(|e| self.error(what("map"), e))?;
                    let key = convert::key_of(&doc, keys).map_err(|c| ScriptError::Js {
                        context: what("map"),
                        file: None,
                        line: 0,
                        column: 0,
                        message: format!("omitted value for PK column {c}"),
                    })?;
                    out.push(Mutation {
                        key,
                        after: Some(Value::Object(doc).to_string()),
                        ..m
                    });
                }
                (None, _, Some(f)) => {
                    let meta = self.row_meta(table, m.time, None)?;
                    let orig: Value = serde_json::from_str(&m.key)
                        .map_err(|e| ScriptError::Engine(format!("invalid key: {e}")))?;
                    let arr = convert::to_js(&orig, &mut self.ctx, &mut self.keys)
                        .map_err(|e| self.error(what("deleteKey"), e))?;
                    let r = f
                        .call(&JsValue::undefined(), &[arr, meta.into()], &mut self.ctx)
                        .map_err(|e| self.error(what("deleteKey"), e))?;
                    if r.is_null_or_undefined() {
                        continue;
                    }
                    if let Some(a) = r.as_object().filter(|o| o.is_array()) {
                        let len = a
                            .get(js_string!("length"), &mut self.ctx)
                            .and_then(|l| l.to_length(&mut self.ctx))
                            .map_err(|e| self.error(what("deleteKey"), e))?;
                        if len == 0 {
                            continue;
                        }
                    }
                    let key = host::key_from_js(&r, Some(&orig), keys, &mut self.ctx)
                        .map_err(|e| self.error(what("deleteKey"), e))?;
                    out.push(Mutation { key, ..m });
                }
                _ => out.push(m),
            }
        }
        Ok(out)
    }

    fn row_to_js(&mut self, r: &Option<Row>) -> JsResult<JsValue> {
        match r {
            None => Ok(JsValue::undefined()),
            Some(r) => Ok(convert::object_to_js(r, &mut self.ctx, &mut self.keys)?.into()),
        }
    }

    pub(super) fn merge(
        &mut self,
        table: &Table,
        fallback: bool,
        conflicts: Vec<Conflict>,
    ) -> Result<Vec<Resolution>, ScriptError> {
        let fns = host::table_fns(table).unwrap_or_default();
        let (f, kind) = if fallback {
            (fns.fallback, "merge fallback")
        } else {
            (fns.merge, "merge")
        };
        let f = f.ok_or_else(|| ScriptError::NotConfigured(format!("{kind} for {table}")))?;
        let mut out = Vec::with_capacity(conflicts.len());
        for c in conflicts {
            let what = format!("{kind} of {table} at {}", c.meta.time);
            let r = self
                .merge_one(&f, table, &c)
                .map_err(|e| self.error(what.clone(), e))?;
            out.push(r);
        }
        Ok(out)
    }

    fn merge_one(&mut self, f: &JsObject, table: &Table, c: &Conflict) -> JsResult<Resolution> {
        let op = JsObject::with_object_proto(self.ctx.intrinsics());
        let before = self.row_to_js(&c.before)?;
        let proposed = self.row_to_js(&c.proposed)?;
        let target = self.row_to_js(&c.target)?;
        let meta = convert::meta(table, c.meta.time, None, &mut self.ctx, &mut self.keys)?;
        if !before.is_undefined() {
            op.create_data_property_or_throw(js_string!("before"), before, &mut self.ctx)?;
        }
        op.create_data_property_or_throw(
            js_string!("proposed"),
            if proposed.is_undefined() {
                JsValue::null()
            } else {
                proposed
            },
            &mut self.ctx,
        )?;
        op.create_data_property_or_throw(
            js_string!("target"),
            if target.is_undefined() {
                JsValue::null()
            } else {
                target
            },
            &mut self.ctx,
        )?;
        op.create_data_property_or_throw(js_string!("meta"), meta, &mut self.ctx)?;
        if !c.unmerged.is_empty() {
            let names: Vec<JsValue> = c
                .unmerged
                .iter()
                .map(|n| JsString::from(n.as_str()).into())
                .collect();
            let arr = JsArray::from_iter(names, &mut self.ctx);
            op.create_data_property_or_throw(js_string!("unmerged"), arr, &mut self.ctx)?;
        }
        let r = f.call(&JsValue::undefined(), &[op.into()], &mut self.ctx)?;
        let Some(obj) = r.as_object() else {
            return Err(convert::type_error(
                "a merge function must return {apply}, {dlq} or {drop}",
            ));
        };
        let apply = obj.get(js_string!("apply"), &mut self.ctx)?;
        if !apply.is_null_or_undefined() {
            // Properties keep their type from whichever input image had them.
            let mut hints = c.before.clone().unwrap_or_default();
            for r in [&c.target, &c.proposed].into_iter().flatten() {
                hints.extend(r.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            let row = convert::doc_from_js(&apply, Some(&hints), None, &mut self.ctx)?;
            return Ok(Resolution::Apply(row));
        }
        let dlq = obj.get(js_string!("dlq"), &mut self.ctx)?;
        if !dlq.is_null_or_undefined() {
            return Ok(Resolution::Dlq(
                dlq.to_string(&mut self.ctx)?.to_std_string_escaped(),
            ));
        }
        if obj.get(js_string!("drop"), &mut self.ctx)?.to_boolean() {
            return Ok(Resolution::Drop);
        }
        Err(convert::type_error(
            "a merge function must return {apply}, {dlq} or {drop}",
        ))
    }

    fn apply(
        &mut self,
        table: &Table,
        muts: Vec<Mutation>,
        keys: TableKeys,
        columns: Vec<ColumnInfo>,
        host_tx: tokio::sync::mpsc::UnboundedSender<HostCall>,
        deadline: Instant,
    ) -> Result<(), ScriptError> {
        let fns = host::table_fns(table).unwrap_or_default();
        let f = fns
            .apply
            .ok_or_else(|| ScriptError::NotConfigured(format!("apply for {table}")))?;
        let what = format!("apply of {table}");
        let (ops, originals) = self
            .ops(table, &muts)
            .map_err(|e| self.error(what.clone(), e))?;
        let (reply_tx, reply_rx) = flume::unbounded::<HostReply>();
        with_state(|s| {
            s.tx = Some(TxScope {
                table: table.clone(),
                keys,
                columns,
                host: host_tx,
                reply: reply_tx,
                next_id: 0,
                pending: HashMap::new(),
                originals: Rc::new(originals),
                muts: Rc::new(muts),
            })
        });
        let r = f
            .call(&JsValue::undefined(), &[ops], &mut self.ctx)
            .map_err(|e| self.error(what.clone(), e))?;
        let Some(promise) = r.as_promise() else {
            // A plain function finished synchronously; run what it queued.
            self.jobs
                .clone()
                .run_jobs(&mut self.ctx)
                .map_err(|e| self.error(what.clone(), e))?;
            return Ok(());
        };
        loop {
            self.jobs
                .clone()
                .run_jobs(&mut self.ctx)
                .map_err(|e| self.error(what.clone(), e))?;
            match promise.state() {
                PromiseState::Fulfilled(_) => return Ok(()),
                PromiseState::Rejected(v) => return Err(self.error(what, JsError::from_opaque(v))),
                PromiseState::Pending => {}
            }
            if with_state(|s| s.tx.as_ref().is_none_or(|t| t.pending.is_empty())) {
                return Err(ScriptError::Js {
                    context: what,
                    file: None,
                    line: 0,
                    column: 0,
                    message: "the promise returned by apply never settles".into(),
                });
            }
            // Park until the database answers one of the script's calls.
            let reply = match reply_rx.recv_deadline(deadline) {
                Ok(r) => r,
                Err(_) => return Err(ScriptError::Timeout { what }),
            };
            tx::settle(reply, &mut self.ctx).map_err(|e| self.error(what.clone(), e))?;
        }
    }

    /// The `ApplyOp[]` of a batch, and each op object's index in it.
    fn ops(
        &mut self,
        table: &Table,
        muts: &[Mutation],
    ) -> JsResult<(JsValue, HashMap<JsObject, usize>)> {
        let mut items = Vec::with_capacity(muts.len());
        let mut originals = HashMap::with_capacity(muts.len());
        for (i, m) in muts.iter().enumerate() {
            let op = JsObject::with_object_proto(self.ctx.intrinsics());
            let action = if m.after.is_some() {
                "upsert"
            } else {
                "delete"
            };
            op.create_data_property_or_throw(
                js_string!("action"),
                JsString::from(action),
                &mut self.ctx,
            )?;
            if let Some(a) = &m.after {
                let d = convert::doc_to_js(a, &mut self.ctx, &mut self.keys, &mut self.created)?;
                op.create_data_property_or_throw(js_string!("data"), d, &mut self.ctx)?;
            }
            if let Some(b) = &m.before {
                if let Ok(d) =
                    convert::doc_to_js(b, &mut self.ctx, &mut self.keys, &mut self.created)
                {
                    op.create_data_property_or_throw(js_string!("before"), d, &mut self.ctx)?;
                }
            }
            let meta = convert::meta(table, m.time, None, &mut self.ctx, &mut self.keys)?;
            op.create_data_property_or_throw(js_string!("meta"), meta, &mut self.ctx)?;
            let key: Value = serde_json::from_str(&m.key)
                .map_err(|e| convert::type_error(format!("invalid key: {e}")))?;
            let pk = convert::to_js(&key, &mut self.ctx, &mut self.keys)?;
            op.create_data_property_or_throw(js_string!("pk"), pk, &mut self.ctx)?;
            originals.insert(op.clone(), i);
            items.push(op.into());
        }
        Ok((JsArray::from_iter(items, &mut self.ctx).into(), originals))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Registered functions belong to this Context's heap: release them before it goes.
        with_state(|s| *s = State::default());
    }
}
