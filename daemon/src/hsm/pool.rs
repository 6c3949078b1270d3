//! A bounded pool of PKCS#11 sessions.
//!
//! At most `max` sessions are open. A caller that finds none idle opens one if
//! it may, or waits. Callers are served in the order they asked: one that
//! gives a session back and asks again at once queues behind those already
//! waiting, so the HSM workers of a large batch cannot keep a session from
//! the checkpoint signer or a readiness probe. A session that saw a lost-session error, or that may
//! still hold a secret object it could not destroy, is discarded (closed, which
//! destroys its session objects) instead of returned, and [`Pool::retire`]
//! retires every session at once (sessions checked out at that moment are
//! closed when they come back rather than reused).
//!
//! Retiring also forgets the token's slot: after a lost token, the slot
//! number may name another token (some HSMs number slots by position), so no
//! session of the new generation is opened, and no PIN sent, until the token
//! has been found again for it ([`Pool::found`]). An open that began before
//! the retirement still goes to the old slot; its session is of the old
//! generation and is closed when given back.
//!
//! The number of sessions checked out is reported to the observer on every
//! change, under the pool's lock, so the last value it saw is the current one.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cryptoki::session::Session;
use cryptoki::slot::Slot;

use super::{HsmError, HsmObserver};

#[derive(Debug)]
struct State {
    /// The token's slot, or `None` from a retirement until the token is
    /// found again.
    slot: Option<Slot>,
    idle: Vec<Session>,
    /// Sessions alive: idle plus checked out.
    open: usize,
    /// Bumped by `retire`; leases from an older generation are not reused.
    generation: u64,
    /// Tickets of the callers waiting, first come first.
    queue: VecDeque<u64>,
    next_ticket: u64,
}

impl State {
    /// Sessions checked out: open but not idle.
    fn busy(&self) -> usize {
        self.open - self.idle.len()
    }
}

#[derive(Debug)]
pub(super) struct Pool {
    max: usize,
    /// How long a caller waits for a free session before giving up: the
    /// call deadline.
    acquire_timeout: Duration,
    state: Mutex<State>,
    freed: Condvar,
    observer: Arc<dyn HsmObserver>,
}

impl Pool {
    pub(super) fn new(
        slot: Slot,
        max: usize,
        acquire_timeout: Duration,
        observer: Arc<dyn HsmObserver>,
    ) -> Self {
        Pool {
            max,
            acquire_timeout,
            observer,
            state: Mutex::new(State {
                slot: Some(slot),
                idle: Vec::new(),
                open: 0,
                generation: 0,
                queue: VecDeque::new(),
                next_ticket: 0,
            }),
            freed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic in a caller (sessions are
        // only moved in and out under the lock), so a poisoned lock is usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Checks a session out, opening one with `open` if none is idle and the
    /// pool is not full, in turn with the other callers. With `may_open`
    /// false it opens one only when none is open at all (so that the caller
    /// gets `open`'s error rather than a wait for nothing); otherwise it
    /// waits for an open one.
    ///
    /// `open` is given the slot (`None` while the token is to be found
    /// again) and the generation the session will belong to; `tried` is
    /// told that generation before `open` runs, and a lease's generation
    /// when one is checked out.
    pub(super) fn acquire(
        &self,
        may_open: bool,
        tried: &std::cell::Cell<Option<u64>>,
        open: impl FnOnce(Option<Slot>, u64) -> Result<Session, HsmError>,
    ) -> Result<Lease<'_>, HsmError> {
        let deadline = Instant::now() + self.acquire_timeout;
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.queue.push_back(ticket);
        loop {
            if state.queue.front() == Some(&ticket) {
                if let Some(session) = state.idle.pop() {
                    state.queue.pop_front();
                    self.observer.sessions_busy(state.busy());
                    let generation = state.generation;
                    // The next in line may find another idle session.
                    self.wake_waiters(state);
                    tried.set(Some(generation));
                    return Ok(Lease {
                        pool: self,
                        session: Some(session),
                        generation,
                        discard: false,
                    });
                }
                if state.open < self.max && (may_open || state.open == 0) {
                    state.queue.pop_front();
                    state.open += 1;
                    let (slot, generation) = (state.slot, state.generation);
                    self.wake_waiters(state);
                    tried.set(Some(generation));
                    // Given back if `open` fails, or panics (a module's
                    // bug, caught by the HSM worker): the place would
                    // otherwise be lost for the life of the pool.
                    let place = Place(self);
                    // Opening and logging in happen outside the lock: they may be slow.
                    let session = open(slot, generation)?;
                    std::mem::forget(place);
                    let state = self.lock();
                    self.observer.sessions_busy(state.busy());
                    return Ok(Lease {
                        pool: self,
                        session: Some(session),
                        generation,
                        discard: false,
                    });
                }
            }
            let now = Instant::now();
            if now >= deadline {
                state.queue.retain(|t| *t != ticket);
                // Whoever was behind this caller may be first now.
                self.wake_waiters(state);
                return Err(HsmError::Busy(self.max));
            }
            state = self
                .freed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Retires every session and forgets the slot (after a lost session or
    /// token), starting a new generation, whose number it returns. With
    /// `seen`, the generation of the session that was lost, it does nothing
    /// (and returns `None`) if a newer generation has begun since: the
    /// caller whose session was lost first has already retired the rest, and
    /// sessions opened since then are of the new token.
    pub(super) fn retire(&self, seen: Option<u64>) -> Option<u64> {
        let (generation, retired, waiting) = {
            let mut state = self.lock();
            if seen.is_some_and(|seen| seen != state.generation) {
                return None;
            }
            state.generation += 1;
            state.slot = None;
            state.open -= state.idle.len();
            let retired = std::mem::take(&mut state.idle);
            self.observer.sessions_busy(state.busy());
            (state.generation, retired, !state.queue.is_empty())
        };
        // Closing happens outside the lock; errors from a dead token are
        // expected and ignored by cryptoki's Drop.
        drop(retired);
        // A caller waiting because the pool was full may open one now.
        if waiting {
            self.freed.notify_all();
        }
        Some(generation)
    }

    /// The slot (`None` while the token is to be found again) and the
    /// current generation.
    pub(super) fn slot(&self) -> (Option<Slot>, u64) {
        let state = self.lock();
        (state.slot, state.generation)
    }

    /// Records where the token was found for `generation`. Ignored if a
    /// newer generation has begun meanwhile: the token was lost again, and
    /// `slot` may no longer be its.
    pub(super) fn found(&self, generation: u64, slot: Slot) {
        let mut state = self.lock();
        if state.generation == generation {
            state.slot = Some(slot);
        }
    }

    /// Sessions open: idle plus checked out.
    pub(super) fn open_sessions(&self) -> usize {
        self.lock().open
    }

    fn give_back(&self, session: Session, generation: u64, discard: bool) {
        let mut state = self.lock();
        if discard || generation != state.generation {
            state.open -= 1;
            self.observer.sessions_busy(state.busy());
            let waiting = !state.queue.is_empty();
            drop(state);
            // `C_CloseSession` destroys the session's objects with it
            // (PKCS#11 v2.40 §5.6 and §4.4): a secret that could not be
            // destroyed goes with its session.
            if let Err(e) = session.close() {
                let e = HsmError::from(e);
                if e.is_session_lost() {
                    tracing::debug!(error = %e, "discarded HSM session was already gone");
                } else {
                    tracing::warn!(error = %e, "could not close a discarded HSM session");
                }
            }
            // A caller waiting because the pool was full may open one now.
            if waiting {
                self.freed.notify_all();
            }
        } else {
            state.idle.push(session);
            self.observer.sessions_busy(state.busy());
            // Only the first in line may take it: wake them all to find it.
            self.wake_waiters(state);
        }
    }

    /// Releases the lock and wakes the callers waiting in
    /// [`Pool::acquire`], if any: every one of them is in `queue`, put there
    /// under this lock before it waits, so an empty queue means nobody to
    /// wake, and the wake (a system call whether or not anyone waits) is
    /// skipped. That is the common case, every session given back and
    /// taken while the pool has one idle. (`retire` and a discarded
    /// session's `give_back` make the same check, and wake after closing.)
    fn wake_waiters(&self, state: MutexGuard<'_, State>) {
        let waiting = !state.queue.is_empty();
        drop(state);
        if waiting {
            self.freed.notify_all();
        }
    }
}

/// A place in the pool taken for a session still being opened: given
/// back (and the callers waiting for one woken) when dropped, that is, when
/// the open fails or panics.
struct Place<'a>(&'a Pool);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.open -= 1;
        self.0.observer.sessions_busy(state.busy());
        self.0.wake_waiters(state);
    }
}

/// A checked-out session; returns to the pool on drop.
#[derive(Debug)]
pub(super) struct Lease<'a> {
    pool: &'a Pool,
    session: Option<Session>,
    generation: u64,
    discard: bool,
}

impl Lease<'_> {
    /// The generation the session belongs to.
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    pub(super) fn session(&self) -> &Session {
        // Invariant: `session` is Some from construction until Drop.
        #[allow(clippy::expect_used)]
        self.session
            .as_ref()
            .expect("lease holds a session until dropped")
    }

    /// Closes the session instead of returning it to the pool.
    pub(super) fn discard(mut self) {
        self.discard = true;
    }
}

/// A lease is used as its session.
impl std::ops::Deref for Lease<'_> {
    type Target = Session;

    fn deref(&self) -> &Session {
        self.session()
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            // Dropped by a panic (the caller's job caught it): whatever the
            // job left in the session, a derived secret it had not yet
            // destroyed included, goes with it, never to the next caller.
            let discard = self.discard || std::thread::panicking();
            self.pool.give_back(session, self.generation, discard);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The wakes of paths that need no session: a failed open and a caller
    //! giving up at its deadline. (A kept session given back wakes the
    //! queue in `softhsm-tests/tests/hsm_sessions.rs`, on a real token.)
    use std::cell::Cell;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use super::*;

    fn pool(max: usize, acquire_timeout: Duration) -> Pool {
        let slot = Slot::try_from(0u64).expect("slot 0");
        Pool::new(
            slot,
            max,
            acquire_timeout,
            Arc::new(super::super::NoObserver),
        )
    }

    /// Whose open failed, as the error of a caller's `acquire`.
    fn failed(who: &str) -> Result<Session, HsmError> {
        Err(HsmError::Worker(format!("{who}'s open failed")))
    }

    fn error_of(result: Result<Lease<'_>, HsmError>) -> HsmError {
        match result {
            Ok(_) => panic!("no session can be opened here"),
            Err(e) => e,
        }
    }

    fn open_failed(e: &HsmError, who: &str) -> bool {
        matches!(e, HsmError::Worker(m) if *m == format!("{who}'s open failed"))
    }

    /// A caller waiting for a full pool is woken when an open fails and
    /// frees its place, not left to its deadline.
    #[test]
    fn a_failed_open_wakes_the_caller_waiting_for_its_place() {
        let pool = pool(1, Duration::from_secs(10));
        let (opening, in_open) = mpsc::channel();
        std::thread::scope(|s| {
            let first = s.spawn(|| {
                error_of(pool.acquire(true, &Cell::new(None), |_, _| {
                    opening.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(300));
                    failed("the first")
                }))
            });
            in_open.recv().unwrap();
            let started = Instant::now();
            let second =
                error_of(pool.acquire(true, &Cell::new(None), |_, _| failed("the second")));
            let waited = started.elapsed();
            assert!(open_failed(&first.join().unwrap(), "the first"));
            assert!(open_failed(&second, "the second"), "{second}");
            assert!(
                waited < Duration::from_secs(5),
                "the second caller waited {waited:?}: it was not woken when the first open failed"
            );
        });
    }

    /// An open that panics (a module's bug; the HSM worker catches it)
    /// gives its place back: the next caller opens at once.
    #[test]
    fn an_open_that_panics_gives_its_place_back() {
        let pool = pool(1, Duration::from_secs(10));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = pool.acquire(true, &Cell::new(None), |_, _| panic!("the module's bug"));
        }));
        assert!(panicked.is_err());
        assert_eq!(pool.open_sessions(), 0);
        let started = Instant::now();
        let next = error_of(pool.acquire(true, &Cell::new(None), |_, _| failed("the next")));
        assert!(open_failed(&next, "the next"), "{next}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// When the first in line gives up at its deadline, the caller behind
    /// it, which may open a session where the first could not, is woken
    /// then, not at its own deadline.
    #[test]
    fn a_caller_giving_up_wakes_the_one_behind_it() {
        let pool = pool(2, Duration::from_secs(4));
        let (opening, in_open) = mpsc::channel();
        let (queued, second_queued) = mpsc::channel();
        std::thread::scope(|s| {
            // Holds one of the two places for longer than every deadline.
            s.spawn(|| {
                error_of(pool.acquire(true, &Cell::new(None), |_, _| {
                    opening.send(()).unwrap();
                    std::thread::sleep(Duration::from_secs(6));
                    failed("the holder")
                }))
            });
            in_open.recv().unwrap();
            // First in line, but may not open a session (logins held
            // back) while one is open: it waits for an idle one.
            let first = s.spawn(|| {
                let started = Instant::now();
                queued.send(()).unwrap();
                let e = error_of(pool.acquire(false, &Cell::new(None), |_, _| failed("the first")));
                (e, started.elapsed())
            });
            second_queued.recv().unwrap();
            while pool.lock().queue.is_empty() {
                std::thread::sleep(Duration::from_millis(1));
            }
            // The first gives up about 4 s after it queued; the second's own
            // deadline would come 2 s after that.
            std::thread::sleep(Duration::from_secs(2));
            let started = Instant::now();
            let second =
                error_of(pool.acquire(true, &Cell::new(None), |_, _| failed("the second")));
            let waited = started.elapsed();
            let (first, _) = first.join().unwrap();
            assert!(matches!(first, HsmError::Busy(2)), "{first}");
            assert!(open_failed(&second, "the second"), "{second}");
            assert!(
                waited < Duration::from_millis(3500),
                "the second caller waited {waited:?}: not woken when the first gave up (about 2 s in)"
            );
        });
    }
}
