//! The job queue of one engine Context: what the engine schedules while a hook runs (promise
//! reactions, its own async jobs) is run here, on the engine's thread, before the hook's answer
//! is read.

use boa_engine::job::{GenericJob, Job as EngineJob, JobExecutor, NativeAsyncJob, PromiseJob};
use boa_engine::{Context, JsResult};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Wake, Waker};
use std::time::Duration;

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
pub(super) struct Jobs {
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
