//! What the server shares between connections: the fixed parts (HSM, store,
//! metrics, limits) and the [`Reloadable`] parts that SIGHUP replaces.
//!
//! A reload reads the whole config file again, builds a new [`Reloadable`]
//! off to the side and swaps it in only when every part of it built; a bad
//! file leaves the running state untouched and says why. Readers take an
//! `Arc` snapshot ([`ServerState::current`]) and keep it for the rest of
//! their request, so a reload never changes the rules half-way through one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::identity::RoleMap;
use super::ratelimit::RateLimiter;
use super::tls::{self, TlsMaterial};
use crate::config::{ConfigError, Env, Limits, Settings};
use crate::hsm::Hsm;
use crate::metrics::Metrics;
use crate::store::Store;

/// The parts of the configuration that a reload replaces.
///
/// To make more of the configuration reloadable (the warrant authorities and
/// policy, for example), add a field here and build it in
/// [`Reloadable::build`]: it is then checked with the rest before any swap,
/// and a handler reads it with `state.current().your_field`.
#[derive(Debug)]
pub struct Reloadable {
    /// Counts up from 1 with every successful reload.
    pub generation: u64,
    /// Server certificate, client CAs and CRLs.
    pub tls: TlsMaterial,
    /// Identity → roles.
    pub roles: RoleMap,
}

impl Reloadable {
    /// Builds the reloadable state from validated settings (reading the TLS
    /// files they name).
    ///
    /// # Errors
    /// [`ConfigError`] naming the field whose file or value is unusable.
    pub fn build(settings: &Settings, generation: u64) -> Result<Self, ConfigError> {
        let tls = tls::load(settings.require_tls()?, &settings.file)?;
        Ok(Reloadable {
            generation,
            tls,
            roles: settings.roles.clone(),
        })
    }
}

/// The server's shared state. Built once by `lavd serve`; handlers get it as
/// `Arc<ServerState>`.
pub struct ServerState {
    /// The HSM. Call it only through [`Hsm::run`] from async code.
    pub hsm: Hsm,
    /// The store. Its methods block (SQLite, fsync): call them on the
    /// blocking pool (`tokio::task::spawn_blocking` or [`super::blocking`]).
    pub store: Arc<Store>,
    /// Metrics; handlers count envelopes and store commits here.
    pub metrics: Arc<Metrics>,
    /// `[limits]` at start (a reload does not change them).
    pub limits: Limits,
    /// The per-identity rate limiter.
    pub(crate) rate_limiter: RateLimiter,
    config_file: PathBuf,
    env: Arc<dyn Env>,
    live: RwLock<Arc<Reloadable>>,
    generation: AtomicU64,
    draining: AtomicBool,
    /// The settings at start, to warn about edits a reload cannot apply.
    startup: StartupSettings,
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState")
            .field("config_file", &self.config_file)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// The settings that only a restart applies.
#[derive(Debug, Clone, PartialEq)]
pub struct StartupSettings {
    /// The config file (read again on reload).
    pub file: PathBuf,
    /// `[server]`.
    pub server: crate::config::ServerSettings,
    /// `[admin]`.
    pub admin: crate::config::AdminSettings,
    /// `[limits]`.
    pub limits: Limits,
    /// `[log]`.
    pub log: crate::config::LogSettings,
    /// `[store] path`.
    pub store_path: PathBuf,
}

impl StartupSettings {
    /// The restart-only parts of `s`.
    pub fn of(s: &Settings) -> Self {
        StartupSettings {
            file: s.file.clone(),
            server: s.server.clone(),
            admin: s.admin.clone(),
            limits: s.limits.clone(),
            log: s.log.clone(),
            store_path: s.store_path.clone(),
        }
    }
}

/// What a successful reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// The new generation.
    pub generation: u64,
    /// Tables that changed in the file but need a restart to apply.
    pub needs_restart: Vec<&'static str>,
}

impl ServerState {
    /// Assembles the state from what `lavd serve` built: the first
    /// reloadable state, the restart-only settings, the opened HSM and store.
    /// `env` is kept to read the config file again on reload.
    pub fn new(
        startup: StartupSettings,
        live: Reloadable,
        env: Arc<dyn Env>,
        hsm: Hsm,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Self {
        ServerState {
            hsm,
            store,
            metrics,
            limits: startup.limits.clone(),
            rate_limiter: RateLimiter::new(
                startup.limits.rate_limit_per_second,
                startup.limits.rate_limit_burst,
            ),
            config_file: startup.file.clone(),
            env,
            generation: AtomicU64::new(live.generation),
            live: RwLock::new(Arc::new(live)),
            draining: AtomicBool::new(false),
            startup,
        }
    }

    /// A snapshot of the reloadable state; keep it for the whole request.
    pub fn current(&self) -> Arc<Reloadable> {
        // The lock is held only to clone an Arc; a writer cannot panic
        // while holding it, so poisoning cannot happen in practice and the
        // value inside is always a complete state.
        self.live
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The settings the server started with.
    pub fn startup(&self) -> &StartupSettings {
        &self.startup
    }

    /// The config file this state came from.
    pub fn config_file(&self) -> &Path {
        &self.config_file
    }

    /// Reads the config file again and swaps in its reloadable parts if all
    /// of them build. Counts the outcome in the metrics.
    ///
    /// # Errors
    /// [`ConfigError`] when the file or a file it names is unusable; the
    /// running state is then unchanged.
    pub fn reload(&self) -> Result<ReloadOutcome, ConfigError> {
        let result = self.try_reload();
        self.metrics.config_reload(result.is_ok());
        result
    }

    fn try_reload(&self) -> Result<ReloadOutcome, ConfigError> {
        let settings = Settings::load(&self.config_file, self.env.as_ref())?;
        let generation = self.generation.load(Ordering::SeqCst) + 1;
        let next = Reloadable::build(&settings, generation)?;
        *self
            .live
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
        self.generation.store(generation, Ordering::SeqCst);
        let now = StartupSettings::of(&settings);
        let was = &self.startup;
        let mut needs_restart = Vec::new();
        for (table, changed) in [
            ("server", now.server != was.server),
            ("admin", now.admin != was.admin),
            ("limits", now.limits != was.limits),
            ("log", now.log != was.log),
            ("store", now.store_path != was.store_path),
        ] {
            if changed {
                needs_restart.push(table);
            }
        }
        for warning in &settings.warnings {
            tracing::warn!("{warning}");
        }
        Ok(ReloadOutcome {
            generation,
            needs_restart,
        })
    }

    /// Marks the server as shutting down: `/readyz` turns false so that
    /// load balancers stop sending new work.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether [`ServerState::start_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
