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
//! The workers are plain threads, not async tasks: a job holds a session
//! only inside one synchronous HSM call, and nothing here awaits.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

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
}

impl std::fmt::Debug for Spreader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spreader")
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl Spreader {
    /// Starts `workers` threads.
    ///
    /// # Errors
    /// [`HsmError::Worker`] if a thread cannot be started.
    pub(super) fn start(workers: usize) -> Result<Arc<Self>, HsmError> {
        let spreader = Arc::new(Spreader {
            ring: Mutex::new(Ring {
                tasks: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            workers,
        });
        for i in 0..workers {
            let worker = spreader.clone();
            let started = std::thread::Builder::new()
                .name(format!("lavd-hsm-{i}"))
                .spawn(move || worker.work());
            if let Err(e) = started {
                spreader.close();
                return Err(HsmError::Worker(format!("cannot start an HSM worker: {e}")));
            }
        }
        Ok(spreader)
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
}

impl<I, T> State<I, T> {
    fn settled(&self) -> bool {
        self.running == 0 && (self.stopped || self.next == self.inputs.len())
    }
}

struct Batch<I, T, F> {
    hsm: Hsm,
    job: F,
    stops: fn(&T) -> bool,
    state: Mutex<State<I, T>>,
    settled: Condvar,
}

impl<I, T, F> Batch<I, T, F> {
    fn lock(&self) -> MutexGuard<'_, State<I, T>> {
        // Only indices, counters and moved values change under this lock; no
        // job runs under it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<I, T, F> Task for Batch<I, T, F>
where
    I: Send,
    T: Send,
    F: Fn(&Hsm, I) -> T + Send + Sync,
{
    fn claim(&self) -> Option<usize> {
        let mut state = self.lock();
        if state.stopped || state.next == state.inputs.len() {
            return None;
        }
        let index = state.next;
        state.next += 1;
        state.running += 1;
        Some(index)
    }

    fn more(&self) -> bool {
        let state = self.lock();
        !state.stopped && state.next < state.inputs.len()
    }

    fn run(&self, index: usize) {
        let input = self.lock().inputs[index].take();
        let outcome = match input {
            Some(input) => match catch_unwind(AssertUnwindSafe(|| (self.job)(&self.hsm, input))) {
                Ok(value) => JobOutcome::Done(value),
                Err(_) => JobOutcome::Panicked,
            },
            // Each index is claimed once: unreachable, and harmless.
            None => JobOutcome::NotRun,
        };
        let stop = match &outcome {
            JobOutcome::Done(value) => (self.stops)(value),
            JobOutcome::Panicked => true,
            JobOutcome::NotRun => false,
        };
        let mut state = self.lock();
        state.stopped |= stop;
        state.outcomes[index] = outcome;
        state.running -= 1;
        if state.settled() {
            self.settled.notify_all();
        }
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
        let count = inputs.len();
        if count == 0 {
            return Vec::new();
        }
        let batch = Arc::new(Batch {
            hsm: self.clone(),
            job,
            stops,
            state: Mutex::new(State {
                inputs: inputs.into_iter().map(Some).collect(),
                outcomes: (0..count).map(|_| JobOutcome::NotRun).collect(),
                next: 0,
                running: 0,
                stopped: false,
            }),
            settled: Condvar::new(),
        });
        self.inner.spreader.submit(batch.clone(), count);
        let mut state = batch.lock();
        while !state.settled() {
            state = batch
                .settled
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        // Inputs never started are dropped here, on the caller's thread.
        state.inputs.clear();
        std::mem::take(&mut state.outcomes)
    }
}
