//! `ludus`: parses the command line, starts logging and hands over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = ludus::cli::Cli::parse();
    let (level, format) = ludus::settings::Settings::load(cli.config.as_deref())
        .map(|s| (s.log.level, s.log.format))
        .unwrap_or_else(|_| ("info".into(), "text".into()));
    ludus::cli::init_logging(&level, cli.log_format.as_deref().unwrap_or(&format));
    match ludus::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
