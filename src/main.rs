//! `ludus`: parses the command line, starts logging and hands over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = ludus::cli::Cli::parse();
    let level =
        ludus::settings::Settings::load(cli.config.as_deref()).map(|s| s.log.level).unwrap_or_else(|_| "info".into());
    ludus::cli::init_logging(&level);
    match ludus::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
