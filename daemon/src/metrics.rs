//! Prometheus metrics, served as text on the admin listener's `/metrics`.
//!
//! The metrics live in their own [`prometheus::Registry`], never the global
//! one, so tests and embedders get a fresh set. Every label value is a
//! `&'static str` chosen by lavd's code (a route template, an outcome
//! code, an HSM operation name) or the name of a configured witness, never
//! a value from a request: no warrant
//! ids, targets, kids or identities can reach a label, and the number of
//! series stays bounded whatever clients send.

use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::hsm::HsmObserver;

/// lavd's metrics. Shared as `Arc<Metrics>`; every method is cheap and
/// lock-free apart from prometheus's own per-series locks.
pub struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_seconds: HistogramVec,
    envelopes: IntCounterVec,
    envelopes_unreleased: IntCounterVec,
    hsm_seconds: HistogramVec,
    hsm_sessions_busy: IntGauge,
    hsm_reconnects: IntCounter,
    hsm_planned_resets: IntCounterVec,
    hsm_login_refused: IntGauge,
    hsm_calls_stuck: IntGauge,
    hsm_call_timeouts: IntCounter,
    request_body_bytes_held: IntGauge,
    store_commit_seconds: HistogramVec,
    unwrap_phase_seconds: HistogramVec,
    store_retries: IntCounter,
    tls_handshake_failures: IntCounterVec,
    connections_open: IntGauge,
    public_requests: IntCounterVec,
    public_tls_handshake_failures: IntCounterVec,
    public_connections_open: IntGauge,
    config_reloads: IntCounterVec,
    witness_requests: IntCounterVec,
    witness_cosigned_size: prometheus::IntGaugeVec,
    escrow_keys_past_retention: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Figures that other parts keep and `/metrics` reports as they are at
/// scrape time ([`Metrics::render_with`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Scraped {
    /// The store's count of retried transactions.
    pub store_retries: u64,
    /// [`crate::hsm::Hsm::stuck_calls`].
    pub hsm_calls_stuck: usize,
    /// [`crate::hsm::Hsm::timed_out_calls`].
    pub hsm_call_timeouts: u64,
    /// [`crate::api::pipeline::BodyBudget::held`] of the API.
    pub request_body_bytes_held: usize,
}

/// Buckets for operations that take microseconds to a second (HSM calls,
/// SQLite commits with fsync).
const FAST_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Buckets for a request's phases: an intent commit's fraction of a
/// millisecond to a large batch's HSM opens on a network HSM.
const PHASE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];
/// Buckets for whole requests.
const REQUEST_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Metrics {
    /// Creates every metric in a new registry.
    ///
    /// # Errors
    /// A prometheus error if a metric is ill-formed (a programming error in
    /// this function; the names are constants).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let http_requests = counter(
            "lavd_http_requests_total",
            "API requests answered, by route template and HTTP status.",
            &["route", "status"],
        )?;
        let http_seconds = histogram(
            "lavd_http_request_duration_seconds",
            "Time from request head to response, by route template.",
            &["route"],
            REQUEST_BUCKETS,
        )?;
        let envelopes = counter(
            "lavd_envelopes_total",
            "Envelopes handled by unwrap, by outcome (ok or the denial reason).",
            &["outcome"],
        )?;
        let envelopes_unreleased = counter(
            "lavd_envelopes_unreleased_total",
            "Envelopes the HSM opened whose leaves say opened, with the budget spent (or, after \
             a COMMIT whose outcome was lost, maybe spent), but whose keys were not released: \
             the request failed or was refused after its audit commit. By the error code it was \
             answered with (warrant_revoked, warrant_expired, spent_not_released, \
             witness_unavailable, log_inconsistent, ...), or key_destroyed for a key destroyed \
             meanwhile in a request that released the others (those are also in \
             lavd_envelopes_total{outcome=\"key_destroyed\"}).",
            &["code"],
        )?;
        let hsm_seconds = histogram(
            "lavd_hsm_operation_duration_seconds",
            "HSM operations, by operation and result.",
            &["op", "result"],
            FAST_BUCKETS,
        )?;
        let hsm_sessions_busy = gauge(
            "lavd_hsm_sessions_busy",
            "HSM sessions checked out of the pool.",
        )?;
        let hsm_reconnects = IntCounter::new(
            "lavd_hsm_reconnects_total",
            "Times the HSM session pool reconnected after a lost session or token.",
        )?;
        registry.register(Box::new(hsm_reconnects.clone()))?;
        let hsm_planned_resets = counter(
            "lavd_hsm_planned_resets_total",
            "Planned PKCS#11 module resets after [hsm.quirks] reset_module_after_opens opens, \
             by outcome (done, deferred, failed).",
            &["outcome"],
        )?;
        let hsm_login_refused = gauge(
            "lavd_hsm_login_refused",
            "1 while the token has refused the PIN and no login is tried again (sessions \
             already logged in still serve): put the new PIN in place and reload.",
        )?;
        let hsm_calls_stuck = gauge(
            "lavd_hsm_calls_stuck",
            "HSM calls that outlived [hsm] call_timeout_ms and have not returned (a hung \
             module or device); /readyz is false while this is above 0.",
        )?;
        let request_body_bytes_held = gauge(
            "lavd_request_body_bytes_held",
            "Bytes of API request bodies counted against [limits] max_body_bytes_in_flight, \
             the revocations' budget and the other together (as declared, or max_body_bytes \
             while a chunked one is read, then its length), from before their read until \
             their bytes are freed; one more that does not fit is answered 503 server_busy.",
        )?;
        let hsm_call_timeouts = IntCounter::new(
            "lavd_hsm_call_timeouts_total",
            "HSM calls whose caller gave up at [hsm] call_timeout_ms (answered hsm_unavailable).",
        )?;
        registry.register(Box::new(hsm_call_timeouts.clone()))?;
        let store_commit_seconds = histogram(
            "lavd_store_commit_duration_seconds",
            "Durable store commits (fsync included), by operation.",
            &["op"],
            FAST_BUCKETS,
        )?;
        let unwrap_phase_seconds = histogram(
            "lavd_unwrap_phase_seconds",
            "Each successful POST /v1/unwrap's time, by phase: gate (the wait at the envelope \
             gate, and readmission after a reload), admit (warrant and envelopes checked, \
             leaves built), intent (budget reserved and open intent committed), hsm (the HSM \
             opens), audit (leaves and spend committed, checkpoint signed), witness (the \
             cosigned checkpoint), reply (sealed and encoded).",
            &["phase"],
            PHASE_BUCKETS,
        )?;
        let store_retries = IntCounter::new(
            "lavd_store_retries_total",
            "Store transactions run again after a serialization failure or a deadlock \
             (PostgreSQL; always 0 on SQLite).",
        )?;
        registry.register(Box::new(store_retries.clone()))?;
        let tls_handshake_failures = counter(
            "lavd_tls_handshake_failures_total",
            "API connections refused at or right after the TLS handshake, by reason.",
            &["reason"],
        )?;
        let connections_open = gauge("lavd_connections_open", "Open API connections.")?;
        // The public log listener (`[audit.public]`) has its own families:
        // anyone may connect to it, and its traffic must not hide, or pass
        // for, the mutual-TLS API's.
        let public_requests = counter(
            "lavd_public_requests_total",
            "Requests answered on the public log listener, by route template and HTTP status.",
            &["route", "status"],
        )?;
        let public_tls_handshake_failures = counter(
            "lavd_public_tls_handshake_failures_total",
            "Public log listener connections refused at the TLS handshake, by reason.",
            &["reason"],
        )?;
        let public_connections_open = gauge(
            "lavd_public_connections_open",
            "Open connections to the public log listener.",
        )?;
        let config_reloads = counter(
            "lavd_config_reloads_total",
            "Configuration reloads (SIGHUP), by outcome.",
            &["outcome"],
        )?;
        // Both outcomes exist from the start, so that an alert on
        // `increase(...{outcome="failed"}[1h]) > 0` has a series to watch.
        for outcome in ["ok", "failed"] {
            config_reloads.with_label_values(&[outcome]);
        }
        let witness_requests = counter(
            "lavd_witness_requests_total",
            "add-checkpoint requests sent to witnesses, by witness (configured name) and \
             outcome (cosigned, conflict, fork, rolled_back, bad_proof, forbidden, \
             unknown_origin, bad_request, bad_cosignature, clock_ahead, no_proof, redirected, unavailable).",
            &["witness", "outcome"],
        )?;
        let escrow_keys_past_retention = gauge(
            "lavd_escrow_keys_past_retention",
            "Escrow keys whose destroy_after has passed and that the store does not say \
             destroyed, as of the last look (every minute; -1 until the first, or when the \
             store cannot say): the retention job (lavd keys destroy --expired) is due or \
             has failed. Their envelopes are refused key_destroyed either way.",
        )?;
        escrow_keys_past_retention.set(-1);
        let witness_cosigned_size = prometheus::IntGaugeVec::new(
            Opts::new(
                "lavd_witness_cosigned_size",
                "The largest checkpoint size each witness has cosigned (verified and stored).",
            ),
            &["witness"],
        )?;
        registry.register(Box::new(witness_cosigned_size.clone()))?;
        Ok(Metrics {
            registry,
            witness_requests,
            witness_cosigned_size,
            http_requests,
            http_seconds,
            envelopes,
            envelopes_unreleased,
            hsm_seconds,
            hsm_sessions_busy,
            hsm_reconnects,
            hsm_planned_resets,
            hsm_login_refused,
            hsm_calls_stuck,
            request_body_bytes_held,
            hsm_call_timeouts,
            store_commit_seconds,
            unwrap_phase_seconds,
            store_retries,
            tls_handshake_failures,
            connections_open,
            public_requests,
            public_tls_handshake_failures,
            public_connections_open,
            config_reloads,
            escrow_keys_past_retention,
        })
    }

    /// The escrow keys past their retention and not destroyed, or `None`
    /// when the store could not say.
    pub fn escrow_keys_past_retention(&self, keys: Option<usize>) {
        self.escrow_keys_past_retention
            .set(keys.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX)));
    }

    /// One API request answered. `route` is the route template
    /// (`/v1/keys`), or `unmatched`/`unrouted` for requests that matched none.
    pub fn request(&self, route: &'static str, status: u16, seconds: f64) {
        let status = status.to_string();
        self.http_requests
            .with_label_values(&[route, status.as_str()])
            .inc();
        self.http_seconds
            .with_label_values(&[route])
            .observe(seconds);
    }

    /// One envelope handled by unwrap: `outcome` is `ok` or a PROTOCOL §5
    /// denial reason (`out_of_window`, …).
    pub fn envelope(&self, outcome: &'static str) {
        self.envelopes.with_label_values(&[outcome]).inc();
    }

    /// `n` envelopes opened, logged opened and charged to the budget, but
    /// not released; `code` is what the request was answered, or
    /// `key_destroyed` for a key destroyed meanwhile in a request that
    /// released the others.
    pub fn envelopes_unreleased(&self, code: &'static str, n: usize) {
        if n > 0 {
            self.envelopes_unreleased
                .with_label_values(&[code])
                .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
        }
    }

    /// One durable store commit took `seconds`; `op` names what was
    /// committed (`audit_append`, `budget`, …).
    pub fn store_commit(&self, op: &'static str, seconds: f64) {
        self.store_commit_seconds
            .with_label_values(&[op])
            .observe(seconds);
    }

    /// One successful unwrap's phases, each `(phase, time)`
    /// ([`crate::unwrap::Phases::each`]).
    pub fn unwrap_phases(&self, phases: &[(&'static str, std::time::Duration)]) {
        for (phase, time) in phases {
            self.unwrap_phase_seconds
                .with_label_values(&[phase])
                .observe(time.as_secs_f64());
        }
    }

    /// One API connection refused during or right after the TLS handshake.
    pub fn tls_handshake_failure(&self, reason: &'static str) {
        self.tls_handshake_failures
            .with_label_values(&[reason])
            .inc();
    }

    /// An API connection opened (`+1`) or closed (`-1`).
    pub fn connection_delta(&self, delta: i64) {
        self.connections_open.add(delta);
    }

    /// One request answered on the public log listener.
    pub fn public_request(&self, route: &'static str, status: u16) {
        let status = status.to_string();
        self.public_requests
            .with_label_values(&[route, status.as_str()])
            .inc();
    }

    /// One public log listener connection refused at the TLS handshake.
    pub fn public_tls_handshake_failure(&self, reason: &'static str) {
        self.public_tls_handshake_failures
            .with_label_values(&[reason])
            .inc();
    }

    /// A public log listener connection opened (`+1`) or closed (`-1`).
    pub fn public_connection_delta(&self, delta: i64) {
        self.public_connections_open.add(delta);
    }

    /// One `add-checkpoint` request to `witness` ended with `outcome`.
    pub fn witness_request(&self, witness: &str, outcome: &'static str) {
        self.witness_requests
            .with_label_values(&[witness, outcome])
            .inc();
    }

    /// `witness` has cosigned the checkpoint of tree size `size`.
    pub fn witness_cosigned(&self, witness: &str, size: u64) {
        self.witness_cosigned_size
            .with_label_values(&[witness])
            .set(i64::try_from(size).unwrap_or(i64::MAX));
    }

    /// A configuration reload finished.
    pub fn config_reload(&self, ok: bool) {
        self.config_reloads
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc();
    }

    /// [`Metrics::render`], with the figures kept elsewhere brought up to
    /// date first: `lavd_store_retries_total` and
    /// `lavd_hsm_call_timeouts_total` up to the store's and the HSM's own
    /// counts (they only grow), `lavd_hsm_calls_stuck` set.
    ///
    /// # Errors
    /// As [`Metrics::render`].
    pub fn render_with(&self, now: Scraped) -> Result<String, prometheus::Error> {
        for (counter, total) in [
            (&self.store_retries, now.store_retries),
            (&self.hsm_call_timeouts, now.hsm_call_timeouts),
        ] {
            let seen = counter.get();
            if total > seen {
                counter.inc_by(total - seen);
            }
        }
        self.hsm_calls_stuck
            .set(i64::try_from(now.hsm_calls_stuck).unwrap_or(i64::MAX));
        self.request_body_bytes_held
            .set(i64::try_from(now.request_body_bytes_held).unwrap_or(i64::MAX));
        self.render()
    }

    /// The Prometheus text exposition format (version 0.0.4).
    ///
    /// # Errors
    /// A prometheus encoding error (only for ill-formed metrics).
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

impl HsmObserver for Metrics {
    fn operation(&self, op: &'static str, seconds: f64, ok: bool) {
        self.hsm_seconds
            .with_label_values(&[op, if ok { "ok" } else { "error" }])
            .observe(seconds);
    }

    fn sessions_busy(&self, busy: usize) {
        self.hsm_sessions_busy
            .set(i64::try_from(busy).unwrap_or(i64::MAX));
    }

    fn reconnected(&self) {
        self.hsm_reconnects.inc();
    }

    fn planned_reset(&self, outcome: &'static str) {
        self.hsm_planned_resets.with_label_values(&[outcome]).inc();
    }

    fn login_refused(&self, refused: bool) {
        self.hsm_login_refused.set(i64::from(refused));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scraped_counts_follow_their_sources_and_never_go_back() {
        let m = Metrics::new().unwrap();
        let line = |text: String, family: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("{family} ")))
                .map(str::to_string)
        };
        let scrape = |store_retries, hsm_call_timeouts, hsm_calls_stuck| {
            m.render_with(Scraped {
                store_retries,
                hsm_calls_stuck,
                hsm_call_timeouts,
                request_body_bytes_held: hsm_calls_stuck * 1000,
            })
            .unwrap()
        };
        for (retries, timeouts, stuck, want_retries, want_timeouts) in [
            (0, 0, 0, 0, 0),
            (5, 2, 2, 5, 2),
            // A store reopened with a smaller count does not make it go back.
            (3, 2, 0, 5, 2),
            (7, 4, 1, 7, 4),
        ] {
            let text = scrape(retries, timeouts, stuck);
            assert_eq!(
                line(text.clone(), "lavd_store_retries_total"),
                Some(format!("lavd_store_retries_total {want_retries}"))
            );
            assert_eq!(
                line(text.clone(), "lavd_hsm_call_timeouts_total"),
                Some(format!("lavd_hsm_call_timeouts_total {want_timeouts}"))
            );
            assert_eq!(
                line(text.clone(), "lavd_hsm_calls_stuck"),
                Some(format!("lavd_hsm_calls_stuck {stuck}"))
            );
            assert_eq!(
                line(text, "lavd_request_body_bytes_held"),
                Some(format!("lavd_request_body_bytes_held {}", stuck * 1000))
            );
        }
    }

    #[test]
    fn renders_every_family_with_static_labels() {
        let m = Metrics::new().unwrap();
        m.request("/v1/keys", 200, 0.002);
        m.request("unmatched", 404, 0.001);
        m.envelope("out_of_window");
        m.store_commit("audit_append", 0.003);
        m.unwrap_phases(&[("hsm", std::time::Duration::from_millis(300))]);
        m.tls_handshake_failure("certificate_expired");
        m.operation("ecdh_derive", 0.0002, true);
        m.sessions_busy(3);
        m.reconnected();
        m.config_reload(false);
        m.public_request("/v1/log/checkpoint", 200);
        m.public_tls_handshake_failure("handshake_timeout");
        m.public_connection_delta(1);
        let text = m.render().unwrap();
        for line in [
            "lavd_http_requests_total{route=\"/v1/keys\",status=\"200\"} 1",
            "lavd_http_requests_total{route=\"unmatched\",status=\"404\"} 1",
            "lavd_envelopes_total{outcome=\"out_of_window\"} 1",
            "lavd_store_commit_duration_seconds_count{op=\"audit_append\"} 1",
            "lavd_unwrap_phase_seconds_bucket{phase=\"hsm\",le=\"0.25\"} 0",
            "lavd_unwrap_phase_seconds_bucket{phase=\"hsm\",le=\"0.5\"} 1",
            "lavd_tls_handshake_failures_total{reason=\"certificate_expired\"} 1",
            "lavd_hsm_operation_duration_seconds_count{op=\"ecdh_derive\",result=\"ok\"} 1",
            "lavd_hsm_sessions_busy 3",
            "lavd_hsm_reconnects_total 1",
            "lavd_config_reloads_total{outcome=\"failed\"} 1",
            "lavd_connections_open 0",
            "lavd_public_requests_total{route=\"/v1/log/checkpoint\",status=\"200\"} 1",
            "lavd_public_tls_handshake_failures_total{reason=\"handshake_timeout\"} 1",
            "lavd_public_connections_open 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
    }

    #[test]
    fn each_instance_has_its_own_registry() {
        let a = Metrics::new().unwrap();
        let b = Metrics::new().unwrap();
        a.envelope("ok");
        assert!(!b.render().unwrap().contains("lavd_envelopes_total{"));
    }
}
