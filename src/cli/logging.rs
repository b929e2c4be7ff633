//! Log output: `tracing` to stderr, as text or one JSON object per line.

/// Initializes tracing logs to stderr: `RUST_LOG` when set, else `level`; `json` writes
/// one JSON object per line (timestamp, level, target, fields such as `task` and `node`).
pub fn init_logging(level: &str, format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        let _ = builder.json().with_current_span(false).try_init();
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let _ = builder.with_ansi(ansi).try_init();
    }
}
