//! The `lavd` command line: one subcommand family per role that uses it
//! (operators: `serve`, `keys`; providers: `seal`; authorities: `warrant`;
//! agencies: `open`; auditors: `audit`; oversight bodies: `witness`).

pub mod audit;
pub mod https;
pub mod keys;
pub mod notify;
pub mod report;
pub mod seal;
pub mod serve;
pub mod store;
pub mod warrant;
pub mod witness;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::hsm::refused_pin::{Found, RefusedPinError, RefusedPinRecord};

/// Lawful Access Vault daemon and tools.
#[derive(Debug, Parser)]
#[command(name = "lavd", version, about, max_term_width = 100)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: the mutual-TLS API and the admin listener, until
    /// SIGTERM or SIGINT (SIGHUP reloads certificates, CRLs, roles,
    /// authorities, the policy and the HSM PIN; docs/configuration.md).
    Serve(serve::ServeArgs),
    /// A complete development daemon on its own SoftHSM token, with demo
    /// certificates, authorities and keys. Never for production.
    Dev(crate::dev::DevArgs),
    /// Escrow and audit key lifecycle (operators).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Seal a message key to an escrow key (providers): prints an envelope.
    Seal(seal::SealArgs),
    /// Open an unwrap reply with the agency's recipient key (agencies).
    Open(seal::OpenArgs),
    /// Export and verify the audit log (operators, auditors).
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Create, sign and inspect warrants (authorities).
    #[command(subcommand)]
    Warrant(warrant::WarrantCommand),
    /// Store schema management (operators).
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// A C2SP tlog-witness that cosigns the log's checkpoints (oversight
    /// bodies): `serve`, `keygen`, `vkey`.
    #[command(subcommand)]
    Witness(witness::WitnessCommand),
}

impl Command {
    /// Runs the command.
    ///
    /// # Errors
    /// Whatever the command reports; `main` turns a [`crate::config::ConfigError`]
    /// into exit code 64.
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            // The daemon sets up logging from its config file; the tools
            // log to stderr with the defaults.
            Command::Serve(args) => serve::run(args),
            Command::Dev(args) => args.run(),
            Command::Keys(cmd) => tool(|| cmd.run()),
            Command::Seal(args) => tool(|| args.run()),
            Command::Open(args) => tool(|| args.run()),
            Command::Warrant(cmd) => tool(|| cmd.run()),
            Command::Audit(cmd) => tool(|| cmd.run()),
            Command::Store(cmd) => tool(|| cmd.run()),
            // `witness serve` sets up logging from its config file.
            Command::Witness(cmd) => cmd.run(),
        }
    }
}

fn tool(run: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    init_logging(&crate::config::LogSettings::default());
    run()
}

/// Runs `lavd` with the process's arguments and environment: parse the command
/// line, set up logging, run the command. A bad configuration (the daemon's,
/// or a trust config given alone) exits with 64 (EX_USAGE); any other failure
/// with 1, after printing `lavd: <code>: <message>`.
pub fn main() -> std::process::ExitCode {
    use clap::Parser as _;
    // Before anything secret is read: no core dump, and no debugger or
    // `/proc/<pid>/mem` reader running as the same user, may see the HSM
    // PIN (kept to log in again), the database password, the TLS key or a
    // DEK in flight. systemd's `LimitCORE=0` covers only the unit, and a
    // `core_pattern` pipe ignores it; containers, `lavd dev` and a plain
    // shell had nothing.
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        eprintln!(
            "lavd: hardening_failed: cannot make the process non-dumpable (prctl \
             PR_SET_DUMPABLE): {e}"
        );
        return std::process::ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    let result = cli.command.run();
    // Every `Hsm` is dropped by now; its worker threads end once their
    // last job does. Exit only then, so that no PKCS#11 call runs beside
    // the module's exit-time destructors (`hsm::quiesce`).
    if !crate::hsm::quiesce(std::time::Duration::from_secs(5)) {
        eprintln!("lavd: hsm_call_running: an HSM call is still running at exit (the HSM does not answer)");
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let detail = e
                .downcast_ref::<crate::audit::export::VerifyError>()
                .map(audit::describe)
                .filter(|d| !d.is_empty())
                .map(|d| format!(" ({d})"))
                .unwrap_or_default();
            // Every error has a code: a script keys on it. `command_failed`
            // is what no more precise code names.
            let code = error_code(&e).unwrap_or("command_failed");
            // Escaped: the chain may quote untrusted text (an export's
            // origin, a leaf's member, a key set's kid), whose control or
            // bidirectional characters must not reach the terminal raw.
            let message = crate::codec::escape_for_terminal(chain_message(&e).trim_end());
            eprintln!("lavd: {code}: {message}{detail}");
            if is_bad_config(&e) {
                std::process::ExitCode::from(64)
            } else if is_refused_login(&e) {
                // EX_NOPERM. Not restarted by the shipped units: every try
                // spends one of the token's PIN attempts, and a few wrong
                // ones lock it (on a network HSM, for every tenant).
                std::process::ExitCode::from(77)
            } else if code == "usage" {
                // As clap's own usage errors.
                std::process::ExitCode::from(2)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit, as a
/// server that holds one descriptor a connection must: a container runtime
/// (containerd 2, Docker 25 and later) starts it at 1024, below the
/// default `max_connections` with the admin listener, the store, the HSM
/// and the files a reload reads beside it; the systemd unit sets
/// `LimitNOFILE` itself. Returns the soft limit now in force, `None` when
/// it is unbounded. A failure to raise it is a warning: the daemon serves
/// with what it has.
pub fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    match (limit.current, limit.maximum) {
        (Some(current), Some(maximum)) if current < maximum => {
            match setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(maximum),
                    maximum: Some(maximum),
                },
            ) {
                Ok(()) => {
                    tracing::info!(from = current, to = maximum, "raised the open files limit");
                    Some(maximum)
                }
                Err(e) => {
                    tracing::warn!(limit = current, error = %e, "cannot raise the open files limit");
                    Some(current)
                }
            }
        }
        (current, _) => current,
    }
}

/// Warns when `limit` open files (from [`raise_open_files_limit`]) cannot
/// hold `connections` connections and the descriptors beside them.
pub fn warn_if_open_files_short(limit: Option<u64>, connections: usize) {
    // The listeners, the store and the HSM, files a reload reads.
    const BESIDE: u64 = 256;
    let needed = u64::try_from(connections)
        .unwrap_or(u64::MAX)
        .saturating_add(BESIDE);
    if let Some(limit) = limit.filter(|l| *l < needed) {
        tracing::warn!(
            limit,
            needed,
            "the open files limit is below the connections allowed and what the daemon holds \
             beside them: accepts will fail with EMFILE before max_connections is reached; \
             raise LimitNOFILE (or the container's nofile ulimit), or lower max_connections"
        );
    }
}

/// Sets up logging to stderr: `LAVD_LOG` if set, else `log.level`, in
/// `log.format`. A second call does nothing.
pub fn init_logging(log: &crate::config::LogSettings) {
    let from_env = std::env::var("LAVD_LOG").ok();
    let (filter, env_error) = log_filter(&log.level, from_env.as_deref());
    // Colour only for a terminal: journald, files and log shippers get
    // plain text.
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter);
    // An error means a subscriber is already set (a test harness): keep it.
    let _ = match log.format {
        crate::config::LogFormat::Human => builder.try_init(),
        crate::config::LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    // Said, not silent: which filter is in force when the environment's
    // is not the file's.
    match (from_env, env_error) {
        (Some(value), Some(e)) => tracing::warn!(
            value = %crate::codec::escape_for_terminal(&value),
            error = %e,
            "LAVD_LOG is not a valid filter; log.level is in force"
        ),
        (Some(value), None) if value != log.level => tracing::info!(
            value = %crate::codec::escape_for_terminal(&value),
            "LAVD_LOG overrides log.level"
        ),
        _ => {}
    }
}

/// The log filter: `env` (`LAVD_LOG`) if it parses, else `level`
/// (`log.level`), else `info`; and why `env` did not parse. tokio-postgres
/// logs each statement with its parameters at debug (the audit leaves:
/// callers, warrant ids, revocation reasons), so under a default level of
/// debug or trace it is held at info, unless the filter names it.
fn log_filter(level: &str, env: Option<&str>) -> (tracing_subscriber::EnvFilter, Option<String>) {
    use tracing_subscriber::EnvFilter;
    let mut env_error = None;
    let (mut filter, spec) = match env.map(EnvFilter::try_new) {
        Some(Ok(filter)) => (filter, env.unwrap_or_default()),
        other => {
            if let Some(Err(e)) = other {
                env_error = Some(e.to_string());
            }
            (
                EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")),
                level,
            )
        }
    };
    // Only under a default level below info: at warn, info would raise it.
    let verbose_default = spec
        .split(',')
        .map(str::trim)
        .any(|d| !d.contains('=') && matches!(d.to_ascii_lowercase().as_str(), "debug" | "trace"));
    if verbose_default && !spec.contains("tokio_postgres") {
        if let Ok(directive) = "tokio_postgres=info".parse() {
            filter = filter.add_directive(directive);
        }
    }
    (filter, env_error)
}

/// A store that is not there (a volume not mounted, a mistyped path, a
/// database re-created) beside a token that holds escrow keys: a command
/// that makes its store (`lavd serve`, `lavd keys generate`) would make a
/// new, empty one, and the log begun in it would be signed under the same
/// origin and audit key as the log of the store that holds those keys: two
/// histories under one name, which witnesses and auditors take for a fork.
/// A first start, on a token with no escrow key yet, makes its store as
/// before.
///
/// # Errors
/// `store_missing` naming the store and the keys; the HSM's error if it
/// cannot say.
pub(crate) fn refuse_new_store_beside_keys(hsm: &crate::hsm::Hsm, why: &str) -> anyhow::Result<()> {
    let kids = hsm.escrow_kids_on_token()?;
    if kids.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = kids
        .iter()
        .take(5)
        .map(|k| crate::codec::escape_for_terminal(k))
        .collect();
    Err(Refused::new(
        "store_missing",
        format!(
            "the store: {why}, but the token holds {} escrow key(s) ({}{}) of a store: \
             a new one would begin a second audit log under the same origin and key, a fork. \
             Restore the store, or point [store] at it (docs/OPERATIONS.md §6)",
            kids.len(),
            shown.join(", "),
            if kids.len() > shown.len() {
                ", …"
            } else {
                ""
            }
        ),
    )
    .into())
}

/// The store `settings` name, which must exist (`store_missing` otherwise):
/// opening one that is not there would make it, empty, where every key
/// looks unrecorded and nothing is due, and its first checkpoint would make
/// it pass for the token's store. Only `lavd keys generate`, `lavd serve`
/// and `lavd store migrate --new` make a store.
///
/// # Errors
/// `store_missing`, or the store's error.
pub(crate) fn open_existing_store(
    settings: &crate::store::StoreSettings,
) -> anyhow::Result<crate::store::Store> {
    crate::store::probe_existing(settings)?.map_err(crate::keys::KeyError::StoreMissing)?;
    Ok(crate::store::Store::open_settings(settings)?)
}

/// Opens the HSM with `open` (which logs in), minding `[hsm]
/// refused_pin_record` (every command that logs in with a config that sets
/// it: the daemons, `lavd keys`, `lavd audit key` and `export`, `lavd
/// witness keygen` and `vkey`): no login as one the token refused when lavd
/// last tried it (nobody changed the PIN file, the module or the token
/// since), nor without a directory that can take a record; a refusal is
/// recorded, and a login that succeeds removes a record of the same module,
/// token and PIN file path (one of another is kept: it still stops the
/// login it names).
///
/// # Errors
/// [`RefusedPinError`] (exit 77 when refused earlier, else 1), or what
/// `open` returned (exit 77 for a refused PIN).
pub(crate) fn open_hsm_minding(
    record: Option<&RefusedPinRecord>,
    open: impl FnOnce() -> Result<crate::hsm::Hsm, crate::hsm::HsmError>,
) -> anyhow::Result<crate::hsm::Hsm> {
    let found = record.map(RefusedPinRecord::check).transpose()?;
    match open() {
        Ok(hsm) => {
            if let (Some(record), Some(Found::Other)) = (record, found) {
                // This PIN file works now: a record left would stop a
                // later start for nothing. Failing to remove it does not
                // stop this one.
                if let Err(e) = record.accepted() {
                    tracing::warn!("{e}");
                }
            }
            Ok(hsm)
        }
        Err(e) => {
            if let (Some(record), crate::hsm::HsmError::Login { ckr }) = (record, &e) {
                match record.refused(ckr) {
                    Ok(()) => tracing::warn!(
                        record = %record.record.display(),
                        pin_file = %record.login.pin_file().display(),
                        "recorded the refusal: no later start or command tries a login until the \
                         PIN file, the module or the token changes, or the record is removed"
                    ),
                    Err(w) => {
                        tracing::error!("{w}; the next start or command will try the PIN again");
                    }
                }
            }
            Err(e.into())
        }
    }
}

/// The token refused the PIN (`CKR_PIN_INCORRECT`, `CKR_PIN_LOCKED`, …):
/// exits 77.
fn is_refused_login(e: &anyhow::Error) -> bool {
    error_code(e) == Some("hsm_login_refused")
}

/// A configuration that cannot be used: the daemon's config file, or a trust
/// config given alone (`lavd warrant inspect --trust`). Both exit 64.
fn is_bad_config(e: &anyhow::Error) -> bool {
    e.downcast_ref::<crate::config::ConfigError>().is_some()
        || e.downcast_ref::<crate::warrant::TrustConfigError>()
            .is_some()
}

/// The most a command reads of a file it is given (a warrant, a key, an
/// unwrap request or reply): far above what any of them may hold, so that
/// each parser still names its own bound, and below what would exhaust
/// memory.
pub(crate) const MAX_INPUT_FILE_BYTES: u64 = 16 << 20;

/// Opens `file` for reading if it is a regular file: a FIFO's open would
/// wait for a writer for ever, and a device's read never end.
///
/// # Errors
/// Not a regular file, or unopenable.
pub(crate) fn open_regular(file: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags};
    // Refused before it is opened if it is no regular file (opening a
    // device can act: arm a watchdog, rewind a tape); then opened without
    // waiting (a FIFO's open waits for a writer) and without becoming a
    // terminal's controlling process, and checked again by what was
    // opened, so that a path swapped after the first check cannot block
    // or feed the read.
    anyhow::ensure!(std::fs::metadata(file)?.is_file(), "not a regular file");
    let opened = std::fs::File::from(rustix::fs::open(
        file,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?);
    anyhow::ensure!(opened.metadata()?.is_file(), "not a regular file");
    Ok(opened)
}

/// Reads `file` if it is a regular file of at most `limit` bytes: a path
/// naming `/dev/zero` would otherwise be read until memory ran out, and a
/// FIFO would block for ever. The bytes are left in the returned buffer: a
/// caller reading a secret wraps it in [`zeroize::Zeroizing`] (the warrant
/// and seal commands do).
///
/// # Errors
/// Not a regular file, unreadable, or larger than `limit`.
pub(crate) fn read_regular(file: &std::path::Path, limit: u64) -> anyhow::Result<Vec<u8>> {
    let mut opened = open_regular(file)?;
    let size = opened.metadata()?.len();
    let mut bytes = read_wiping(&mut opened, size, limit)?;
    anyhow::ensure!(
        bytes.len() as u64 <= limit,
        "larger than the {limit} bytes it can hold"
    );
    // Moved out whole; the empty buffer left is what is wiped.
    Ok(std::mem::take(&mut *bytes))
}

/// Reads `reader` to its end, at most `limit` + 1 bytes, leaving no copy
/// of what it read unwiped (a file may hold a key or a PIN): into a buffer
/// sized for `size` bytes (the file's length, which may be wrong), and when
/// that fills, into one twice as large, the old one wiped; never through a
/// stack buffer. On an error what was read is wiped.
///
/// # Errors
/// The failing read.
pub(crate) fn read_wiping(
    reader: &mut impl std::io::Read,
    size: u64,
    limit: u64,
) -> std::io::Result<zeroize::Zeroizing<Vec<u8>>> {
    // The first buffer no larger than 64 MiB, whatever the metadata says
    // (a sparse file of a terabyte would abort the allocation); it grows
    // from there as the bytes come.
    const FIRST_AT_MOST: usize = 64 << 20;
    let most = usize::try_from(limit.saturating_add(1)).unwrap_or(usize::MAX);
    let first = usize::try_from(size.saturating_add(1))
        .unwrap_or(usize::MAX)
        .min(most)
        .clamp(1, FIRST_AT_MOST);
    let mut buffer = zeroize::Zeroizing::new(vec![0u8; first]);
    let mut filled = 0;
    loop {
        if filled == buffer.len() {
            if filled == most {
                break;
            }
            let mut larger = zeroize::Zeroizing::new(vec![0u8; filled.saturating_mul(2).min(most)]);
            larger[..filled].copy_from_slice(&buffer[..filled]);
            buffer = larger;
        }
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buffer.truncate(filled);
    Ok(buffer)
}

/// A command's refusal that no library error carries, with its stable
/// code: a bad pair of arguments, an output that cannot be written, a
/// server reply without the member it must have.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    /// The stable code.
    pub code: &'static str,
    /// What was wrong, naming it.
    pub message: String,
}

impl Refused {
    /// A refusal with `code`.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Refused {
            code,
            message: message.into(),
        }
    }
}

/// A file a command was given that it could not read ([`read_input`]).
#[derive(Debug, thiserror::Error)]
#[error("{path}: {why}")]
pub struct UnreadableInput {
    path: String,
    why: String,
}

/// [`read_regular`] of a file a command was given, up to
/// [`MAX_INPUT_FILE_BYTES`]; refused as `input_unreadable`.
///
/// # Errors
/// [`UnreadableInput`].
pub(crate) fn read_input(path: &std::path::Path) -> Result<Vec<u8>, UnreadableInput> {
    read_input_within(path, MAX_INPUT_FILE_BYTES)
}

/// [`read_input`] with a bound of the caller's (an export's, which grows
/// with `--max-entries`).
///
/// # Errors
/// [`UnreadableInput`].
pub(crate) fn read_input_within(
    path: &std::path::Path,
    limit: u64,
) -> Result<Vec<u8>, UnreadableInput> {
    read_regular(path, limit).map_err(|e| UnreadableInput {
        path: path.display().to_string(),
        why: format!("{e:#}"),
    })
}

/// `e` and its causes, outermost first, joined by ": " as anyhow's `{:#}`
/// does, but without a cause that the message before it already ends with:
/// several errors quote their source in their own message ("warrant store
/// unavailable: {0}", for the daemon's logs and replies, which print one
/// message) and also name it as their source, which `{:#}` printed twice.
pub(crate) fn chain_message(e: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        // Whole, after a separator: a short cause that merely equals the
        // message's last characters is still said.
        if text.is_empty() || message == text || message.ends_with(&format!(": {text}")) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

/// The stable code of a command's error, for scripts that read stderr.
pub fn error_code(e: &anyhow::Error) -> Option<&'static str> {
    if is_bad_config(e) {
        return Some("bad_config");
    }
    if let Some(k) = e.downcast_ref::<crate::keys::KeyError>() {
        return Some(k.code());
    }
    if let Some(v) = e.downcast_ref::<crate::audit::export::VerifyError>() {
        return Some(v.code());
    }
    if let Some(h) = e.downcast_ref::<https::HttpsError>() {
        return Some(h.code());
    }
    if let Some(w) = e.downcast_ref::<crate::audit::witness::WitnessError>() {
        return Some(w.code());
    }
    if let Some(l) = e.downcast_ref::<crate::audit::log::LogError>() {
        return Some(l.code());
    }
    if let Some(n) = e.downcast_ref::<warrant::NotAccepted>() {
        return Some(n.code);
    }
    if let Some(w) = e.downcast_ref::<crate::warrant::WarrantError>() {
        return Some(w.code());
    }
    if let Some(r) = e.downcast_ref::<RefusedPinError>() {
        return Some(r.code());
    }
    if let Some(h) = e.downcast_ref::<crate::hsm::HsmError>() {
        return Some(h.code());
    }
    if let Some(s) = e.downcast_ref::<crate::store::StoreError>() {
        return Some(match s {
            // Not the store failing: it refused, and says why.
            crate::store::StoreError::CopyRefused(_) => "store_copy_refused",
            crate::store::StoreError::InUse { .. } => "store_in_use",
            crate::store::StoreError::Moved { .. } => "store_moved",
            _ => "store_unavailable",
        });
    }
    if let Some(s) = e.downcast_ref::<crate::api::ServeError>() {
        return Some(s.code());
    }
    if let Some(n) = e.downcast_ref::<crate::audit::note::NoteError>() {
        return Some(n.code());
    }
    if let Some(t) = e.downcast_ref::<crate::audit::tiles::TileError>() {
        return Some(t.code());
    }
    // A tile read while the root is computed (the right edge's partial
    // tiles): the tile's own code, which the tree error wraps.
    if let Some(t) =
        e.downcast_ref::<crate::audit::merkle::TreeError<crate::audit::tiles::TileError>>()
    {
        return Some(match t {
            crate::audit::merkle::TreeError::Reader(tile) => tile.code(),
            other => other.code(),
        });
    }
    if let Some(t) = e.downcast_ref::<crate::audit::tiles::TilePathError>() {
        return Some(t.code());
    }
    if let Some(p) = e.downcast_ref::<crate::audit::merkle::ProofError>() {
        return Some(p.code());
    }
    if let Some(l) = e.downcast_ref::<crate::audit::leaf::LeafError>() {
        return Some(l.code());
    }
    if let Some(s) = e.downcast_ref::<crate::warrant::SignError>() {
        return Some(s.code());
    }
    if let Some(r) = e.downcast_ref::<crate::envelope::reply::ReplyError>() {
        return Some(r.code());
    }
    if e.downcast_ref::<UnreadableInput>().is_some() {
        return Some("input_unreadable");
    }
    if let Some(r) = e.downcast_ref::<Refused>() {
        return Some(r.code);
    }
    if let Some(r) = e.downcast_ref::<crate::envelope::EnvelopeError>() {
        return Some(r.code());
    }
    None
}

/// Writes a command's output to stdout, flushed. A closed stdout (`lavd …
/// | head -1`) is an error, `output_closed`, not the panic `println!`
/// makes of it; any other failure (a full disk) is `output_unwritable`.
///
/// # Errors
/// [`output_error`] when stdout cannot take it.
pub fn write_out(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_fmt(args)
        .and_then(|()| stdout.flush())
        .map_err(output_error)
}

/// Writing stdout failed: `output_closed` for a closed pipe, else
/// `output_unwritable`.
pub fn output_error(e: std::io::Error) -> anyhow::Error {
    let code = if e.kind() == std::io::ErrorKind::BrokenPipe {
        "output_closed"
    } else {
        "output_unwritable"
    };
    Refused::new(code, format!("writing to stdout: {e}")).into()
}

/// `result`, with an I/O error that reached it bare (a `writeln!` to
/// stdout, with `?`) as [`output_error`]. Errors reading inputs carry
/// their file's context and are left as they are.
pub fn stdout_errors(result: anyhow::Result<()>) -> anyhow::Result<()> {
    result.map_err(|e| match e.downcast::<std::io::Error>() {
        Ok(io) => output_error(io),
        Err(other) => other,
    })
}

/// `print!` through [`write_out`], returning its error.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))?
    };
}

/// `println!` through [`write_out`], returning its error.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*)))?
    };
}
pub(crate) use {out, outln};

/// `--config FILE`, shared by every subcommand that touches the HSM or store.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// The daemon's config file.
    #[arg(long, value_name = "FILE", default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
}

impl ConfigArg {
    /// Loads and validates the config from the process environment.
    ///
    /// # Errors
    /// [`crate::config::ConfigError`].
    pub fn load(&self) -> Result<crate::config::Settings, crate::config::ConfigError> {
        let settings = crate::config::Settings::load(&self.config, &crate::config::ProcessEnv)?;
        for warning in &settings.warnings {
            tracing::warn!("{warning}");
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {

    /// A file read whole whatever length its metadata gave (a procfs-like
    /// 0, a file that grew), through larger buffers; at most the limit and
    /// one byte more, so the caller can refuse it.
    #[test]
    fn read_wiping_reads_whole_files_within_their_limit() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for size in [0, 1, 999, 1000, 5000] {
            let got = super::read_wiping(&mut std::io::Cursor::new(&data), size, 4096).unwrap();
            assert_eq!(&got[..], &data[..], "size {size}");
        }
        let got = super::read_wiping(&mut std::io::Cursor::new(&data), 0, 10).unwrap();
        assert_eq!(&got[..], &data[..11]);
        let got = super::read_wiping(&mut std::io::Cursor::new(&[] as &[u8]), 0, 10).unwrap();
        assert!(got.is_empty());
    }

    /// A read interrupted by a signal is tried again, short reads are
    /// joined, and any other error ends the read with that error.
    #[test]
    fn read_wiping_retries_interrupted_reads_and_stops_at_other_errors() {
        struct Flaky<'a> {
            data: &'a [u8],
            calls: usize,
            fail_at: Option<usize>,
        }
        impl std::io::Read for Flaky<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                self.calls += 1;
                if self.fail_at == Some(self.calls) {
                    return Err(std::io::Error::other("the device went away"));
                }
                if self.calls % 2 == 1 {
                    return Err(std::io::ErrorKind::Interrupted.into());
                }
                let n = out.len().min(self.data.len()).min(3);
                out[..n].copy_from_slice(&self.data[..n]);
                self.data = &self.data[n..];
                Ok(n)
            }
        }
        let data: Vec<u8> = (0..100u8).collect();
        let mut reader = Flaky {
            data: &data,
            calls: 0,
            fail_at: None,
        };
        let got = super::read_wiping(&mut reader, 1, 4096).unwrap();
        assert_eq!(&got[..], &data[..]);
        assert!(reader.calls > 60, "{} reads", reader.calls);
        let mut reader = Flaky {
            data: &data,
            calls: 0,
            fail_at: Some(9),
        };
        let e = super::read_wiping(&mut reader, 100, 4096).unwrap_err();
        assert_eq!(e.to_string(), "the device went away");
    }

    /// tokio-postgres is held at info under a debug filter, from the file
    /// or the environment, unless the filter names it; an environment
    /// filter that does not parse leaves the file's, and is said.
    #[test]
    fn the_log_filter_holds_tokio_postgres_at_info() {
        let shown = |level: &str, env: Option<&str>| {
            let (filter, error) = super::log_filter(level, env);
            (filter.to_string(), error.is_some())
        };
        let (filter, error) = shown("debug", None);
        assert!(filter.contains("tokio_postgres=info"), "{filter}");
        assert!(!error);
        let (filter, _) = shown("info", Some("debug"));
        assert!(filter.contains("tokio_postgres=info"), "{filter}");
        let (filter, _) = shown("info", Some("debug,tokio_postgres=debug"));
        assert!(filter.contains("tokio_postgres=debug"), "{filter}");
        assert!(!filter.contains("tokio_postgres=info"), "{filter}");
        let (filter, error) = shown("warn", Some("lavd=[bad"));
        assert!(error, "{filter}");
        assert!(filter.contains("warn"), "{filter}");
        // A quieter default is not raised for it.
        let (filter, _) = shown("lavd=debug,warn", None);
        assert!(!filter.contains("tokio_postgres"), "{filter}");
    }
    use super::*;

    /// A PIN the token refused is `hsm_login_refused` (exit 77) however it
    /// reaches the command's end: bare, through a key command, through the
    /// audit log (a session opened again mid-command), or as the record of
    /// an earlier refusal; another HSM error is `hsm_unavailable`.
    #[test]
    fn a_refused_pin_is_exit_77_through_every_wrapper() {
        let login = || crate::hsm::HsmError::Login {
            ckr: "CKR_PIN_INCORRECT".into(),
        };
        let held = || crate::hsm::HsmError::LoginHeld {
            ckr: "CKR_PIN_INCORRECT".into(),
        };
        for e in [
            anyhow::Error::from(login()),
            anyhow::Error::from(crate::keys::KeyError::Hsm(login())).context("destroying"),
            anyhow::Error::from(crate::audit::log::LogError::Hsm(login())),
            anyhow::Error::from(held()),
            anyhow::Error::from(crate::keys::KeyError::Hsm(held())),
            anyhow::Error::from(crate::audit::log::LogError::Hsm(held())),
        ] {
            assert_eq!(error_code(&e), Some("hsm_login_refused"), "{e:#}");
            assert!(is_refused_login(&e), "{e:#}");
        }
        let other = anyhow::Error::from(crate::keys::KeyError::Hsm(crate::hsm::HsmError::Wrapper(
            "gone".into(),
        )));
        assert_eq!(error_code(&other), Some("hsm_unavailable"));
        assert!(!is_refused_login(&other));
    }

    /// A hash tile of the wrong length met while the root is computed keeps
    /// the tile's code through the tree error and the context, and the
    /// error line names it once, though the tree error's message quotes it.
    #[test]
    fn a_tile_refused_under_the_tree_error_keeps_its_code_and_is_said_once() {
        let tile = crate::audit::tiles::TileError::HashTileLength {
            path: "tile/0/001.p/4".into(),
            width: 4,
            got: 127,
        };
        let e = anyhow::Error::from(crate::audit::merkle::TreeError::Reader(tile))
            .context("the hash tiles");
        assert_eq!(error_code(&e), Some("tile_length_mismatch"));
        assert_eq!(
            chain_message(&e),
            "the hash tiles: reading a stored subtree hash: tile/0/001.p/4: 127 bytes, \
             a tile 4 wide has 128 bytes"
        );
        // A cause its outer message does not end with is still said, and
        // so is one that ends it only as part of a word.
        let plain = anyhow::anyhow!("no such file").context("reading x");
        assert_eq!(chain_message(&plain), "reading x: no such file");
        let tail = anyhow::anyhow!("0").context("reading block 10");
        assert_eq!(chain_message(&tail), "reading block 10: 0");
    }
}
