//! The `lavd` binary; everything it does is in [`lavd::cli::main`].

fn main() -> std::process::ExitCode {
    lavd::cli::main()
}
