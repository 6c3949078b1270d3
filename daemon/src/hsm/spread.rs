//! Spreads a batch of HSM jobs over the session pool, fairly.
//!
//! One worker thread per pooled session takes jobs from a ring of batches:
//! a free worker claims the next job of the batch at the front of the ring
//! and, if that batch has more, puts it at the back. So every batch in
//! flight gets an equal share of the workers whatever its size: a
//! one-envelope request that arrives while a 1000-envelope batch runs waits
//! for the next free worker, not for the batch. A batch's jobs run on up to
//! all the workers at once; its caller waits on its own (blocking) thread
//! until every job it started has finished, and gets the outcomes in the
//! order of the inputs.
//!
//! A job whose result says stop (an HSM failure) stops its batch: jobs not
//! yet started are never run ([`JobOutcome::NotRun`]); jobs already running
//! finish. A job that panics stops its batch too.
//!
//! The call deadline (`[hsm] call_timeout_ms`): a caller whose batch has
//! made no progress (no job started or finished) for that long gives up.
//! Its running jobs come back as [`JobOutcome::TimedOut`], and so do the
//! ones that never got a worker (the workers were held by hung calls, or
//! that far behind), and the batch is stopped. PKCS#11 has no way to cancel a call,
//! so a job that hangs keeps its worker thread and its session until the
//! module returns: neither is reused before that, and whatever the job
//! returns then is dropped (a DEK is zeroized). While any job hangs past
//! its deadline, the HSM is taken to be failing: a new batch is answered
//! at once with every job `TimedOut`, instead of each caller waiting a
//! whole deadline for a call that would most likely hang too (and callers
//! queued behind a signer each waiting one more). Service resumes by
//! itself when the hung calls return. A call that never returns keeps its
//! worker for the life of the process (see OPERATIONS §7, the call
//! deadline).
//!
//! The workers are plain threads, not async tasks: a job holds a session
//! only inside one synchronous HSM call, and nothing here awaits.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Hsm, HsmError};

/// What became of one input of [`Hsm::spread`].
#[derive(Debug)]
pub enum JobOutcome<T> {
    /// The job ran and returned this.
    Done(T),
    /// The job was not started: an earlier outcome stopped the batch.
    NotRun,
    /// The job panicked (a bug); the batch was stopped.
    Panicked,
    /// The job did not finish within the call deadline (or no worker was
    /// free because others hang): the caller stopped waiting. What the job
    /// returns later is dropped.
    TimedOut,
}

/// One batch, as the workers see it (its input and result types erased).
trait Task: Send + Sync {
    /// Claims the next input's index; `None` when none is left or the batch
    /// was stopped.
    fn claim(&self) -> Option<usize>;
    /// Whether a later [`Task::claim`] could return an index.
    fn more(&self) -> bool;
    /// Runs the claimed input `index` and records its outcome.
    fn run(&self, index: usize);
}

struct Ring {
    tasks: VecDeque<Arc<dyn Task>>,
    closed: bool,
}

/// The workers and their ring of batches.
pub(super) struct Spreader {
    ring: Mutex<Ring>,
    ready: Condvar,
    workers: usize,
    /// How long a batch may go without progress before its caller gives up.
    call_timeout: Duration,
    /// Jobs whose caller gave up and that have not returned yet.
    stuck: Arc<AtomicUsize>,
    /// Jobs whose caller gave up at the deadline, ever (a counter for
    /// `/metrics`).
    timed_out: AtomicU64,
}

impl std::fmt::Debug for Spreader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spreader")
            .field("workers", &self.workers)
            .field("call_timeout", &self.call_timeout)
            .field("stuck", &self.stuck.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

/// The HSM worker threads still running, process-wide: see [`quiesce`].
static ALIVE: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

/// One worker thread's place in [`ALIVE`], given back when the thread ends
/// (or when it could not be started); also held by each open [`Hsm`].
#[derive(Debug)]
pub(super) struct Alive;

impl Alive {
    pub(super) fn enter() -> Self {
        *ALIVE
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
        Alive
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        let mut alive = ALIVE
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *alive -= 1;
        ALIVE.1.notify_all();
    }
}

/// The handles of the HSM threads ([`keep_handle`]), joined by
/// [`quiesce`].
static HANDLES: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

/// Keeps an HSM thread's handle for [`quiesce`], and joins the threads
/// kept before that have finished, so that the list holds about as many
/// handles as there are threads (a finished thread not joined keeps its
/// stack), however many module resets start new ones.
pub(super) fn keep_handle(handle: std::thread::JoinHandle<()>) {
    let finished = {
        let mut handles = HANDLES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (finished, running) = std::mem::take(&mut *handles)
            .into_iter()
            .partition::<Vec<_>, _>(std::thread::JoinHandle::is_finished);
        *handles = running;
        handles.push(handle);
        finished
    };
    // Outside the lock; each returns at once, its thread's work being done.
    for thread in finished {
        let _ = thread.join();
    }
}

/// Waits, up to `timeout`, until every HSM worker thread has ended, and
/// says whether they all did. For the end of the process: the last
/// reference to an [`Hsm`] can be a worker's (the job it just ran held
/// one), and dropping it closes the pool's sessions on that thread, so
/// returning from `main` at once would run the PKCS#11 module's exit-time
/// destructors beside those calls (a crash inside SoftHSM, seen once in
/// CI). Once every `Hsm` is dropped the workers end as soon as their job
/// does; a worker held in a hung HSM call does not, hence the timeout.
///
/// A thread's count is given back when its work returns, but the thread
/// ends only after its thread-local destructors have run: among them
/// OpenSSL's per-thread state, which SoftHSM uses. An exit that overtook
/// them crashed in libcrypto on `lavd-hsm-0` (a CLI command in CI,
/// 2026-12-05). So the threads whose work returned are then joined too.
pub fn quiesce(timeout: Duration) -> bool {
    let all = {
        let alive = ALIVE
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (alive, _) = ALIVE
            .1
            .wait_timeout_while(alive, timeout, |n| *n > 0)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *alive == 0
    };
    let handles = std::mem::take(
        &mut *HANDLES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    // Counted again once the handles are taken: a worker is counted before
    // its handle is kept, so none counted now means every thread taken has
    // given its count back and is ending. One started since the wait (a
    // new `Hsm`, in a process that opens several) would make joining wait
    // as long as that `Hsm` lives.
    let settled = all
        && *ALIVE
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            == 0;
    for thread in handles {
        if settled || thread.is_finished() {
            let _ = thread.join();
        } else {
            // Still working (a new `Hsm`'s, or one in a hung call, which
            // joining would wait on for ever): kept for a later call.
            keep_handle(thread);
        }
    }
    settled
}

impl Spreader {
    /// Starts `workers` threads; callers wait at most `call_timeout`
    /// without progress.
    ///
    /// # Errors
    /// [`HsmError::Worker`] if a thread cannot be started.
    pub(super) fn start(workers: usize, call_timeout: Duration) -> Result<Arc<Self>, HsmError> {
        let spreader = Arc::new(Spreader {
            ring: Mutex::new(Ring {
                tasks: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            workers,
            call_timeout,
            stuck: Arc::new(AtomicUsize::new(0)),
            timed_out: AtomicU64::new(0),
        });
        for i in 0..workers {
            let worker = spreader.clone();
            let alive = Alive::enter();
            let started = std::thread::Builder::new()
                .name(format!("lavd-hsm-{i}"))
                .spawn(move || {
                    let _alive = alive;
                    // Rebound after `_alive`, so dropped before it.
                    let worker = worker;
                    worker.work();
                });
            match started {
                Ok(thread) => keep_handle(thread),
                Err(e) => {
                    spreader.close();
                    return Err(HsmError::Worker(format!("cannot start an HSM worker: {e}")));
                }
            }
        }
        Ok(spreader)
    }

    /// Jobs whose caller gave up at the deadline and that still run.
    pub(super) fn stuck(&self) -> usize {
        self.stuck.load(Ordering::SeqCst)
    }

    /// Jobs whose caller gave up at the deadline since the start.
    pub(super) fn timed_out(&self) -> u64 {
        self.timed_out.load(Ordering::SeqCst)
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        // Tasks are only moved in and out under the lock, and no job runs
        // under it: a poisoned lock still holds a consistent ring.
        self.ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops the workers once they finish what they are running (the
    /// [`Hsm`] is gone, so no batch can be waiting).
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    fn submit(&self, task: Arc<dyn Task>, jobs: usize) {
        self.lock().tasks.push_back(task);
        for _ in 0..jobs.min(self.workers) {
            self.ready.notify_one();
        }
    }

    fn work(&self) {
        loop {
            let mut spent = Vec::new();
            let claimed = {
                let mut ring = self.lock();
                loop {
                    if ring.closed {
                        break None;
                    }
                    let Some(task) = ring.tasks.pop_front() else {
                        ring = self
                            .ready
                            .wait(ring)
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        continue;
                    };
                    let index = task.claim();
                    if task.more() {
                        ring.tasks.push_back(task.clone());
                    }
                    match index {
                        Some(index) => break Some((task, index)),
                        // Dropped after the lock is released: the last
                        // reference to a batch holds an `Hsm`, whose drop
                        // closes this very ring.
                        None => spent.push(task),
                    }
                }
            };
            drop(spent);
            match claimed {
                Some((task, index)) => task.run(index),
                None => return,
            }
        }
    }
}

struct State<I, T> {
    inputs: Vec<Option<I>>,
    outcomes: Vec<JobOutcome<T>>,
    next: usize,
    running: usize,
    stopped: bool,
    /// When a job last started or finished.
    progress: Instant,
    /// The caller gave up waiting: outcomes are no longer wanted.
    abandoned: bool,
}

impl<I, T> State<I, T> {
    fn settled(&self) -> bool {
        self.running == 0 && (self.stopped || self.next == self.inputs.len())
    }
}

/// One caller's batch. `C` is what each job is given: the [`Hsm`] (the
/// tests use a unit context).
struct Batch<C, I, T, F> {
    context: C,
    job: F,
    stops: fn(&T) -> bool,
    state: Mutex<State<I, T>>,
    settled: Condvar,
    /// The spreader's count of jobs running for callers that gave up.
    stuck: Arc<AtomicUsize>,
}

impl<C, I, T, F> Batch<C, I, T, F> {
    fn lock(&self) -> MutexGuard<'_, State<I, T>> {
        // Only indices, counters and moved values change under this lock; no
        // job runs under it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<C, I, T, F> Task for Batch<C, I, T, F>
where
    C: Send + Sync,
    I: Send,
    T: Send,
    F: Fn(&C, I) -> T + Send + Sync,
{
    fn claim(&self) -> Option<usize> {
        let mut state = self.lock();
        if state.stopped || state.next == state.inputs.len() {
            return None;
        }
        let index = state.next;
        state.next += 1;
        state.running += 1;
        state.progress = Instant::now();
        // Stands until the job records its outcome: what the caller gets if
        // it gives up first.
        state.outcomes[index] = JobOutcome::TimedOut;
        Some(index)
    }

    fn more(&self) -> bool {
        let state = self.lock();
        !state.stopped && state.next < state.inputs.len()
    }

    fn run(&self, index: usize) {
        // Empty when the caller gave up between this job's claim and now
        // (it cleared the inputs): the job does not run.
        let input = self.lock().inputs.get_mut(index).and_then(Option::take);
        let outcome = match input {
            Some(input) => {
                match catch_unwind(AssertUnwindSafe(|| (self.job)(&self.context, input))) {
                    Ok(value) => JobOutcome::Done(value),
                    Err(_) => JobOutcome::Panicked,
                }
            }
            // The caller gave up after this job was claimed and cleared
            // the inputs: the job does not run (its outcome is dropped
            // below, as the batch is abandoned).
            None => JobOutcome::NotRun,
        };
        let stop = match &outcome {
            JobOutcome::Done(value) => (self.stops)(value),
            JobOutcome::Panicked => true,
            JobOutcome::NotRun | JobOutcome::TimedOut => false,
        };
        let mut state = self.lock();
        state.running -= 1;
        if state.abandoned {
            // The caller gave up at the deadline and counted this job as
            // stuck; it returned at last. Its outcome is dropped (after the
            // lock: a DEK is zeroized on drop).
            self.stuck.fetch_sub(1, Ordering::SeqCst);
            drop(state);
            drop(outcome);
            return;
        }
        state.stopped |= stop;
        state.progress = Instant::now();
        if let Some(slot) = state.outcomes.get_mut(index) {
            *slot = outcome;
        }
        if state.settled() {
            self.settled.notify_all();
        }
    }
}

/// A batch handed to the workers and not yet waited for
/// ([`Spreader::submit_batch`]). Dropped without [`Spreader::wait`], its
/// jobs still run and their outcomes are dropped with the batch.
pub(crate) struct Submitted<C, I, T, F> {
    /// `None`: not submitted, because a call is past its deadline (the HSM
    /// is failing): every job is `TimedOut`.
    batch: Option<Arc<Batch<C, I, T, F>>>,
    count: usize,
}

impl<C, I, T, F> std::fmt::Debug for Submitted<C, I, T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submitted")
            .field("count", &self.count)
            .field("refused", &self.batch.is_none())
            .finish_non_exhaustive()
    }
}

impl Spreader {
    /// Hands a batch to the workers without waiting for it: see
    /// [`Hsm::spread`], which is this and [`Spreader::wait`].
    pub(super) fn submit_batch<C, I, T, F>(
        &self,
        context: C,
        inputs: Vec<I>,
        job: F,
        stops: fn(&T) -> bool,
    ) -> Submitted<C, I, T, F>
    where
        C: Send + Sync + 'static,
        I: Send + 'static,
        T: Send + 'static,
        F: Fn(&C, I) -> T + Send + Sync + 'static,
    {
        let count = inputs.len();
        if count == 0 || self.stuck() > 0 {
            // None to run; or a call outlived its deadline and has not
            // returned: the HSM is failing, and waiting would most likely
            // reach the deadline too.
            return Submitted { batch: None, count };
        }
        let batch = Arc::new(Batch {
            context,
            job,
            stops,
            state: Mutex::new(State {
                inputs: inputs.into_iter().map(Some).collect(),
                outcomes: (0..count).map(|_| JobOutcome::NotRun).collect(),
                next: 0,
                running: 0,
                stopped: false,
                progress: Instant::now(),
                abandoned: false,
            }),
            settled: Condvar::new(),
            stuck: self.stuck.clone(),
        });
        self.submit(batch.clone(), count);
        Submitted {
            batch: Some(batch),
            count,
        }
    }

    /// Waits for a submitted batch, for as long as it makes progress
    /// within the call deadline, and returns its outcomes in input order.
    pub(super) fn wait<C, I, T, F>(&self, submitted: Submitted<C, I, T, F>) -> Vec<JobOutcome<T>> {
        let Some(batch) = submitted.batch else {
            return (0..submitted.count).map(|_| JobOutcome::TimedOut).collect();
        };
        let mut state = batch.lock();
        while !state.settled() {
            let waited = state.progress.elapsed();
            if waited >= self.call_timeout {
                // No job started or finished for a whole deadline: give
                // up. Running jobs keep their outcome `TimedOut` and are
                // counted stuck until they return. The rest never start:
                // no worker was free within the deadline (others hang, or
                // are that far behind), so they are `TimedOut` too, not
                // `NotRun` (which says an earlier outcome stopped the
                // batch, and would let the jobs that did finish be
                // released).
                state.stopped = true;
                state.abandoned = true;
                let unstarted = state.inputs.len() - state.next;
                let next = state.next;
                for outcome in &mut state.outcomes[next..] {
                    *outcome = JobOutcome::TimedOut;
                }
                self.stuck.fetch_add(state.running, Ordering::SeqCst);
                self.timed_out
                    .fetch_add((state.running + unstarted) as u64, Ordering::SeqCst);
                tracing::warn!(
                    running = state.running,
                    timeout_ms = self.call_timeout.as_millis() as u64,
                    "HSM calls did not return within the call deadline; gave up waiting"
                );
                break;
            }
            state = batch
                .settled
                .wait_timeout(state, self.call_timeout - waited)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        // Inputs never started are dropped here, on the caller's thread.
        state.inputs.clear();
        std::mem::take(&mut state.outcomes)
    }

    /// Runs a batch and waits for it, as [`Hsm::spread`] does.
    #[cfg(test)]
    fn spread<C, I, T, F>(
        &self,
        context: C,
        inputs: Vec<I>,
        job: F,
        stops: fn(&T) -> bool,
    ) -> Vec<JobOutcome<T>>
    where
        C: Send + Sync + 'static,
        I: Send + 'static,
        T: Send + 'static,
        F: Fn(&C, I) -> T + Send + Sync + 'static,
    {
        let submitted = self.submit_batch(context, inputs, job, stops);
        self.wait(submitted)
    }
}

impl Hsm {
    /// Runs `job` on every input on the HSM workers, as many at once as the
    /// pool has sessions, sharing the workers fairly with every other batch
    /// in flight, and returns the outcomes in the order of `inputs`.
    ///
    /// Blocking: call it from a blocking thread. The first outcome for
    /// which `stops` is true (or a panic) stops the batch: inputs not yet
    /// started come back as [`JobOutcome::NotRun`] and are dropped there.
    /// A batch that makes no progress for the call deadline is given up:
    /// see the module docs ([`JobOutcome::TimedOut`]).
    pub fn spread<I, T, F>(
        &self,
        inputs: Vec<I>,
        job: F,
        stops: fn(&T) -> bool,
    ) -> Vec<JobOutcome<T>>
    where
        I: Send + 'static,
        T: Send + 'static,
        F: Fn(&Hsm, I) -> T + Send + Sync + 'static,
    {
        self.start_spread(inputs, job, stops).wait()
    }

    /// [`Hsm::spread`] without waiting: the jobs start on the workers at
    /// once, and [`StartedSpread::wait`] returns their outcomes. So the
    /// caller can do its own work while the HSM works. Dropped without a
    /// wait, the jobs still run and their outcomes are dropped (a DEK is
    /// zeroized).
    pub fn start_spread<I, T, F>(
        &self,
        inputs: Vec<I>,
        job: F,
        stops: fn(&T) -> bool,
    ) -> StartedSpread<I, T, F>
    where
        I: Send + 'static,
        T: Send + 'static,
        F: Fn(&Hsm, I) -> T + Send + Sync + 'static,
    {
        StartedSpread {
            hsm: self.clone(),
            submitted: self
                .inner
                .spreader
                .submit_batch(self.clone(), inputs, job, stops),
        }
    }
}

/// A batch started by [`Hsm::start_spread`].
#[derive(Debug)]
pub struct StartedSpread<I, T, F> {
    hsm: Hsm,
    submitted: Submitted<Hsm, I, T, F>,
}

impl<I, T, F> StartedSpread<I, T, F> {
    /// Waits for the batch as [`Hsm::spread`] does, and returns the
    /// outcomes in the order of the inputs. Blocking.
    pub fn wait(self) -> Vec<JobOutcome<T>> {
        self.hsm.inner.spreader.wait(self.submitted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A deadline no test job comes near.
    const LONG: Duration = Duration::from_secs(60);

    fn never(_: &usize) -> bool {
        false
    }

    #[test]
    fn a_hung_job_is_given_up_at_the_deadline_and_its_worker_is_not_reused_until_it_returns() {
        let spreader = Spreader::start(1, Duration::from_millis(200)).unwrap();
        let release = Arc::new(std::sync::Barrier::new(2));
        let r = release.clone();
        let started = Instant::now();
        let outcomes = spreader.spread(
            (),
            vec![0usize, 1, 2],
            move |(), i| {
                if i == 0 {
                    r.wait();
                }
                i
            },
            never,
        );
        let waited = started.elapsed();
        // The hung job and the two no worker was free for.
        assert!(
            outcomes.iter().all(|o| matches!(o, JobOutcome::TimedOut)),
            "{outcomes:?}"
        );
        // The deadline, not the hang; generous upper bound for a loaded
        // 2-core machine.
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        assert_eq!(spreader.stuck(), 1);
        // A call hangs past its deadline: a new batch is answered at once.
        let started = Instant::now();
        let outcomes = spreader.spread((), vec![7usize], |(), i| i, never);
        assert!(matches!(outcomes[..], [JobOutcome::TimedOut]));
        assert!(started.elapsed() < Duration::from_millis(200));
        // The hung call returns: its outcome is dropped, the worker serves again.
        release.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while spreader.stuck() != 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(spreader.stuck(), 0);
        let outcomes = spreader.spread((), vec![7usize], |(), i| i, never);
        assert!(matches!(outcomes[..], [JobOutcome::Done(7)]));
        spreader.close();
    }

    /// A batch whose jobs got no worker within the deadline (the workers
    /// went to another batch's hung call) is given up with those jobs
    /// `TimedOut`: before, they came back `NotRun`, and the jobs that had
    /// finished were released as if an earlier outcome had stopped it.
    #[test]
    fn jobs_that_got_no_worker_within_the_deadline_time_out() {
        let spreader = Spreader::start(1, Duration::from_millis(200)).unwrap();
        let (first_running, first_runs) = std::sync::mpsc::channel::<()>();
        let (finish_first, first_may_finish) = std::sync::mpsc::channel::<()>();
        let first_may_finish = Mutex::new(first_may_finish);
        let b = spreader.submit_batch(
            (),
            vec![0usize, 1, 2],
            move |(), i| {
                if i == 0 {
                    first_running.send(()).unwrap();
                    first_may_finish.lock().unwrap().recv().unwrap();
                }
                i
            },
            never,
        );
        first_runs.recv().unwrap();
        // Another batch, whose call hangs, joins the ring behind it.
        let release = Arc::new(std::sync::Barrier::new(2));
        let r = release.clone();
        let x = spreader.submit_batch(
            (),
            vec![9usize],
            move |(), i| {
                r.wait();
                i
            },
            never,
        );
        finish_first.send(()).unwrap();
        let outcomes = spreader.wait(b);
        assert!(matches!(outcomes[0], JobOutcome::Done(0)), "{outcomes:?}");
        assert!(
            outcomes.iter().any(|o| matches!(o, JobOutcome::TimedOut)),
            "{outcomes:?}"
        );
        assert!(
            !outcomes.iter().any(|o| matches!(o, JobOutcome::NotRun)),
            "{outcomes:?}"
        );
        assert!(spreader.timed_out() >= 1);
        // The hung call returns; its own caller never waited (dropped).
        drop(x);
        release.wait();
        spreader.close();
    }

    /// A job claimed by a worker that is then held off the CPU past the
    /// deadline runs after its caller gave up and cleared the inputs: it
    /// does nothing, and is no longer counted stuck. Before, it indexed the
    /// cleared inputs, panicked, killed its worker and stayed stuck.
    #[test]
    fn a_job_claimed_before_the_caller_gave_up_and_run_after_does_nothing() {
        let spreader = Spreader::start(0, Duration::from_millis(50)).unwrap();
        let submitted = spreader.submit_batch((), vec![1usize], |(), i| i, never);
        let batch = submitted.batch.clone().unwrap();
        let index = batch.claim().unwrap();
        assert!(matches!(
            spreader.wait(submitted)[..],
            [JobOutcome::TimedOut]
        ));
        assert_eq!(spreader.stuck(), 1);
        let ran = catch_unwind(AssertUnwindSafe(|| batch.run(index)));
        assert!(ran.is_ok(), "the late job panicked");
        assert_eq!(spreader.stuck(), 0);
        spreader.close();
    }

    #[test]
    fn outcomes_come_back_in_input_order_from_many_workers() {
        let spreader = Spreader::start(4, LONG).unwrap();
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (r, m) = (running.clone(), most.clone());
        let outcomes = spreader.spread(
            (),
            (0..200usize).collect(),
            move |(), i| {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                // Uneven job times, so that completion order differs from
                // input order.
                std::thread::sleep(Duration::from_micros((i as u64 * 7919) % 500));
                r.fetch_sub(1, Ordering::SeqCst);
                i * 2
            },
            never,
        );
        let got: Vec<usize> = outcomes
            .into_iter()
            .map(|o| match o {
                JobOutcome::Done(v) => v,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(got, (0..200).map(|i| i * 2).collect::<Vec<_>>());
        assert!(
            most.load(Ordering::SeqCst) > 1,
            "never ran two jobs at once"
        );
        assert!(
            most.load(Ordering::SeqCst) <= 4,
            "more jobs at once than workers"
        );
        spreader.close();
    }

    #[test]
    fn a_batch_submitted_and_waited_for_later_gets_its_outcome_and_a_dropped_one_still_runs() {
        let spreader = Spreader::start(1, LONG).unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        // Waited for after the job has finished: the outcome was kept.
        let r = ran.clone();
        let submitted = spreader.submit_batch(
            (),
            vec![21usize],
            move |(), i| {
                r.fetch_add(1, Ordering::SeqCst);
                i * 2
            },
            never,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while ran.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(matches!(
            spreader.wait(submitted)[..],
            [JobOutcome::Done(42)]
        ));
        // Dropped without a wait: the job still runs (the audit log drops
        // a signature whose commit failed this way), and the worker is
        // free again afterwards.
        let r = ran.clone();
        drop(spreader.submit_batch(
            (),
            vec![1usize],
            move |(), _| r.fetch_add(1, Ordering::SeqCst),
            never,
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while ran.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(ran.load(Ordering::SeqCst), 2);
        assert!(matches!(
            spreader.spread((), vec![3usize], |(), i| i, never)[..],
            [JobOutcome::Done(3)]
        ));
        spreader.close();
    }

    #[test]
    fn a_stopping_outcome_or_a_panic_leaves_later_inputs_unrun() {
        // One worker, so that "later" is exact: a job is claimed only after
        // the previous outcome is recorded.
        let spreader = Spreader::start(1, LONG).unwrap();
        let outcomes = spreader.spread((), (0..100usize).collect(), |(), i| i, |i| *i == 10);
        for (i, outcome) in outcomes.iter().enumerate() {
            match outcome {
                JobOutcome::Done(v) => assert!(i <= 10 && *v == i, "{i}"),
                JobOutcome::NotRun => assert!(i > 10, "{i}"),
                JobOutcome::Panicked | JobOutcome::TimedOut => panic!("{i}"),
            }
        }

        let outcomes = spreader.spread(
            (),
            (0..100usize).collect(),
            |(), i| {
                assert!(i != 5, "a bug in a job");
                i
            },
            never,
        );
        assert!(matches!(outcomes[4], JobOutcome::Done(4)));
        assert!(matches!(outcomes[5], JobOutcome::Panicked));
        assert!(outcomes[6..]
            .iter()
            .all(|o| matches!(o, JobOutcome::NotRun)));
        // The worker survived the panic.
        let outcomes = spreader.spread((), vec![1usize], |(), i| i, never);
        assert!(matches!(outcomes[..], [JobOutcome::Done(1)]));
        spreader.close();
    }

    #[test]
    fn a_small_batch_is_not_queued_behind_a_large_one() {
        let spreader = Spreader::start(2, LONG).unwrap();
        let large_done = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|s| {
            let done = large_done.clone();
            let large = s.spawn(|| {
                spreader.spread(
                    (),
                    (0..400usize).collect(),
                    move |(), i| {
                        std::thread::sleep(Duration::from_millis(1));
                        done.fetch_add(1, Ordering::SeqCst);
                        i
                    },
                    never,
                )
            });
            // Once the large batch holds both workers.
            while large_done.load(Ordering::SeqCst) < 10 {
                std::thread::sleep(Duration::from_millis(1));
            }
            for round in 0..3 {
                let outcomes = spreader.spread((), vec![7usize], |(), i| i, never);
                assert!(matches!(outcomes[..], [JobOutcome::Done(7)]));
                // Round-robin: each small job waits for one large job per
                // worker at most, so most of the large batch is still to
                // come (waiting for the whole batch would leave none).
                let done = large_done.load(Ordering::SeqCst);
                assert!(
                    done < 300,
                    "small batch {round} ran after {done} of 400 large jobs"
                );
            }
            assert_eq!(large.join().unwrap().len(), 400);
        });
        spreader.close();
    }
}
