//! The engine threads. Each owns an [`Engine`] with the script loaded; work arrives on a
//! bounded queue, one message per batch, and answers on a oneshot. A worker that panics or
//! outgrows the memory budget between jobs is replaced by a fresh one. The CPU time each job
//! takes on its thread is counted, and each thread's heap is measured ([`mem`]).
//!
//! boa cannot stop a running job from outside. Its runtime limits stop plain runaway loops
//! and deep recursion from inside (an ordinary script error); nothing stops a regular
//! expression that backtracks for ever or one enormous native call. A worker that misses its
//! deadline is therefore abandoned: it runs on, counted as stuck, while a fresh worker takes
//! its place, and work of the schema it was running fails at once until it ends. A watchdog
//! aborts the process (staging is durable; a supervisor restarts it) when too many workers
//! are stuck, when one stays stuck too long, or when one job grows its thread's heap past the
//! memory budget.

use super::config::Captured;
use super::engine::{Engine, Work};
use super::loader::Sources;
use super::mem::{self, ThreadMem};
use super::ScriptError;
use crate::metrics::{SCRIPT_ENTRY_WAIT, SCRIPT_EXEC_TIME, SCRIPT_STUCK_WORKERS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

const STACK_BYTES: usize = 16 << 20;

/// A queued piece of work.
pub(super) struct Job {
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
pub(super) struct Limits {
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
pub(super) fn abort_process(_reason: &str) {
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
pub(super) struct Shared {
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
    pub(super) fn new(
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
    pub(super) fn spawn(
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
    pub(super) fn replace(self: &Arc<Self>, id: usize, why: &str) {
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
                tracing::error!(script = %name, error = %crate::error::ErrorChain(&e), "replacement userscript worker failed to start");
            }
        });
    }

    /// The caller of the job `taken` stopped waiting for it. A worker still running it is
    /// abandoned: boa cannot interrupt it, so it runs on (marked stuck) while a fresh worker
    /// takes its place. Past `max_stuck` abandoned workers the process is aborted.
    pub(super) fn abandon(self: &Arc<Self>, taken: &Arc<AtomicUsize>) {
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
    pub(super) fn stuck_on(&self, scope: &str) -> bool {
        self.registry().stuck.values().any(|s| s.scope == scope)
    }

    /// How many abandoned workers are still running.
    pub(super) fn stuck_workers(&self) -> usize {
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
