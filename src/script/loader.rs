//! How the script is read: its files, transpiled once per process and shared by every engine
//! thread ([`Sources`]); the module loader of one Context (the host module under both names,
//! files beside the importer, never outside the script's directory); and the mapping of engine
//! errors, parse errors and exceptions alike, to the script's own files and lines.

use super::host;
use super::transpile::{self, Compiled};
use super::{ScriptError, LOOP_LIMIT, RECURSION_LIMIT};
use boa_engine::module::{Module, ModuleLoader, Referrer};
use boa_engine::{js_string, Context, JsError, JsNativeError, JsResult, JsString, Source};
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError};

/// The script's files, transpiled once per process and shared by all workers.
pub(super) struct Sources {
    /// Canonical directory of the main script; imports may not leave it.
    pub dir: PathBuf,
    pub main: PathBuf,
    /// The main file's name, for logs.
    pub name: String,
    cache: Mutex<HashMap<PathBuf, Arc<Compiled>>>,
}

impl Sources {
    pub(super) fn new(path: &Path) -> Result<Sources, ScriptError> {
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
pub(super) struct Loader {
    sources: Arc<Sources>,
    host: RefCell<Option<Module>>,
    modules: RefCell<HashMap<PathBuf, Module>>,
    /// The precise error of a failed load, for the report (the engine only keeps a message).
    error: RefCell<Option<ScriptError>>,
}

impl Loader {
    pub(super) fn new(sources: Arc<Sources>) -> Loader {
        Loader {
            sources,
            host: RefCell::new(None),
            modules: RefCell::new(HashMap::new()),
            error: RefCell::new(None),
        }
    }

    /// The precise error of the load that failed, once.
    pub(super) fn take_error(&self) -> Option<ScriptError> {
        self.error.borrow_mut().take()
    }

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

    pub(super) fn module(&self, path: &Path, ctx: &mut Context) -> Result<Module, ScriptError> {
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

/// Converts an engine error into ours, naming the script position of the innermost frame that
/// belongs to the script.
pub(super) fn js_error(
    sources: &Sources,
    context: String,
    e: JsError,
    ctx: &mut Context,
) -> ScriptError {
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
