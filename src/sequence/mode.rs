//! Which mode each schema runs in, by the Go cdc-sink's rules (README.md, "Modes").
//!
//! `--immediate` → immediate; `--bestEffortOnly` → best-effort; `--bestEffortWindow 0` →
//! always consistent. Otherwise per schema, re-evaluated at least every 10 s and whenever its
//! checkpoint moves: lag ≥ window → best-effort; lag ≤ window/4 → consistent; in between the
//! current mode stays.
//!
//! DELIBERATE DIFFERENCE from the reference: lag is `now − committed checkpoint`, or, with no
//! committed checkpoint yet, `now − newest resolved timestamp`; with no checkpoint at all the
//! schema is consistent. The reference measures a missing checkpoint as a lag of ~54 years and
//! starts every brand-new feed in best-effort mode; here a new feed starts consistent and turns
//! best-effort only once its resolved timestamps show it is behind.
//!
//! Best-effort lookups need an index on staged keys, which costs every staged row a third to
//! two thirds more insert time on PostgreSQL; it is therefore built when a schema is about to
//! turn best-effort (without blocking writers), and the switch happens once it is ready.
//!
//! Switching never mixes modes within a request: a request holds a read lock on its schema's
//! mode while it runs, and a switch takes the write lock, so it waits for the requests of the
//! old mode to finish and holds back new ones until the new mode is in place (within this
//! process; instances decide separately, which is safe because both modes keep each key's
//! versions in order).

use super::parts::{SequenceArgs, SequenceError};
use crate::apply::SchemaCache;
use crate::checkpoint::{Bounds, Checkpoints};
use crate::hlc::Hlc;
use crate::ident::Schema;
use crate::metrics as m;
use crate::stage::Stager;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{watch, Notify, OwnedRwLockReadGuard, RwLock};

/// How requests of a schema reach the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Staged; applied in resolved windows, in transactions that keep source transactions whole.
    Consistent,
    /// Applied at once where per-key order allows, staged otherwise.
    BestEffort,
    /// Applied at once, in one transaction per request.
    Immediate,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Consistent => "consistent",
            Mode::BestEffort => "best_effort",
            Mode::Immediate => "immediate",
        }
    }

    const ALL: [Mode; 3] = [Mode::Consistent, Mode::BestEffort, Mode::Immediate];
}

/// How modes are chosen, from the flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Policy {
    Fixed(Mode),
    /// By lag, with this window.
    Auto(Duration),
}

impl Policy {
    pub(crate) fn of(args: &SequenceArgs) -> Policy {
        if args.immediate {
            Policy::Fixed(Mode::Immediate)
        } else if args.best_effort_only {
            Policy::Fixed(Mode::BestEffort)
        } else if args.best_effort_window.is_zero() {
            Policy::Fixed(Mode::Consistent)
        } else {
            Policy::Auto(args.best_effort_window)
        }
    }
}

/// How far behind a schema is, in seconds (negative when its checkpoint is in the future):
/// from the committed checkpoint, else from the newest resolved timestamp, else unknown.
pub(crate) fn lag(bounds: Bounds, now: Hlc) -> Option<f64> {
    let basis = if !bounds.committed.is_zero() {
        bounds.committed
    } else if !bounds.proposed.is_zero() {
        bounds.proposed
    } else {
        return None;
    };
    Some((i128::from(now.nanos()) - i128::from(basis.nanos())) as f64 / 1e9)
}

/// The mode after `current` for a schema that is `lag` seconds behind.
pub(crate) fn decide(current: Mode, lag: Option<f64>, window: Duration) -> Mode {
    let Some(lag) = lag else {
        return Mode::Consistent;
    };
    let window = window.as_secs_f64();
    if lag >= window {
        Mode::BestEffort
    } else if lag <= window / 4.0 {
        Mode::Consistent
    } else {
        current
    }
}

/// How often a schema's mode is re-evaluated at least, and how often the in-memory committed
/// checkpoint is looked at for moves.
const EVALUATE_EVERY: Duration = Duration::from_secs(10);
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// A request's permission to run in `mode`: the mode cannot change until it is dropped.
pub struct Admission {
    mode: Mode,
    _guard: OwnedRwLockReadGuard<Mode>,
}

impl Admission {
    pub fn mode(&self) -> Mode {
        self.mode
    }
}

struct SchemaMode {
    mode: Arc<RwLock<Mode>>,
    /// Something moved the checkpoint (a resolved timestamp arrived): evaluate now.
    kick: Notify,
}

/// What choosing a mode looks at.
#[derive(Clone)]
pub(crate) struct Sources {
    pub checkpoints: Arc<Checkpoints>,
    pub stager: Arc<Stager>,
    pub schemas: SchemaCache,
}

impl Sources {
    /// Whether the staging tables of `schema` have the index best-effort needs; with `build`,
    /// builds the missing ones first.
    async fn indexed(&self, schema: &Schema, build: bool) -> Result<bool, SequenceError> {
        let info = self.schemas.schema(schema).await?;
        let tables: Vec<_> = info.levels.iter().flatten().cloned().collect();
        Ok(self.stager.key_index(&tables, build).await?)
    }
}

/// The mode of every schema this process has seen.
pub(crate) struct Modes {
    policy: Policy,
    sources: Sources,
    schemas: Mutex<HashMap<Schema, Arc<SchemaMode>>>,
    stop: watch::Receiver<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Modes {
    pub(crate) fn new(policy: Policy, sources: Sources, stop: watch::Receiver<bool>) -> Modes {
        Modes {
            policy,
            sources,
            schemas: Mutex::new(HashMap::new()),
            stop,
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// Lets a request of `schema` run; it keeps its mode until the admission is dropped. The
    /// first request of a schema decides its initial mode from the stored checkpoints.
    pub(crate) async fn admit(&self, schema: &Schema) -> Result<Admission, SequenceError> {
        let existing = self.schemas.lock().expect("poisoned").get(schema).cloned();
        let state = match existing {
            Some(s) => s,
            None => self.create(schema).await?,
        };
        let guard = state.mode.clone().read_owned().await;
        Ok(Admission {
            mode: *guard,
            _guard: guard,
        })
    }

    /// The current mode of `schema`, if this process has seen it (and no switch is under way).
    pub(crate) fn current(&self, schema: &Schema) -> Option<Mode> {
        let state = self
            .schemas
            .lock()
            .expect("poisoned")
            .get(schema)
            .cloned()?;
        let mode = state.mode.try_read().ok().map(|m| *m);
        mode
    }

    /// Re-evaluates `schema` soon (its checkpoint may have moved).
    pub(crate) fn kick(&self, schema: &Schema) {
        if let Some(s) = self.schemas.lock().expect("poisoned").get(schema) {
            s.kick.notify_one();
        }
    }

    /// Waits for the evaluation tasks, which end when the sequencer's stop signal is sent.
    pub(crate) async fn shutdown(&self) {
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock().expect("poisoned"));
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn create(&self, schema: &Schema) -> Result<Arc<SchemaMode>, SequenceError> {
        let (mut mode, lag) = match self.policy {
            Policy::Fixed(mode) => (mode, None),
            Policy::Auto(window) => {
                let bounds = self.sources.checkpoints.bounds(schema).await?;
                let lag = lag(bounds, now());
                (decide(Mode::Consistent, lag, window), lag)
            }
        };
        // Without the index, start consistent; the evaluation builds it, then switches.
        let building = matches!(self.policy, Policy::Auto(_))
            && mode == Mode::BestEffort
            && !self.sources.indexed(schema, false).await?;
        if building {
            mode = Mode::Consistent;
        }
        let state = {
            let mut schemas = self.schemas.lock().expect("poisoned");
            if let Some(s) = schemas.get(schema) {
                return Ok(s.clone());
            }
            let state = Arc::new(SchemaMode {
                mode: Arc::new(RwLock::new(mode)),
                kick: Notify::new(),
            });
            schemas.insert(schema.clone(), state.clone());
            state
        };
        set_gauge(schema, mode);
        tracing::info!(schema = %schema, mode = mode.name(), lag_seconds = lag, "sequencing mode chosen");
        if let Policy::Auto(window) = self.policy {
            if building {
                state.kick.notify_one();
            }
            let task = tokio::spawn(evaluate(
                state.clone(),
                schema.clone(),
                self.sources.clone(),
                window,
                mode,
                self.stop.clone(),
            ));
            self.tasks.lock().expect("poisoned").push(task);
        }
        Ok(state)
    }
}

/// Re-evaluates one schema's mode until stopped: every [`EVALUATE_EVERY`], when kicked, and
/// when this process sees its committed checkpoint move.
async fn evaluate(
    state: Arc<SchemaMode>,
    schema: Schema,
    sources: Sources,
    window: Duration,
    mut current: Mode,
    mut stop: watch::Receiver<bool>,
) {
    let checkpoints = &sources.checkpoints;
    let mut evaluated = Instant::now();
    let mut seen = checkpoints.cached_committed(&schema);
    loop {
        let kicked = tokio::select! {
            _ = tokio::time::sleep(WATCH_EVERY) => false,
            _ = state.kick.notified() => true,
            _ = stop.changed() => return,
        };
        if *stop.borrow() {
            return;
        }
        let moved = checkpoints.cached_committed(&schema) != seen;
        if !(kicked || moved || evaluated.elapsed() >= EVALUATE_EVERY) {
            continue;
        }
        evaluated = Instant::now();
        let bounds = match checkpoints.bounds(&schema).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(schema = %schema, error = %crate::error::ErrorChain(&e), "cannot read checkpoints to choose the sequencing mode; keeping it");
                continue;
            }
        };
        seen = checkpoints.cached_committed(&schema);
        let lag = lag(bounds, now());
        let next = decide(current, lag, window);
        if next == Mode::BestEffort {
            // Also covers tables that appeared since the switch.
            let indexed = tokio::select! {
                r = sources.indexed(&schema, true) => r,
                _ = stop.changed() => return,
            };
            match indexed {
                Ok(true) => {}
                Ok(false) if current != Mode::BestEffort => {
                    tracing::info!(schema = %schema, "staging index is being built elsewhere; switching to best-effort once it is ready");
                    continue;
                }
                Ok(false) => {}
                Err(e) if current != Mode::BestEffort => {
                    tracing::warn!(schema = %schema, error = %crate::error::ErrorChain(&e), "cannot build the staging index best-effort mode needs; staying consistent");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(schema = %schema, error = %crate::error::ErrorChain(&e), "cannot build the staging index best-effort mode needs");
                }
            }
        }
        if next == current {
            continue;
        }
        // Waits for the requests admitted in the old mode; new ones wait for the new mode.
        *state.mode.write().await = next;
        tracing::info!(schema = %schema, from = current.name(), to = next.name(), lag_seconds = lag, window = ?window, "sequencing mode switched");
        current = next;
        set_gauge(&schema, next);
    }
}

fn now() -> Hlc {
    Hlc::from_system_time(SystemTime::now())
}

fn set_gauge(schema: &Schema, mode: Mode) {
    for m in Mode::ALL {
        let labels = [
            (m::LABEL_SCHEMA, schema.to_string()),
            (m::LABEL_MODE, m.name().to_string()),
        ];
        metrics::gauge!(m::SEQUENCE_MODE, &labels).set(if m == mode { 1.0 } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn bounds(committed: i64, proposed: i64) -> Bounds {
        Bounds {
            committed: Hlc::new(committed, 0),
            proposed: Hlc::new(proposed, 0),
        }
    }

    #[test]
    fn lag_counts_from_the_committed_checkpoint_else_the_newest_resolved() {
        let now = Hlc::new(100_000_000_000, 0);
        assert_eq!(lag(bounds(40_000_000_000, 90_000_000_000), now), Some(60.0));
        assert_eq!(lag(bounds(0, 90_000_000_000), now), Some(10.0));
        assert_eq!(lag(bounds(0, 0), now), None);
        assert_eq!(lag(bounds(0, 130_000_000_000), now), Some(-30.0));
    }

    #[test]
    fn far_behind_is_best_effort_caught_up_is_consistent_and_between_keeps_the_mode() {
        let h = 3600.0;
        for current in [Mode::Consistent, Mode::BestEffort] {
            assert_eq!(decide(current, Some(h), HOUR), Mode::BestEffort);
            assert_eq!(decide(current, Some(10.0 * h), HOUR), Mode::BestEffort);
            assert_eq!(decide(current, Some(h / 4.0), HOUR), Mode::Consistent);
            assert_eq!(decide(current, Some(-5.0), HOUR), Mode::Consistent);
            assert_eq!(decide(current, Some(h / 2.0), HOUR), current);
            assert_eq!(decide(current, Some(h - 1.0), HOUR), current);
        }
    }

    #[test]
    fn a_schema_without_checkpoints_is_consistent() {
        // The reference would say best-effort here (a lag of ~54 years): see the module doc.
        assert_eq!(decide(Mode::BestEffort, None, HOUR), Mode::Consistent);
        assert_eq!(
            decide(Mode::Consistent, lag(bounds(0, 0), now()), HOUR),
            Mode::Consistent
        );
    }

    fn start_args(extra: &[&str]) -> SequenceArgs {
        let mut argv = vec![
            "cdc-sink",
            "start",
            "--targetConn",
            "postgres://u@h/db",
            "--bestEffortWindow=0",
        ];
        argv.extend_from_slice(extra);
        match <crate::cli::Cli as clap::Parser>::try_parse_from(argv)
            .expect("parses")
            .command
        {
            crate::cli::Command::Start(a) => a.sequence.clone(),
            _ => unreachable!("a start command line"),
        }
    }

    #[test]
    fn flags_choose_the_policy_and_a_later_window_overrides_an_earlier_one() {
        assert_eq!(
            Policy::of(&start_args(&[])),
            Policy::Fixed(Mode::Consistent)
        );
        assert_eq!(
            Policy::of(&start_args(&["--bestEffortWindow", "2s"])),
            Policy::Auto(Duration::from_secs(2))
        );
        assert_eq!(
            Policy::of(&start_args(&["--bestEffortOnly"])),
            Policy::Fixed(Mode::BestEffort)
        );
        assert_eq!(
            Policy::of(&start_args(&["--immediate", "--bestEffortOnly"])),
            Policy::Fixed(Mode::Immediate)
        );
        let default = <crate::cli::Cli as clap::Parser>::try_parse_from([
            "cdc-sink",
            "start",
            "--targetConn",
            "postgres://u@h/db",
        ])
        .expect("parses");
        let crate::cli::Command::Start(a) = default.command else {
            unreachable!("a start command line")
        };
        assert_eq!(Policy::of(&a.sequence), Policy::Auto(HOUR));
    }
}
