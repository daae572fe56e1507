//! The window scheduler: dispatches flushes in time order, up to `--parallelism` at once when
//! their keys are disjoint, and commits the checkpoint behind the completed prefix.

use super::*;

/// A dispatched flush.
pub(super) struct Dispatched {
    pub(super) job: Arc<FlushJob>,
    pub(super) head: bool,
    /// An earlier flush was unfinished when it started.
    pub(super) behind: bool,
    pub(super) retried: bool,
    /// When it was handed to [`Window::dispatch`].
    pub(super) queued: Instant,
}

pub(super) enum Event {
    Flush(u64, Result<(), SequenceError>),
    Commit(Result<Hlc, SequenceError>),
    Panicked(String),
}

/// The coordinator of one window: dispatches flushes in time order, tracks their keys and
/// completion, and commits the checkpoint in order.
pub(super) struct Window {
    pub(super) ctx: Arc<Ctx>,
    /// The end of the window as far as known (it grows when the reader extends it).
    pub(super) hi: Hlc,
    /// The page ending at the window's final `hi` has arrived.
    pub(super) read_all: bool,
    pub(super) sweep_from: Hlc,
    pub(super) parallelism: usize,
    pub(super) flush_size: usize,
    pub(super) next_idx: u64,
    pub(super) running: JoinSet<(u64, Result<(), SequenceError>)>,
    pub(super) jobs: HashMap<u64, Dispatched>,
    /// Flushes waiting for every earlier one to finish before their second try.
    pub(super) deferred: BTreeSet<u64>,
    pub(super) locks: KeyLocks,
    pub(super) progress: Progress,
    pub(super) commit: Option<JoinHandle<Result<Hlc, SequenceError>>>,
    pub(super) error: Option<SequenceError>,
    /// The flush whose failure ended the window, searched for its poison mutation.
    pub(super) failed: Option<Arc<FlushJob>>,
}

impl Window {
    pub(super) fn new(ctx: Arc<Ctx>, bounds: Bounds, sweep_from: Hlc) -> Window {
        let args = &ctx.parts.args;
        // Leave half the target pool to ingest, reads and checkpoint commits.
        let pool = ctx.parts.target.pool.options().get_max_connections() as usize;
        let parallelism = args.parallelism().min((pool / 2).max(1));
        Window {
            hi: bounds.proposed,
            read_all: false,
            sweep_from,
            parallelism,
            flush_size: args.flush_size,
            next_idx: 0,
            running: JoinSet::new(),
            jobs: HashMap::new(),
            deferred: BTreeSet::new(),
            locks: KeyLocks::default(),
            progress: Progress::new(bounds.committed),
            commit: None,
            error: None,
            failed: None,
            ctx,
        }
    }

    /// Applies the window; returns where it ended.
    pub(super) async fn run(
        mut self,
        mut pages: mpsc::Receiver<Result<Page, SequenceError>>,
    ) -> Result<Hlc, SequenceError> {
        enum Next {
            Page(Option<Result<Page, SequenceError>>),
            Event(Event),
        }
        let mut stop = self.ctx.stop.clone();
        while self.error.is_none() {
            if *stop.borrow_and_update() {
                self.fail(SequenceError::Stopped);
                break;
            }
            let next = if self.busy() {
                tokio::select! {
                    p = pages.recv() => Next::Page(p),
                    ev = self.wait() => Next::Event(ev),
                    Ok(()) = stop.changed() => continue,
                }
            } else {
                tokio::select! {
                    p = pages.recv() => Next::Page(p),
                    Ok(()) = stop.changed() => continue,
                }
            };
            let page = match next {
                Next::Event(ev) => {
                    self.handle(ev);
                    continue;
                }
                Next::Page(Some(Ok(page))) => page,
                Next::Page(Some(Err(e))) => {
                    self.fail(e);
                    break;
                }
                Next::Page(None) => break,
            };
            let last = page.last;
            metrics::gauge!(m::STAGE_MERGE_LAG, &schema_label(&self.ctx.schema))
                .set(now_seconds() - page.cut.seconds());
            self.hi = self.hi.max(page.hi);
            self.read_all = last;
            for slice in slices(page.rows, page.after, page.cut, self.flush_size) {
                let job = FlushJob::new(self.next_idx, slice, &self.ctx.tables);
                self.next_idx += 1;
                self.dispatch(job).await;
                if self.error.is_some() {
                    break;
                }
            }
            if last {
                break;
            }
        }
        self.finish().await
    }

    pub(super) fn busy(&self) -> bool {
        !self.running.is_empty() || self.commit.is_some()
    }

    /// Waits for the next flush or checkpoint commit to end; only call while [`Window::busy`].
    pub(super) async fn wait(&mut self) -> Event {
        let running = &mut self.running;
        let commit = &mut self.commit;
        let ev = tokio::select! {
            Some(joined) = running.join_next(), if !running.is_empty() => match joined {
                Ok((idx, result)) => Event::Flush(idx, result),
                Err(e) => Event::Panicked(e.to_string()),
            },
            joined = async { commit.as_mut().expect("checked").await }, if commit.is_some() => {
                Event::Commit(joined.unwrap_or_else(|e| Err(SequenceError::Task(e.to_string()))))
            }
        };
        if matches!(ev, Event::Commit(_)) {
            self.commit = None;
        }
        ev
    }

    pub(super) fn handle(&mut self, ev: Event) {
        match ev {
            Event::Flush(idx, Ok(())) => {
                let d = self.jobs.remove(&idx).expect("dispatched flush");
                metrics::histogram!(m::LOCKSET_EXEC_COMPLETE, m::LABEL_SET => m::SET_SCHEDULER)
                    .record(d.queued.elapsed().as_secs_f64());
                self.locks.release(&d.job.keys);
                self.progress.done(idx);
                if d.head {
                    self.progress.set_committed(d.job.upto);
                }
            }
            Event::Flush(idx, Err(e)) => {
                let d = self.jobs.get_mut(&idx).expect("dispatched flush");
                if self.error.is_none() && d.behind && !d.retried && deferrable(&e) {
                    // Its keys stay locked, so no later flush of the same keys overtakes it.
                    d.retried = true;
                    self.deferred.insert(idx);
                    metrics::counter!(m::CORE_FLUSH_DEFERRED, &schema_label(&self.ctx.schema))
                        .increment(1);
                    tracing::debug!(schema = %self.ctx.schema, error = %crate::error::ErrorChain(&e), "flush deferred until earlier flushes finish");
                } else {
                    let d = self.jobs.remove(&idx).expect("dispatched flush");
                    metrics::histogram!(m::LOCKSET_EXEC_COMPLETE, m::LABEL_SET => m::SET_SCHEDULER)
                        .record(d.queued.elapsed().as_secs_f64());
                    self.locks.release(&d.job.keys);
                    if self.error.is_none() {
                        self.failed = Some(d.job);
                    }
                    self.fail(e);
                }
            }
            Event::Commit(Ok(at)) => self.progress.set_committed(at),
            Event::Commit(Err(e)) => self.fail(e),
            Event::Panicked(e) => self.fail(SequenceError::Task(e)),
        }
        self.retry_deferred();
        self.maybe_commit();
        self.publish_queue();
    }

    /// Rows dispatched to flushes and not applied yet (`stage_merge_queue_count`).
    pub(super) fn publish_queue(&self) {
        let rows: usize = self.jobs.values().map(|d| d.job.rows).sum();
        metrics::gauge!(m::STAGE_MERGE_QUEUE, &schema_label(&self.ctx.schema)).set(rows as f64);
    }

    pub(super) fn fail(&mut self, e: SequenceError) {
        if self.error.is_none() {
            self.error = Some(e);
        } else if !matches!(e, SequenceError::Stopped) {
            tracing::warn!(schema = %self.ctx.schema, error = %crate::error::ErrorChain(&e), "another flush failed");
        }
    }

    /// Retries the first deferred flush once nothing before it is unfinished.
    pub(super) fn retry_deferred(&mut self) {
        if self.error.is_some() {
            return;
        }
        let Some(&idx) = self.deferred.first() else {
            return;
        };
        if self.progress.pending_before(idx) {
            return;
        }
        self.deferred.remove(&idx);
        let job = self.jobs[&idx].job.clone();
        metrics::counter!(m::LOCKSET_RETRIED, m::LABEL_SET => m::SET_SCHEDULER).increment(1);
        self.spawn(job, Role::Concurrent);
    }

    /// Starts the in-order checkpoint commit when the completed prefix has moved past it.
    pub(super) fn maybe_commit(&mut self) {
        if self.error.is_some() || self.commit.is_some() {
            return;
        }
        let upto = self.progress.prefix();
        if upto <= self.progress.committed() {
            return;
        }
        let sweep = self.at_end(upto).then_some(self.sweep_from);
        self.commit = Some(tokio::spawn(commit_step(self.ctx.clone(), upto, sweep)));
    }

    /// `upto` is the end of the whole window: the step committing it sweeps the window.
    pub(super) fn at_end(&self, upto: Hlc) -> bool {
        self.read_all && upto >= self.hi
    }

    pub(super) fn spawn(&mut self, job: Arc<FlushJob>, role: Role) {
        let ctx = self.ctx.clone();
        let idx = job.idx;
        self.running.spawn(async move {
            let _executing = Executing::start();
            (idx, run_flush(ctx, job, role).await)
        });
    }

    /// Starts `job` as soon as it may: fewer than `parallelism` flushes in flight and none of
    /// them holding its keys. When the lease is due for renewal, in-flight flushes are let
    /// finish first (their shared locks would make the renewing `UPDATE` wait anyway, and new
    /// flushes would queue behind it), then it is renewed on its own, never inside a flush
    /// transaction, where its exclusive lock would keep every other flush waiting.
    pub(super) async fn dispatch(&mut self, job: FlushJob) {
        let idx = job.idx;
        if job.rows == 0 {
            // Nothing to write: the checkpoint may simply move over it.
            self.progress.push(idx, job.upto);
            self.progress.done(idx);
            self.maybe_commit();
            return;
        }
        let queued = Instant::now();
        let mut waited = false;
        loop {
            if self.error.is_some() {
                return;
            }
            if *self.ctx.stop.borrow() {
                self.fail(SequenceError::Stopped);
                return;
            }
            if self.running.is_empty() {
                if self.commit.is_none() && self.ctx.renewal_due() {
                    waited = true;
                    self.renew().await;
                    continue;
                }
                // Let a checkpoint commit in progress end, so this flush can carry the next.
                if self.commit.is_none() {
                    break;
                }
            } else if !self.ctx.renewal_due()
                && self.running.len() + self.deferred.len() < self.parallelism
                && self.locks.free(&job.keys)
            {
                break;
            }
            waited = true;
            let ev = self.wait().await;
            self.handle(ev);
        }
        let started = if waited {
            m::LOCKSET_DEFERRED_START
        } else {
            m::LOCKSET_IMMEDIATE_START
        };
        metrics::counter!(started, m::LABEL_SET => m::SET_SCHEDULER).increment(1);
        metrics::histogram!(m::LOCKSET_EXEC_WAIT, m::LABEL_SET => m::SET_SCHEDULER)
            .record(queued.elapsed().as_secs_f64());
        let head = self.running.is_empty() && self.progress.committed() == job.after;
        debug_assert!(!self.running.is_empty() || self.locks.is_empty());
        let behind = self.progress.any_pending();
        self.progress.push(idx, job.upto);
        self.locks.take(idx, &job.keys);
        let role = if head {
            Role::Head {
                sweep: self.at_end(job.upto).then_some(self.sweep_from),
            }
        } else {
            Role::Concurrent
        };
        let job = Arc::new(job);
        self.jobs.insert(
            idx,
            Dispatched {
                job: job.clone(),
                head,
                behind,
                retried: false,
                queued,
            },
        );
        self.spawn(job, role);
        self.publish_queue();
    }

    /// Renews the lease while nothing of the window runs.
    pub(super) async fn renew(&mut self) {
        let started = Instant::now();
        let parts = &self.ctx.parts;
        match parts
            .leases
            .renew_now(&self.ctx.lease, LEASE_LIFETIME)
            .await
        {
            Ok(true) => self.ctx.mark_renewed(started),
            Ok(false) => self.fail(self.ctx.lost()),
            Err(e) => self.fail(e.into()),
        }
    }

    /// Waits for the window to be committed; after a failure, waits for the flushes in flight
    /// and commits the checkpoint over what they completed before returning the error.
    pub(super) async fn finish(mut self) -> Result<Hlc, SequenceError> {
        while self.error.is_none() {
            if !self.busy() {
                if self.at_end(self.progress.committed()) {
                    return Ok(self.hi);
                }
                self.maybe_commit();
                if !self.busy() {
                    self.fail(SequenceError::Task(
                        "the staging reader stopped before the end of the window".into(),
                    ));
                    break;
                }
            }
            let ev = self.wait().await;
            self.handle(ev);
        }
        while self.busy() {
            let ev = self.wait().await;
            self.handle(ev);
        }
        let upto = self.progress.prefix();
        if upto > self.progress.committed() {
            let sweep = self.at_end(upto).then_some(self.sweep_from);
            if let Err(e) = commit_step(self.ctx.clone(), upto, sweep).await {
                tracing::warn!(schema = %self.ctx.schema, error = %crate::error::ErrorChain(&e), "could not commit the checkpoint of the applied flushes");
            }
        }
        let error = self.error.take().expect("failed window has an error");
        let stopped = matches!(error, SequenceError::Stopped);
        if let Some(job) = self
            .failed
            .take()
            .filter(|_| !stopped && !is_transient(&error))
        {
            self.name_poison(&job).await;
        }
        Err(error)
    }

    /// Logs the mutation of a failed flush that the target refuses (it is retried with capped backoff, never in a tight loop), so an
    /// operator can find what blocks the schema. The key is an identifier, not row values.
    pub(super) async fn name_poison(&self, job: &FlushJob) {
        let parts = &self.ctx.parts;
        let found = find_poison(
            &parts.applier,
            parts.script.as_ref(),
            &parts.target.pool,
            &self.ctx.info,
            &job.batches,
        )
        .await;
        let pipelines = &parts.pipelines;
        match &found {
            Ok(Some(p)) => pipelines.poison(
                &self.ctx.schema,
                Some((p.table.clone(), p.key.clone(), p.time)),
            ),
            _ => pipelines.poison(&self.ctx.schema, None),
        }
        match found {
            Ok(Some(p)) => {
                tracing::error!(schema = %self.ctx.schema, table = %p.table, key = %p.key, time = %p.time, error = %crate::error::ErrorChain(&p.error), "poison mutation blocks the schema; will retry with backoff")
            }
            Ok(None) => {
                tracing::warn!(schema = %self.ctx.schema, "a flush failed but each of its mutations applies alone")
            }
            Err(e) => {
                tracing::warn!(schema = %self.ctx.schema, error = %crate::error::ErrorChain(&e), "could not search the failed flush for its poison mutation")
            }
        }
    }
}
