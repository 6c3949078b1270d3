//! The HSM boundary: the only module that names cryptoki.
//!
//! It loads the configured PKCS#11 module, finds the token by label or serial,
//! logs in with a PIN that never leaves a zeroizing buffer, and keeps a bounded
//! pool of sessions. Every operation is synchronous and runs on a blocking
//! thread ([`Hsm::run`]); no session is ever held across an `.await`. A batch
//! of operations (a request's envelope opens) is spread over one worker
//! thread per session, shared fairly between requests ([`Hsm::spread`]).
//!
//! What it trusts: the PKCS#11 module and token. What it guarantees: escrow
//! private keys are generated inside the token as sensitive, non-extractable,
//! derive-only objects, and the only secret that ever leaves the token is the
//! 32-byte ECDH output of one envelope, read from a session object that is
//! destroyed straight away.
//!
//! A lost session or token (see [`error`]) does not make the daemon fail
//! forever: the pool drops its sessions, finds the token again, logs in again
//! and retries the operation once.

pub mod error;
mod keys;
mod pool;
pub mod refused_pin;
mod spread;

pub use error::HsmError;
pub use keys::{AuditKeyInfo, GeneratedKey, ESCROW_LABEL_PREFIX, P256_GENERATOR};
pub use spread::{quiesce, JobOutcome, StartedSpread};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use pool::{Lease, Pool};

/// How the token is chosen. A slot number alone is not offered: slot numbers
/// change when tokens are added or re-initialised, and a daemon that opened
/// the wrong token would serve the wrong keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// `CKA_LABEL` of the token (unique among present tokens).
    Label(String),
    /// The token's serial number.
    Serial(String),
}

impl std::fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSelector::Label(l) => write!(f, "label {l:?}"),
            TokenSelector::Serial(s) => write!(f, "serial {s:?}"),
        }
    }
}

/// Vendor behaviour that differs between HSMs, as data rather than `if`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quirks {
    /// Put `CKA_VALUE_LEN = 32` in the ECDH derive template. SoftHSM needs it
    /// (without it the derived value reads as empty).
    pub derive_sets_value_len: bool,
    /// After this many envelope opens (ECDH derives), finalise and
    /// initialise the module again ([`Hsm::reset_module`]'s steps, on a
    /// thread of its own); 0 never. SoftHSM 2.6 keeps every object ever
    /// destroyed in a session (about 240 bytes for each derived secret)
    /// until `C_Finalize`, so without it a SoftHSM daemon grows by that
    /// much for each envelope it opens, for as long as it runs.
    pub reset_module_after_opens: u64,
}

impl Default for Quirks {
    fn default() -> Self {
        Self {
            derive_sets_value_len: true,
            reset_module_after_opens: 0,
        }
    }
}

/// Validated HSM settings (built by `config`).
pub struct HsmSettings {
    /// Path of the PKCS#11 module.
    pub module: PathBuf,
    /// Which token.
    pub token: TokenSelector,
    /// The user PIN. Zeroized on drop by `secrecy`.
    pub pin: AuthPin,
    /// Maximum number of open sessions, and the number of worker threads
    /// that run [`Hsm::spread`] batches.
    pub sessions: usize,
    /// Vendor quirks.
    pub quirks: Quirks,
    /// Environment variables the module reads when it is loaded (SoftHSM's
    /// `SOFTHSM2_CONF`, YubiHSM's `YUBIHSM_PKCS11_CONF`, …), set in this
    /// process just before the module is first loaded.
    pub module_env: Vec<(String, String)>,
    /// The call deadline: how long a caller waits for an HSM call (or for a
    /// session or worker to run it on) before it gives up with
    /// [`HsmError::Timeout`]. See [`spread`] for what happens to the call.
    pub call_timeout: std::time::Duration,
}

impl std::fmt::Debug for HsmSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmSettings")
            .field("module", &self.module)
            .field("token", &self.token)
            .field("pin", &"<redacted>")
            .field("sessions", &self.sessions)
            .field("quirks", &self.quirks)
            .field("module_env", &self.module_env)
            .field("call_timeout", &self.call_timeout)
            .finish()
    }
}

/// Observes HSM operations (the metrics module implements it).
pub trait HsmObserver: Send + Sync + std::fmt::Debug {
    /// One operation finished.
    fn operation(&self, op: &'static str, seconds: f64, ok: bool);
    /// The number of sessions checked out of the pool changed.
    fn sessions_busy(&self, busy: usize);
    /// The pool dropped its sessions after a lost session or token and
    /// reconnected.
    fn reconnected(&self) {}
    /// A planned reset after [`Quirks::reset_module_after_opens`] opens
    /// ended: `done`, `deferred` (running calls did not finish soon
    /// enough, or the token refuses the PIN) or `failed`.
    fn planned_reset(&self, _outcome: &'static str) {}
    /// The token refused the PIN and logins are held back (`true`), or
    /// the PIN was replaced and they are tried again (`false`).
    fn login_refused(&self, _refused: bool) {}
}

#[derive(Debug)]
struct NoObserver;
impl HsmObserver for NoObserver {
    fn operation(&self, _: &'static str, _: f64, _: bool) {}
    fn sessions_busy(&self, _: usize) {}
}

/// A logged-in token with a session pool. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Hsm {
    inner: Arc<Inner>,
}

/// The synchronous operation of a [`PendingCall`].
type Operation<I, T> = fn(&Hsm, I) -> Result<T, HsmError>;

/// An operation handed to an HSM worker by [`Hsm::start_call`].
#[derive(Debug)]
pub(crate) struct PendingCall<I, T> {
    op: &'static str,
    hsm: Hsm,
    submitted: spread::Submitted<Hsm, I, Result<T, HsmError>, Operation<I, T>>,
}

impl<I, T> PendingCall<I, T> {
    /// Waits for the operation for as long as the batch of workers it is in
    /// makes progress within the call deadline. Blocking: call it from a
    /// blocking thread, never from an HSM worker.
    ///
    /// # Errors
    /// The operation's error, [`HsmError::Timeout`] if it did not return in
    /// time (or another call is still running past its deadline, so it was
    /// never started), [`HsmError::Worker`] if it panicked.
    pub(crate) fn wait(self) -> Result<T, HsmError> {
        let op = self.op;
        match self.hsm.inner.spreader.wait(self.submitted).pop() {
            Some(JobOutcome::Done(result)) => result,
            Some(JobOutcome::TimedOut) => Err(HsmError::Timeout {
                op,
                after: self.hsm.call_timeout(),
            }),
            Some(JobOutcome::Panicked) => Err(HsmError::Worker(format!("{op} panicked"))),
            Some(JobOutcome::NotRun) | None => Err(HsmError::Worker(format!("{op} did not run"))),
        }
    }
}

#[derive(Debug)]
struct Inner {
    pkcs11: Pkcs11,
    settings: HsmSettings,
    pool: Pool,
    /// Escrow and audit private key handles by label, so that the hot path does
    /// not search the token.
    handles: Mutex<Handles>,
    observer: Arc<dyn HsmObserver>,
    /// Every operation holds this shared; [`Hsm::reset_module`] holds it
    /// exclusively, so the module is never finalised under a running call.
    gate: Gate,
    /// The workers behind [`Hsm::spread`], one per session.
    spreader: Arc<spread::Spreader>,
    /// The PIN new sessions log in with, and whether the token refused it.
    login: Mutex<Login>,
    /// Held across each `C_Login`: logins run one at a time, so sessions
    /// opened together spend one try of the token's PIN counter, not one
    /// each.
    logging_in: Mutex<()>,
    /// Opens since the module was last initialised, toward
    /// [`Quirks::reset_module_after_opens`].
    opens: std::sync::atomic::AtomicU64,
    /// Whether a planned reset is due or running ([`Hsm::opened`]).
    resetting: std::sync::atomic::AtomicBool,
    /// The slots [`find_token`] could not read at its last lookup, after its
    /// retries: the same ones again are not waited for (a lookup inside a
    /// module reset holds every HSM call back).
    unreadable_slots: Mutex<Vec<u64>>,
    /// Counted among the HSM threads that the end of the process waits for
    /// (`spread::quiesce`) until every other field is dropped: the last
    /// `Hsm` may be dropped on a thread that is not counted (a blocking
    /// thread's readiness probe that outlived the runtime's shutdown), and
    /// dropping it closes the pool's sessions there. Last, so dropped last.
    _alive: spread::Alive,
}

/// Cached key handles, valid for the sessions of one pool generation: a
/// handle found on a token lost since may name another object on the token
/// found again, so the cache starts empty with each generation, and a
/// session of an older generation neither reads nor fills it.
#[derive(Debug, Default)]
struct Handles {
    generation: u64,
    by_label: HashMap<String, cryptoki::object::ObjectHandle>,
    /// The verdict of `Hsm::check_pair` by escrow label: the private key's
    /// handle and the public key it was checked with, and whether they
    /// agree.
    pairs_checked: HashMap<
        String,
        (
            cryptoki::object::ObjectHandle,
            crate::jwk::P256PublicKey,
            bool,
        ),
    >,
}

/// The PIN in use and the login latch. A token counts wrong PINs and locks
/// after a few; each new session of a daemon whose PIN was changed on the
/// token would spend one. So after one refusal no login is tried again
/// until the PIN is replaced ([`Hsm::set_pin`], on reload) or the daemon
/// restarts.
struct Login {
    pin: Arc<AuthPin>,
    /// The `CKR_*` code of the refusal while latched.
    refused: Option<String>,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("pin", &"<redacted>")
            .field("refused", &self.refused)
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.spreader.close();
    }
}

/// PKCS#11 modules are process-wide: `C_Initialize` may run once per process
/// and `C_Finalize` would pull the token from under every other user. So each
/// module is loaded and initialised once and kept for the life of the process.
fn module(path: &Path, env: &[(String, String)]) -> Result<Pkcs11, HsmError> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(p) = modules.get(path) {
        return Ok(p.clone());
    }
    if !path.is_file() {
        return Err(HsmError::Module {
            path: path.to_path_buf(),
            reason: "no such file".into(),
        });
    }
    // Modules read their configuration from the environment once, when they
    // initialise: set it now. This runs before the module is loaded, which
    // lavd does at start-up, before it starts any thread that reads the
    // environment (`lavd serve`'s async runtime exists by then, for SIGHUP,
    // but its idle workers read none).
    for (name, value) in env {
        std::env::set_var(name, value);
    }
    let pkcs11 = Pkcs11::new(path).map_err(|e| HsmError::Module {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    // OS locking: the module may be called from several blocking threads.
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Already initialised in this process by someone else (a test harness
        // that also inspects the token): the module state is shared, which is
        // what we want.
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(e.into()),
    }
    modules.insert(path.to_path_buf(), pkcs11.clone());
    Ok(pkcs11)
}

impl Hsm {
    /// Loads the module, finds the token and logs in once.
    ///
    /// # Errors
    /// [`HsmError::Module`], [`HsmError::TokenNotFound`] (listing the tokens
    /// present), [`HsmError::AmbiguousToken`], [`HsmError::Login`], or the
    /// failing PKCS#11 call.
    pub fn open(settings: HsmSettings) -> Result<Self, HsmError> {
        Self::open_with_observer(settings, Arc::new(NoObserver))
    }

    /// [`Hsm::open`] with an observer for metrics.
    ///
    /// # Errors
    /// As [`Hsm::open`].
    pub fn open_with_observer(
        mut settings: HsmSettings,
        observer: Arc<dyn HsmObserver>,
    ) -> Result<Self, HsmError> {
        // The PIN lives in one place from here, the login's (which a reload
        // replaces): not also in the settings kept for the process's life,
        // where a PIN rotated away would stay in memory (wiped on drop).
        let pin = std::mem::replace(&mut settings.pin, AuthPin::new(String::new().into()));
        let pkcs11 = module(&settings.module, &settings.module_env)?;
        let unreadable_slots = Mutex::new(Vec::new());
        let slot = find_token(
            &pkcs11,
            &settings.module,
            &settings.token,
            &unreadable_slots,
        )?;
        let pool = Pool::new(
            slot,
            settings.sessions.max(1),
            settings.call_timeout,
            observer.clone(),
        );
        let spreader = spread::Spreader::start(settings.sessions.max(1), settings.call_timeout)?;
        let login = Mutex::new(Login {
            pin: Arc::new(pin),
            refused: None,
        });
        let hsm = Hsm {
            inner: Arc::new(Inner {
                pkcs11,
                settings,
                login,
                logging_in: Mutex::new(()),
                pool,
                handles: Mutex::default(),
                observer,
                gate: Gate::default(),
                spreader,
                opens: Default::default(),
                resetting: Default::default(),
                unreadable_slots,
                _alive: spread::Alive::enter(),
            }),
        };
        // Log in now so that a wrong PIN fails at start, not on the first request.
        hsm.with_session("login", |_| Ok(()))?;
        Ok(hsm)
    }

    /// The configured token selector.
    pub fn token(&self) -> &TokenSelector {
        &self.inner.settings.token
    }

    /// Runs `f` on a blocking thread, so async callers never hold a session
    /// across an `.await`.
    ///
    /// # Errors
    /// `f`'s error, or [`HsmError::Worker`] if the blocking task failed.
    pub async fn run<T, F>(&self, f: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: FnOnce(&Hsm) -> Result<T, HsmError> + Send + 'static,
    {
        let hsm = self.clone();
        tokio::task::spawn_blocking(move || f(&hsm))
            .await
            .map_err(|e| HsmError::Worker(e.to_string()))?
    }

    /// How many HSM calls outlived the call deadline and have not returned:
    /// while any has, `/readyz` is false.
    pub fn stuck_calls(&self) -> usize {
        self.inner.spreader.stuck()
    }

    /// How many HSM calls have outlived the call deadline since the start
    /// (their callers were answered `hsm_unavailable`).
    pub fn timed_out_calls(&self) -> u64 {
        self.inner.spreader.timed_out()
    }

    /// The configured call deadline.
    pub fn call_timeout(&self) -> std::time::Duration {
        self.inner.settings.call_timeout
    }

    /// Hands one synchronous operation to an HSM worker (see [`spread`])
    /// and returns at once; [`PendingCall::wait`] waits for it at most the
    /// call deadline. So a caller can do its own work (a store commit)
    /// while the HSM works, without a thread of its own. Dropped without a
    /// wait, the operation still runs and its result is dropped.
    pub(crate) fn start_call<I, T>(
        &self,
        op: &'static str,
        input: I,
        f: Operation<I, T>,
    ) -> PendingCall<I, T>
    where
        I: Send + 'static,
        T: Send + 'static,
    {
        fn stops<T>(_: &Result<T, HsmError>) -> bool {
            false
        }
        PendingCall {
            op,
            hsm: self.clone(),
            submitted: self
                .inner
                .spreader
                .submit_batch(self.clone(), vec![input], f, stops::<T>),
        }
    }

    /// True when a session can be had and the user is logged in: the check
    /// behind `/readyz`. It reconnects if the token came back.
    pub fn is_ready(&self) -> bool {
        self.ready().is_ok()
    }

    /// [`Hsm::is_ready`] with the reason it is not.
    ///
    /// # Errors
    /// [`HsmError::Busy`] when no session came free in time, else the
    /// failing call (`CKR_USER_NOT_LOGGED_IN` for a session not logged in).
    pub fn ready(&self) -> Result<(), HsmError> {
        self.with_session("ready", |s| {
            let info = s.get_session_info()?;
            if matches!(
                info.session_state(),
                cryptoki::session::SessionState::RoUser | cryptoki::session::SessionState::RwUser
            ) {
                Ok(())
            } else {
                Err(CkError::Pkcs11(
                    RvError::UserNotLoggedIn,
                    cryptoki::context::Function::GetSessionInfo,
                )
                .into())
            }
        })
    }

    /// Runs `f` with a pooled, logged-in session. If the session or token was
    /// lost, reconnects (re-finding the token and logging in) and retries once.
    fn with_session<T>(
        &self,
        op: &'static str,
        f: impl Fn(&Lease<'_>) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        self.with_session_retrying(op, true, f)
    }

    /// As [`Hsm::with_session`], but never runs `f` twice: for an operation
    /// that may have taken effect on the device although its answer was
    /// lost (generating a key pair), where a second run would meet the
    /// first one's result. A lost session still reconnects, for the next
    /// call.
    fn with_session_once<T>(
        &self,
        op: &'static str,
        f: impl Fn(&Lease<'_>) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        self.with_session_retrying(op, false, f)
    }

    fn with_session_retrying<T>(
        &self,
        op: &'static str,
        retry: bool,
        f: impl Fn(&Lease<'_>) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let _shared = self.shared(op)?;
        let started = Instant::now();
        // The generation of the session the first try used (or opened).
        let tried = std::cell::Cell::new(None);
        let result = self.try_with_session(&f, &tried).or_else(|e| {
            if e.is_session_lost() {
                tracing::warn!(error = %e, "HSM session lost; reconnecting");
                self.reconnect(tried.get());
                if retry {
                    self.try_with_session(&f, &std::cell::Cell::new(None))
                } else {
                    Err(e)
                }
            } else {
                Err(e)
            }
        });
        self.inner
            .observer
            .operation(op, started.elapsed().as_secs_f64(), result.is_ok());
        result
    }

    fn try_with_session<T>(
        &self,
        f: &impl Fn(&Lease<'_>) -> Result<T, HsmError>,
        tried: &std::cell::Cell<Option<u64>>,
    ) -> Result<T, HsmError> {
        let inner = &self.inner;
        // While logins are held back, a caller waits for a session that is
        // logged in rather than failing for want of a new one; so does a
        // caller whose login was refused (or held back) meanwhile.
        let may_open = self.login_refused().is_none();
        let open = |slot, generation| self.new_session(self.slot_of(slot, generation)?);
        let lease = match inner.pool.acquire(may_open, tried, open) {
            Err(first @ (HsmError::Login { .. } | HsmError::LoginHeld { .. }))
                if may_open && self.login_refused().is_some() =>
            {
                // With none logged in, the refusal itself is the answer.
                inner
                    .pool
                    .acquire(false, tried, open)
                    .map_err(|e| match e {
                        HsmError::LoginHeld { .. } => first,
                        e => e,
                    })?
            }
            other => other?,
        };
        match f(&lease) {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_session_lost() || e.taints_session() {
                    lease.discard();
                }
                Err(e)
            }
        }
    }

    fn new_session(&self, slot: Slot) -> Result<Session, HsmError> {
        let session = self.inner.pkcs11.open_rw_session(slot)?;
        let _turn = self
            .inner
            .logging_in
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Read under the turn: a refusal by the login just before this one
        // holds this one back.
        let pin = {
            let login = self.login();
            if let Some(ckr) = &login.refused {
                return Err(HsmError::LoginHeld { ckr: ckr.clone() });
            }
            login.pin.clone()
        };
        // Login is per application and token; when all sessions were closed
        // (or the token was reset) the user is logged out again.
        match session.login(cryptoki::session::UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(e) => {
                let e = HsmError::from(e);
                if let HsmError::Login { ckr } = &e {
                    let mut login = self.login();
                    // Latch only for the PIN that was refused: one put in
                    // place meanwhile has not been tried yet.
                    if Arc::ptr_eq(&login.pin, &pin) && login.refused.is_none() {
                        tracing::error!(
                            ckr = %ckr,
                            "the token refused the HSM PIN; no login is tried again (each \
                             try counts towards locking the token) until a reload (SIGHUP) \
                             reads a different PIN, or a restart; sessions already logged in \
                             still serve"
                        );
                        login.refused = Some(ckr.clone());
                        self.inner.observer.login_refused(true);
                    }
                }
                Err(e)
            }
        }
    }

    fn login(&self) -> std::sync::MutexGuard<'_, Login> {
        // Two fields set under the lock with no code between: a poisoned
        // lock still holds a consistent state.
        self.inner
            .login
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the PIN new sessions log in with, if `pin` differs from it,
    /// and then lifts the login latch: the next login tries `pin` (on a
    /// reload: a rotated PIN applies without a restart; sessions already
    /// logged in are unaffected). The same PIN changes nothing, and a
    /// latch stays: a routine reload must not spend another try of the
    /// token's PIN counter on a PIN the token refused. Returns whether the
    /// PIN changed.
    pub fn set_pin(&self, pin: AuthPin) -> bool {
        use secrecy::ExposeSecret;
        let mut login = self.login();
        if login.pin.expose_secret() == pin.expose_secret() {
            if let Some(ckr) = &login.refused {
                tracing::warn!(
                    ckr = %ckr,
                    "the PIN source still holds the PIN the token refused; logins stay held back"
                );
            }
            return false;
        }
        login.pin = Arc::new(pin);
        if let Some(ckr) = login.refused.take() {
            self.inner.observer.login_refused(false);
            tracing::info!(was = %ckr, "HSM logins are tried again, with the new PIN");
        }
        true
    }

    /// The code of the login refusal holding new sessions back, if any.
    pub fn login_refused(&self) -> Option<String> {
        self.login().refused.clone()
    }

    /// A shared hold on the module (no reset runs under it), waiting at
    /// most the call deadline for a reset to finish.
    ///
    /// # Errors
    /// [`HsmError::Timeout`] naming `op`.
    pub(crate) fn shared(&self, op: &'static str) -> Result<GateGuard<'_>, HsmError> {
        let after = self.inner.settings.call_timeout;
        self.inner
            .gate
            .shared_within(after)
            .ok_or(HsmError::Timeout { op, after })
    }

    /// The readiness check of a daemon signing with key `label`: a
    /// logged-in session, and a token that still finds the key (`has_key`:
    /// the session alone can outlive the token's object store). A token
    /// that fails may be broken only in the module's state (its storage
    /// came back, the partition reconnected): the module is reset once and
    /// checked again, so the daemon recovers without a restart. Not when
    /// the token answers that the key's objects are wrong
    /// ([`HsmError::is_key_fault`]), which no reset mends, nor when every
    /// session is held by calls still running or the probe's call timed
    /// out ([`HsmError::is_busy`]): a reset would wait for those calls,
    /// holding every new one back, then end the sessions of a module that
    /// was only busy (a hung call is reported by the probe's caller, which
    /// counts the calls past their deadline).
    ///
    /// # Errors
    /// Why it is not ready, for the log.
    pub fn check_ready(
        &self,
        has_key: impl Fn(&Hsm) -> Result<(), HsmError>,
    ) -> Result<(), String> {
        // Whether a reset could help: not for a key whose objects are wrong
        // on a token that answers (each probe would reset the module for
        // nothing, holding every call back, and count a reconnection).
        let check = |h: &Hsm| {
            h.ready().map_err(|e| {
                if e.is_busy() {
                    // Its sessions are logged in, only held.
                    (e.to_string(), false)
                } else {
                    (format!("no logged-in session: {e}"), true)
                }
            })?;
            has_key(h).map_err(|e| (e.to_string(), !e.is_key_fault() && !e.is_busy()))
        };
        check(self).or_else(|(first, resettable)| {
            // A refused PIN is not a module fault: a reset would end the
            // sessions still logged in, and could not log in again. Said
            // whatever else failed.
            if let Some(ckr) = self.login_refused() {
                return Err(format!(
                    "{first}; the token refused the PIN ({ckr}): replace it and reload or restart"
                ));
            }
            if !resettable {
                return Err(first);
            }
            match self.reset_module() {
                Ok(()) => check(self).map_err(|(again, _)| again),
                Err(e) => Err(format!("{first}; module reset: {e}")),
            }
        })
    }

    /// Resets the PKCS#11 module: waits for every running operation (new
    /// ones wait for the reset), drops
    /// all sessions, `C_Finalize`, `C_Initialize`, and finds the token again.
    /// For a token that stays broken for the life of the module's state
    /// (SoftHSM never re-validates a token whose storage vanished; some
    /// network HSM clients behave alike after losing the partition): the
    /// readiness probe calls it when the token fails, so the daemon recovers
    /// when the token comes back, without a restart.
    ///
    /// # Security
    /// The module is process-wide: this also ends the sessions of any other
    /// user of the module in this process (lavd has none).
    ///
    /// It waits at most the call deadline for running operations: a call
    /// that hangs in the module keeps the module from being reset (it would
    /// be finalised under that call), and the reset fails with
    /// [`HsmError::Timeout`] instead of waiting with it.
    ///
    /// # Errors
    /// The failing `C_Initialize`, [`HsmError::TokenNotFound`], or
    /// [`HsmError::Timeout`].
    pub fn reset_module(&self) -> Result<(), HsmError> {
        self.reinitialise()?;
        self.inner.observer.reconnected();
        Ok(())
    }

    /// [`Hsm::reset_module`]'s steps.
    fn reinitialise(&self) -> Result<(), HsmError> {
        let inner = &self.inner;
        let Some(exclusive) = inner.gate.exclusive(inner.settings.call_timeout) else {
            return Err(HsmError::Timeout {
                op: "module reset (waiting for running calls)",
                after: inner.settings.call_timeout,
            });
        };
        self.reinitialise_holding(&exclusive)
    }

    /// The reset itself, with the gate held exclusively: no call is running
    /// and none starts until the guard is dropped.
    fn reinitialise_holding(&self, _exclusive: &GateGuard<'_>) -> Result<(), HsmError> {
        let inner = &self.inner;
        let generation = inner.pool.retire(None);
        inner.opens.store(0, std::sync::atomic::Ordering::Relaxed);
        match inner.pkcs11.clone().finalize() {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiNotInitialized, _)) => {}
            Err(e) => tracing::warn!(error = %e, "C_Finalize failed during a module reset"),
        }
        match inner
            .pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(e.into()),
        }
        let slot = find_token(
            &inner.pkcs11,
            &inner.settings.module,
            &inner.settings.token,
            &inner.unreadable_slots,
        )?;
        if let Some(generation) = generation {
            inner.pool.found(generation, slot);
        }
        Ok(())
    }

    /// Counts one envelope opened toward
    /// [`Quirks::reset_module_after_opens`] and, when that many have been
    /// opened since the module was initialised, starts a planned reset
    /// ([`Hsm::planned_reset`]) on a thread of its own. Called after the
    /// open, outside the gate.
    fn opened(&self) {
        use std::sync::atomic::Ordering;
        let inner = &self.inner;
        let every = inner.settings.quirks.reset_module_after_opens;
        if every == 0
            || inner.opens.fetch_add(1, Ordering::Relaxed) + 1 < every
            // A reset would log every session out, and no new one could log
            // in: the sessions still logged in are all that serves.
            || self.login_refused().is_some()
            || inner.resetting.swap(true, Ordering::AcqRel)
        {
            return;
        }
        // A reset that ran between this count and the swap zeroed the
        // count: another now would be a second one at once.
        if inner.opens.load(Ordering::Relaxed) < every {
            inner.resetting.store(false, Ordering::Release);
            return;
        }
        // Counted among the HSM threads that the end of the process waits
        // for (`spread::quiesce`): the reset may hold the last `Hsm`.
        let alive = spread::Alive::enter();
        let hsm = self.clone();
        let spawned = std::thread::Builder::new()
            .name("lavd-hsm-reset".into())
            .spawn(move || {
                let _alive = alive;
                // Rebound after `_alive`, so dropped before it: `quiesce`
                // counts this thread until its `Hsm` is gone.
                let hsm = hsm;
                // Cleared however the reset ends, a panic too, so that
                // resets are not stopped for good.
                let _done = ClearOnDrop(&hsm.inner.resetting);
                let outcome = hsm.planned_reset(every);
                hsm.inner.observer.planned_reset(outcome);
            });
        match spawned {
            Ok(thread) => spread::keep_handle(thread),
            Err(e) => {
                inner.resetting.store(false, Ordering::Release);
                tracing::warn!(error = %e, "cannot start the planned PKCS#11 module reset's thread");
            }
        }
    }

    /// The planned reset: [`Hsm::reset_module`]'s steps, but
    /// - it waits for running calls only briefly (a tenth of the call
    ///   deadline, at most 100 ms), because new calls wait while it does:
    ///   a reset that is not urgent must not stall every request behind one
    ///   slow call. When the calls do not finish by then it is put off for a
    ///   tenth of `every` opens;
    /// - it is put off while the token refuses the PIN (see
    ///   [`Hsm::opened`]), until the next open after the PIN is replaced.
    ///
    /// Returns the outcome for `lavd_hsm_planned_resets_total`: `done`,
    /// `deferred` or `failed`. A failed reset is tried again after `every`
    /// more opens.
    fn planned_reset(&self, every: u64) -> &'static str {
        use std::sync::atomic::Ordering;
        let inner = &self.inner;
        let started = Instant::now();
        let wait = (inner.settings.call_timeout / 10).min(std::time::Duration::from_millis(100));
        let Some(exclusive) = inner.gate.exclusive(wait) else {
            inner.opens.store(every - every / 10, Ordering::Relaxed);
            tracing::info!(
                "the planned PKCS#11 module reset waited {}ms for running calls; put off for {} opens",
                wait.as_millis(),
                every / 10
            );
            return "deferred";
        };
        if self.login_refused().is_some() {
            return "deferred";
        }
        match self.reinitialise_holding(&exclusive) {
            Ok(()) => {
                tracing::info!(
                    opens = every,
                    millis = started.elapsed().as_millis() as u64,
                    "PKCS#11 module reset after [hsm.quirks] reset_module_after_opens opens"
                );
                "done"
            }
            Err(e) => {
                inner.opens.store(0, Ordering::Relaxed);
                tracing::warn!(error = %e, "the planned PKCS#11 module reset failed; it is tried again after as many opens");
                "failed"
            }
        }
    }

    /// Sessions the pool has open (idle plus checked out).
    pub fn open_sessions(&self) -> usize {
        self.inner.pool.open_sessions()
    }

    /// After a session of generation `seen` was lost: retires every pooled
    /// session, which also forgets the slot and the cached handles, and
    /// finds the token again (its slot may have changed). Callers that lost
    /// sessions of the same generation at once reconnect once: the others
    /// find a newer generation begun and leave it.
    fn reconnect(&self, seen: Option<u64>) {
        let Some(generation) = self.inner.pool.retire(seen) else {
            return;
        };
        self.inner.observer.reconnected();
        if let Err(e) = self.slot_of(None, generation) {
            // The next session to be opened looks for it again.
            tracing::warn!(error = %e, "token not found while reconnecting");
        }
    }

    /// The slot to open a session of `generation` on: `known`, or, when the
    /// pool retired its sessions and forgot the slot, the token's slot
    /// found now (recorded for that generation).
    fn slot_of(&self, known: Option<Slot>, generation: u64) -> Result<Slot, HsmError> {
        if let Some(slot) = known {
            return Ok(slot);
        }
        let inner = &self.inner;
        let find = || {
            find_token(
                &inner.pkcs11,
                &inner.settings.module,
                &inner.settings.token,
                &inner.unreadable_slots,
            )
        };
        let slot = match find() {
            // The module was finalised under us (a library reset): initialise
            // it again rather than failing until a restart.
            Err(e) if e.ckr() == Some("CKR_CRYPTOKI_NOT_INITIALIZED") => {
                match inner
                    .pkcs11
                    .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
                {
                    Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => find(),
                    Err(e) => Err(e.into()),
                }
            }
            other => other,
        }?;
        inner.pool.found(generation, slot);
        Ok(slot)
    }

    /// A new session, not from the pool, on the token's slot (found again
    /// if the pool forgot it), logged in.
    fn unpooled_session(&self) -> Result<Session, HsmError> {
        let (slot, generation) = self.inner.pool.slot();
        self.new_session(self.slot_of(slot, generation)?)
    }
}

/// Stores `false` in the flag when dropped.
struct ClearOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// A read-write gate whose writer waits with a deadline. A waiting writer
/// holds back new readers (so a reset is not starved by a stream of calls)
/// but gives up at its deadline (so a call that hangs in the module holds
/// back the others for at most that long, and a reset never waits forever).
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    readers: usize,
    writer: bool,
    writers_waiting: usize,
}

/// A hold on the [`Gate`], shared or exclusive; released on drop.
#[derive(Debug)]
pub(crate) struct GateGuard<'a> {
    gate: &'a Gate,
    exclusive: bool,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        // Counters only change under the lock and no code runs under it: a
        // poisoned lock still holds consistent counts.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[cfg(test)]
    fn shared(&self) -> GateGuard<'_> {
        loop {
            if let Some(guard) = self.shared_within(std::time::Duration::from_secs(3600)) {
                return guard;
            }
        }
    }

    /// A shared hold, waiting at most `timeout` for a reset (a writer) to
    /// finish: a reset stuck in `C_Initialize` of a module that hangs holds
    /// callers back for at most that long, not for ever.
    fn shared_within(&self, timeout: std::time::Duration) -> Option<GateGuard<'_>> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while state.writer || state.writers_waiting > 0 {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        state.readers += 1;
        Some(GateGuard {
            gate: self,
            exclusive: false,
        })
    }

    fn exclusive(&self, timeout: std::time::Duration) -> Option<GateGuard<'_>> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        state.writers_waiting += 1;
        while state.writer || state.readers > 0 {
            let now = Instant::now();
            if now >= deadline {
                state.writers_waiting -= 1;
                drop(state);
                self.changed.notify_all();
                return None;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        state.writers_waiting -= 1;
        state.writer = true;
        Some(GateGuard {
            gate: self,
            exclusive: true,
        })
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        // Whom the release may let in: after a reset, the calls it held
        // back; after a call, only a reset waiting for the calls to end
        // (calls wait only while a reset runs or waits). Without one, the
        // wake, a system call whether or not anyone waits, is skipped: it
        // was one an HSM operation.
        let wake = if self.exclusive {
            state.writer = false;
            true
        } else {
            state.readers -= 1;
            state.writers_waiting > 0
        };
        drop(state);
        if wake {
            self.gate.changed.notify_all();
        }
    }
}

/// Finds the one slot whose token matches the selector.
///
/// A token whose info cannot be read (another process is rewriting it, or it
/// is failing) is skipped; if any was, the scan is retried a few times, so
/// that a token with the same label read a moment later is found and the
/// ambiguity refused, rather than the PIN sent to whichever one was read.
/// A token still unreadable after the retries (a neighbour's broken
/// partition) does not stop this daemon from finding its own: by label, the
/// one match is then taken with a warning to select by serial. Those slots
/// are kept in `unreadable_before`: the same ones unreadable at the next
/// lookup are not waited for, nor warned about, again.
fn find_token(
    pkcs11: &Pkcs11,
    module: &Path,
    wanted: &TokenSelector,
    unreadable_before: &Mutex<Vec<u64>>,
) -> Result<Slot, HsmError> {
    let mut attempt = 0;
    loop {
        let mut present = Vec::new();
        let mut matches = Vec::new();
        let mut unreadable_slots = Vec::new();
        for slot in pkcs11.get_slots_with_token()? {
            let info = match pkcs11.get_token_info(slot) {
                Ok(info) => info,
                Err(e) => {
                    tracing::debug!(slot = slot.id(), error = %e, "skipping unreadable token");
                    unreadable_slots.push(slot.id());
                    continue;
                }
            };
            if !info.token_initialized() {
                continue;
            }
            let label = info.label().trim_end().to_string();
            let serial = info.serial_number().trim_end().to_string();
            let hit = match wanted {
                TokenSelector::Label(l) => *l == label,
                TokenSelector::Serial(s) => *s == serial,
            };
            if hit {
                matches.push(slot);
            }
            present.push(format!("{label:?} (serial {serial})"));
        }
        unreadable_slots.sort_unstable();
        let unreadable = unreadable_slots.len();
        let mut before = unreadable_before
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match matches.len() {
            1 if unreadable == 0 || matches!(wanted, TokenSelector::Serial(_)) => {
                *before = unreadable_slots;
                return Ok(matches[0]);
            }
            // Waited for and warned about at the last lookup.
            1 if *before == unreadable_slots => return Ok(matches[0]),
            0 | 1 if unreadable > 0 && attempt < 3 => {
                drop(before);
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(50 * attempt));
            }
            1 => {
                tracing::warn!(
                    %wanted,
                    unreadable,
                    "one token has this label, but other tokens on the module cannot be read, so \
                     one of them may have it too; select the token by serial"
                );
                *before = unreadable_slots;
                return Ok(matches[0]);
            }
            0 => {
                return Err(HsmError::TokenNotFound {
                    wanted: wanted.to_string(),
                    module: module.to_path_buf(),
                    present: if present.is_empty() {
                        "none".into()
                    } else {
                        present.join(", ")
                    },
                })
            }
            count => {
                return Err(HsmError::AmbiguousToken {
                    label: match wanted {
                        TokenSelector::Label(l) | TokenSelector::Serial(l) => l.clone(),
                    },
                    count,
                })
            }
        }
    }
}

/// A 32-byte ECDH output, zeroized on drop.
pub type SharedSecret = crate::secret::Secret<[u8; 32]>;

/// Initialises a token on the module's first uninitialised slot and sets its
/// user PIN. Only for `lavd dev`, which makes its own SoftHSM token; real
/// tokens are initialised with the vendor's tools under their own procedures.
///
/// # Errors
/// [`HsmError::TokenNotFound`] if no uninitialised slot exists, or the
/// failing PKCS#11 call.
pub fn init_dev_token(
    module_path: &Path,
    module_env: &[(String, String)],
    label: &str,
    so_pin: &AuthPin,
    user_pin: &AuthPin,
) -> Result<(), HsmError> {
    let pkcs11 = module(module_path, module_env)?;
    let mut free = None;
    for slot in pkcs11.get_slots_with_token()? {
        if !pkcs11.get_token_info(slot)?.token_initialized() {
            free = Some(slot);
            break;
        }
    }
    let slot = free.ok_or_else(|| HsmError::TokenNotFound {
        wanted: "an uninitialised slot".into(),
        module: module_path.to_path_buf(),
        present: "only initialised tokens".into(),
    })?;
    pkcs11.init_token(slot, so_pin, label)?;
    let session = pkcs11.open_rw_session(slot)?;
    session.login(cryptoki::session::UserType::So, Some(so_pin))?;
    session.init_pin(user_pin)?;
    session.logout()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A reset that hangs (in `C_Initialize` of a network HSM's client)
    /// holds calls back for at most their deadline: before, they waited
    /// for it without bound, each on a blocking thread.
    #[test]
    fn a_call_waits_for_a_reset_at_most_its_deadline() {
        let gate = Gate::default();
        let reset = gate.exclusive(Duration::from_millis(100)).unwrap();
        let started = Instant::now();
        assert!(gate.shared_within(Duration::from_millis(100)).is_none());
        assert!(started.elapsed() >= Duration::from_millis(100));
        drop(reset);
        assert!(gate.shared_within(Duration::from_millis(100)).is_some());
    }

    #[test]
    fn a_reset_waits_for_running_calls_at_most_its_deadline_and_holds_back_new_ones() {
        let gate = Gate::default();
        // A call that hangs: the reset gives up at its deadline, and calls
        // go on afterwards.
        let hung = gate.shared();
        let started = Instant::now();
        assert!(gate.exclusive(Duration::from_millis(100)).is_none());
        assert!(started.elapsed() >= Duration::from_millis(100));
        drop(gate.shared());
        drop(hung);
        // No call running: the reset proceeds, and a call waits for it.
        let reset = gate.exclusive(Duration::from_millis(100)).unwrap();
        std::thread::scope(|s| {
            let call = s.spawn(|| {
                let _call = gate.shared();
                Instant::now()
            });
            std::thread::sleep(Duration::from_millis(50));
            let released = Instant::now();
            drop(reset);
            assert!(
                call.join().unwrap() >= released,
                "a call ran during the reset"
            );
        });
        // A waiting reset holds back new calls (it is not starved by them).
        let running = gate.shared();
        std::thread::scope(|s| {
            let reset = s.spawn(|| {
                gate.exclusive(Duration::from_secs(10))
                    .map(|_reset| Instant::now())
            });
            while gate.lock().writers_waiting == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let call = s.spawn(|| {
                let _call = gate.shared();
                Instant::now()
            });
            std::thread::sleep(Duration::from_millis(50));
            let released = Instant::now();
            drop(running);
            let reset_in = reset.join().unwrap().expect("the reset got in");
            // Woken when the last call ended, not at its own deadline.
            assert!(
                reset_in.duration_since(released) < Duration::from_secs(5),
                "the reset waited {:?} after the last call ended",
                reset_in.duration_since(released)
            );
            assert!(call.join().unwrap() >= released);
        });
    }
}
