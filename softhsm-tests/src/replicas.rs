//! A replicated `lavd serve` set for tests: several processes on one
//! SoftHSM token and one PostgreSQL database ([`crate::pg`]).

use lavd::jwk::{P256PrivateKey, P256PublicKey};
use time::{Duration, OffsetDateTime};

use crate::pg::TestDb;
use crate::server::{serve_config, Daemon, Pki};
use crate::vault::{self, Clients, Parties, TARGET};
use crate::TestToken;

/// Replicas per cluster.
pub const REPLICAS: usize = 3;

/// Three `lavd serve` replicas on one token and one database, with a
/// client per party per replica and escrow key `E-1`.
#[derive(Debug)]
pub struct Cluster {
    /// See the type doc.
    pub t: TestToken,
    /// See the type doc.
    pub pki: Pki,
    // Dropped after the daemons (fields drop in order).
    /// See the type doc.
    pub daemons: Vec<Daemon>,
    /// See the type doc.
    pub clients: Vec<Clients>,
    /// See the type doc.
    pub parties: Parties,
    /// See the type doc.
    pub escrow: P256PublicKey,
    /// See the type doc.
    pub recipient: P256PrivateKey,
    /// The shared database.
    pub db: TestDb,
}

impl Cluster {
    /// Starts the replicas and waits until each is ready.
    pub fn start() -> Self {
        Self::start_with_limits("")
    }

    /// As [`Cluster::start`], with `limits` (TOML lines) added to `[limits]`.
    pub fn start_with_limits(limits: &str) -> Self {
        Self::start_on(TestToken::new(), limits, None, "")
    }

    /// As [`Cluster::start_with_limits`], on `t`, loading the latency and
    /// fault module `shim` (made on `t`) when given, with `store` (TOML
    /// lines) added to `[store]`.
    pub fn start_on(t: TestToken, limits: &str, shim: Option<&crate::Shim>, store: &str) -> Self {
        Self::start_with_hsm(t, limits, shim, store, "")
    }

    /// As [`Cluster::start_on`], with `hsm` (TOML lines) added to `[hsm]`.
    pub fn start_with_hsm(
        t: TestToken,
        limits: &str,
        shim: Option<&crate::Shim>,
        store: &str,
        hsm: &str,
    ) -> Self {
        Self::start_with_db(t, TestDb::create(), limits, shim, store, hsm)
    }

    /// As [`Cluster::start_with_hsm`], on database `db`.
    pub fn start_with_db(
        t: TestToken,
        db: TestDb,
        limits: &str,
        shim: Option<&crate::Shim>,
        store: &str,
        hsm: &str,
    ) -> Self {
        let hsm = format!("sessions = 4\n{hsm}");
        let pki = Pki::new(&t);
        let config = serve_config(&format!(
            "{}[limits]\nrate_limit_per_second = 100000.0\nrate_limit_burst = 100000\n{limits}\n",
            vault::roles_toml()
        ));
        match shim {
            None => db.write_token_config_hsm(
                &t,
                &crate::module_path(),
                &hsm,
                &format!("{store}{config}"),
            ),
            Some(shim) => db.write_token_config_hsm(
                &t,
                &crate::shim_module_path(),
                &hsm,
                &format!("{store}{}\n{config}", shim.hsm_env()),
            ),
        }
        vault::generate_escrow_key(&t, "E-1");
        let parties = Parties::new(&pki);
        let daemons: Vec<Daemon> = (0..REPLICAS)
            .map(|i| Daemon::start_replica(&t, &format!("replica-{i}")))
            .collect();
        for d in &daemons {
            d.wait_readyz(200);
        }
        let clients: Vec<Clients> = daemons
            .iter()
            .map(|d| parties.clients(&pki, d.api))
            .collect();
        // The key generated through the CLI is listed by every replica.
        let escrow = vault::published_key(&clients[0].provider, "E-1");
        for c in &clients[1..] {
            assert_eq!(vault::published_key(&c.provider, "E-1"), escrow);
        }
        Cluster {
            t,
            pki,
            daemons,
            clients,
            parties,
            escrow,
            recipient: vault::recipient(),
            db,
        }
    }

    /// Envelope number `n` to `E-1`, for the test target.
    pub fn envelope(&self, n: usize) -> serde_json::Value {
        vault::seal(
            &self.escrow,
            "E-1",
            TARGET,
            OffsetDateTime::now_utc() - Duration::hours(1),
            &format!("m{n}"),
            &[7; 32],
        )
    }

    /// A double-lock warrant `id` with budget `max` for the recipient.
    pub fn warrant(&self, id: &str, max: u64) -> serde_json::Value {
        vault::double_lock(&vault::claims(id, self.recipient.public(), max))
    }
}
