//! `lavd witness …`: a C2SP tlog-witness for an oversight body to run
//! beside (never inside) the log operator's infrastructure.
//!
//! - `serve`: config (a bad file exits 64) → logging → key (the HSM token,
//!   logged in, holding it) → state file → listeners (witness over TLS,
//!   admin plain HTTP) → `READY=1` → SIGTERM/SIGINT → `STOPPING=1`, finish
//!   in-flight requests within `server.shutdown_grace_secs` → exit 0.
//! - `keygen`: makes the witness's Ed25519 key on its token (sign only,
//!   non-extractable, as lavd's audit key) and prints its vkey.
//! - `vkey`: prints the vkey of the configured key, for log operators'
//!   `[[audit.witnesses]]` and verifiers' policies.

use super::outln;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;

use super::notify::Notifier;
use super::serve::{drain, Event, Reloads, Signals, ADMIN_CONNECTIONS};
use crate::api::{pipeline, server, Timeouts};
use crate::audit::witness::CosignerKey;
use crate::config::{ConfigError, ProcessEnv, WitnessKeySource, WitnessSettings};
use crate::hsm::Hsm;
use crate::witness::serve::{self as witness_serve, Signer, Witness};
use crate::witness::WitnessState;

/// The default config path of `lavd witness`.
pub const DEFAULT_WITNESS_CONFIG: &str = "/etc/lavd-witness/witness.toml";

/// `lavd witness` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum WitnessCommand {
    /// Run the witness: `POST /add-checkpoint` over TLS and the admin
    /// listener, until SIGTERM or SIGINT.
    Serve(WitnessConfigArg),
    /// Generate the witness's Ed25519 key in its HSM token and print its
    /// cosignature/v1 vkey.
    Keygen(WitnessConfigArg),
    /// Print the witness's cosignature/v1 vkey.
    Vkey(WitnessConfigArg),
}

/// `--config FILE` of `lavd witness`.
#[derive(Debug, Clone, clap::Args)]
pub struct WitnessConfigArg {
    /// The witness's config file.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_WITNESS_CONFIG)]
    pub config: PathBuf,
}

impl WitnessCommand {
    /// Runs the command.
    ///
    /// # Errors
    /// [`ConfigError`] (exit 64) for a bad config, key file or TLS file; an
    /// HSM, state or listen error otherwise.
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            WitnessCommand::Serve(args) => serve(&args.config),
            WitnessCommand::Keygen(args) => {
                super::init_logging(&crate::config::LogSettings::default());
                let settings = WitnessSettings::load(&args.config, &ProcessEnv)?;
                let WitnessKeySource::Hsm {
                    hsm,
                    label,
                    refused_pin_record,
                } = settings.key
                else {
                    return Err(ConfigError {
                        file: settings.file,
                        field: "key_file".into(),
                        reason: "keygen makes a key in the [hsm] token; a dev key file is made \
                                 by hand (32 random bytes, hex)"
                            .into(),
                    }
                    .into());
                };
                let hsm =
                    super::open_hsm_minding(refused_pin_record.as_deref(), || Hsm::open(hsm))?;
                let info = hsm
                    .generate_audit_key(&label)
                    .context("generating the witness key")?;
                // A new key is a new witness: its state starts here, empty.
                // `serve` never makes one (a lost state must not pass for a
                // new witness's).
                if !settings.state.exists() {
                    WitnessState::create(&settings.state)?;
                }
                outln!("{}", CosignerKey::new(&settings.name, info.public.bytes())?);
                Ok(())
            }
            WitnessCommand::Vkey(args) => {
                super::init_logging(&crate::config::LogSettings::default());
                let settings = WitnessSettings::load(&args.config, &ProcessEnv)?;
                let signer = signer(settings.key, &settings.file)?;
                outln!(
                    "{}",
                    CosignerKey::new(&settings.name, &signer.public_key()?)?
                );
                Ok(())
            }
        }
    }
}

/// Opens the key the config names, minding `[hsm] refused_pin_record`.
fn signer(key: WitnessKeySource, file: &Path) -> anyhow::Result<Signer> {
    match key {
        WitnessKeySource::Hsm {
            hsm,
            label,
            refused_pin_record,
        } => {
            let hsm = super::open_hsm_minding(refused_pin_record.as_deref(), || Hsm::open(hsm))?;
            let signer = Signer::Hsm { hsm, label };
            signer
                .public_key()
                .context("the witness key (run `lavd witness keygen` first)")?;
            Ok(signer)
        }
        WitnessKeySource::DevFile(path) => {
            let bad = |reason: String| ConfigError {
                file: file.to_path_buf(),
                field: "key_file".into(),
                reason,
            };
            let text = zeroize::Zeroizing::new(
                std::fs::read_to_string(&path)
                    .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?,
            );
            let mut seed = zeroize::Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(text.trim(), seed.as_mut_slice()).map_err(|_| {
                bad(format!(
                    "{} must hold a 32-byte Ed25519 seed in hex (64 characters)",
                    path.display()
                ))
            })?;
            let pair = aws_lc_rs::signature::Ed25519KeyPair::from_seed_unchecked(seed.as_slice())
                .map_err(|e| bad(format!("{}: not an Ed25519 seed: {e}", path.display())))?;
            Ok(Signer::Dev(pair))
        }
    }
}

fn serve(config: &Path) -> anyhow::Result<()> {
    let settings = WitnessSettings::load(config, &ProcessEnv)?;
    let tls = crate::api::tls::load_public(settings.require_tls()?, &settings.file)?;
    super::init_logging(&settings.log);
    super::warn_if_open_files_short(
        super::raise_open_files_limit(),
        settings.limits.max_connections + ADMIN_CONNECTIONS,
    );
    for warning in &settings.warnings {
        tracing::warn!("{warning}");
    }
    if matches!(settings.key, WitnessKeySource::DevFile(_)) {
        tracing::warn!("dev = true: the witness key is in a file; never run a witness like this");
    }
    let dev = matches!(settings.key, WitnessKeySource::DevFile(_));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lavd-witness")
        .max_blocking_threads(settings.server.blocking_threads)
        .build()
        .context("cannot start the async runtime")?;
    // As `lavd serve`: from before the HSM's login.
    let hangup = Signals::take_hangup(&runtime)?;
    let signer = signer(settings.key, &settings.file)?;
    let state = if settings.state.exists() {
        match WitnessState::open(&settings.state) {
            Ok(state) => state,
            Err(e) if e.not_a_state() => {
                return Err(ConfigError {
                    file: settings.file,
                    field: "state".into(),
                    reason: format!(
                        "{e} (docs/OPERATIONS.md §13): put back the file this witness last \
                         wrote, or move this one aside and make a new witness, with a new key \
                         label, with `lavd witness keygen`"
                    ),
                }
                .into())
            }
            Err(e) => return Err(e.into()),
        }
    } else if dev {
        tracing::warn!(state = %settings.state.display(), "dev = true: creating an empty witness state");
        WitnessState::create(&settings.state)?
    } else {
        return Err(ConfigError {
            file: settings.file,
            field: "state".into(),
            reason: format!(
                "{} does not exist: a witness started on an empty state would cosign, from \
                 size 0, a branch contradicting what it cosigned before (docs/OPERATIONS.md \
                 §13); put back the file this witness last wrote, or make a new witness, with a \
                 new key label, with `lavd witness keygen`: a backup older than its last \
                 cosignature is a rollback",
                settings.state.display()
            ),
        }
        .into());
    };
    let witness = Arc::new(Witness::new(
        &settings.name,
        signer,
        state,
        settings.logs,
        settings.limits.clone(),
    )?);
    tracing::info!(vkey = %witness.key(), "witness key");
    let result = runtime.block_on(run(
        witness,
        hangup,
        tls,
        &settings.server,
        &settings.admin,
        &settings.limits,
        Notifier::new(std::env::var("NOTIFY_SOCKET").ok()),
    ));
    // As `lavd serve`: blocking tasks still running (a readiness probe
    // inside a module that does not answer) are not waited for past this;
    // dropping the runtime would wait for them for ever.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}

async fn run(
    witness: Arc<Witness>,
    hangup: tokio::signal::unix::Signal,
    tls: Arc<rustls::ServerConfig>,
    server_settings: &crate::config::ServerSettings,
    admin_settings: &crate::config::AdminSettings,
    limits: &crate::config::Limits,
    notifier: Notifier,
) -> anyhow::Result<()> {
    let mut signals = Signals::with_hangup(hangup)?;
    let timeouts = Timeouts {
        handshake: limits.handshake_timeout,
        header_read: limits.header_read_timeout,
        idle: limits.idle_timeout,
    };
    let handler: server::PublicHandler = {
        let witness = witness.clone();
        Arc::new(move |req, remote, activity| {
            Box::pin(witness_serve::handle(
                witness.clone(),
                req,
                remote,
                activity,
            ))
        })
    };
    let listener = server::serve_public_tls(
        server_settings.listen,
        limits.max_connections,
        server::PeerBound {
            max: limits.max_connections_per_ip,
            refused: std::sync::Arc::new(|| {}),
        },
        timeouts,
        limits.max_header_bytes,
        tls,
        handler,
    )
    .await?;
    let admin = server::serve_plain(
        admin_settings.listen,
        ADMIN_CONNECTIONS,
        timeouts,
        pipeline::router(witness_serve::admin_routes(witness.clone())),
    )
    .await?;
    // `api=` and `admin=` as `lavd serve` writes them, for the same tools.
    let status = format!(
        "serving witness api={} admin={}",
        listener.local_addr(),
        admin.local_addr()
    );
    tracing::info!(api = %listener.local_addr(), admin = %admin.local_addr(), "serving");
    notifier.ready(&status);
    let name = loop {
        match signals.next().await {
            Event::Reload => reloads_nothing(),
            Event::Stop(name) => break name,
        }
    };
    tracing::info!(signal = name, "stopping");
    notifier.stopping(server_settings.shutdown_grace + super::notify::STOP_MARGIN);
    witness.start_draining();
    drain(
        listener,
        admin,
        server_settings.shutdown_grace,
        &mut signals,
        Reloads::default(),
        || async { reloads_nothing() },
        || {},
    )
    .await;
    Ok(())
}

/// What the witness does on SIGHUP.
fn reloads_nothing() {
    tracing::warn!("SIGHUP: the witness reloads nothing; restart it to apply a change");
}
