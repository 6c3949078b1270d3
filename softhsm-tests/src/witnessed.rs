//! A `lavd serve` token whose config names witnesses: the log's audit key
//! is made first (the witnesses are configured with its verifier key), then
//! the `[audit]` witness settings are written once the witnesses run.
//! Used by `tests/log_witnessed.rs` and `lavd-bench` part (i).

use std::path::PathBuf;

use crate::server::{path_str, Pki};
use crate::witness::Witness;
use crate::{assert_ok, vault, TestToken};

/// A log token before `lavd serve` starts.
pub struct LogWithWitnesses {
    /// The token and working directory.
    pub t: TestToken,
    /// Its certificates.
    pub pki: Pki,
    /// The log's signed-note verifier key (`lavd audit key`).
    pub vkey: String,
    /// The checkpoints' origin (the vkey's name).
    pub origin: String,
    /// The escrow key `E-1`.
    pub escrow: lavd::jwk::P256PublicKey,
    /// `serve_config(extra)`, without witness settings.
    base: String,
}

impl LogWithWitnesses {
    /// A token with escrow key `E-1`, the audit key, and `base` (a whole
    /// `serve_config`) as its config.
    pub fn new(base: &str) -> Self {
        let t = TestToken::new();
        let pki = Pki::new(&t);
        t.write_config(base);
        let escrow = vault::generate_escrow_key(&t, "E-1");
        assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
        // `Daemon::start` makes the audit key once per token; it is made.
        std::fs::write(t.path("audit-key-made"), "").expect("marker");
        let vkey = assert_ok(&t.lavd_with_config(&["audit", "key"]))
            .trim()
            .to_string();
        let origin = vkey.split('+').next().expect("vkey name").to_string();
        LogWithWitnesses {
            t,
            pki,
            vkey,
            origin,
            escrow,
            base: base.to_string(),
        }
    }

    /// Starts a witness of this log named `name`, its per-client rate
    /// limit raised out of the way (every checkpoint is submitted).
    pub fn witness(&self, name: &str) -> Witness {
        Witness::start(
            name,
            &self.origin,
            &self.vkey,
            "[limits]\nrate_limit_per_second = 100000.0\nrate_limit_burst = 100000\n",
        )
    }

    /// Writes `witnesses.policy` (`policy`, after a `log` line for this
    /// log) and the config: the base, then `[audit]` with `audit` (its keys,
    /// e.g. `release_after_witness = true`) and one `[[audit.witnesses]]`
    /// entry for each of `witnesses`. Returns the policy file.
    pub fn configure(&self, witnesses: &[&Witness], policy: &str, audit: &str) -> PathBuf {
        let policy_file = self.t.path("witnesses.policy");
        std::fs::write(&policy_file, format!("log {}\n{policy}", self.vkey)).expect("policy");
        let mut entries = String::new();
        for (i, w) in witnesses.iter().enumerate() {
            let ca = self.t.path(&format!("witness{i}-ca.pem"));
            std::fs::write(&ca, w.pki.servers.pem()).expect("witness CA");
            entries.push_str(&format!(
                "[[audit.witnesses]]\nname = {:?}\nurl = \"https://{}\"\nkey = {:?}\nca_file = {:?}\n",
                w.name,
                w.daemon.api,
                w.vkey,
                path_str(&ca)
            ));
        }
        self.t.write_config(&format!(
            "{}\n[audit]\nwitness_policy = \"witnesses.policy\"\n{audit}\n{entries}",
            self.base
        ));
        policy_file
    }
}
