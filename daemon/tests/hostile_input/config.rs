//! `lavd.toml` (`config/raw.rs` and its validation): the sample configs of
//! `hsm-config/` and a full server config, edited as bytes and as a TOML
//! tree (keys removed, values of another type, unknown keys); each edit is
//! accepted or refused naming a field and a reason (exit 64), never a panic.

use proptest::prelude::*;

use crate::common::{self, apply, apply_json, edits, json_edits};
use crate::targets::{self, AnyEnv};
use crate::warrant_common::{Authorities, DOUBLE_LOCK};

fn samples() -> &'static [String] {
    static S: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../hsm-config");
        let mut texts: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        assert!(texts.len() >= 4, "the hsm-config samples are the seeds");
        texts.push(full());
        texts
    })
}

/// Every table `lavd serve` reads.
fn full() -> String {
    let trust = Authorities::new().trust_toml(DOUBLE_LOCK);
    format!(
        r#"[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "lavd"
pin_env = "LAVD_HSM_PIN"
sessions = 4
[store]
path = "lavd.db"
[audit]
key_label = "lav-audit"
origin = "lavd.example/audit"
[server]
listen = "127.0.0.1:8443"
shutdown_grace_secs = 10
blocking_threads = 8
[tls]
cert = "server.pem"
key = "server.key"
client_cas = ["ca.pem"]
min_version = "1.3"
[admin]
listen = "127.0.0.1:9090"
[roles]
"spiffe://agency.example/lea/unit-7" = ["agency"]
"spiffe://ops.example/admin" = ["admin"]
[limits]
max_body_bytes = 1048576
max_batch = 1000
rate_limit_per_second = 50.0
rate_limit_burst = 100
[log]
format = "json"
level = "info"
{trust}"#
    )
}

proptest! {
    #![proptest_config(common::config())]

    #[test]
    fn arbitrary_text(text in "\\PC{0,300}") {
        targets::config(text.as_bytes());
    }

    #[test]
    fn byte_edits_of_the_samples(which in any::<prop::sample::Index>(), edits in edits()) {
        let text = &samples()[which.index(samples().len())];
        targets::config(&apply(text.as_bytes(), &edits));
    }

    /// Keys removed, values replaced by other types, unknown keys added:
    /// a refusal names a field of the file and a reason.
    #[test]
    fn tree_edits_of_the_samples(which in any::<prop::sample::Index>(), jedits in json_edits()) {
        let text = &samples()[which.index(samples().len())];
        let tree: serde_json::Value = toml::from_str(text).unwrap();
        let edited = apply_json(&tree, &jedits);
        // JSON null has no TOML spelling: such an edit is not a file.
        let Ok(toml_text) = toml::to_string(&edited) else { return Ok(()) };
        targets::config(toml_text.as_bytes());
        if let Err((field, reason)) = lavd::config::RawConfig::parse(&toml_text) {
            prop_assert!(!field.is_empty() && !reason.is_empty());
        }
    }
}

#[test]
fn the_full_config_validates() {
    let raw = lavd::config::RawConfig::parse(&full()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let settings = lavd::config::Settings::from_raw(raw, &dir.path().join("lavd.toml"), &AnyEnv);
    // The full config is valid apart from files it names, which the
    // validation does not open ([tls] files are read at serve time).
    assert!(settings.is_ok(), "{:?}", settings.err());
}
