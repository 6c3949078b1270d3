//! A `lavd serve` token whose config names witnesses: the log's audit key
//! is made first (the witnesses are configured with its verifier key), then
//! the `[audit]` witness settings are written once the witnesses run.
//! Used by `tests/log_witnessed.rs` and `lavd-bench` part (i).

use std::path::PathBuf;

use crate::server::{path_str, Pki};
use crate::witness::{PyWitness, Witness};
use crate::{assert_ok, vault, TestToken};

/// One witness as the log's config names it.
pub struct Entry {
    name: String,
    /// Its submission prefix.
    pub url: String,
    vkey: String,
    /// The CA of its TLS certificate (https); none for plain http.
    pub ca_pem: Option<String>,
}

impl From<&Witness> for Entry {
    fn from(w: &Witness) -> Self {
        Entry {
            name: w.name.clone(),
            url: format!("https://{}", w.daemon.api),
            vkey: w.vkey.clone(),
            ca_pem: Some(w.pki.servers.pem()),
        }
    }
}

impl Entry {
    /// The independent Python witness started as `name` (plain http on
    /// loopback).
    pub fn python(w: &PyWitness, name: &str) -> Self {
        Entry {
            name: name.to_string(),
            url: format!("http://{}", w.addr),
            vkey: w.vkey.clone(),
            ca_pem: None,
        }
    }
}

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
    /// The PostgreSQL store, or none for SQLite.
    db: Option<crate::pg::TestDb>,
}

impl LogWithWitnesses {
    /// A token with escrow key `E-1`, the audit key, and `base` (a whole
    /// `serve_config`) as its config.
    pub fn new(base: &str) -> Self {
        Self::with_store(base, None)
    }

    /// As [`LogWithWitnesses::new`], on a new PostgreSQL database (for
    /// replicas).
    pub fn on_postgres(base: &str) -> Self {
        Self::with_store(base, Some(crate::pg::TestDb::create()))
    }

    fn with_store(base: &str, db: Option<crate::pg::TestDb>) -> Self {
        let t = TestToken::new();
        let pki = Pki::new(&t);
        match &db {
            Some(db) => db.write_token_config(&t, base),
            None => t.write_config(base),
        }
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
            db,
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
    pub fn configure(&self, witnesses: &[Entry], policy: &str, audit: &str) -> PathBuf {
        let policy_file = self.t.path("witnesses.policy");
        std::fs::write(&policy_file, format!("log {}\n{policy}", self.vkey)).expect("policy");
        let mut entries = String::new();
        for (i, w) in witnesses.iter().enumerate() {
            entries.push_str(&format!(
                "[[audit.witnesses]]\nname = {:?}\nurl = {:?}\nkey = {:?}\n",
                w.name, w.url, w.vkey
            ));
            if let Some(pem) = &w.ca_pem {
                let ca = self.t.path(&format!("witness{i}-ca.pem"));
                std::fs::write(&ca, pem).expect("witness CA");
                entries.push_str(&format!("ca_file = {:?}\n", path_str(&ca)));
            }
        }
        let config = format!(
            "{}\n[audit]\nwitness_policy = \"witnesses.policy\"\n{audit}\n{entries}",
            self.base
        );
        match &self.db {
            Some(db) => db.write_token_config(&self.t, &config),
            None => self.t.write_config(&config),
        }
        policy_file
    }
}
