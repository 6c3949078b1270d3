//! The parties of the witness tests: a real `lavd serve` whose unwraps make
//! real, log-signed checkpoints (with consistency proofs from its own API),
//! and real `lavd witness serve` processes on their own SoftHSM tokens,
//! over TLS without client certificates.

use std::path::PathBuf;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use time::OffsetDateTime;

use crate::server::{path_str, Client, Daemon, Pki, Response};
use crate::vault::{self, Clients, Vault, TARGET};
use crate::{assert_ok, module_path, TestToken};

/// A running lavd log ([`Vault`]) and the parties that drive it.
pub struct Log {
    /// `lavd serve`, its token, PKI and parties.
    pub v: Vault,
    /// Clients of the running daemon.
    pub c: Clients,
    /// The log's signed-note verifier key.
    pub vkey: String,
    /// The checkpoints' origin.
    pub origin: String,
    warrant: serde_json::Value,
}

impl Log {
    /// Starts `lavd serve` with one escrow key and a warrant for 1000
    /// unwraps.
    pub fn start() -> Self {
        let v = Vault::start("");
        let c = v.parties.clients(&v.pki, v.daemon.api);
        let warrant = vault::double_lock(&vault::claims(
            "WITNESSED-1",
            vault::recipient().public(),
            1000,
        ));
        let vkey = vault::verifier_key(&c.auditor);
        let origin = vkey.split('+').next().expect("vkey name").to_string();
        Log {
            v,
            c,
            vkey,
            origin,
            warrant,
        }
    }

    /// One unwrap (one leaf); returns the checkpoint of its reply.
    pub fn unwrap(&self, n: u32) -> String {
        self.unwrap_via(&self.c, n)
    }

    /// Stops `lavd serve` (SIGTERM, exit 0).
    pub fn stop(&mut self) {
        let d = &mut self.v.daemon;
        d.signal(rustix::process::Signal::TERM);
        let status = d.wait_exit(std::time::Duration::from_secs(30));
        assert!(status.success(), "{status:?}: {}", d.stderr());
    }

    /// Starts `lavd serve` again on its config.
    pub fn start_again(&mut self) {
        self.v.daemon = Daemon::start(&self.v.t);
        self.c = self.v.parties.clients(&self.v.pki, self.v.daemon.api);
    }

    /// Starts another `lavd serve` on the same token with `config` (another
    /// store, say), and its clients.
    pub fn serve(&self, config: &std::path::Path, name: &str) -> (Daemon, Clients) {
        let daemon = Daemon::start_config(&self.v.t, config, name);
        let c = self.v.parties.clients(&self.v.pki, daemon.api);
        (daemon, c)
    }

    /// [`Log::unwrap`] through the daemon of `c`.
    pub fn unwrap_via(&self, c: &Clients, n: u32) -> String {
        let envelope = vault::seal(
            &self.v.escrow,
            "E-1",
            TARGET,
            OffsetDateTime::now_utc() - time::Duration::hours(1),
            &format!("w{n}"),
            &[7; 32],
        );
        let r = vault::post(
            &c.agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": self.warrant, "envelopes": [envelope]}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["audit"]["checkpoint"]
            .as_str()
            .expect("checkpoint in the reply")
            .to_string()
    }

    /// The log's consistency proof from `from` to `to`, as the standard
    /// base64 lines of an add-checkpoint body.
    pub fn proof(&self, from: u64, to: u64) -> Vec<String> {
        proof_via(&self.c, from, to)
    }

    /// The add-checkpoint body for `checkpoint` from `old`, with the log's
    /// own proof.
    pub fn body(&self, old: u64, checkpoint: &str) -> String {
        body(old, &self.proof(old, size(checkpoint)), checkpoint)
    }
}

/// The consistency proof from `from` to `to` of the daemon of `c`, as the
/// standard base64 lines of an add-checkpoint body (none from 0, or
/// between equal sizes).
pub fn proof_via(c: &Clients, from: u64, to: u64) -> Vec<String> {
    {
        if from == 0 || from == to {
            return Vec::new();
        }
        let r = c
            .auditor
            .get(&format!("/v1/audit/proof/consistency?from={from}&to={to}"));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["proof"]
            .as_array()
            .expect("proof")
            .iter()
            .map(|h| {
                STANDARD.encode(
                    URL_SAFE_NO_PAD
                        .decode(h.as_str().expect("hash"))
                        .expect("base64url"),
                )
            })
            .collect()
    }
}

/// An add-checkpoint body (C2SP tlog-witness): the old size line, the
/// proof lines, an empty line, the checkpoint.
pub fn body(old: u64, proof: &[String], checkpoint: &str) -> String {
    let mut text = format!("old {old}\n");
    for line in proof {
        text.push_str(line);
        text.push('\n');
    }
    text.push('\n');
    text.push_str(checkpoint);
    text
}

/// The tree size line of a checkpoint.
pub fn size(checkpoint: &str) -> u64 {
    checkpoint
        .lines()
        .nth(1)
        .and_then(|l| l.parse().ok())
        .expect("checkpoint size line")
}

/// A `lavd witness serve` process on its own token.
pub struct Witness {
    /// The process (`api` is the witness listener; dropped, so killed,
    /// before its token).
    pub daemon: Daemon,
    /// The witness's token and working directory.
    pub t: TestToken,
    /// Its server certificate.
    pub pki: Pki,
    /// Its cosignature/v1 vkey, as `lavd witness keygen` printed it.
    pub vkey: String,
    /// Its name.
    pub name: String,
    /// Its config file.
    pub config: PathBuf,
}

impl Witness {
    /// Makes a token, a key (`lavd witness keygen`) and a config
    /// witnessing `log` (origin and vkey) with `extra` appended (a
    /// `[limits]` table, say), and starts `lavd witness serve`.
    pub fn start(name: &str, origin: &str, log_vkey: &str, extra: &str) -> Self {
        let t = TestToken::new();
        let pki = Pki::new(&t);
        let config = t.path("witness.toml");
        std::fs::write(
            &config,
            format!(
                "name = {name:?}\nstate = \"witness.db\"\nkey_label = \"lav-witness\"\n\n\
                 [server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_secs = 10\n\n\
                 [admin]\nlisten = \"127.0.0.1:0\"\n\n\
                 [tls]\ncert = \"tls/server.pem\"\nkey = \"tls/server.key\"\n\n\
                 [hsm]\nmodule = {:?}\ntoken_label = {:?}\npin_file = \"pin\"\nsessions = 2\n\n\
                 [[logs]]\norigin = {origin:?}\nvkey = {log_vkey:?}\n\n{extra}",
                path_str(&module_path()),
                t.label
            ),
        )
        .expect("witness.toml");
        let vkey = assert_ok(&t.lavd(&["witness", "keygen", "--config", &path_str(&config)]))
            .trim()
            .to_string();
        let daemon = Daemon::start_witness(&t, &config, "witness");
        Witness {
            t,
            pki,
            daemon,
            vkey,
            name: name.to_string(),
            config,
        }
    }

    /// A client of the witness listener (no client certificate).
    pub fn client(&self) -> Client {
        self.pki.client(self.daemon.api, None)
    }

    /// `POST /add-checkpoint` with `body`.
    pub fn add(&self, body: &str) -> Response {
        self.client()
            .request("POST", "/add-checkpoint", Some(body.as_bytes()))
            .expect("add-checkpoint")
    }

    /// Stops the process (SIGTERM: `STOPPING=1`, exit 0) and starts it again on the same
    /// config, key and state file.
    pub fn restart(&mut self) {
        self.daemon.signal(rustix::process::Signal::TERM);
        self.daemon.expect_notify("STOPPING=1");
        let status = self.daemon.wait_exit(std::time::Duration::from_secs(30));
        assert!(status.success(), "{status:?}: {}", self.daemon.stderr());
        self.daemon = Daemon::start_witness(&self.t, &self.config, "witness");
    }
}

/// `softhsm-tests/interop/witness.py`: the independent witness, written
/// in Python from the C2SP texts, serving plain HTTP on loopback.
pub struct PyWitness {
    child: std::process::Child,
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// Its cosignature/v1 vkey, as it computed it.
    pub vkey: String,
}

impl PyWitness {
    /// Starts it as `name`, with the Ed25519 seed `seed`, keeping its state
    /// in `state` (JSON), witnessing `log` (origin and vkey).
    pub fn start(
        name: &str,
        seed: &[u8; 32],
        state: &std::path::Path,
        origin: &str,
        log_vkey: &str,
    ) -> Self {
        use std::io::BufRead as _;
        let seed_file = state.with_extension("seed");
        std::fs::write(&seed_file, hex::encode(seed)).expect("seed file");
        let mut child = std::process::Command::new(crate::interop_python())
            .arg(py_witness_script())
            .args(["serve", "--name", name, "--seed-file"])
            .arg(&seed_file)
            .arg("--state")
            .arg(state)
            .arg("--log")
            .arg(format!("{origin}={log_vkey}"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start witness.py");
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut next = |prefix: &str| {
            let line = lines.next().expect("witness.py output").expect("utf-8");
            line.strip_prefix(prefix)
                .unwrap_or_else(|| panic!("{line:?} does not start with {prefix:?}"))
                .to_string()
        };
        let vkey = next("vkey ");
        let port: u16 = next("listening ").parse().expect("port");
        PyWitness {
            child,
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            vkey,
        }
    }

    /// Stops the process (SIGSTOP): connections are still accepted by the
    /// kernel, and answered only once it [`Self::resume`]s.
    pub fn pause(&self) {
        self.signal(rustix::process::Signal::STOP);
    }

    /// Lets a [`Self::pause`]d process run again (SIGCONT).
    pub fn resume(&self) {
        self.signal(rustix::process::Signal::CONT);
    }

    fn signal(&self, signal: rustix::process::Signal) {
        rustix::process::kill_process(rustix::process::Pid::from_child(&self.child), signal)
            .expect("signal witness.py");
    }

    /// `POST /add-checkpoint` with `body`.
    pub fn add(&self, body: &str) -> Response {
        let tcp = std::net::TcpStream::connect(self.addr).expect("connect witness.py");
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .expect("timeout");
        crate::server::Conn::new(tcp)
            .request("POST", "/add-checkpoint", &[], Some(body.as_bytes()))
            .expect("add-checkpoint")
    }
}

impl Drop for PyWitness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The path of `softhsm-tests/interop/witness.py`.
pub fn py_witness_script() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/witness.py")
}

/// Runs `witness.py` with `args` and `stdin`; returns the exit code and
/// stdout.
pub fn py_witness(args: &[&str], stdin: &str) -> (i32, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(crate::interop_python())
        .arg(py_witness_script())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run witness.py");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("witness.py");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}
