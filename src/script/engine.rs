//! The engine threads. Each owns a boa Context with the script loaded; work arrives on a
//! bounded queue, one message per batch, and answers on a oneshot. A worker that panics or
//! outgrows the memory budget between jobs is replaced by a fresh one.
//!
//! boa cannot stop a running job from outside. Its runtime limits stop plain runaway loops
//! and deep recursion from inside (an ordinary script error); nothing stops a regular
//! expression that backtracks for ever or one enormous native call. A worker that misses its
//! deadline is therefore abandoned: it runs on, counted as stuck, while a fresh worker takes
//! its place, and work of the schema it was running fails at once until it ends. A watchdog
//! aborts the process (staging is durable; a supervisor restarts it) when too many workers
//! are stuck, when one stays stuck too long, or when one job grows its thread's heap past the
//! memory budget.

use super::config::{Captured, DeletesTo};
use super::convert::{self, KeyCache, Keymap, TableKeys};
use super::host::{self, with_state, ColumnInfo, KeyScope, State, TxScope};
use super::mem::{self, ThreadMem};
use super::transpile::{self, Compiled};
use super::tx::{HostCall, HostReply};
use super::ScriptError;
use crate::apply::merge::{Conflict, Resolution, Row};
use crate::hlc::Hlc;
use crate::ident::{Schema, Table};
use crate::metrics::{SCRIPT_ENTRY_WAIT, SCRIPT_EXEC_TIME, SCRIPT_STUCK_WORKERS};
use crate::mutation::Mutation;
use boa_engine::builtins::promise::PromiseState;
use boa_engine::job::{GenericJob, Job as EngineJob, JobExecutor, NativeAsyncJob, PromiseJob};
use boa_engine::module::{Module, ModuleLoader, Referrer};
use boa_engine::object::builtins::JsArray;
use boa_engine::property::PropertyKey;
use boa_engine::{
    js_string, Context, JsError, JsNativeError, JsObject, JsResult, JsString, JsValue, Source,
};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Poll, Wake, Waker};
use std::time::{Duration, Instant};

/// Loop iterations one function call may run before the engine throws (boa counts every loop
/// of a call together), so `while (true) {}` fails its batch with an error instead of holding
/// the worker. A loop that calls a function running its own loop is counted per call.
pub(crate) const LOOP_LIMIT: u64 = 10_000_000;
const RECURSION_LIMIT: usize = 1_000;
const STACK_BYTES: usize = 16 << 20;

/// The script's files, transpiled once per process and shared by all workers.
pub struct Sources {
    /// Canonical directory of the main script; imports may not leave it.
    pub dir: PathBuf,
    pub main: PathBuf,
    /// The main file's name, for logs.
    pub name: String,
    cache: Mutex<HashMap<PathBuf, Arc<Compiled>>>,
}

impl Sources {
    pub fn new(path: &Path) -> Result<Sources, ScriptError> {
        let main = path.canonicalize().map_err(|e| ScriptError::Read {
            file: path.display().to_string(),
            error: e.to_string(),
        })?;
        let dir = main.parent().map(Path::to_path_buf).unwrap_or_default();
        let name = main
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Sources {
            dir,
            main,
            name,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn compiled(&self, path: &Path) -> Result<Arc<Compiled>, ScriptError> {
        if let Some(c) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(path)
        {
            return Ok(c.clone());
        }
        let text = std::fs::read_to_string(path).map_err(|e| ScriptError::Read {
            file: path.display().to_string(),
            error: e.to_string(),
        })?;
        let c = Arc::new(transpile::compile(path, &text)?);
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(path.to_path_buf(), c.clone());
        Ok(c)
    }

    fn lookup(&self, path: &str) -> Option<Arc<Compiled>> {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(Path::new(path))
            .cloned()
    }

    /// The script position of a position in generated JavaScript.
    fn position(&self, file: &str, line: u32, column: u32) -> (u32, u32) {
        match self.lookup(file) {
            Some(c) => c.source_position(line, column),
            None => (line, column),
        }
    }
}

/// Lexical normalisation: the file may not exist yet when we ask.
fn normalise(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Resolves imports: the host module under both names, files next to the importer.
struct Loader {
    sources: Arc<Sources>,
    host: RefCell<Option<Module>>,
    modules: RefCell<HashMap<PathBuf, Module>>,
    /// The precise error of a failed load, for the report (the engine only keeps a message).
    error: RefCell<Option<ScriptError>>,
}

impl Loader {
    fn find(&self, referrer: Option<&Path>, spec: &str) -> Result<PathBuf, String> {
        let base = referrer
            .and_then(Path::parent)
            .map_or_else(|| self.sources.dir.clone(), Path::to_path_buf);
        let rel = if spec.starts_with("./") || spec.starts_with("../") || spec.starts_with('/') {
            PathBuf::from(spec)
        } else {
            // A bare name means a sibling file.
            Path::new(".").join(spec)
        };
        let path = normalise(&base.join(rel));
        if !path.starts_with(&self.sources.dir) {
            return Err(format!("{spec:?} is outside the script's directory"));
        }
        if path.is_file() {
            return Ok(path);
        }
        let mut candidates = Vec::new();
        for ext in ["ts", "js", "mts", "mjs"] {
            let mut s = path.clone().into_os_string();
            s.push(".");
            s.push(ext);
            candidates.push(PathBuf::from(s));
        }
        // `import "./x.js"` written for a TypeScript file x.ts.
        if path.extension().is_some_and(|e| e == "js") {
            candidates.push(path.with_extension("ts"));
        }
        candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
            format!(
                "cannot find module {spec:?} (looked for {} and .ts/.js/.mts/.mjs)",
                path.display()
            )
        })
    }

    fn module(&self, path: &Path, ctx: &mut Context) -> Result<Module, ScriptError> {
        if let Some(m) = self.modules.borrow().get(path) {
            return Ok(m.clone());
        }
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let module = match ext {
            "ts" | "js" | "mts" | "mjs" | "cts" | "cjs" => {
                let c = self.sources.compiled(path)?;
                let src = Source::from_bytes(c.js.as_bytes()).with_path(path);
                Module::parse(src, None, ctx)
                    .map_err(|e| syntax_from_engine(&self.sources, path, &e))?
            }
            _ => {
                let text = std::fs::read_to_string(path).map_err(|e| ScriptError::Read {
                    file: path.display().to_string(),
                    error: e.to_string(),
                })?;
                if ext == "json" {
                    Module::parse_json(JsString::from(text.as_str()), ctx).map_err(|e| {
                        ScriptError::Syntax {
                            file: path.display().to_string(),
                            line: 0,
                            column: 0,
                            message: format!("invalid JSON: {e}"),
                        }
                    })?
                } else {
                    Module::from_value_as_default(JsString::from(text.as_str()).into(), ctx)
                }
            }
        };
        self.modules
            .borrow_mut()
            .insert(path.to_path_buf(), module.clone());
        Ok(module)
    }

    fn resolve(&self, referrer: Option<&Path>, spec: &str, ctx: &mut Context) -> JsResult<Module> {
        if spec == "cdc-sink@v1" || spec == "replicator@v1" {
            let mut host = self.host.borrow_mut();
            return Ok(host.get_or_insert_with(|| host::host_module(ctx)).clone());
        }
        let from = referrer.map_or_else(|| self.sources.name.clone(), |p| p.display().to_string());
        let result = self
            .find(referrer, spec)
            .map_err(|message| ScriptError::Import {
                file: from.clone(),
                message,
            })
            .and_then(|p| self.module(&p, ctx));
        result.map_err(|e| {
            let msg = e.to_string();
            self.error.borrow_mut().get_or_insert(e);
            JsNativeError::typ().with_message(msg).into()
        })
    }
}

impl ModuleLoader for Loader {
    fn load_imported_module(
        self: Rc<Self>,
        referrer: Referrer,
        request: boa_engine::module::ModuleRequest,
        context: &RefCell<&mut Context>,
    ) -> impl Future<Output = JsResult<Module>> {
        let spec = request.specifier().to_std_string_escaped();
        let r = self.resolve(referrer.path(), &spec, &mut context.borrow_mut());
        async { r }
    }
}

/// The engine reports parse errors on generated JavaScript; name the script's line instead.
fn syntax_from_engine(sources: &Sources, path: &Path, e: &JsError) -> ScriptError {
    let message = e.to_string();
    let (mut line, mut column) = (0, 0);
    // "... at line 3, col 7"
    if let Some(i) = message.rfind("line ") {
        let rest = &message[i + 5..];
        let nums: Vec<u32> = rest
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .take(2)
            .filter_map(|s| s.parse().ok())
            .collect();
        if let [l, c] = nums.as_slice() {
            (line, column) = sources.position(&path.display().to_string(), *l, *c);
        }
    }
    ScriptError::Syntax {
        file: path.display().to_string(),
        line,
        column,
        message,
    }
}

/// Wakes a thread parked on a future.
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Drives a future on this thread, parking (not spinning) while it is pending.
fn park_on<F: Future>(fut: F) -> F::Output {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park_timeout(Duration::from_millis(100));
    }
}

/// The job queue of one Context. Promise reactions run to exhaustion; the engine's own async
/// jobs (module loading) are driven by parking the thread, never by spinning. Host calls of
/// `getTX()` are not engine jobs: the worker parks on their reply channel.
#[derive(Default)]
struct Jobs {
    promise: RefCell<VecDeque<PromiseJob>>,
    asyncs: RefCell<VecDeque<NativeAsyncJob>>,
    generic: RefCell<VecDeque<GenericJob>>,
}

impl JobExecutor for Jobs {
    fn enqueue_job(self: Rc<Self>, job: EngineJob, _: &mut Context) {
        match job {
            EngineJob::PromiseJob(p) => self.promise.borrow_mut().push_back(p),
            EngineJob::AsyncJob(a) => self.asyncs.borrow_mut().push_back(a),
            EngineJob::GenericJob(g) => self.generic.borrow_mut().push_back(g),
            // No timers exist in our globals, and FinalizationRegistry callbacks are optional.
            _ => {}
        }
    }

    fn run_jobs(self: Rc<Self>, ctx: &mut Context) -> JsResult<()> {
        loop {
            let mut progressed = false;
            loop {
                let job = self.promise.borrow_mut().pop_front();
                let Some(job) = job else { break };
                progressed = true;
                if let Err(e) = job.call(ctx) {
                    self.promise.borrow_mut().clear();
                    return Err(e);
                }
            }
            loop {
                let job = self.generic.borrow_mut().pop_front();
                let Some(job) = job else { break };
                progressed = true;
                job.call(ctx)?;
            }
            let asyncs: Vec<NativeAsyncJob> = self.asyncs.borrow_mut().drain(..).collect();
            if !asyncs.is_empty() {
                progressed = true;
                let cell = RefCell::new(&mut *ctx);
                for job in asyncs {
                    park_on(job.call(&cell))?;
                }
            }
            if !progressed {
                break;
            }
        }
        ctx.clear_kept_objects();
        Ok(())
    }
}

/// Converts an engine error into ours, naming the script position of the innermost frame that
/// belongs to the script.
fn js_error(sources: &Sources, context: String, e: JsError, ctx: &mut Context) -> ScriptError {
    let fallback = e.to_string();
    let Ok(v) = e.into_opaque(ctx) else {
        // Runtime limits cannot become JS values.
        let message = match limit_hint(&fallback) {
            Some(hint) => format!("{fallback} ({hint})"),
            None => fallback,
        };
        return ScriptError::Js {
            context,
            file: None,
            line: 0,
            column: 0,
            message,
        };
    };
    let message = match v.as_object() {
        Some(_) => v
            .to_string(ctx)
            .map(|s| s.to_std_string_escaped())
            .unwrap_or(fallback),
        None => v.display().to_string(),
    };
    let mut file = None;
    let (mut line, mut column) = (0, 0);
    if let Some(obj) = v.as_object() {
        if let Ok(stack) = obj.get(js_string!("stack"), ctx) {
            if let Some(stack) = stack.as_string() {
                for frame in stack.to_std_string_escaped().lines() {
                    if let Some((f, l, c)) = parse_frame(frame) {
                        if sources.lookup(&f).is_some() {
                            (line, column) = sources.position(&f, l, c);
                            file = Some(f);
                            break;
                        }
                    }
                }
            }
        }
    }
    let message = match limit_hint(&message) {
        Some(hint) => format!("{message} ({hint})"),
        None => message,
    };
    ScriptError::Js {
        context,
        // Without a position, at least name the script.
        file: file.or_else(|| Some(sources.main.display().to_string())),
        line,
        column,
        message,
    }
}

/// What a runtime-limit error of the engine means, in the script's terms.
fn limit_hint(message: &str) -> Option<String> {
    if !message.contains("RuntimeLimitError") {
        return None;
    }
    if message.contains("iteration loops") {
        return Some(format!(
            "the userscript loop limit: {LOOP_LIMIT} loop iterations in one function call"
        ));
    }
    if message.contains("recursi") {
        return Some(format!(
            "the userscript recursion limit: {RECURSION_LIMIT} nested calls"
        ));
    }
    Some("a userscript engine limit".into())
}

/// `    at fn (/dir/a.ts:3:7)` → (`/dir/a.ts`, 3, 7).
fn parse_frame(frame: &str) -> Option<(String, u32, u32)> {
    let inner = frame.trim().strip_suffix(')')?;
    let inner = &inner[inner.rfind('(')? + 1..];
    let (rest, col) = inner.rsplit_once(':')?;
    let (file, line) = rest.rsplit_once(':')?;
    Some((file.to_string(), line.parse().ok()?, col.parse().ok()?))
}

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
pub struct Engine {
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

type Reply<T> = tokio::sync::oneshot::Sender<Result<T, ScriptError>>;

/// Work for an engine thread.
pub enum Work {
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
    pub fn start(
        sources: Arc<Sources>,
        known_flags: Vec<String>,
        quiet: bool,
    ) -> Result<Engine, ScriptError> {
        let jobs = Rc::new(Jobs::default());
        let loader = Rc::new(Loader {
            sources: sources.clone(),
            host: RefCell::new(None),
            modules: RefCell::new(HashMap::new()),
            error: RefCell::new(None),
        });
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
            if let Some(precise) = loader.error.borrow_mut().take() {
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

    pub fn captured(&self) -> &Captured {
        &self.captured
    }

    fn error(&mut self, context: impl Into<String>, e: JsError) -> ScriptError {
        js_error(&self.sources, context.into(), e, &mut self.ctx)
    }

    /// Runs one piece of work; `finished` is called just before its answer is sent, so what
    /// the worker records about the job is in place when the caller sees the answer.
    pub fn run(&mut self, work: Work, deadline: Instant, finished: &mut dyn FnMut()) {
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

    pub fn dispatch(
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

    pub fn map(
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

    pub fn merge(
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
            host::settle(reply, &mut self.ctx).map_err(|e| self.error(what.clone(), e))?;
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

/// A queued piece of work.
pub struct Job {
    pub work: Work,
    /// The schema the work belongs to: a worker stuck on it makes further work of that schema
    /// fail at once.
    pub scope: String,
    pub enqueued: Instant,
    pub deadline: Instant,
    /// 1 + the id of the worker that took the job; 0 while queued.
    pub taken: Arc<AtomicUsize>,
}

/// Bounds on what a runaway script may cost.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes an engine thread's heap may reach: past it between jobs the worker is replaced,
    /// and growing by more within one job aborts the process. 0 disables both.
    pub memory_budget: u64,
    /// Abandoned workers (past their deadline, still running) allowed at once; one more
    /// aborts the process.
    pub max_stuck: usize,
    /// An abandoned worker still running after this long aborts the process; zero = never.
    pub stuck_abort: Duration,
    /// What aborting does, after the ERROR is logged (tests record instead of dying).
    pub on_abort: fn(&str),
}

/// The default of [`Limits::on_abort`]: staging is durable and a supervisor restarts the
/// process, so ending it is the one way to stop engine work that cannot be interrupted.
pub fn abort_process(_reason: &str) {
    std::process::abort();
}

/// A worker running a job.
struct Busy {
    taken: Arc<AtomicUsize>,
    scope: String,
    mem: &'static ThreadMem,
    /// The thread's heap figure when the job started.
    base: i64,
    /// To rename the thread once abandoned, so `top -H` and tests can tell it.
    thread: libc::pthread_t,
}

/// A worker given up on while it runs a job.
struct Stuck {
    scope: String,
    since: Instant,
}

#[derive(Default)]
struct Registry {
    /// Live workers and their "given up" flags.
    workers: HashMap<usize, Arc<AtomicBool>>,
    busy: HashMap<usize, Busy>,
    stuck: HashMap<usize, Stuck>,
    /// Once the process is being aborted, nothing more is checked.
    aborted: bool,
}

/// What the workers share.
pub struct Shared {
    pub sources: Arc<Sources>,
    pub known_flags: Vec<String>,
    pub jobs: flume::Receiver<Job>,
    pub limits: Limits,
    registry: Mutex<Registry>,
    next_id: AtomicUsize,
    pub replaced: AtomicU64,
    /// CPU time the engine threads spent running work.
    pub busy_cpu_nanos: AtomicU64,
}

/// How often the watchdog looks at stuck workers and job memory.
const WATCH_EVERY: Duration = Duration::from_millis(50);

impl Shared {
    /// The shared state, and its watchdog thread (which ends with the last reference).
    pub fn new(
        sources: Arc<Sources>,
        known_flags: Vec<String>,
        jobs: flume::Receiver<Job>,
        limits: Limits,
    ) -> Arc<Shared> {
        let shared = Arc::new(Shared {
            sources,
            known_flags,
            jobs,
            limits,
            registry: Mutex::new(Registry::default()),
            next_id: AtomicUsize::new(0),
            replaced: AtomicU64::new(0),
            busy_cpu_nanos: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&shared);
        let spawned = std::thread::Builder::new()
            .name("userscript-watchdog".into())
            .spawn(move || watchdog(weak));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the userscript watchdog");
        }
        shared
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a worker; the receiver answers once its top level ran.
    pub fn spawn(
        self: &Arc<Self>,
        quiet: bool,
    ) -> std::sync::mpsc::Receiver<Result<Captured, ScriptError>> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let lost = Arc::new(AtomicBool::new(false));
        self.registry().workers.insert(id, lost.clone());
        let shared = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("userscript-{id}"))
            .stack_size(STACK_BYTES)
            .spawn(move || worker(shared, id, lost, quiet, ready_tx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a userscript thread");
        }
        ready_rx
    }

    /// Gives up on worker `id` (crashed or too big) and starts another in its place.
    pub fn replace(self: &Arc<Self>, id: usize, why: &str) {
        let removed = self.registry().workers.remove(&id);
        if let Some(lost) = removed {
            lost.store(true, Ordering::SeqCst);
            self.respawn(id, why);
        }
    }

    fn respawn(self: &Arc<Self>, id: usize, why: &str) {
        self.replaced.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(worker = id, reason = why, "replacing a userscript worker");
        let ready = self.spawn(true);
        let name = self.sources.name.clone();
        // The same script loaded before; report a failure without waiting here.
        std::thread::spawn(move || {
            if let Ok(Err(e)) = ready.recv() {
                tracing::error!(script = %name, error = %e, "replacement userscript worker failed to start");
            }
        });
    }

    /// The caller of the job `taken` stopped waiting for it. A worker still running it is
    /// abandoned: boa cannot interrupt it, so it runs on (marked stuck) while a fresh worker
    /// takes its place. Past `max_stuck` abandoned workers the process is aborted.
    pub fn abandon(self: &Arc<Self>, taken: &Arc<AtomicUsize>) {
        let Some(id) = taken.load(Ordering::SeqCst).checked_sub(1) else {
            return;
        };
        let stuck = {
            let mut r = self.registry();
            // It may have finished (late) already, or moved on to other work.
            let Some((scope, thread)) = r
                .busy
                .get(&id)
                .filter(|b| Arc::ptr_eq(&b.taken, taken))
                .map(|b| (b.scope.clone(), b.thread))
            else {
                return;
            };
            // The thread is alive: it leaves `busy` only under this lock.
            let name = std::ffi::CString::new(format!("script-stuck-{}", id % 100))
                .expect("no NUL in a thread name");
            // SAFETY: `thread` is a live thread of this process; the name is at most 15 bytes.
            unsafe { libc::pthread_setname_np(thread, name.as_ptr()) };
            let Some(lost) = r.workers.remove(&id) else {
                return;
            };
            lost.store(true, Ordering::SeqCst);
            r.stuck.insert(
                id,
                Stuck {
                    scope: scope.clone(),
                    since: Instant::now(),
                },
            );
            metrics::gauge!(SCRIPT_STUCK_WORKERS).increment(1.0);
            tracing::warn!(
                worker = id,
                schema = %scope,
                stuck = r.stuck.len(),
                "a userscript worker missed its deadline and cannot be interrupted; it is abandoned, and work of its schema fails at once while it runs"
            );
            r.stuck.len()
        };
        if stuck > self.limits.max_stuck {
            self.abort(&format!(
                "{stuck} userscript workers are stuck past their deadline (more than --userscriptMaxStuck {})",
                self.limits.max_stuck
            ));
            return;
        }
        self.respawn(id, "missed its deadline");
    }

    /// Whether an abandoned worker is still running work of `scope`.
    pub fn stuck_on(&self, scope: &str) -> bool {
        self.registry().stuck.values().any(|s| s.scope == scope)
    }

    /// How many abandoned workers are still running.
    pub fn stuck_workers(&self) -> usize {
        self.registry().stuck.len()
    }

    fn abort(&self, reason: &str) {
        {
            let mut r = self.registry();
            if r.aborted {
                return;
            }
            r.aborted = true;
        }
        tracing::error!(
            script = %self.sources.name,
            reason,
            "aborting the process: userscript engine work cannot be interrupted (staged rows are durable; a supervisor restarts the sink)"
        );
        (self.limits.on_abort)(reason);
    }

    /// One look: abandoned workers that stay too long, jobs that grow the heap too much.
    fn watch(&self) {
        let found = {
            let r = self.registry();
            if r.aborted {
                return;
            }
            let limit = self.limits.stuck_abort;
            let too_long = r
                .stuck
                .iter()
                .find(|(_, s)| !limit.is_zero() && s.since.elapsed() > limit)
                .map(|(id, s)| {
                    format!(
                        "userscript worker {id} (schema {}) is still running {}s after it was abandoned (--userscriptStuckAbort {}s)",
                        s.scope,
                        s.since.elapsed().as_secs(),
                        limit.as_secs()
                    )
                });
            let budget = self.limits.memory_budget;
            let too_big = r
                .busy
                .iter()
                .find_map(|(id, b)| {
                    let grown = b.mem.live.load(Ordering::Relaxed) - b.base;
                    (budget > 0 && grown > budget as i64).then(|| {
                        format!(
                            "userscript worker {id} (schema {}) allocated {grown} bytes in one job (--userscriptMemory {budget})",
                            b.scope
                        )
                    })
                });
            too_long.or(too_big)
        };
        if let Some(reason) = found {
            self.abort(&reason);
        }
    }
}

fn watchdog(shared: std::sync::Weak<Shared>) {
    loop {
        std::thread::park_timeout(WATCH_EVERY);
        let Some(s) = shared.upgrade() else { return };
        s.watch();
    }
}

/// CPU time of the calling thread: what one engine thread spends, whatever else runs.
fn thread_cpu_nanos() -> u64 {
    // SAFETY: clock_gettime only writes into the struct we pass.
    let mut t: libc::timespec = unsafe { std::mem::zeroed() };
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        return 0;
    }
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn worker(
    shared: Arc<Shared>,
    id: usize,
    lost: Arc<AtomicBool>,
    quiet: bool,
    ready: std::sync::mpsc::Sender<Result<Captured, ScriptError>>,
) {
    let mem = mem::track_this_thread();
    let mut engine = match Engine::start(shared.sources.clone(), shared.known_flags.clone(), quiet)
    {
        Ok(e) => {
            let _ = ready.send(Ok(e.captured().clone()));
            e
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            shared.registry().workers.remove(&id);
            mem::untrack_this_thread();
            return;
        }
    };
    drop(ready);
    while !lost.load(Ordering::SeqCst) {
        let Ok(job) = shared.jobs.recv() else { break };
        let start = Instant::now();
        if start >= job.deadline {
            // The caller gave up while the job was queued.
            continue;
        }
        job.taken.store(id + 1, Ordering::SeqCst);
        shared.registry().busy.insert(
            id,
            Busy {
                taken: job.taken.clone(),
                scope: job.scope.clone(),
                mem,
                base: mem.live.load(Ordering::Relaxed),
                // SAFETY: pthread_self has no preconditions.
                thread: unsafe { libc::pthread_self() },
            },
        );
        metrics::histogram!(SCRIPT_ENTRY_WAIT).record((start - job.enqueued).as_secs_f64());
        let deadline = job.deadline;
        let cpu = thread_cpu_nanos();
        let mut finished = || {
            metrics::histogram!(SCRIPT_EXEC_TIME).record(start.elapsed().as_secs_f64());
            shared
                .busy_cpu_nanos
                .fetch_add(thread_cpu_nanos().saturating_sub(cpu), Ordering::Relaxed);
        };
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            engine.run(job.work, deadline, &mut finished)
        }));
        {
            let mut r = shared.registry();
            r.busy.remove(&id);
            if let Some(s) = r.stuck.remove(&id) {
                metrics::gauge!(SCRIPT_STUCK_WORKERS).decrement(1.0);
                tracing::info!(
                    worker = id,
                    schema = %s.scope,
                    seconds = s.since.elapsed().as_secs(),
                    "an abandoned userscript worker finished its job and stops"
                );
                break;
            }
        }
        if ran.is_err() {
            shared.replace(id, "panicked");
            break;
        }
        let budget = shared.limits.memory_budget;
        if budget > 0 && mem.live.load(Ordering::Relaxed) > budget as i64 {
            shared.replace(id, "memory budget exceeded");
            break;
        }
    }
    drop(engine);
    mem::untrack_this_thread();
}
