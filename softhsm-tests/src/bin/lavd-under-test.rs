//! The `lavd` command line built inside this test crate, so that integration
//! tests can run it as a real process through `CARGO_BIN_EXE_lavd-under-test`
//! (Cargo only exposes binaries of the package under test). It is the same
//! code as `daemon/src/main.rs`: both call [`lavd::cli::main`].

fn main() -> std::process::ExitCode {
    lavd::cli::main()
}
