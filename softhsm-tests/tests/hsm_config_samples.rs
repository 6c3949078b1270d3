//! Every sample in `hsm-config/` parses and validates; the SoftHSM one opens
//! a real token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lavd::config::{Env, RawConfig, Settings};
use lavd::hsm::Hsm;
use softhsm_tests::{harness, PIN};

struct MapEnv(HashMap<&'static str, String>);
impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

fn samples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hsm-config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn load(path: &Path) -> Settings {
    let text = std::fs::read_to_string(path).unwrap();
    let raw = RawConfig::parse(&text)
        .unwrap_or_else(|(field, reason)| panic!("{}: {field}: {reason}", path.display()));
    let env = MapEnv(HashMap::from([("LAVD_HSM_PIN", PIN.to_string())]));
    Settings::from_raw(raw, path, &env).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_sample_parses_and_validates() {
    let files = samples();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "aws-cloudhsm.toml",
            "softhsm2.toml",
            "thales-luna.toml",
            "yubihsm2.toml"
        ]
    );
    for file in files {
        let settings = load(&file);
        assert!(settings.hsm.module.is_absolute(), "{}", file.display());
        assert!((1..=256).contains(&settings.hsm.sessions));
    }
}

#[test]
fn the_softhsm_sample_opens_a_real_token() {
    // The harness creates a token labelled `lavd`, as the sample expects.
    harness();
    let mut settings =
        load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../hsm-config/softhsm2.toml"));
    settings.hsm.module = softhsm_tests::module_path();
    let hsm = Hsm::open(settings.hsm).unwrap();
    assert!(hsm.is_ready());
}

/// The witness sample parses and validates as `lavd witness serve` reads
/// it, and `dev`-only key files are refused in it.
#[test]
fn the_witness_sample_validates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hsm-config/witness/softhsm2.toml");
    let env = MapEnv(HashMap::from([("LAVD_WITNESS_PIN", PIN.to_string())]));
    let settings =
        lavd::config::WitnessSettings::load(&path, &env).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(settings.name, "witness.oversight.example/w1");
    assert_eq!(settings.logs.len(), 1);
    assert!(settings.require_tls().is_ok());
    assert!(matches!(
        settings.key,
        lavd::config::WitnessKeySource::Hsm { ref label, .. } if label == "lav-witness"
    ));
}
