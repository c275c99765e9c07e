//! The `director` command: `serve`, `check-config`, `route`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use director::config::Config;
use director::server::{resolve_backends, Director};

/// Where the configuration is looked for when `-c` is not given.
const DEFAULT_CONFIG: &str = "/etc/director/config.yaml";

#[derive(Parser)]
#[command(
    name = "director",
    version,
    about = "A sticky mail director for IMAP/POP3 backends"
)]
struct Cli {
    /// Configuration file.
    #[arg(short = 'c', long = "config", global = true, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve: listen for clients and relay them to their backends.
    Serve,
    /// Check the configuration file and exit (0 if valid).
    CheckConfig,
    /// Print the backend a user would be sent to by a freshly started director (the ring).
    Route {
        /// The login name.
        user: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: in a log file or the journal they split `key=value`.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("director: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async move {
        match cli.command {
            Command::CheckConfig => match resolve_backends(&config).await {
                Ok(b) => {
                    println!("{}: OK ({} backends)", cli.config.display(), b.len());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("director: {}: {e}", cli.config.display());
                    ExitCode::from(2)
                }
            },
            Command::Route { user } => {
                let backends = match resolve_backends(&config).await {
                    Ok(b) => b,
                    Err(e) => {
                        eprintln!("director: {}: {e}", cli.config.display());
                        return ExitCode::from(2);
                    }
                };
                let set = director::state::BackendSet::new(backends);
                let hash = config.user_hash().hash(&user);
                match set.ring("").and_then(|r| r.lookup(hash)) {
                    Some(ip) => {
                        println!("{user}\thash={hash}\tbackend={ip}");
                        ExitCode::SUCCESS
                    }
                    None => {
                        eprintln!("director: no backend can take users");
                        ExitCode::from(1)
                    }
                }
            }
            Command::Serve => {
                let director = match Director::build(&config).await {
                    Ok(d) => d,
                    Err(e) => {
                        eprintln!("director: {}: {e}", cli.config.display());
                        return ExitCode::from(2);
                    }
                };
                director.run(shutdown_signal()).await;
                ExitCode::SUCCESS
            }
        }
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}
