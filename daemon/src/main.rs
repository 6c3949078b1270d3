//! `lavd`: parse the command line, set up logging, run the command. A bad
//! configuration exits with 64 (EX_USAGE) and names the file, field and reason.

use std::process::ExitCode;

use clap::Parser as _;
use lavd::cli::Cli;
use lavd::config::ConfigError;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LAVD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli.command.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lavd: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(64)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
