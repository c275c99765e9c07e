//! The `director` command: `serve`, `check-config`, `route`, and the admin verbs (`status`,
//! `add`, `down`, `maintenance`...), which talk to the running director through the admin
//! socket named in the same configuration file. `serve` reloads its configuration on SIGHUP and
//! stops gracefully on SIGTERM (a second one exits at once).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use director::admin::client;
use director::admin::AdminRequest;
use director::config::{Config, LogFormat};
use director::server::prepare::{check, load_config, resolve_backends};
use director::server::reload::LogLevelHook;
use director::server::Director;
use std::sync::Arc;

/// mimalloc rather than glibc's malloc: a login makes some sixty small allocations (task,
/// socket registrations, buffers, strings), and glibc spent a sixth of the login's user-space
/// instructions on them, aligned ones (tokio's tasks and I/O registrations) most of all
/// (BENCHMARKS.md, `scripts/bench callgrind`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Admin verbs: print the director's reply as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StartStop {
    Start,
    Stop,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PauseResume {
    Pause,
    Resume,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 30m or 2h: {e}"))
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
    /// Every backend (address, tag, weight, admin state, health, last check, users,
    /// sessions), or one user (current and hashed backend, record expiry).
    Status { user: Option<String> },
    /// Users with a sticky record, optionally only those of one backend, a page at a time
    /// (1000 users unless `--limit`); the last line says how to get the next page.
    Map {
        host: Option<String>,
        /// Start after this user hash: the `--after` that the previous page printed.
        #[arg(long)]
        after: Option<u32>,
        /// Users per page, 1..100000 (default 1000).
        #[arg(long)]
        limit: Option<usize>,
        /// Every page, one after the other (with `--json`: one JSON object per page and line).
        #[arg(long, conflicts_with = "after")]
        all: bool,
    },
    /// Add a backend (a name adds every address it resolves to), or set an existing one's
    /// weight and tag (`--tag TAG`, or `HOST@TAG` as Dovecot writes it). Nobody with a record
    /// moves.
    Add {
        host: String,
        /// Points on the ring, 0..1000 (default 100).
        weight: Option<u32>,
        #[arg(short = 't', long)]
        tag: Option<String>,
    },
    /// Set a backend's weight (in maintenance: the weight restored at its end).
    Update { host: String, weight: u32 },
    /// Let a backend take users again (ends a maintenance).
    Up { host: String },
    /// Take a backend out: its users are moved off (sessions ended first).
    Down { host: String },
    /// Move a backend's users off, then forget the backend.
    Remove { host: String },
    /// Move a user to a backend: its sessions are ended, then its record points there.
    Move { user: String, host: String },
    /// End a user's sessions (its record stays).
    Kick { user: String },
    /// Send the users of HOST (or `all`) where the ring sends them now: sessions of users
    /// who change backend are ended first. `--force` only drops the records.
    Flush {
        target: String,
        #[arg(short = 'F', long)]
        force: bool,
    },
    /// Print the commands that recreate the admin state.
    Dump,
    /// Run the commands of a dump (`director dump`, or `doveadm director dump` for
    /// migration) from FILE, or `-` for standard input.
    Import { file: String },
    /// Maintenance of a backend: weight 0, users moved off, checks skipped; allowed test
    /// users still go there. `stop` restores the weight.
    Maintenance {
        host: String,
        action: StartStop,
        /// End by itself after this long (e.g. 2h).
        #[arg(long = "for", value_parser = duration)]
        for_: Option<Duration>,
        /// A user still routed to the backend (repeatable).
        #[arg(long = "allow-user")]
        allow_user: Vec<String>,
    },
    /// Reload the configuration file of the running director (as SIGHUP does): listeners,
    /// limits, TLS certificate, backend and health settings, log level. A file that does not
    /// check is refused (the error is printed) and the running configuration stays.
    Reload,
    /// Pause or resume all health checks.
    Checks {
        action: PauseResume,
        /// Resume by itself after this long (e.g. 30m).
        #[arg(long = "for", value_parser = duration)]
        for_: Option<Duration>,
    },
}

impl Command {
    /// The admin request of an admin verb (`None` for the others).
    fn request(&self) -> Option<AdminRequest> {
        let host = |h: &String| h.clone();
        Some(match self {
            Command::Serve
            | Command::CheckConfig
            | Command::Route { .. }
            | Command::Import { .. } => return None,
            Command::Status { user: None } => AdminRequest::Status,
            Command::Status { user: Some(u) } => AdminRequest::UserStatus { user: u.clone() },
            Command::Map {
                host, after, limit, ..
            } => AdminRequest::Map {
                host: host.clone(),
                after: *after,
                limit: *limit,
            },
            // `HOST@TAG`, as Dovecot's `doveadm director add` takes a tagged host.
            Command::Add { host, weight, tag } => match (host.split_once('@'), tag) {
                (Some((bare, at_tag)), None) => AdminRequest::Add {
                    host: bare.to_owned(),
                    weight: *weight,
                    tag: Some(at_tag.to_owned()),
                },
                _ => AdminRequest::Add {
                    host: host.clone(),
                    weight: *weight,
                    tag: tag.clone(),
                },
            },
            Command::Update { host, weight } => AdminRequest::Update {
                host: host.clone(),
                weight: *weight,
            },
            Command::Up { host: h } => AdminRequest::Up { host: host(h) },
            Command::Down { host: h } => AdminRequest::Down { host: host(h) },
            Command::Remove { host: h } => AdminRequest::Remove { host: host(h) },
            Command::Move { user, host: h } => AdminRequest::Move {
                user: user.clone(),
                host: host(h),
            },
            Command::Kick { user } => AdminRequest::Kick { user: user.clone() },
            Command::Flush { target, force } => AdminRequest::Flush {
                host: (target != "all").then(|| target.clone()),
                force: *force,
            },
            Command::Dump => AdminRequest::Dump,
            Command::Reload => AdminRequest::Reload,
            Command::Maintenance {
                host: h,
                action: StartStop::Start,
                for_,
                allow_user,
            } => AdminRequest::MaintenanceStart {
                host: host(h),
                for_secs: for_.map(|d| d.as_secs().max(1)),
                allow_users: allow_user.clone(),
            },
            Command::Maintenance {
                host: h,
                action: StartStop::Stop,
                ..
            } => AdminRequest::MaintenanceStop { host: host(h) },
            Command::Checks {
                action: PauseResume::Pause,
                for_,
            } => AdminRequest::ChecksPause {
                for_secs: for_.map(|d| d.as_secs().max(1)),
            },
            Command::Checks {
                action: PauseResume::Resume,
                ..
            } => AdminRequest::ChecksResume,
        })
    }
}

/// Runs one admin verb against the running director.
/// `check-config`'s second line: single or cluster, and where the state is kept.
fn mode_line(config: &Config) -> String {
    match (&config.cluster, &config.state_file) {
        (Some(c), _) => format!(
            "mode: cluster: director_id {}, state in etcd {} under {}",
            c.director_id,
            c.etcd.endpoints.join(" "),
            c.etcd.prefix
        ),
        (None, Some(path)) => format!("mode: single director: state kept in {}", path.display()),
        (None, None) => {
            "mode: single director: no state_file, admin changes last until it stops".into()
        }
    }
}

fn admin_verb(config: &Config, req: &AdminRequest, json: bool) -> ExitCode {
    match client::call(&config.admin.socket, req) {
        Ok(value) => match client::print(req, &value, json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("director: {e}");
                ExitCode::from(1)
            }
        },
        Err(e @ client::ClientError::Connect { .. }) => {
            eprintln!("director: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("director: {e}");
            ExitCode::from(1)
        }
    }
}

/// `director import FILE|-`: every line is checked first, then run in order; the first
/// refusal stops the import.
fn import(config: &Config, file: &str, json: bool) -> ExitCode {
    let text = if file == "-" {
        let mut t = String::new();
        std::io::stdin().read_to_string(&mut t).map(|_| t)
    } else {
        std::fs::read_to_string(file)
    };
    let text = match text {
        Ok(t) => t,
        Err(e) => {
            eprintln!("director: import: cannot read {file}: {e}");
            return ExitCode::from(2);
        }
    };
    let mut requests = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let parsed = client::import_words(line).and_then(|words| {
            let Some(words) = words else { return Ok(None) };
            let cli = Cli::try_parse_from(std::iter::once("director".to_owned()).chain(words))
                .map_err(|e| e.to_string().lines().next().unwrap_or("").to_owned())?;
            match cli.command.request() {
                Some(r)
                    if r.is_change()
                        && !matches!(
                            r,
                            AdminRequest::Move { .. }
                                | AdminRequest::Kick { .. }
                                | AdminRequest::Flush { .. }
                        ) =>
                {
                    Ok(Some(r))
                }
                _ => Err(
                    "only add, update, up, down, remove, maintenance and checks can be imported"
                        .into(),
                ),
            }
        });
        match parsed {
            Ok(Some(r)) => requests.push((n + 1, line, r)),
            Ok(None) => {}
            Err(e) => {
                eprintln!("director: import: {file}:{}: {e}: {line}", n + 1);
                return ExitCode::from(2);
            }
        }
    }
    for (n, line, req) in &requests {
        match client::call(&config.admin.socket, req) {
            Ok(value) => {
                if !json {
                    print!("{file}:{n}: ");
                }
                let _ = client::print(req, &value, json);
            }
            Err(e) => {
                eprintln!("director: import: {file}:{n}: {e}: {line}");
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    // Log lines wait in a batch (src/log_sink.rs): written out before a panic's message and
    // at every exit.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        director::log_sink::flush();
        default_hook(info);
    }));
    let code = run();
    director::log_sink::flush();
    code
}

fn run() -> ExitCode {
    let cli = Cli::parse();
    let config = match load_config(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            init_logs(LogFormat::Text, "info");
            eprintln!("director: {e}");
            if matches!(cli.command, Command::Reload) {
                eprintln!("director: reload refused: the running director was not asked and keeps its configuration");
            }
            return ExitCode::from(2);
        }
    };
    let log_level = init_logs(config.log_format, &config.log_level);
    if let Command::Import { file } = &cli.command {
        return import(&config, file, cli.json);
    }
    if let (Command::Map { all: true, .. }, Some(req)) = (&cli.command, cli.command.request()) {
        return match client::map_all(&config.admin.socket, &req, cli.json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("director: {e}");
                ExitCode::from(match e {
                    client::ClientError::Connect { .. } => 2,
                    client::ClientError::Refused(_) => 1,
                })
            }
        };
    }
    if let Some(req) = cli.command.request() {
        return admin_verb(&config, &req, cli.json);
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async move {
        match cli.command {
            Command::CheckConfig => match check(&config).await {
                Ok(n) => {
                    println!("{}: OK ({n} backends)", cli.config.display());
                    println!("{}", mode_line(&config));
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
                let hash = director::routing::user_hash::UserHash::from_config(&config)
                    .expect("checked when the configuration was loaded")
                    .hash(&user);
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
                use tokio::signal::unix::{signal, SignalKind};
                // Handlers first: from here on SIGHUP reloads instead of killing.
                let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
                let stops = StopSignals::new();
                let director = match Director::build(&config).await {
                    Ok(d) => d,
                    Err(e) => {
                        eprintln!("director: {}: {e}", cli.config.display());
                        return ExitCode::from(2);
                    }
                };
                director
                    .reloader
                    .set_path(std::path::absolute(&cli.config).unwrap_or(cli.config.clone()));
                director.reloader.set_log_level(log_level);
                let reloader = director.reloader.clone();
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!("SIGHUP: reloading the configuration");
                        let _ = reloader.reload().await;
                    }
                });
                director.run(stops.first()).await;
                ExitCode::SUCCESS
            }
            // Admin verbs and import returned above.
            _ => ExitCode::from(2),
        }
    })
}

/// Logs go to stderr, at the level `log_level` sets (default `info`) unless `RUST_LOG` is
/// set, as `key=value` text or one JSON object a line (`log_format`). Returns how a reload
/// applies a new `log_level` (nothing while `RUST_LOG` is set: it wins).
fn init_logs(format: LogFormat, level: &str) -> LogLevelHook {
    use tracing_subscriber::EnvFilter;
    let from_env = std::env::var("RUST_LOG").is_ok_and(|v| !v.is_empty());
    let filter = if from_env {
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level))
    } else {
        EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"))
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(director::log_sink::sink());
    macro_rules! hook {
        ($handle:expr) => {{
            let handle = $handle;
            Arc::new(move |level: &str| {
                if from_env {
                    return Ok(());
                }
                let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
                handle.reload(filter).map_err(|e| e.to_string())
            })
        }};
    }
    match format {
        LogFormat::Json => {
            let logs = logs
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_filter_reloading();
            let handle = logs.reload_handle();
            logs.init();
            hook!(handle)
        }
        // No colours: in a log file or the journal they split `key=value`.
        LogFormat::Text => {
            let logs = logs
                .event_format(director::log_line::TextLine)
                .with_filter_reloading();
            let handle = logs.reload_handle();
            logs.init();
            // The same text and the same sink: a session's two lines may skip tracing.
            director::log_line::allow_direct();
            hook!(handle)
        }
    }
}

/// SIGTERM and SIGINT: the first starts a graceful stop, a second exits at once.
struct StopSignals {
    first: tokio::sync::oneshot::Receiver<()>,
}

impl StopSignals {
    fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let (tx, first) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            let _ = tx.send(());
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            tracing::warn!("second stop signal: exiting at once, open sessions cut");
            director::log_sink::flush();
            std::process::exit(1);
        });
        StopSignals { first }
    }

    /// Completes at the first stop signal.
    async fn first(self) {
        let _ = self.first.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(args: &[&str]) -> Option<AdminRequest> {
        let cli =
            Cli::try_parse_from(std::iter::once("director").chain(args.iter().copied())).unwrap();
        cli.command.request()
    }

    #[test]
    fn add_takes_a_tag_as_dovecot_writes_it_or_as_an_option() {
        let tagged = |host: &str, tag: &str| AdminRequest::Add {
            host: host.into(),
            weight: Some(50),
            tag: Some(tag.into()),
        };
        assert_eq!(
            request(&["add", "10.0.0.3@vip", "50"]),
            Some(tagged("10.0.0.3", "vip"))
        );
        assert_eq!(
            request(&["add", "10.0.0.3", "50", "--tag", "vip"]),
            Some(tagged("10.0.0.3", "vip"))
        );
    }
}
