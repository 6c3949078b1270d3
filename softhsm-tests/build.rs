//! Builds the latency and fault PKCS#11 module (`pkcs11-shim/`, C) with the
//! system C compiler, so that tests and benchmarks can load it into a real
//! `lavd serve` like any vendor module. Its path reaches the crate as
//! `LAVD_PKCS11_SHIM`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "pkcs11-shim/lavd_pkcs11_shim.c";
    println!("cargo:rerun-if-changed={source}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let library = out.join("liblavd_pkcs11_shim.so");
    let include = "/usr/include/p11-kit-1";
    assert!(
        std::path::Path::new(include)
            .join("p11-kit/pkcs11.h")
            .is_file(),
        "{include}/p11-kit/pkcs11.h is missing: run .ci/setup --tests (it installs libp11-kit-dev)"
    );
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC"])
        .args(["-fvisibility=hidden", "-I", include, "-o"])
        .arg(&library)
        .arg(source)
        .args(["-ldl", "-lpthread"])
        .status()
        .expect("run the C compiler (cc): run .ci/setup --tests");
    assert!(status.success(), "building {source} failed");
    println!("cargo:rustc-env=LAVD_PKCS11_SHIM={}", library.display());
}
