//! `lavd serve`: the daemon's life, in order. Config (a bad file exits 64
//! before anything starts) → logging → build (TLS material and roles, the
//! store, the HSM with its login) → serve (API and admin listeners, then
//! `READY=1`) → wait for a signal (SIGHUP reloads on a thread of its own,
//! SIGTERM/SIGINT stop) →
//! drain (stop accepting, finish in-flight requests within
//! `server.shutdown_grace_secs`, a second signal cuts it short) → exit 0.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::notify::Notifier;
use super::ConfigArg;
use crate::api::admin::{self, Readiness};
use crate::api::pipeline::{self, Access, Api};
use crate::api::ratelimit::RateLimiter;
use crate::api::state::StartupSettings;
use crate::api::{routes, server, Reloadable, ServerState, Timeouts};
use crate::audit::log::AuditLog;
use crate::audit::witnessing::Witnessing;
use crate::config::{Env, ProcessEnv, Settings};
use crate::hsm::Hsm;
use crate::metrics::Metrics;
use crate::store::Store;

/// One `lavd serve` per SQLite store: an exclusive `flock` on the
/// database file itself, which the kernel releases when the process ends,
/// however it ends (a crash leaves no stale lock). Taken on the file, not
/// on a name, so that two configurations reaching one file by different
/// paths (a symlink, a bind mount) meet the same lock; on Linux `flock` and
/// SQLite's own (POSIX record) locks do not interact. A second daemon on
/// the file would take the first one's open intents in flight for those of
/// a crashed run and log them again, and its per-process budget
/// reservations would not see the first one's. `lavd store copy` takes it
/// too: a copy made beside a serving daemon would miss what the daemon
/// commits after its snapshot (spends, revocations, destructions), and
/// the PostgreSQL store would carry on without them. Other commands do
/// not: they work beside a serving daemon, as SQLite lets them.
///
/// The descriptor is never closed: closing any descriptor of a file drops
/// every POSIX lock the process holds on it, SQLite's included, and
/// connections may outlive `run` (blocking tasks still running at the
/// runtime's shutdown). The kernel closes it at exit.
///
/// Takes this lock on the SQLite store at `store` (creating the file, empty and
/// 0600, if it does not exist), without waiting, for the rest of the
/// process.
///
/// # Errors
/// [`crate::store::StoreError::InUse`] when another process holds it;
/// [`crate::store::StoreError::Unavailable`] for a name SQLite would
/// not read as a file (`:memory:`, a `file:` URI), or a file that
/// cannot be opened or locked.
pub(super) fn lock_sqlite_store(store: &std::path::Path) -> Result<(), crate::store::StoreError> {
    use rustix::fs::{flock, FlockOperation};
    let unavailable = |reason: String| crate::store::StoreError::Unavailable {
        store: store.display().to_string(),
        reason,
    };
    if !crate::store::names_a_file(store) {
        return Err(unavailable(
            "lavd serve needs a file path for its SQLite store (not `:memory:` or a \
                 `file:` URI)"
                .into(),
        ));
    }
    crate::store::create_private(store)
        .map_err(|e| unavailable(format!("cannot create the store file: {e}")))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .open(store)
        .map_err(|e| unavailable(format!("cannot open it to lock it: {e}")))?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {
            std::mem::forget(file);
            Ok(())
        }
        Err(rustix::io::Errno::WOULDBLOCK) => Err(crate::store::StoreError::InUse {
            store: store.display().to_string(),
        }),
        Err(e) => Err(unavailable(format!("cannot lock it: {e}"))),
    }
}

/// Connections the admin listener serves at once (probes and scrapes).
pub(super) const ADMIN_CONNECTIONS: usize = 64;
/// How long the admin listener may take to close after the API drained.
const ADMIN_GRACE: Duration = Duration::from_secs(1);

/// `lavd serve` arguments.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Runs the daemon until SIGTERM or SIGINT.
///
/// # Errors
/// [`crate::config::ConfigError`] (exit 64) for a bad config or TLS file;
/// an HSM, store or listen error otherwise.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let env: Arc<dyn Env> = Arc::new(ProcessEnv);
    let settings = Settings::load(&args.config.config, env.as_ref())?;
    // Logging first: building the TLS material may warn (a stale CRL).
    super::init_logging(&settings.log);
    // Every connection the listeners may hold: the API's, the public log's
    // and the admin listener's.
    super::warn_if_open_files_short(
        super::raise_open_files_limit(),
        settings.limits.max_connections
            + settings
                .audit
                .public
                .as_ref()
                .map_or(0, |p| p.max_connections)
            + ADMIN_CONNECTIONS,
    );
    let live = Reloadable::build(
        &settings,
        &settings.limits,
        crate::api::state::FIRST_GENERATION,
        None,
    )?;
    live.tls.log_crls();
    for warning in &settings.warnings {
        tracing::warn!("{warning}");
    }

    let metrics = Arc::new(Metrics::new().context("metrics")?);
    let startup = StartupSettings::of(&settings);
    let blocking_threads = startup.server.blocking_threads;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lavd")
        .max_blocking_threads(blocking_threads)
        .build()
        .context("cannot start the async runtime")?;
    // SIGHUP's default action ends the process: a certificate renewal's
    // `kill -HUP` during a slow start (a migration, the HSM's login) would
    // kill it, and its restart log in again. Taken from here; one that
    // arrives before serving is a reload once serving. (SIGTERM and SIGINT
    // keep their default until then: a start that hangs can be stopped.)
    let hangup = Signals::take_hangup(&runtime)?;
    let trust = settings.require_trust()?.clone();
    let open_hsm = |config| {
        super::open_hsm_minding(settings.refused_pin_record.as_ref(), || {
            Hsm::open_with_observer(config, metrics.clone())
        })
    };
    let open_store = || -> anyhow::Result<Arc<Store>> {
        // The lock before the store is opened (migrated, its orphaned
        // intents written); held until the process ends.
        if let crate::store::StoreSettings::Sqlite { path } = &settings.store {
            lock_sqlite_store(path)?;
        }
        let store = Store::open_settings(&settings.store)?;
        // Whatever an earlier start committed on the primary only (a
        // migration whose wait for the synchronous standbys was cancelled)
        // is replicated before this one serves on it: a barrier (PostgreSQL
        // with standbys named; nothing otherwise). Cancelled itself, the
        // start fails (`CommitUnknown`).
        {
            use crate::store::AuditStore as _;
            let (_, server) = store.tree_size_on()?;
            store.replicated(&server)?;
        }
        Ok(Arc::new(store))
    };
    // The store looked at before anything could create it: one that is not
    // there is made only beside a token without escrow keys, so the HSM is
    // asked first then.
    // A store without a leaf is new too, however it got its schema (a
    // refused `lavd store copy` migrated its target).
    let (hsm, store) = match crate::store::probe_log_begun(&settings.store)?.err() {
        Some(why) => {
            let hsm = open_hsm(settings.hsm)?;
            // The audit key first: a token whose objects cannot be seen
            // (or a start that would fail on it) makes no store.
            // As `AuditLog::new` reports it: `no_audit_key`.
            hsm.audit_key(&settings.audit.key_label)
                .map_err(crate::audit::log::LogError::Hsm)
                .context("the audit log (run `lavd keys generate-audit` first)")?;
            super::refuse_new_store_beside_keys(&hsm, &why)?;
            (hsm, open_store()?)
        }
        None => {
            let store = open_store()?;
            (open_hsm(settings.hsm)?, store)
        }
    };
    let audit = AuditLog::new(
        store.clone(),
        hsm.clone(),
        &settings.audit.key_label,
        &settings.audit.origin,
    )
    .context("the audit log (run `lavd keys generate-audit` first)")?;
    // A log's origin is fixed at its first checkpoint: a changed
    // `audit.origin` is the configuration's error, not the log's.
    if let Some(stored) = audit.origin_changed()? {
        return Err(crate::config::ConfigError {
            file: args.config.config.clone(),
            field: "audit.origin".into(),
            reason: format!(
                "the log's checkpoints are signed under the origin {stored:?}, and a log's \
                 origin is fixed at its first checkpoint (it is part of every signature); \
                 set audit.origin = {stored:?}"
            ),
        }
        .into());
    }
    // A store that does not extend its newest checkpoint (truncated or
    // rewritten while the daemon was stopped) is refused before serving.
    if let Some(reason) = audit.inconsistency() {
        return Err(crate::audit::log::LogError::Inconsistent(reason.to_string()).into());
    }
    let audit = audit.with_commit_timer({
        let metrics = metrics.clone();
        Arc::new(move |seconds| metrics.store_commit("audit_append", seconds))
    });
    let witnessing = settings.audit.witnesses.clone().map(|w| {
        Arc::new(Witnessing::new(
            w,
            store.clone() as Arc<dyn crate::store::AuditStore>,
            Some(metrics.clone()),
        ))
    });
    let audit = match &witnessing {
        Some(w) => {
            let w = w.clone();
            audit.with_signed_hook(Arc::new(move |size| w.signed(size)))
        }
        None => audit,
    };
    let state = Arc::new(
        ServerState::new(startup, live, env, hsm, store, audit, metrics)
            .with_witnessing(witnessing),
    );
    // The first leaf of every run: which authorities and policy are trusted.
    // At the start a checkpoint that cannot be signed fails it too, as
    // before: the HSM cannot serve.
    // Both kept typed under their context, so that the exit line carries
    // the code (`store_unavailable`, `hsm_unavailable`).
    if let Some(e) = state
        .log_authorities_loaded(&trust)
        .context("cannot write the audit log")?
    {
        return Err(anyhow::Error::new(e).context("cannot sign the audit log's checkpoint"));
    }
    // HSM opens of a process that stopped before their audit commit (a
    // crash): their intents become `open_interrupted` leaves before anything
    // else opens. On PostgreSQL only those past their lease, and a thread
    // looks again while serving (other replicas may stop meanwhile).
    let interrupted = state
        .audit
        .write_orphaned_intents()
        // Kept typed under the context, so that the exit line carries its
        // code (`store_unavailable`, `hsm_unavailable`).
        .context("cannot write the leaves of interrupted HSM opens")?;
    if interrupted > 0 {
        tracing::warn!(
            leaves = interrupted,
            "logged HSM opens that a previous run began but never committed (open_interrupted)"
        );
    }
    // Started once serving, so that every return before it leaves no
    // thread behind.
    let sweep_every = match &settings.store {
        crate::store::StoreSettings::Postgres(pg) => {
            Some((pg.reservation_lease / 4).clamp(Duration::from_secs(1), Duration::from_secs(30)))
        }
        crate::store::StoreSettings::Sqlite { .. } => None,
    };

    let result = runtime.block_on(serve(
        state.clone(),
        Notifier::new(std::env::var("NOTIFY_SOCKET").ok()),
        sweep_every,
        hangup,
    ));
    // Blocking tasks still running (a readiness probe inside a module that
    // does not answer) are not waited for past this.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    // The store's last handle is dropped here, outside the runtime: a
    // PostgreSQL client closes its connection on a runtime of its own,
    // which cannot start inside another (every stop on PostgreSQL
    // panicked, exit 101, until this).
    drop(state);
    result
}

/// How often the daemon counts the escrow keys past their retention
/// (`lavd_escrow_keys_past_retention`).
const RETENTION_WATCH_EVERY: Duration = Duration::from_secs(60);

/// Counts, now and every [`RETENTION_WATCH_EVERY`], the escrow keys whose
/// `destroy_after` has passed and that the store does not say destroyed,
/// for `lavd_escrow_keys_past_retention`: a retention job that does not
/// run, or fails, shows there, where an alert can see it. A row that
/// cannot be read, or a store that cannot say, sets it to -1.
async fn watch_retention(state: Arc<ServerState>) {
    let mut tick = tokio::time::interval(RETENTION_WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let store = state.store.clone();
        let counted = tokio::task::spawn_blocking(move || {
            crate::keys::due_for_destruction(store.as_ref(), time::OffsetDateTime::now_utc())
        })
        .await;
        let keys = match counted {
            Ok(Ok(due)) if due.unreadable.is_empty() => Some(due.keys.len()),
            Ok(Ok(due)) => {
                tracing::warn!(
                    rows = due.unreadable.len(),
                    "escrow key rows cannot be read: cannot count the keys past their retention"
                );
                None
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot count the escrow keys past their retention");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "the count of escrow keys past their retention failed");
                None
            }
        };
        state.metrics.escrow_keys_past_retention(keys);
    }
}

/// Reloads the configuration (SIGHUP) and logs the outcome; `Err` names
/// the field that failed it.
///
/// Reading files, building TLS and, for a trust change, writing and
/// fsyncing its audit leaf and signing a checkpoint in the HSM all block: a
/// thread of its own does it, not the blocking pool, where unwraps waiting
/// at the envelope gate could hold every thread (a new CRL must not wait
/// for the clients it revokes). Its callers run one at a time, in signal
/// order; a stop signal does not wait for it, the drain does (unless a
/// second signal says not to).
async fn reload(state: &Arc<ServerState>) -> Result<(), String> {
    let reloading = state.clone();
    let (done, result) = tokio::sync::oneshot::channel();
    let started = std::thread::Builder::new()
        .name("lavd-reload".into())
        .spawn(move || {
            let _ = done.send(reloading.reload());
        });
    let failed = |why: String| {
        Err(crate::config::ConfigError {
            file: state.config_file().to_path_buf(),
            field: "reload".into(),
            reason: why,
        })
    };
    let reloaded = match started {
        Ok(_) => result.await.unwrap_or_else(|_| {
            // `reload` counts its own outcomes; not this one.
            state.metrics.config_reload(false);
            failed("the reload panicked (see the line above)".into())
        }),
        Err(e) => {
            state.metrics.config_reload(false);
            failed(format!("cannot start the reload's thread: {e}"))
        }
    };
    match reloaded {
        Ok(outcome) => {
            tracing::info!(generation = outcome.generation, "configuration reloaded");
            if !outcome.needs_restart.is_empty() {
                tracing::warn!(
                    tables = ?outcome.needs_restart,
                    "these tables changed but apply only after a restart"
                );
            }
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "reload failed; still serving the previous configuration");
            Err(e.field)
        }
    }
}

async fn serve(
    state: Arc<ServerState>,
    notifier: Notifier,
    sweep_every: Option<Duration>,
    hangup: Signal,
) -> anyhow::Result<()> {
    // Signal handlers first, so that a signal sent right after READY=1 is
    // never lost (SIGHUP's since the start).
    let mut signals = Signals::with_hangup(hangup)?;
    let startup = state.startup();
    if let Some(witnessing) = &state.witnessing {
        witnessing.spawn_submitters()?;
    }
    let timeouts = Timeouts {
        handshake: state.limits.handshake_timeout,
        header_read: state.limits.header_read_timeout,
        idle: state.limits.idle_timeout,
    };
    let api = Arc::new(Api {
        state: state.clone(),
        router: pipeline::router(routes::routes(state.clone())),
        access: Access::Mutual,
    });
    let api = server::serve_api(
        api,
        startup.server.listen,
        state.limits.max_connections,
        state.limits.max_connections_per_ip,
    )
    .await?;
    let public = match &startup.audit.public {
        None => None,
        Some(p) => {
            let api = Arc::new(Api {
                state: state.clone(),
                router: pipeline::router(routes::public_routes(state.clone())),
                access: Access::Public(RateLimiter::new(
                    p.rate_limit_per_second,
                    p.rate_limit_burst,
                )),
            });
            Some(
                server::serve_api(api, p.listen, p.max_connections, p.max_connections_per_ip)
                    .await?,
            )
        }
    };
    let readiness = Arc::new(Readiness::new(state.clone()));
    let admin = server::serve_plain(
        startup.admin.listen,
        ADMIN_CONNECTIONS,
        timeouts,
        pipeline::router(admin::routes(readiness)),
    )
    .await?;
    let public_addr = public.as_ref().map(|l| l.local_addr().to_string());
    let status = format!(
        "serving api={} admin={}{}",
        api.local_addr(),
        admin.local_addr(),
        public_addr
            .as_deref()
            .map(|a| format!(" public_log={a}"))
            .unwrap_or_default()
    );
    tracing::info!(api = %api.local_addr(), admin = %admin.local_addr(), public_log = public_addr.as_deref(), "serving");
    // Stopped with the deferred writer at the end of this function (the
    // last `?` is above).
    if let Some(every) = sweep_every {
        state
            .audit
            .start_intent_sweeper(every)
            .context("cannot start the orphaned intents' sweeper")?;
    }
    notifier.ready(&status);
    let retention_watch = tokio::spawn(watch_retention(state.clone()));

    // A reload runs as a task while this loop goes on reading signals: a
    // stop signal sent during a slow reload (a checkpoint signature, a
    // store that went away: up to `RELOG_WITHIN`) starts the drain at
    // once, the reload still running (the drain waits for it unless a
    // second signal says not to). A SIGHUP during a reload queues one
    // more, started when it ends: it reads every change made before that
    // SIGHUP (more than one queued coalesce, as signals do).
    let start_reload = || {
        notifier.reloading();
        let state = state.clone();
        tokio::spawn(async move { reload(&state).await })
    };
    let mut reloading: Option<tokio::task::JoinHandle<Result<(), String>>> = None;
    let mut queued = false;
    loop {
        tokio::select! {
            event = signals.next() => match event {
                Event::Reload if reloading.is_some() => queued = true,
                Event::Reload => reloading = Some(start_reload()),
                Event::Stop(name) => {
                    tracing::info!(signal = name, "stopping");
                    break;
                }
            },
            reloaded = async {
                match reloading.as_mut() {
                    Some(running) => running.await,
                    // Not polled: the branch is off while nothing runs.
                    None => std::future::pending().await,
                }
            }, if reloading.is_some() => {
                reloading = None;
                // What `systemctl status` shows until the next reload.
                match reloaded {
                    Ok(Ok(())) => notifier.ready(&status),
                    Ok(Err(field)) => notifier.ready(&format!(
                        "{status}; the last reload failed ({field}), the previous \
                         configuration is in force"
                    )),
                    Err(e) => {
                        tracing::error!(error = %e, "the reload's task ended without an outcome");
                        notifier.ready(&format!(
                            "{status}; the last reload ended without an outcome, the \
                             previous configuration may be in force"
                        ));
                    }
                }
                if std::mem::take(&mut queued) {
                    reloading = Some(start_reload());
                }
            }
        }
    }

    // The drain's grace, then the HSM calls of the requests it cut (each
    // bounded by the call timeout), then the rest.
    notifier.stopping(
        startup.server.shutdown_grace + state.hsm.call_timeout() + super::notify::STOP_MARGIN,
    );
    retention_watch.abort();
    state.start_draining();
    // The public log listener has nothing to drain that matters: tiles
    // can be fetched again.
    if let Some(public) = public {
        public.shutdown(std::future::ready(())).await;
    }
    let cutting = state.clone();
    drain(
        api,
        admin,
        startup.server.shutdown_grace,
        &mut signals,
        Reloads {
            running: reloading.map(|running| {
                tokio::spawn(async move {
                    let _ = running.await;
                })
            }),
            queued,
        },
        || {
            let state = state.clone();
            async move {
                let _ = reload(&state).await;
            }
        },
        move || cutting.cut_requests(),
    )
    .await;
    // Requests whose connections the drain cut (its grace ran out, or a
    // second signal came) may still run on the blocking pool: an unwrap
    // among them may have opened in the HSM, and its leaves (or, should its
    // commit fail, its deferred leaves) are written before the deferred
    // writer stops and the runtime with its blocking pool is shut down.
    // Queued requests (at the envelope gate) start nothing since the drain
    // ended (`cut_requests`). A further signal stops the wait: what still
    // runs is then logged from its open intents, by the next start (SQLite)
    // or a replica once their lease has run out (PostgreSQL).
    let waiting = tokio::task::spawn_blocking(|| {
        routes::wait_for_request_work(Duration::from_secs(5), |running, waited| {
            tracing::warn!(
                running,
                waited_secs = waited.as_secs(),
                "stopping: waiting for requests' HSM and store work that has not returned"
            );
        });
    });
    tokio::select! {
        _ = waiting => {}
        name = signals.next_stop() => {
            tracing::error!(
                signal = name,
                "another signal: not waiting for requests' work any longer; HSM opens still \
                 running are logged from their open intents, as open_interrupted, by the next \
                 start (SQLite) or by a replica once their lease has run out (PostgreSQL)"
            );
        }
    }
    // A last chance for leaves still waiting for the store.
    // Then the writer ends, and with it its handle on the HSM.
    let audit = state.audit.clone();
    let lost = tokio::task::spawn_blocking(move || {
        let lost = audit.flush_deferred(Duration::from_secs(5));
        audit.stop_deferred();
        lost
    })
    .await
    .unwrap_or_else(|_| state.audit.deferred_leaves());
    if lost > 0 {
        tracing::error!(
            leaves = lost,
            "stopping with leaves not yet written: HSM opens whose requests' audit commits \
             failed (nothing of them was released), which the store has not taken since; \
             their open intents stay in the store, and the next start (SQLite) or a replica \
             once their lease has run out (PostgreSQL) logs them as open_interrupted \
             (docs/audit.md)"
        );
    }
    Ok(())
}

/// Stops accepting and lets in-flight requests finish within `grace` (a
/// second signal cuts it short), then closes the admin listener. `cut` runs
/// when the grace ends, just before the connections still open are cut
/// (not when every request finished in time).
pub(super) async fn drain<R>(
    api: server::Listener,
    admin: server::Listener,
    grace: Duration,
    signals: &mut Signals,
    before: Reloads,
    on_reload: impl Fn() -> R,
    cut: impl FnOnce(),
) where
    R: std::future::Future<Output = ()> + Send + 'static,
{
    tracing::info!(grace_secs = grace.as_secs(), "draining in-flight requests");
    // Set when a stop signal says not to wait: a reload still queued then
    // does not start (one already running cannot be stopped).
    let given_up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Reloads run as tasks, each after the one before (one at a time, in
    // signal order), and the newest is kept here: the drain's deadline
    // future is dropped as soon as the last connection closes, and must not
    // take a reload with it.
    let queue = |previous: Option<tokio::task::JoinHandle<()>>| {
        let next = on_reload();
        let given_up = given_up.clone();
        tokio::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            if given_up.load(std::sync::atomic::Ordering::SeqCst) {
                tracing::warn!("stopping: a queued reload is not started");
            } else {
                next.await;
            }
        })
    };
    // The reload running when the stop signal came, and one queued behind
    // it, go on as reloads started while draining do.
    let mut reloading = before.running;
    if before.queued {
        reloading = Some(queue(reloading.take()));
    }
    let mut cut_short = false;
    let drained = api
        .shutdown(async {
            let over = tokio::time::sleep(grace);
            tokio::pin!(over);
            loop {
                tokio::select! {
                    () = &mut over => break,
                    event = signals.next() => match event {
                        Event::Stop(name) => {
                            tracing::warn!(signal = name, "second signal: not waiting any longer");
                            cut_short = true;
                            given_up.store(true, std::sync::atomic::Ordering::SeqCst);
                            break;
                        }
                        // Requests still in flight are decided under the
                        // newest configuration (a CRL, a role withdrawn):
                        // a reload still applies while they drain.
                        Event::Reload => reloading = Some(queue(reloading.take())),
                    },
                }
            }
            cut();
        })
        .await;
    if drained.aborted > 0 {
        tracing::warn!(
            aborted = drained.aborted,
            "grace period over; closed connections with requests still in flight"
        );
    }
    // A reload in progress is waited for (its leaf written, its outcome
    // logged), unless a signal said not to wait any longer, or says so now.
    if let Some(pending) = reloading.filter(|r| !r.is_finished()) {
        if cut_short {
            tracing::warn!("not waiting for the reload in progress");
        } else {
            tracing::info!("drained; waiting for the reload in progress");
            tokio::select! {
                _ = pending => {}
                name = signals.next_stop() => {
                    given_up.store(true, std::sync::atomic::Ordering::SeqCst);
                    tracing::warn!(signal = name, "not waiting for the reload in progress");
                }
            }
        }
    }
    admin.shutdown(tokio::time::sleep(ADMIN_GRACE)).await;
    tracing::info!("stopped");
}

/// The reloads a daemon had under way when a stop signal came.
#[derive(Default)]
pub(super) struct Reloads {
    /// The one running.
    pub running: Option<tokio::task::JoinHandle<()>>,
    /// Whether a SIGHUP came while it ran (one more reload is owed).
    pub queued: bool,
}

/// What a signal asks for.
pub(super) enum Event {
    /// SIGHUP.
    Reload,
    /// SIGTERM or SIGINT, by name.
    Stop(&'static str),
}

/// The signals a daemon handles, installed before it reports ready.
pub(super) struct Signals {
    hangup: Signal,
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    /// SIGHUP's handler alone, installed as early as a daemon can (before
    /// a slow start: a migration, the HSM's login), so that a certificate
    /// renewal's `kill -HUP` then does not end the process, its default
    /// action. One that arrives before serving is seen once serving.
    pub(super) fn take_hangup(runtime: &tokio::runtime::Runtime) -> anyhow::Result<Signal> {
        let _entered = runtime.enter();
        signal(SignalKind::hangup()).context("cannot handle SIGHUP")
    }

    /// With SIGHUP's handler installed earlier.
    pub(super) fn with_hangup(hangup: Signal) -> anyhow::Result<Self> {
        let install = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("cannot handle {name}"))
        };
        Ok(Signals {
            hangup,
            terminate: install(SignalKind::terminate(), "SIGTERM")?,
            interrupt: install(SignalKind::interrupt(), "SIGINT")?,
        })
    }

    pub(super) async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.hangup.recv() => Event::Reload,
            _ = self.terminate.recv() => Event::Stop("SIGTERM"),
            _ = self.interrupt.recv() => Event::Stop("SIGINT"),
        }
    }

    /// The name of the next SIGTERM or SIGINT (SIGHUP is ignored: after
    /// the drain no request is admitted or decided any more).
    pub(super) async fn next_stop(&mut self) -> &'static str {
        loop {
            if let Event::Stop(name) = self.next().await {
                return name;
            }
        }
    }
}
