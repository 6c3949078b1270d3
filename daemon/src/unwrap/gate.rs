//! Bounds the envelopes that unwrap requests work on at once
//! (`[limits] max_envelopes_in_flight`).
//!
//! A request in flight holds its envelopes parsed, their audit leaves, the
//! opened keys and its reply: about 2 KiB per envelope. With many large
//! batches at once that working set, not the HSM, sets the daemon's memory,
//! while more batches in flight than the HSM workers can serve add no
//! throughput (every batch in flight already shares all of them). So a
//! request takes one permit per envelope before it parses them, and gives
//! them back once its reply is built. A request larger than the gate takes
//! all of it.
//!
//! First fit: a request that fits in the free permits goes at once, even
//! while a larger one waits, so a single-envelope request does not queue
//! behind large batches. So that a large request cannot be kept waiting for
//! ever by a stream of smaller ones, nobody overtakes a request that has
//! waited [`NO_OVERTAKING_AFTER`]; it goes as soon as enough permits are
//! back.
//!
//! Blocking (a mutex and a condition variable): the unwrap path runs on the
//! blocking pool.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a waiting request may be overtaken by smaller ones that fit.
pub const NO_OVERTAKING_AFTER: Duration = Duration::from_secs(1);

/// The gate: `capacity` envelope permits.
#[derive(Debug)]
pub struct EnvelopeGate {
    capacity: usize,
    /// [`NO_OVERTAKING_AFTER`] (shorter or longer in tests).
    window: Duration,
    state: Mutex<State>,
    returned: Condvar,
}

#[derive(Debug)]
struct State {
    free: usize,
    /// Requests waiting, oldest first: their ticket and since when.
    waiting: VecDeque<(u64, Instant)>,
    next_ticket: u64,
}

impl State {
    /// Whether the request `ticket` (waiting, or `None` if it just came)
    /// needing `n` may go now.
    fn may_go(&self, ticket: Option<u64>, n: usize, now: Instant, window: Duration) -> bool {
        if n > self.free {
            return false;
        }
        match self.waiting.front() {
            None => true,
            Some(&(oldest, _)) if Some(oldest) == ticket => true,
            Some(&(_, since)) => now.duration_since(since) < window,
        }
    }
}

/// Envelope permits held by one request; given back on drop.
#[derive(Debug)]
#[must_use = "the permits are given back when this is dropped"]
pub struct Permit<'a> {
    gate: &'a EnvelopeGate,
    n: usize,
}

impl EnvelopeGate {
    /// A gate of `capacity` envelopes (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self::with_window(capacity, NO_OVERTAKING_AFTER)
    }

    fn with_window(capacity: usize, window: Duration) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            window,
            state: Mutex::new(State {
                free: capacity,
                waiting: VecDeque::new(),
                next_ticket: 0,
            }),
            returned: Condvar::new(),
        }
    }

    /// How many envelopes the gate lets in at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Only counters and tickets change under the lock, each update
        // complete: a poisoned lock still holds a consistent state.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes permits for `envelopes` envelopes (at most the capacity),
    /// waiting until they are free.
    pub fn enter(&self, envelopes: usize) -> Permit<'_> {
        let n = envelopes.min(self.capacity);
        let mut state = self.lock();
        if !state.may_go(None, n, Instant::now(), self.window) {
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            state.waiting.push_back((ticket, Instant::now()));
            while !state.may_go(Some(ticket), n, Instant::now(), self.window) {
                state = self
                    .returned
                    .wait(state)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            state.waiting.retain(|(t, _)| *t != ticket);
        }
        state.free -= n;
        drop(state);
        // Permits may still be free for a smaller waiter behind this one.
        self.returned.notify_all();
        Permit { gate: self, n }
    }

    /// Envelopes free now.
    pub fn free(&self) -> usize {
        self.lock().free
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.gate.lock().free += self.n;
        self.gate.returned.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Runs `gate.enter(n)` on a thread and reports when it got in; the
    /// permit is held until `release` receives.
    fn enter_later(
        gate: &'static EnvelopeGate,
        n: usize,
    ) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            let _permit = gate.enter(n);
            entered_tx.send(()).unwrap();
            let _ = release_rx.recv();
        });
        (entered, release)
    }

    /// Waits until `n` requests are queued.
    fn until_waiting(gate: &EnvelopeGate, n: usize) {
        let deadline = Instant::now() + LONG;
        while gate.lock().waiting.len() < n {
            assert!(Instant::now() < deadline, "never queued");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn leak(capacity: usize, window: Duration) -> &'static EnvelopeGate {
        Box::leak(Box::new(EnvelopeGate::with_window(capacity, window)))
    }

    // "Did not get in" is asserted by waiting SHORT: a wrong "got in" is
    // caught on any machine that runs the thread within it. The overtaking
    // windows are an hour (never reached) or 50 ms (passed by a 100 ms
    // sleep after the waiter is seen queued).
    const SHORT: Duration = Duration::from_millis(300);
    const LONG: Duration = Duration::from_secs(30);
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn permits_are_bounded_and_given_back() {
        let gate = leak(10, HOUR);
        let a = gate.enter(6);
        assert_eq!(gate.free(), 4);
        let (entered, release) = enter_later(gate, 6);
        assert!(entered.recv_timeout(SHORT).is_err(), "6 + 6 > 10 got in");
        drop(a);
        entered.recv_timeout(LONG).expect("got in once 6 came back");
        release.send(()).unwrap();
    }

    #[test]
    fn a_request_larger_than_the_gate_takes_all_of_it() {
        let gate = leak(4, HOUR);
        let all = gate.enter(1000);
        assert_eq!(gate.free(), 0);
        drop(all);
        assert_eq!(gate.free(), 4);
    }

    #[test]
    fn a_small_request_overtakes_a_waiting_large_one_that_does_not_fit() {
        let gate = leak(10, HOUR);
        let running = gate.enter(8);
        let (large, release_large) = enter_later(gate, 10);
        until_waiting(gate, 1);
        // 1 fits in the 2 free permits: it goes at once, ahead of the 10.
        let small = gate.enter(1);
        drop(small);
        drop(running);
        large.recv_timeout(LONG).expect("the large one got in");
        release_large.send(()).unwrap();
    }

    #[test]
    fn nobody_overtakes_a_request_that_has_waited_long() {
        let gate = leak(10, Duration::from_millis(50));
        let running = gate.enter(8);
        let (large, release_large) = enter_later(gate, 10);
        until_waiting(gate, 1);
        std::thread::sleep(Duration::from_millis(100));
        let (small, release_small) = enter_later(gate, 1);
        assert!(
            small.recv_timeout(SHORT).is_err(),
            "overtook a request waiting longer than {NO_OVERTAKING_AFTER:?}"
        );
        drop(running);
        large
            .recv_timeout(LONG)
            .expect("the large one got in first");
        release_large.send(()).unwrap();
        small.recv_timeout(LONG).expect("then the small one");
        release_small.send(()).unwrap();
    }
}
