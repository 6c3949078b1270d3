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
use std::sync::{Arc, Mutex, RwLock};

use super::identity::RoleMap;
use super::ratelimit::RateLimiter;
use super::tls::{self, TlsMaterial};
use crate::audit::leaf::{
    AuthoritiesLoaded, AuthoritySummary, Digest, EmergencySummary, Event, PolicySummary,
};
use crate::audit::log::{AuditLog, LogError};
use crate::config::{ConfigError, Env, Limits, Settings};
use crate::hsm::Hsm;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::store::{AuditAppend, Spend};
use crate::warrant::trust::AuthorityPublicKey;
use crate::warrant::{TrustStore, Verifier};

/// The parts of the configuration that a reload replaces: certificates,
/// CRLs, roles, and the warrant authorities and policy.
///
/// To make more of the configuration reloadable, add a field here and build
/// it in [`Reloadable::build`]: it is then checked with the rest before any
/// swap, and a handler reads it with `state.current().your_field`.
#[derive(Debug)]
pub struct Reloadable {
    /// Counts up from 1 with every successful reload.
    pub generation: u64,
    /// Server certificate, client CAs and CRLs.
    pub tls: TlsMaterial,
    /// Identity → roles.
    pub roles: RoleMap,
    /// The authorities and policy warrants are checked against.
    pub verifier: Arc<Verifier>,
    /// Digest of the trust configuration (as in its `authorities_loaded` leaf).
    pub trust_digest: Digest,
}

/// How long a reload tries to log the running trust again after a trust
/// change's leaf whose commit has an unknown fate, holding every unwrap and
/// revocation at its commit, before the process exits 75
/// ([`ServerState::reload`]).
pub const RELOG_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// The generation of the configuration a daemon starts with; each reload
/// counts one up.
pub const FIRST_GENERATION: u64 = 1;

impl Reloadable {
    /// Builds the reloadable state from validated settings (reading the TLS
    /// files they name).
    ///
    /// # Errors
    /// [`ConfigError`] naming the field whose file or value is unusable.
    /// `limits` are the running daemon's: `[limits]` applies only at a
    /// start, so a reload passes the ones the daemon started with.
    ///
    /// `running` is the running configuration's TLS material at a reload,
    /// `None` at the start: a new CRL past its `nextUpdate` is refused only
    /// where it would replace a running one that still counts (see
    /// [`tls::load`]).
    pub fn build(
        settings: &Settings,
        limits: &Limits,
        generation: u64,
        running: Option<&tls::TlsMaterial>,
    ) -> Result<Self, ConfigError> {
        let tls = tls::load(settings.require_tls()?, &settings.file, running)?;
        let trust = settings.require_trust()?.clone();
        let trust_digest = trust_digest(&trust);
        Ok(Reloadable {
            generation,
            tls,
            roles: settings.roles.clone(),
            verifier: Arc::new(Verifier::new(trust, limits.warrant())),
            trust_digest,
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
    /// The audit log (the store's leaves plus HSM-signed checkpoints).
    pub audit: AuditLog,
    /// Metrics; handlers count envelopes and store commits here.
    pub metrics: Arc<Metrics>,
    /// `[limits]` at start (a reload does not change them).
    pub limits: Limits,
    /// The witnesses (`[[audit.witnesses]]`), when configured.
    pub witnessing: Option<Arc<crate::audit::witnessing::Witnessing>>,
    /// The per-identity rate limiter.
    pub(crate) rate_limiter: RateLimiter,
    /// Bounds the envelopes unwrap requests work on at once
    /// (`[limits] max_envelopes_in_flight`).
    pub envelope_gate: crate::unwrap::gate::EnvelopeGate,
    /// Bounds the request bodies held at once
    /// (`[limits] max_body_bytes_in_flight`), but for revocations'.
    pub bodies: super::pipeline::BodyBudget,
    /// The same bound for revocations' bodies, apart, so that unwrap
    /// bodies cannot crowd out a revocation.
    pub revocation_bodies: super::pipeline::BodyBudget,
    /// Revocations' bodies from callers with the admin role, apart again
    /// (`[limits] max_body_bytes`: one body of the largest size, or
    /// thousands of an admin's revocations of a few hundred bytes), so
    /// that no other caller can crowd out the admin's; what does not fit
    /// takes from `revocation_bodies` (a chunked body counts as
    /// `max_body_bytes` while it is read: it alone fills this one).
    pub admin_revocation_bodies: super::pipeline::BodyBudget,
    config_file: PathBuf,
    env: Arc<dyn Env>,
    live: RwLock<Arc<Reloadable>>,
    generation: AtomicU64,
    /// Held for a whole reload, so that reloads are one at a time and no
    /// two [`Reloadable`]s ever share a generation (connections keep a
    /// passed certificate check per generation).
    reloading: Mutex<()>,
    /// Held by a reload that changes authorities or policy (exclusive)
    /// from before its `authorities_loaded` leaf to the swap of the
    /// configuration, and by an unwrap (shared) from its
    /// last look at the configuration to the end of its audit commit
    /// ([`crate::unwrap::Recheck`]).
    reload_fence: std::sync::RwLock<()>,
    draining: AtomicBool,
    /// Set when the drain ended ([`ServerState::cut_requests`]).
    cut: AtomicBool,
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
    /// `[store]`.
    pub store: crate::store::StoreSettings,
    /// `[hsm]` as far as a change matters (module, token, sessions,
    /// quirks, environment, call timeout; not the PIN).
    pub hsm: String,
    /// `[audit]`.
    pub audit: crate::config::AuditSettings,
    /// The files restart-only tables read once, at start, by table: the
    /// database's and the witnesses' CA files, with a digest of their
    /// contents (`None` when unreadable). A file replaced in place is a
    /// change that needs a restart, as a changed path is.
    pub files: Vec<(&'static str, PathBuf, Option<[u8; 32]>)>,
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
            store: s.store.clone(),
            hsm: hsm_fingerprint(s),
            audit: s.audit.clone(),
            files: restart_files(s),
        }
    }
}

/// `[hsm]` as far as a change needs a restart: every setting but the PIN,
/// which a reload reads, and the refused-PIN record's path, which only a
/// start reads. Destructured whole, so that a new setting must be placed
/// here or named as reloadable.
fn hsm_fingerprint(s: &Settings) -> String {
    let crate::hsm::HsmSettings {
        module,
        token,
        pin: _,
        sessions,
        quirks,
        module_env,
        call_timeout,
    } = &s.hsm;
    let record = s.refused_pin_record.as_ref().map(|r| &r.record);
    format!(
        "{} {token} {sessions} {quirks:?} {module_env:?} {call_timeout:?} {record:?}",
        module.display(),
    )
}

impl StartupSettings {
    /// The tables that differ between `self` and `was` (the running
    /// configuration) and apply only after a restart: their settings, or a
    /// file they read at start.
    pub fn restart_tables(&self, was: &StartupSettings) -> Vec<&'static str> {
        let now = self;
        let mut needs_restart = Vec::new();
        for (table, changed) in [
            ("server", now.server != was.server),
            ("admin", now.admin != was.admin),
            ("limits", now.limits != was.limits),
            ("log", now.log != was.log),
            ("store", now.store != was.store),
            ("hsm", now.hsm != was.hsm),
            ("audit", now.audit != was.audit),
        ] {
            let files = |of: &StartupSettings| {
                of.files
                    .iter()
                    .filter(|(t, ..)| *t == table)
                    .cloned()
                    .collect::<Vec<_>>()
            };
            if changed || files(now) != files(was) {
                needs_restart.push(table);
            }
        }
        needs_restart
    }
}

/// [`StartupSettings::files`] of `s`.
fn restart_files(s: &Settings) -> Vec<(&'static str, PathBuf, Option<[u8; 32]>)> {
    let mut files = Vec::new();
    if let crate::store::StoreSettings::Postgres(pg) = &s.store {
        files.extend(pg.ca_file.iter().map(|f| ("store", f.clone())));
    }
    if let Some(w) = &s.audit.witnesses {
        files.extend(
            w.witnesses
                .iter()
                .filter_map(|e| e.ca_file.clone())
                .map(|f| ("audit", f)),
        );
    }
    files
        .into_iter()
        .map(|(table, path)| {
            let digest = std::fs::read(&path)
                .ok()
                .map(|bytes| crate::warrant::claims::sha256(&bytes));
            (table, path, digest)
        })
        .collect()
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
        audit: AuditLog,
        metrics: Arc<Metrics>,
    ) -> Self {
        let revocation_bodies = super::pipeline::BodyBudget::new(
            startup.limits.max_body_bytes_in_flight,
            "limits.max_body_bytes_in_flight",
        );
        ServerState {
            hsm,
            store,
            audit,
            metrics,
            witnessing: None,
            limits: startup.limits.clone(),
            rate_limiter: RateLimiter::new(
                startup.limits.rate_limit_per_second,
                startup.limits.rate_limit_burst,
            ),
            envelope_gate: crate::unwrap::gate::EnvelopeGate::new(
                startup.limits.max_envelopes_in_flight,
            ),
            bodies: super::pipeline::BodyBudget::new(
                startup.limits.max_body_bytes_in_flight,
                "limits.max_body_bytes_in_flight",
            ),
            admin_revocation_bodies: super::pipeline::BodyBudget::new(
                startup.limits.max_body_bytes,
                "limits.max_body_bytes",
            )
            .or_else(&revocation_bodies),
            revocation_bodies,
            config_file: startup.file.clone(),
            env,
            generation: AtomicU64::new(live.generation),
            live: RwLock::new(Arc::new(live)),
            reloading: Mutex::new(()),
            reload_fence: std::sync::RwLock::new(()),
            draining: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            startup,
        }
    }

    /// Adds the witnesses (`[[audit.witnesses]]`), when configured.
    #[must_use]
    pub fn with_witnessing(
        mut self,
        witnessing: Option<Arc<crate::audit::witnessing::Witnessing>>,
    ) -> Self {
        self.witnessing = witnessing;
        self
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

    /// See [`crate::unwrap::Recheck`].
    pub fn reload_fence(&self) -> &std::sync::RwLock<()> {
        &self.reload_fence
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
    /// of them build. Counts the outcome in the metrics. A change of the
    /// authorities or policy applies only once its `authorities_loaded` leaf
    /// is durable; if it cannot be written, nothing applies.
    ///
    /// It blocks (files, TLS, and for a trust change an fsync and an HSM
    /// signature): call it on the blocking pool.
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
        // A reload that panicked left nothing half-applied (the swap is
        // one assignment at its end), so a poisoned lock is still usable.
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let settings = Settings::load(&self.config_file, self.env.as_ref())?;
        // `[limits]` keeps its startup values: the new policy is held to
        // the signature bound that runs, not to the file's.
        if let Some(trust) = &settings.trust {
            let needed = trust.policy().signatures_needed();
            if needed > self.limits.max_warrant_signatures {
                return Err(ConfigError {
                    file: self.config_file.clone(),
                    field: "policy".into(),
                    reason: format!(
                        "needs {needed} signatures, above the running \
                         limits.max_warrant_signatures {} (limits apply only after a \
                         restart): no warrant could pass",
                        self.limits.max_warrant_signatures
                    ),
                });
            }
        }
        let generation = self.generation.load(Ordering::SeqCst) + 1;
        let next = Reloadable::build(
            &settings,
            &self.limits,
            generation,
            Some(&self.current().tls),
        )?;
        // A trust change is ordered against unwraps' and revocations'
        // leaves: none judged under the running trust commits after its
        // `authorities_loaded` leaf; those in their commit finish it first,
        // and those at their last look wait for the swap
        // ([`crate::unwrap::Recheck`]). Other changes
        // (roles, CAs, CRLs) write no leaf and take no fence, so that they
        // never wait for the store: a new CRL must not wait for the
        // clients it revokes.
        let trust_changed = next.trust_digest != self.current().trust_digest;
        let fence = trust_changed.then(|| match self.reload_fence.try_write() {
            Ok(fence) => fence,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                tracing::info!(
                    "the new authorities or policy wait for the unwraps and revocations in their \
                     audit commit, judged under the running ones, to finish"
                );
                self.reload_fence
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            }
        });
        let next = Arc::new(next);
        // The swap, and the fence let go.
        let apply = |fence: Option<std::sync::RwLockWriteGuard<'_, ()>>| {
            next.tls.log_crls();
            *self
                .live
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = next.clone();
            self.generation.store(generation, Ordering::SeqCst);
            drop(fence);
        };
        if trust_changed {
            // No change of who may sign warrants without its audit leaf:
            // the leaf is durable before the new trust applies, and if it
            // cannot be written the reload fails and the old trust stays.
            // Once the leaf is durable the new trust applies, even if no
            // checkpoint covers it yet: the log must never say one trust
            // while the daemon enforces another. It applies as the leaf's
            // transaction ends, before the checkpoint's signature is
            // awaited: the fence is held across a commit, not an HSM call.
            let trust = settings.require_trust()?;
            // The fence of a commit that did not end committed, kept until
            // the running trust is logged again.
            let kept = std::cell::Cell::new(None);
            let logged = self.log_authorities_loaded_then(trust, |committed| {
                if committed {
                    apply(fence);
                } else {
                    kept.set(fence);
                }
            });
            let unsigned = match logged {
                Ok(unsigned) => unsigned,
                Err(e) => {
                    let unknown = matches!(
                        e.downcast_ref::<LogError>(),
                        Some(LogError::Store(crate::store::StoreError::CommitUnknown(_)))
                    );
                    let reason = if unknown {
                        // The leaf may be durable, saying a trust that does
                        // not apply: the running one is logged after it,
                        // with the fence still held, so that the log's last
                        // word is the trust in force.
                        let again = self.log_running_trust_again(&kept);
                        format!(
                            "not applied, and whether its audit record was written is unknown \
                             (the store lost the commit's answer): {again}: {e:#}"
                        )
                    } else {
                        format!("not applied: its audit record could not be written: {e:#}")
                    };
                    drop(kept.take());
                    return Err(ConfigError {
                        file: self.config_file.clone(),
                        field: "authorities".into(),
                        reason,
                    });
                }
            };
            drop(kept.take());
            if let Some(e) = unsigned {
                tracing::warn!(error = %e, "the new authorities' audit record is written and they apply, but no checkpoint covers it yet");
            }
        } else {
            apply(fence);
        }
        let now = StartupSettings::of(&settings);
        let was = &self.startup;
        // A changed PIN applies on reload (a PIN rotated on the token needs
        // no restart, and lifts a login latch), unless `[hsm]` changed too:
        // then it may be another token's, applied at the restart.
        if now.hsm == was.hsm && self.hsm.set_pin(settings.hsm.pin.clone()) {
            tracing::info!(
                "the HSM PIN changed; new sessions log in with it (sessions logged in stay so)"
            );
        }
        let needs_restart = now.restart_tables(was);
        for warning in &settings.warnings {
            tracing::warn!("{warning}");
        }
        Ok(ReloadOutcome {
            generation,
            needs_restart,
        })
    }

    /// Appends the `authorities_loaded` leaf for `trust` (at start and after
    /// a reload that changed it), durably.
    ///
    /// Returns the error of the checkpoint that was to cover it, if it
    /// could not be signed: the leaf is durable all the same.
    ///
    /// # Errors
    /// A [`crate::audit::leaf::LeafError`] or a [`LogError`], typed, so
    /// that a command's exit line carries its code.
    pub fn log_authorities_loaded(&self, trust: &TrustStore) -> anyhow::Result<Option<LogError>> {
        self.log_authorities_loaded_then(trust, |_| {})
    }

    /// As [`Self::log_authorities_loaded`], calling `ended` as the leaf's
    /// transaction ends, with whether it committed
    /// ([`AuditLog::append_committed_then`]); not at all if the leaf could
    /// not be made.
    ///
    /// # Errors
    /// As [`Self::log_authorities_loaded`].
    fn log_authorities_loaded_then(
        &self,
        trust: &TrustStore,
        ended: impl FnOnce(bool),
    ) -> anyhow::Result<Option<LogError>> {
        let event = authorities_loaded(trust)?;
        let (_, receipt) = self.audit.append_committed_then(
            AuditAppend {
                events: vec![event],
                time: time::OffsetDateTime::now_utc(),
                spend: Spend::None,
            },
            ended,
        )?;
        Ok(receipt.err())
    }

    /// Logs the running trust's `authorities_loaded` leaf again, after a
    /// trust change's leaf whose commit has an unknown fate: that leaf may
    /// be durable though its trust does not apply. `fence` (the reload's,
    /// held) is let go as this leaf's commit ends, not before: no unwrap's
    /// or revocation's leaf judged under the running trust commits between
    /// the two. Tried until the store takes it (every 50 ms at first, then
    /// every 2 s) for [`RELOG_WITHIN`]; if it does not, the process exits
    /// 75 with the fence still held: held requests release nothing (their
    /// open intents are written as `open_interrupted` leaves), and the next
    /// start logs the trust its configuration names, so that
    /// the log and the daemon agree again. Returns what happened, for the
    /// reload's error.
    fn log_running_trust_again(
        &self,
        fence: &std::cell::Cell<Option<std::sync::RwLockWriteGuard<'_, ()>>>,
    ) -> String {
        let running = self.current();
        let deadline = std::time::Instant::now() + RELOG_WITHIN;
        let mut wait = std::time::Duration::from_millis(50);
        loop {
            let logged = self.log_authorities_loaded_then(running.verifier.trust(), |committed| {
                if committed {
                    drop(fence.take());
                }
            });
            let e = match logged {
                Ok(None) => return "the running authorities were logged again after it".into(),
                Ok(Some(unsigned)) => {
                    return format!(
                        "the running authorities were logged again after it (no checkpoint \
                         covers that yet: {unsigned})"
                    )
                }
                Err(e) => e,
            };
            if std::time::Instant::now() >= deadline {
                tracing::error!(
                    error = %format!("{e:#}"),
                    "the running authorities could not be logged again within {} s after a \
                     trust change whose record may be written: exiting 75 rather than serve \
                     under a trust the log may not say (the next start logs the trust its \
                     configuration names)",
                    RELOG_WITHIN.as_secs()
                );
                std::process::exit(75);
            }
            tracing::warn!(
                error = %format!("{e:#}"),
                "the running authorities cannot be logged again yet, after a trust change \
                 whose record may be written; unwraps and revocations wait for it; retrying"
            );
            std::thread::sleep(wait);
            wait = (wait * 2).min(std::time::Duration::from_secs(2));
        }
    }

    /// Marks the server as shutting down: `/readyz` turns false so that
    /// load balancers stop sending new work.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// The drain is over: connections still open were cut. A request whose
    /// work has not started yet (an unwrap queued at the envelope gate)
    /// then starts none: nobody would get its reply, and the stop waits
    /// for every request's work.
    pub fn cut_requests(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Whether [`ServerState::cut_requests`] was called.
    pub fn requests_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    /// Whether [`ServerState::start_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// The trust configuration as canonical JSON (sorted keys, no whitespace):
/// every authority with its public key, role, algorithm and validity, and
/// the policy. Its SHA-256 is the `config_digest` of `authorities_loaded`,
/// so an auditor can tell whether two loads were the same configuration.
fn trust_canonical(trust: &TrustStore) -> Vec<u8> {
    let authorities: Vec<serde_json::Value> = trust
        .authorities()
        .map(|a| {
            let jwk = match a.key() {
                AuthorityPublicKey::P256(k) => k.to_jwk(),
                AuthorityPublicKey::Ed25519(k) => k.to_jwk(),
            };
            let mut entry = serde_json::json!({
                "kid": a.kid(),
                "role": a.role(),
                "alg": a.alg().name(),
                "jwk": jwk,
                // To the nanosecond the authority enforces (whole seconds
                // print as before, so their digests are unchanged): a
                // reload moving a bound within a second is a trust change.
                "valid_from": crate::codec::format_time_exact(a.valid_from()),
                "valid_until": crate::codec::format_time_exact(a.valid_until()),
            });
            // Only when configured: a configuration without holders keeps
            // the digest it had before them.
            if a.holder() != a.kid() {
                entry["holder"] = a.holder().into();
            }
            entry
        })
        .collect();
    let (require, emergency) = policy_summary(trust);
    let value = serde_json::json!({
        "authorities": authorities,
        "policy": {"require": require, "emergency": emergency},
    });
    // serde_json's map is ordered (no preserve_order feature), so this is
    // canonical.
    value.to_string().into_bytes()
}

fn policy_summary(
    trust: &TrustStore,
) -> (
    std::collections::BTreeMap<String, u32>,
    Option<EmergencySummary>,
) {
    let rules = |rules: &[crate::warrant::trust::RoleRule]| {
        rules
            .iter()
            .map(|r| (r.role.clone(), u32::try_from(r.count).unwrap_or(u32::MAX)))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let policy = trust.policy();
    let emergency = policy.emergency.as_ref().map(|e| EmergencySummary {
        require: rules(&e.require),
        max_hours: e.max_hours,
    });
    (rules(&policy.require), emergency)
}

fn trust_digest(trust: &TrustStore) -> Digest {
    Digest::of_trust_config(&trust_canonical(trust))
}

fn authorities_loaded(trust: &TrustStore) -> Result<Event, crate::audit::leaf::LeafError> {
    let authorities = trust
        .authorities()
        .map(|a| AuthoritySummary {
            kid: a.kid().to_string(),
            role: a.role().to_string(),
            alg: a.alg().name().to_string(),
            holder: (a.holder() != a.kid()).then(|| a.holder().to_string()),
        })
        .collect();
    let (require, emergency) = policy_summary(trust);
    Ok(AuthoritiesLoaded::new(
        trust_digest(trust),
        authorities,
        PolicySummary { require, emergency },
    )?
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An authority's validity counts to the nanosecond in the trust
    /// digest, as the authority enforces it: a reload that moves
    /// `valid_until` within one second is a trust change (its own
    /// `authorities_loaded` leaf and fence). A whole-second bound prints as
    /// it did before, so existing digests stay.
    #[test]
    fn a_validity_moved_within_a_second_changes_the_trust_digest() {
        let jwk = serde_json::to_string(
            &crate::jwk::P256PrivateKey::generate()
                .unwrap()
                .public()
                .to_jwk(),
        )
        .unwrap();
        let trust = |until: &str| {
            TrustStore::from_toml(
                &format!(
                    "[[authorities]]\nkid = \"exec-1\"\nrole = \"executive\"\nalg = \"ES256\"\n\
                     jwk = '{jwk}'\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"{until}\"\n\
                     [policy]\n[[policy.require]]\nrole = \"executive\"\ncount = 1\n"
                ),
                Path::new("."),
            )
            .unwrap()
        };
        let whole = trust("2028-01-01T00:00:00Z");
        let late = trust("2028-01-01T00:00:00.9Z");
        let early = trust("2028-01-01T00:00:00.1Z");
        assert_ne!(trust_digest(&late), trust_digest(&early));
        assert_ne!(trust_digest(&whole), trust_digest(&early));
        assert_eq!(
            trust_digest(&whole),
            trust_digest(&trust("2028-01-01T00:00:00Z"))
        );
        let canonical = String::from_utf8(trust_canonical(&whole)).unwrap();
        assert!(
            canonical.contains("\"valid_until\":\"2028-01-01T00:00:00Z\""),
            "{canonical}"
        );
        let canonical = String::from_utf8(trust_canonical(&early)).unwrap();
        assert!(
            canonical.contains("\"valid_until\":\"2028-01-01T00:00:00.1Z\""),
            "{canonical}"
        );
    }

    /// A CA file replaced in place (a rotated Secret) is read only at
    /// start, so a reload names its table as needing a restart, as it does
    /// a changed path; an untouched file is no change.
    #[test]
    fn a_ca_file_replaced_in_place_needs_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lavd.toml");
        std::fs::write(
            &path,
            "[hsm]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"lavd\"\n\
             pin_file = \"pin\"\n[store]\n\
             url = \"postgresql://lavd@db.example:5432/lavd?sslmode=verify-full\"\n\
             password_file = \"dbpass\"\nca_file = \"ca.pem\"\n[audit]\norigin = \"o.test/a\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("pin"), "1234\n").unwrap();
        std::fs::write(dir.path().join("dbpass"), "s3cret\n").unwrap();
        let ca = |name: &str| {
            let ca = rcgen::generate_simple_self_signed(vec![name.into()]).unwrap();
            std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
        };
        let load = || {
            StartupSettings::of(&Settings::load(&path, &crate::config::ProcessEnv).expect("config"))
        };
        ca("db.example");
        let was = load();
        assert_eq!(load().restart_tables(&was), Vec::<&str>::new());
        ca("db2.example");
        assert_eq!(load().restart_tables(&was), vec!["store"]);
    }

    /// `[hsm] refused_pin_record` is read only at start: a reload that
    /// changes it names `[hsm]` as needing a restart, as configuration.md
    /// says of every `[hsm]` setting but the PIN.
    #[test]
    fn a_changed_refused_pin_record_needs_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lavd.toml");
        std::fs::write(dir.path().join("pin"), "1234\n").unwrap();
        let write = |record: &str| {
            std::fs::write(
                &path,
                format!(
                    "[hsm]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"lavd\"\n\
                     pin_file = \"pin\"\n{record}[store]\npath = \"lavd.db\"\n\
                     [audit]\norigin = \"o.test/a\"\n"
                ),
            )
            .unwrap();
        };
        let load = || {
            StartupSettings::of(&Settings::load(&path, &crate::config::ProcessEnv).expect("config"))
        };
        write("");
        let was = load();
        write("refused_pin_record = \"refused\"\n");
        assert_eq!(load().restart_tables(&was), vec!["hsm"]);
        let with = load();
        write("refused_pin_record = \"refused-2\"\n");
        assert_eq!(load().restart_tables(&with), vec!["hsm"]);
        write("refused_pin_record = \"refused\"\n");
        assert_eq!(load().restart_tables(&with), Vec::<&str>::new());
    }
}
