//! Test harness for lavd against real SoftHSM 2 tokens.
//!
//! Each test process gets its own SoftHSM token directory (SoftHSM reads
//! `SOFTHSM2_CONF` once per process) with a pool of freshly initialised
//! tokens; each test claims its own token, so tests in one process never share
//! keys. The `lavd` CLI runs as a real child process with the same
//! `SOFTHSM2_CONF`, and the test process can inspect the token directly with
//! cryptoki (another application on the same token, as an auditor would be).

pub mod crash;
pub mod dev;
pub mod faults;
pub mod load;
pub mod pg;
pub mod pg_cluster;
pub mod pg_standby;
pub mod replicas;
pub mod server;
pub mod vault;
pub mod witness;
pub mod witnessed;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

/// Tokens created per test process.
const TOKENS: usize = 12;
/// The user PIN of every test token.
pub const PIN: &str = "1234";
const SO_PIN: &str = "5678";

/// The SoftHSM module: `TEST_PKCS11_MODULE` if set (as in rust-cryptoki's
/// tests), else Debian's path. A missing module fails the test with a message
/// naming the package; it never skips.
pub fn module_path() -> PathBuf {
    if let Ok(p) = std::env::var("TEST_PKCS11_MODULE") {
        return PathBuf::from(p);
    }
    for p in [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    ] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    panic!("SoftHSM 2 not found: apt-get install softhsm2, or set TEST_PKCS11_MODULE");
}

/// The latency and fault module (`pkcs11-shim/`), built by `build.rs`: a
/// PKCS#11 module that forwards every call to SoftHSM, optionally after a
/// delay, or fails calls on demand. See [`Shim`].
pub fn shim_module_path() -> PathBuf {
    PathBuf::from(env!("LAVD_PKCS11_SHIM"))
}

/// The settings file of the fault module for one test daemon. Rewriting it
/// changes the module's behaviour in the running `lavd` within a few
/// milliseconds (it re-reads the file when it changes).
#[derive(Debug)]
pub struct Shim {
    path: PathBuf,
    stats: PathBuf,
}

impl Shim {
    /// A settings file in `token`'s working directory, forwarding to SoftHSM
    /// with no delay and no fault.
    pub fn new(token: &TestToken) -> Self {
        Self::named(token, "shim")
    }

    /// As [`Shim::new`], with its own settings and stats files
    /// (`<name>.conf`, `<name>.stats`): for a second process on the same
    /// token whose calls are held or faulted apart from the first's.
    pub fn named(token: &TestToken, name: &str) -> Self {
        let shim = Shim {
            path: token.path(&format!("{name}.conf")),
            stats: token.path(&format!("{name}.stats")),
        };
        shim.set("");
        shim
    }

    /// `[hsm]` for `lavd.toml` loading the module, to pass to
    /// [`TestToken::write_config_with_module`].
    pub fn hsm_env(&self) -> String {
        format!(
            "[hsm.env]\nLAVD_SHIM_CONFIG = {:?}\n",
            self.path.display().to_string()
        )
    }

    /// Replaces the settings with `settings` (lines such as `latency_us = 1000`
    /// or `fault = device_error`); the forwarded module and the stats file
    /// are always set. Returns once every call the module starts from then
    /// on sees them: it looks at the file at most every 5 ms, by a clock
    /// (`CLOCK_MONOTONIC_COARSE`) that may lag a few milliseconds.
    pub fn set(&self, settings: &str) {
        self.write(settings).expect("shim settings");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    fn write(&self, settings: &str) -> std::io::Result<()> {
        let text = format!(
            "module = {}\nstats = {}\n{settings}\n",
            module_path().display(),
            self.stats.display()
        );
        // Write then rename, so that the module never reads half a file.
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Removes the settings file, as when a test's directory is removed.
    pub fn remove(&self) {
        std::fs::remove_file(&self.path).expect("remove the shim settings");
    }

    /// Clears the settings (every held call is released) when dropped:
    /// hold one inside a `std::thread::scope` whose threads wait on calls
    /// the module holds, before anything that can panic, so that a failed
    /// assert releases them and the scope can end.
    pub fn releasing(&self) -> ShimRelease<'_> {
        ShimRelease(self)
    }

    /// Forgets the stats: [`Self::faults`] is 0 until a process of the
    /// module next writes them. Each process writes its own counts to the
    /// one file, so a test with several processes that waits for a fault
    /// of one of them resets first.
    pub fn reset_stats(&self) {
        match std::fs::remove_file(&self.stats) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("{}: {e}", self.stats.display()),
        }
    }

    /// How many faults the module has injected since it was loaded, PIN
    /// refusals included (0 before the first).
    pub fn faults(&self) -> u64 {
        self.stat("faults")
    }

    /// Waits, at most 10 s, until the module has injected `n` faults since
    /// it was loaded (a `hang` counts when it holds a call).
    pub fn wait_for_faults(&self, n: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.faults() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{} faults, waited for {n}",
                self.faults()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// How many settings files the module has refused since it was loaded
    /// (0 before the first): while the newest one is refused, every call
    /// through the module fails with `CKR_GENERAL_ERROR`.
    pub fn refused(&self) -> u64 {
        self.stat("refused")
    }

    fn stat(&self, name: &str) -> u64 {
        let Ok(text) = std::fs::read_to_string(&self.stats) else {
            return 0;
        };
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} line in the shim's stats:\n{text}"))
    }
}

/// The process-wide SoftHSM setup.
pub struct Harness {
    dir: tempfile::TempDir,
    conf: PathBuf,
    pkcs11: Pkcs11,
    next: AtomicUsize,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness").field("conf", &self.conf).finish()
    }
}

/// The harness of this test process, created on first use.
pub fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        watchdog();
        let dir = tempfile::tempdir().expect("temp dir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).expect("token dir");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("softhsm2.conf");
        // Tokens must exist before this process initialises SoftHSM: it does
        // not see tokens created later. `lavd` is the label the sample config
        // in hsm-config/ uses.
        let labels = (0..TOKENS)
            .map(|i| format!("t{i}"))
            .chain(["lavd".to_string()]);
        for label in labels {
            let out = Command::new("softhsm2-util")
                .env("SOFTHSM2_CONF", &conf)
                .args(["--init-token", "--free", "--label"])
                .arg(label)
                .args(["--pin", PIN, "--so-pin", SO_PIN])
                .output()
                .unwrap_or_else(|e| {
                    panic!("softhsm2-util ({e}): run .ci/setup, which installs SoftHSM 2")
                });
            assert!(out.status.success(), "softhsm2-util: {out:?}");
        }
        // Before any PKCS#11 call in this process: SoftHSM reads it once.
        std::env::set_var("SOFTHSM2_CONF", &conf);
        let pkcs11 = Pkcs11::new(module_path()).expect("load SoftHSM");
        pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .expect("C_Initialize");
        Harness {
            dir,
            conf,
            pkcs11,
            next: AtomicUsize::new(0),
        }
    })
}

impl Harness {
    /// The `SOFTHSM2_CONF` of this process.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The PKCS#11 context the test itself uses to inspect tokens.
    pub fn pkcs11(&self) -> &Pkcs11 {
        &self.pkcs11
    }
}

/// One token claimed by one test, with a working directory holding its
/// `lavd.toml`, PIN file and SQLite store.
#[derive(Debug)]
pub struct TestToken {
    /// The token's label.
    pub label: String,
    /// The test's working directory.
    pub work: tempfile::TempDir,
}

impl TestToken {
    /// Claims a fresh token and writes a `lavd.toml` for it.
    pub fn new() -> Self {
        let h = harness();
        let n = h.next.fetch_add(1, Ordering::SeqCst);
        assert!(
            n < TOKENS,
            "more than {TOKENS} tokens claimed in one test process"
        );
        let work = tempfile::tempdir_in(h.dir.path()).expect("work dir");
        let token = TestToken {
            label: format!("t{n}"),
            work,
        };
        std::fs::write(token.path("pin"), format!("{PIN}\n")).expect("pin file");
        restrict(&token.path("pin"));
        token.write_config("");
        token
    }

    /// A path inside the working directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// The SoftHSM directory of this token: the one whose `token.object`
    /// holds its label (32 bytes, space-padded). Moving it away is what a
    /// network HSM losing its partition looks like from PKCS#11.
    pub fn token_dir(&self) -> PathBuf {
        let tokens = self
            .work
            .path()
            .parent()
            .expect("harness dir")
            .join("tokens");
        let mut label = self.label.as_bytes().to_vec();
        label.resize(32, b' ');
        let found: Vec<PathBuf> = std::fs::read_dir(&tokens)
            .expect("token dir")
            .map(|d| d.expect("dir entry").path())
            .filter(|d| {
                std::fs::read(d.join("token.object"))
                    .map(|o| o.windows(32).any(|w| w == label.as_slice()))
                    .unwrap_or(false)
            })
            .collect();
        assert_eq!(
            found.len(),
            1,
            "token directories for {}: {found:?}",
            self.label
        );
        found.into_iter().next().expect("one")
    }

    /// The config file.
    pub fn config(&self) -> PathBuf {
        self.path("lavd.toml")
    }

    /// Writes `lavd.toml` for this token, with `extra` appended.
    pub fn write_config(&self, extra: &str) {
        self.write_config_with_module(&module_path(), extra);
    }

    /// Writes `lavd.toml` for this token loading the PKCS#11 `module`
    /// (SoftHSM itself, or the fault module of [`Shim`]), with `extra`
    /// appended.
    pub fn write_config_with_module(&self, module: &Path, extra: &str) {
        self.write_config_with(module, 2, extra);
    }

    /// Writes `lavd.toml` for this token loading `module` with a pool of
    /// `sessions` HSM sessions, with `extra` appended.
    pub fn write_config_with(&self, module: &Path, sessions: usize, extra: &str) {
        self.write_config_hsm(module, sessions, "", extra);
    }

    /// As [`TestToken::write_config_with`], with `hsm` (lines such as
    /// `call_timeout_ms = 1000`) added to `[hsm]`.
    pub fn write_config_hsm(&self, module: &Path, sessions: usize, hsm: &str, extra: &str) {
        let text = format!(
            "[hsm]\nmodule = {:?}\ntoken_label = {:?}\npin_file = \"pin\"\nsessions = {sessions}\n{hsm}\n\
             [store]\npath = \"lavd.db\"\n{extra}",
            module.display().to_string(),
            self.label
        );
        std::fs::write(self.config(), text).expect("lavd.toml");
    }

    /// Runs the real `lavd` binary with this process's `SOFTHSM2_CONF`.
    pub fn lavd(&self, args: &[&str]) -> Output {
        output_within(&mut lavd_command(args), CLI_LIMIT)
    }

    /// `lavd` with `--config` for this token appended to `args`.
    pub fn lavd_with_config(&self, args: &[&str]) -> Output {
        let config = self.config();
        let mut all: Vec<&str> = args.to_vec();
        all.push("--config");
        all.push(config.to_str().expect("utf-8 path"));
        self.lavd(&all)
    }

    /// The slot holding this token.
    ///
    /// Looked up again for up to two seconds: this process's SoftHSM
    /// re-reads a token's files when another process (a `lavd` command of
    /// the test) changed them, and under load a lookup right then has been
    /// seen to miss the token once in a few runs. SoftHSM re-reads only
    /// when the token's files changed again, so a read that failed midway
    /// can leave this process's view of the token failing for good (seen
    /// once in CI, 2026-12-07, all 50 lookups of a second failing): halfway,
    /// another process logs in to the token once ([`Self::touch`]), which
    /// rewrites its file, and the next lookup reads it afresh.
    pub fn slot(&self) -> Slot {
        let p = harness().pkcs11();
        let mut errors = Vec::new();
        for attempt in 0..100 {
            if attempt == 50 {
                let _ = self.touch();
            }
            let found = p
                .get_slots_with_token()
                .expect("slots")
                .into_iter()
                .find(|s| match p.get_token_info(*s) {
                    Ok(i) => i.label().trim_end() == self.label,
                    Err(e) => {
                        errors.push(format!("{s:?}: {e}"));
                        false
                    }
                });
            if let Some(slot) = found {
                return slot;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!(
            "token {} not present; C_GetTokenInfo errors: {errors:?}",
            self.label
        )
    }

    /// Logs in to this token from another process (OpenSC's
    /// `pkcs11-tool`, listing its data objects): SoftHSM saves the token's
    /// flags at each login, which rewrites the token's own file, and this
    /// process's SoftHSM then reads it afresh at its next lookup. It writes
    /// no object: making or deleting one also moves the token's
    /// generation, after which SoftHSM can hold a token it read badly as
    /// invalid for good. Best effort: a failure is printed (and `false`
    /// returned), and the lookup goes on.
    pub fn touch(&self) -> bool {
        let Some(slot) = self.pkcs11_tool_slot() else {
            return false;
        };
        let out = Command::new("pkcs11-tool")
            .arg("--module")
            .arg(module_path())
            .args(["--slot", &slot, "--login", "--pin", PIN])
            .args(["--list-objects", "--type", "data"])
            .output();
        match out {
            Ok(o) if o.status.success() => true,
            other => {
                eprintln!("pkcs11-tool --login on token {}: {other:?}", self.label);
                false
            }
        }
    }

    /// The slot id (`0x…`) of this token as another process sees it
    /// (`pkcs11-tool -L`), matched on the whole label: `pkcs11-tool
    /// --token-label` takes the first token whose label begins with the one
    /// given, and `t1` would find `t10` (helper-187's review).
    fn pkcs11_tool_slot(&self) -> Option<String> {
        let out = Command::new("pkcs11-tool")
            .arg("--module")
            .arg(module_path())
            .arg("-L")
            .output()
            .ok()?;
        let listing = String::from_utf8_lossy(&out.stdout);
        let mut slot = None;
        for line in listing.lines() {
            // "Slot 3 (0x5a1e...): SoftHSM slot ID 0x5a1e..."
            if let Some(rest) = line.strip_prefix("Slot ") {
                slot = rest
                    .split_once('(')
                    .and_then(|(_, r)| r.split_once(')'))
                    .map(|(id, _)| id.to_owned());
            } else if let Some(label) = line.trim_start().strip_prefix("token label") {
                let label = label.trim_start().strip_prefix(':').map(str::trim);
                if label == Some(self.label.as_str()) {
                    return slot;
                }
            }
        }
        None
    }

    /// The labels of the private keys on this token, read by another
    /// process (OpenSC's `pkcs11-tool`), which loads SoftHSM afresh: this
    /// process's view of a token that `lavd` commands keep changing has
    /// been seen to stick failing in CI ([`Self::slot`]), and a test that
    /// only asks what the token holds need not depend on it.
    ///
    /// # Panics
    /// When `pkcs11-tool` fails.
    pub fn private_key_labels(&self) -> Vec<String> {
        let slot = self
            .pkcs11_tool_slot()
            .unwrap_or_else(|| panic!("pkcs11-tool -L lists no token labelled {}", self.label));
        let out = Command::new("pkcs11-tool")
            .arg("--module")
            .arg(module_path())
            .args(["--slot", &slot, "--login", "--pin", PIN])
            .args(["--list-objects", "--type", "privkey"])
            .output()
            .expect("run pkcs11-tool");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "pkcs11-tool --list-objects on token {}: {:?}\n{stdout}{}",
            self.label,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // Each object is a "Private Key Object; EC" line followed by
        // indented "  label:      ..." and other lines.
        stdout
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("label:"))
            .map(|l| l.trim().to_owned())
            .collect()
    }

    /// Whether the token holds escrow key `kid`'s private half (labelled
    /// `lav-escrow:{kid}`), asked of another process
    /// ([`Self::private_key_labels`]).
    ///
    /// # Panics
    /// When `pkcs11-tool` fails, or two private keys carry the label.
    pub fn holds_escrow_key(&self, kid: &str) -> bool {
        let label = format!("lav-escrow:{kid}");
        let found = self
            .private_key_labels()
            .iter()
            .filter(|l| **l == label)
            .count();
        assert!(found <= 1, "{found} private keys labelled {label}");
        found == 1
    }

    /// A new logged-in session of the test's own (not lavd's).
    pub fn session(&self) -> Session {
        let session = harness()
            .pkcs11()
            .open_rw_session(self.slot())
            .expect("open session");
        match session.login(UserType::User, Some(&AuthPin::new(PIN.into()))) {
            Ok(()) => {}
            Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::UserAlreadyLoggedIn,
                _,
            )) => {}
            Err(e) => panic!("login: {e}"),
        }
        session
    }

    /// Validated settings for using this token in-process through lavd.
    pub fn settings(&self) -> lavd::config::Settings {
        lavd::config::Settings::load(&self.config(), &lavd::config::ProcessEnv)
            .expect("test config is valid")
    }

    /// Marks escrow key `kid` destroyed in the SQLite store by hand, with no
    /// `key_destroyed` leaf (what an edit of the store, not a destruction,
    /// leaves). Returns the rows changed.
    pub fn mark_destroyed_by_hand(&self, kid: &str) -> usize {
        rusqlite::Connection::open(self.path("lavd.db"))
            .expect("open the store")
            .execute(
                "UPDATE escrow_keys SET destroyed_at = '2026-12-10T00:00:00Z', \
                 destroy_reason = 'forced: by hand' WHERE kid = ?1",
                [kid],
            )
            .expect("mark the key destroyed")
    }

    /// The first step of `lavd keys destroy` on escrow key `kid`, as lavd
    /// commits it (the store's mark and its `key_destroyed` leaf, forced,
    /// in one transaction), without the second (the token): a destruction
    /// interrupted between the two.
    pub fn interrupt_destruction(&self, kid: &str) {
        use lavd::store::AuditStore as _;
        let store = lavd::store::Store::open_settings(&self.settings().store).expect("store");
        let now = time::OffsetDateTime::now_utc();
        let leaf = lavd::audit::leaf::KeyDestroyed::new(kid, "forced", true, None)
            .expect("key_destroyed leaf");
        store
            .append(lavd::store::AuditAppend {
                events: vec![leaf.into()],
                time: now,
                spend: lavd::store::Spend::DestroyKey {
                    kid: kid.to_string(),
                    at: now,
                    reason: "forced: interrupted".into(),
                },
            })
            .expect("the destruction's first step");
    }
}

/// `chmod 600`, as an operator would do for a PIN file.
pub fn restrict(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

impl Default for TestToken {
    fn default() -> Self {
        Self::new()
    }
}

/// The `lavd-under-test` binary. Cargo builds a package's binaries before its
/// integration tests and puts them next to the `deps/` folder that holds the
/// test executables.
///
/// `LAVD_BINARY`, when set, names another binary that runs
/// [`lavd::cli::main`] (the benchmark, which is not an integration test,
/// runs itself).
pub fn lavd_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("LAVD_BINARY") {
        return PathBuf::from(bin);
    }
    package_binary("lavd-under-test")
}

/// One of this package's binaries (`lavd-under-test`, `audit-writer`,
/// `load-client`), built by Cargo before the integration tests, next to
/// the `deps/` folder that holds the test executables.
pub fn package_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.is_file(), "{} not built", bin.display());
    bin
}

/// The Python of the interop venv (`target/interop-venv`, made by
/// `.ci/setup --tests` with jwcrypto, pyhpke, rfc8785 and cryptography). A
/// missing venv, or one made before a package was added, fails the test with
/// what to run; it never skips.
pub fn interop_python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/interop-venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run .ci/setup --tests (it makes the venv with jwcrypto, pyhpke, rfc8785 \
         and cryptography)",
        python.display()
    );
    // The same imports `.ci/setup` checks before it (re)makes the venv.
    let imports = Command::new(&python)
        .args(["-c", "import jwcrypto, cryptography, yaml, pyhpke, rfc8785"])
        .output()
        .expect("run the interop venv's python");
    assert!(
        imports.status.success(),
        "{} lacks a package: run .ci/setup --tests\n{}",
        python.display(),
        String::from_utf8_lossy(&imports.stderr)
    );
    python
}

/// With `LAVD_TEST_BINARY_LIMIT_SECS` set (`.ci/test` sets 900: the
/// longest test binary takes about a minute), aborts the process once it
/// has run that long, saying so: a hang becomes a failure that names its
/// test binary, instead of CI's own limit (90 minutes for the whole run)
/// ending it with nothing said about where. Unset elsewhere, where the
/// long load runs of docs/RELIABILITY.md take longer.
fn watchdog() {
    let Some(limit) = std::env::var("LAVD_TEST_BINARY_LIMIT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
    else {
        return;
    };
    let started = std::env::args().next().unwrap_or_default();
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("{started}: still running after {limit:?}: a test hangs; aborting");
        std::process::abort();
    });
}

/// The longest a test waits for one `lavd` command ([`output_within`]).
pub const CLI_LIMIT: Duration = Duration::from_secs(180);

/// Runs `command` as [`Command::output`] does (stdin empty, stdout and
/// stderr captured), but kills it and fails the test if it has not exited
/// within `limit`: a command held by the fault module, or waiting on a
/// store that never answers, fails its test instead of hanging CI.
///
/// # Panics
/// When it cannot start, or does not exit within `limit`.
pub fn output_within(command: &mut Command, limit: Duration) -> Output {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut all = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut all);
            }
            all
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = std::time::Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for a child") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not exit within {limit:?}; killed");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Kills `child` with SIGKILL if this is still held `limit` from now: for
/// a test that reads a child's output line by line (which blocks for as
/// long as the child neither writes nor exits), so that a child that stalls
/// ends the read and fails the test instead of hanging it. Drop it before
/// reaping the child (`kill`, `wait`).
pub fn kill_after(child: &std::process::Child, limit: Duration) -> KillAfter {
    let pid = rustix::process::Pid::from_child(child);
    let (cancel, cancelled) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = cancelled.recv_timeout(limit) {
            eprintln!("child {pid:?} still running after {limit:?}: killed");
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    });
    KillAfter(cancel)
}

/// See [`kill_after`]; dropping it cancels the kill.
pub struct KillAfter(#[allow(dead_code)] std::sync::mpsc::Sender<()>);

/// A `lavd` command (the real binary) with this process's `SOFTHSM2_CONF`,
/// logging at `warn` (`LAVD_LOG`), unless [`LOG_AS_CONFIGURED`] is set in
/// this process's environment: then at its config's level (`info` by
/// default), as a deployed daemon logs (the benchmark sets it).
pub fn lavd_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(lavd_binary());
    cmd.env("SOFTHSM2_CONF", harness().conf());
    if std::env::var_os(LOG_AS_CONFIGURED).is_none() {
        cmd.env("LAVD_LOG", "warn");
    }
    cmd.args(args);
    cmd
}

/// See [`lavd_command`].
pub const LOG_AS_CONFIGURED: &str = "LAVD_HARNESS_LOG_AS_CONFIGURED";

/// Asserts a command failed with `code` on stderr (`lavd: <code>: …`) and
/// returns stderr.
pub fn assert_fails_with(out: &Output, exit: i32, code: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(exit), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!("lavd: {code}: ")),
        "expected code {code}, stderr: {stderr}"
    );
    stderr
}

/// Asserts that `path`, and everything under it if it is a directory, is
/// its owner's alone (no group or other permission bit): what holds the
/// log's leaves. Meaningful only under a umask that lets such bits through
/// (022): the callers set it.
pub fn assert_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::symlink_metadata(path).expect("stat");
    assert_eq!(
        meta.permissions().mode() & 0o077,
        0,
        "{} is {:o}: others may read it",
        path.display(),
        meta.permissions().mode() & 0o777
    );
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).expect("read_dir") {
            assert_private(&entry.expect("entry").path());
        }
    }
}

/// Asserts success and returns stdout.
pub fn assert_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

/// Polls `f` until it holds, for at most `within` (every hundredth of it,
/// 5 to 100 ms apart); then fails the test naming `what`.
///
/// # Panics
/// When `f` still does not hold after `within`.
pub fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    let pause = (within / 100).clamp(Duration::from_millis(5), Duration::from_millis(100));
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(pause);
    }
}

/// Sets its flag when dropped: the stop signal of a test's background
/// threads, given however the test's own code ends. A `std::thread::scope`
/// joins its threads even when its closure panics, so threads that loop
/// until a flag that only the closure's last line sets would hang the test
/// (and CI, until its limit) instead of letting it fail: hold one of these
/// in the closure, before anything that can panic.
pub struct StopOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// How many tests of this process hold an [`InProcessHsm`].
static IN_PROCESS_HSM_TESTS: std::sync::Mutex<usize> = std::sync::Mutex::new(0);

/// Held, first, by each test that opens a [`lavd::hsm::Hsm`] in the test
/// process itself (not through a `lavd` child). Dropped last, after the
/// test's `Hsm`s, by the last such test of the process then running, it
/// waits until lavd's HSM worker threads have ended
/// ([`lavd::hsm::quiesce`]): libtest's exit right after the last test
/// would otherwise run SoftHSM's exit-time destructors beside a worker
/// still closing its sessions, the crash at exit that `lavd`'s own
/// commands avoid the same way. A test that begins meanwhile stops the
/// wait: the last to end does it again.
pub struct InProcessHsm(());

impl InProcessHsm {
    /// Counts this test in; hold it for the whole test, declared before
    /// any `Hsm` (so dropped after them).
    #[must_use]
    pub fn begin() -> Self {
        *IN_PROCESS_HSM_TESTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
        Self(())
    }
}

impl Drop for InProcessHsm {
    fn drop(&mut self) {
        let last = {
            let mut n = IN_PROCESS_HSM_TESTS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *n -= 1;
            *n == 0
        };
        if !last {
            return;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if lavd::hsm::quiesce(Duration::from_millis(100)) {
                return;
            }
            let others = *IN_PROCESS_HSM_TESTS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if others > 0 {
                return;
            }
        }
        // Something still holds an `Hsm` (a log's deferred writer not
        // stopped, say): the test fails, unless it is failing already.
        assert!(
            std::thread::panicking(),
            "lavd's HSM worker threads still running 30 s after the last test that opened an Hsm \
             (an Hsm, or a log holding one, outlived its test?)"
        );
    }
}

/// See [`Shim::releasing`].
pub struct ShimRelease<'a>(&'a Shim);

impl Drop for ShimRelease<'_> {
    fn drop(&mut self) {
        // Not `set`: a drop must not panic (it may run during a panic).
        let _ = self.0.write("");
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = self.write("");
    }
}

/// Counts what lavd's HSM layer reports: reconnects and the most sessions
/// busy at once.
#[derive(Debug, Default)]
pub struct HsmCounts {
    /// Pool reconnects after a lost session or token.
    pub reconnects: std::sync::atomic::AtomicUsize,
    /// The highest number of sessions checked out at once.
    pub max_busy: std::sync::atomic::AtomicUsize,
    /// Module resets done after `[hsm.quirks] reset_module_after_opens`
    /// opens.
    pub planned_resets: std::sync::atomic::AtomicUsize,
    /// Planned resets put off or failed.
    pub planned_resets_not_done: std::sync::atomic::AtomicUsize,
}

impl lavd::hsm::HsmObserver for HsmCounts {
    fn operation(&self, _: &'static str, _: f64, _: bool) {}
    fn sessions_busy(&self, busy: usize) {
        self.max_busy.fetch_max(busy, Ordering::SeqCst);
    }
    fn reconnected(&self) {
        self.reconnects.fetch_add(1, Ordering::SeqCst);
    }
    fn planned_reset(&self, outcome: &'static str) {
        if outcome == "done" {
            self.planned_resets.fetch_add(1, Ordering::SeqCst);
        } else {
            self.planned_resets_not_done.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A software ephemeral P-256 key for checking in-HSM ECDH: its public point
/// goes into the HSM, and the software side computes the shared secret the
/// HSM must return, from the escrow public key.
pub fn software_peer(escrow: &lavd::jwk::P256PublicKey) -> (lavd::jwk::P256PublicKey, [u8; 32]) {
    use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey, ECDH_P256};
    let sk = PrivateKey::generate(&ECDH_P256).expect("key");
    let pk = lavd::jwk::P256PublicKey::from_sec1(sk.compute_public_key().expect("public").as_ref())
        .expect("point");
    let expected = agreement::agree(
        &sk,
        UnparsedPublicKey::new(&ECDH_P256, escrow.sec1()),
        aws_lc_rs::error::Unspecified,
        |z| <[u8; 32]>::try_from(z).map_err(|_| aws_lc_rs::error::Unspecified),
    )
    .expect("ECDH");
    (pk, expected)
}

/// Appends one `key_generated` leaf for kid `kid` (all at one fixed time)
/// through `log`, the way the daemon appends, and returns the checkpoint
/// that covers it: filler for tests that need a log of some length.
///
/// # Panics
/// If the append fails.
pub fn append_key_generated(log: &lavd::audit::log::AuditLog, kid: &str) -> String {
    let t0 = lavd::codec::parse_time("2026-12-01T00:00:00Z").expect("fixed time");
    let event = lavd::audit::leaf::KeyGenerated::new(
        kid,
        t0,
        t0 + time::Duration::days(31),
        t0 + time::Duration::days(400),
        None,
    )
    .expect("a valid key_generated event");
    log.append(lavd::store::AuditAppend {
        events: vec![event.into()],
        time: t0,
        spend: lavd::store::Spend::None,
    })
    .expect("append")
    .checkpoint
}

/// For the benchmarks: runs `op(thread, i)` on `threads` threads for
/// `duration`; ops per second.
pub fn measure<F>(threads: usize, duration: std::time::Duration, op: F) -> f64
where
    F: Fn(usize, u64) + Sync,
{
    use std::sync::atomic::{AtomicBool, AtomicU64};
    let stop = AtomicBool::new(false);
    let count = AtomicU64::new(0);
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (stop, count, op) = (&stop, &count, &op);
            s.spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    op(t, i);
                    i += 1;
                }
                count.fetch_add(i, Ordering::Relaxed);
            });
        }
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
    });
    count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// Makes a P-256 key pair under `label` on `session`'s token, as another
/// application would: with `private`, both halves are `CKA_PRIVATE` (a PIN
/// holder's pair; the session must be logged in), else neither is (a
/// co-tenant's decoys, made without the PIN). The private half is derive
/// only, as lavd's own are: what is wrong with it is only that lavd did not
/// make it (its attributes alone would pass lavd's check).
///
/// # Panics
/// When the token refuses: the test fails.
pub fn foreign_pair(session: &Session, label: &str, private: bool) {
    use cryptoki::object::Attribute;
    // DER of the P-256 curve's OID (RFC 5480).
    let params = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let label = label.as_bytes().to_vec();
    session
        .generate_key_pair(
            &cryptoki::mechanism::Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(true),
                Attribute::Private(private),
                Attribute::EcParams(params),
                Attribute::Label(label.clone()),
            ],
            &[
                Attribute::Token(true),
                Attribute::Private(private),
                Attribute::Sensitive(private),
                Attribute::Derive(true),
                Attribute::Sign(false),
                Attribute::SignRecover(false),
                Attribute::Decrypt(false),
                Attribute::Unwrap(false),
                Attribute::Label(label),
            ],
        )
        .expect("a key pair under the label");
}

/// Object templates of a P-256 key pair made outside lavd from `scalar`,
/// under `label`, both `CKA_PRIVATE` = `private`: the public half (with its
/// point) and the private half (with its value, and no usage yet: the
/// caller adds what the test needs). For `C_CreateObject`.
///
/// # Panics
/// When `scalar` is no P-256 scalar: the test fails.
pub fn p256_key_objects(
    label: &str,
    scalar: &[u8; 32],
    private: bool,
) -> (
    Vec<cryptoki::object::Attribute>,
    Vec<cryptoki::object::Attribute>,
) {
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    let secret = p256::SecretKey::from_slice(scalar).expect("a P-256 scalar");
    let point = secret.public_key().to_encoded_point(false);
    let mut ec_point = vec![0x04, 0x41];
    ec_point.extend_from_slice(point.as_bytes());
    let common = |class| {
        vec![
            Attribute::Class(class),
            Attribute::KeyType(KeyType::EC),
            Attribute::Token(true),
            Attribute::Private(private),
            Attribute::Label(label.as_bytes().to_vec()),
            // DER of the P-256 curve's OID (RFC 5480).
            Attribute::EcParams(vec![
                0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
            ]),
        ]
    };
    let mut public = common(ObjectClass::PUBLIC_KEY);
    public.push(Attribute::EcPoint(ec_point));
    let mut private_half = common(ObjectClass::PRIVATE_KEY);
    private_half.push(Attribute::Value(secret.to_bytes().to_vec()));
    (public, private_half)
}

/// A private key's usage attributes that let it serve one operation:
/// `CKA_SIGN` with `sign` (an audit key), else `CKA_DERIVE` (an escrow
/// key). SoftHSM's `C_CreateObject` defaults the others to true, and lavd
/// refuses a key that could serve more.
pub fn only_usage(sign: bool) -> Vec<cryptoki::object::Attribute> {
    use cryptoki::object::Attribute;
    vec![
        Attribute::Derive(!sign),
        Attribute::Sign(sign),
        Attribute::SignRecover(false),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
    ]
}

/// The `[not_before, not_after]` [`generate_key`] gives (RFC 3339, whole
/// days): from the start of yesterday (UTC) to 30 days after the start of
/// today. Relative to today, so that its keys are published whenever the
/// tests run (fixed dates stopped every key test once they had passed).
pub fn key_window() -> [String; 2] {
    let today = time::OffsetDateTime::now_utc().replace_time(time::Time::MIDNIGHT);
    [
        lavd::codec::format_time(today - time::Duration::days(1)),
        lavd::codec::format_time(today + time::Duration::days(30)),
    ]
}

/// `lavd keys generate --kid KID` on `t`'s config, sealable within
/// [`key_window`], retained until `destroy_after`.
pub fn generate_key(t: &TestToken, kid: &str, destroy_after: &str) -> Output {
    let [not_before, not_after] = key_window();
    generate_key_for(t, kid, [&not_before, &not_after, destroy_after])
}

/// `lavd keys generate --kid KID` on `t`'s config with its `[not_before,
/// not_after, destroy_after]` (RFC 3339).
pub fn generate_key_for(
    t: &TestToken,
    kid: &str,
    [not_before, not_after, destroy_after]: [&str; 3],
) -> Output {
    t.lavd_with_config(&[
        "keys",
        "generate",
        "--kid",
        kid,
        "--not-before",
        not_before,
        "--not-after",
        not_after,
        "--destroy-after",
        destroy_after,
    ])
}
