//! The `switchboard` binary: parse configuration, set up logging, bind the
//! listener and run one instance until SIGINT or SIGTERM. `switchboard token`
//! prints a development JWT instead.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchboard::config::{AuthMode, Config, LogFormat, TokenArgs};
use tracing_subscriber::EnvFilter;

#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main`: a background thread purges freed
/// pages (dirty after 1 s, no muzzy stage), so memory a closed connection
/// used goes back to the system instead of staying in the heap. The symbol
/// is jemalloc's documented configuration hook (`malloc_conf`, prefixed
/// `_rjem_` by tikv-jemalloc-sys); `_RJEM_MALLOC_CONF` in the environment
/// still overrides it.
#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 60] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The command line: the server's flags, or a subcommand.
#[derive(Debug, Parser)]
#[command(
    name = "switchboard",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    server: Config,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a JWT for the configured key and exit (development): a
    /// connection token, or with --room a per-room token.
    Token(TokenArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Token(args)) = cli.command {
        return print_token(&args);
    }
    let mut config = match cli.server.validate() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("switchboard: {e}");
            return ExitCode::from(2);
        }
    };
    let files = raise_open_files_limit();
    if let Err(e) = config.fit_max_connections(files.now) {
        eprintln!("switchboard: {e}");
        return ExitCode::from(2);
    }
    let runtime = match config.threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    match runtime {
        Ok(runtime) => runtime.block_on(serve(config, files)),
        Err(e) => {
            eprintln!("switchboard: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `switchboard token`: the token on stdout, or the error on stderr (exit 2).
fn print_token(args: &TokenArgs) -> ExitCode {
    let now_s = switchboard::router::now_ms() / 1000;
    match switchboard::auth::mint(args, now_s) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("switchboard token: {e}");
            ExitCode::from(2)
        }
    }
}

/// The open-files limit before and after start-up raised it.
#[derive(Debug, Clone, Copy)]
struct OpenFiles {
    /// The soft limit the process was started with.
    was: u64,
    /// The soft limit now (the hard limit, unless raising it failed).
    now: u64,
    /// The hard limit.
    hard: u64,
}

/// Raises the soft open-files limit to the hard one: every connection is a
/// file descriptor, and the usual soft default (1024) would cap an instance
/// at about a thousand connections.
fn raise_open_files_limit() -> OpenFiles {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let was = limit.current.unwrap_or(u64::MAX);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    let now = if was < hard
        && setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        )
        .is_ok()
    {
        hard
    } else {
        was
    };
    OpenFiles { was, now, hard }
}

async fn serve(config: Config, files: OpenFiles) -> ExitCode {
    // The redis crate warns once per failed reconnect attempt (dozens a
    // second while a cluster node is down); our own lines say it once. Its
    // warnings come back with a RUST_LOG directive for it (`redis=warn`).
    let env = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let names_redis = env.split(',').any(|d| d.trim().starts_with("redis"));
    let filter = if names_redis {
        EnvFilter::new(env)
    } else {
        EnvFilter::new(format!("{env},redis=error"))
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    if config.auth == AuthMode::None {
        tracing::warn!(
            "AUTH IS DISABLED (--auth none): anyone can connect as any user with ?user=NAME. \
             Development only; never expose this instance."
        );
    }
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    tracing::info!(
        soft_at_start = files.was,
        soft = files.now,
        hard = files.hard,
        max_connections = config.max_connections(),
        "open-files limit"
    );
    if files.now < files.hard {
        tracing::warn!(
            soft = files.now,
            hard = files.hard,
            "could not raise the open-files limit to the hard limit"
        );
    }
    let listener = match listen(config.listen) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(addr = %config.listen, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    match switchboard::server::run(config, listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "switchboard failed");
            ExitCode::FAILURE
        }
    }
}

/// Connections the kernel queues before the accept loop takes them (capped
/// by `net.core.somaxconn`). The default of the standard library and mio,
/// 128, overflows under a reconnect storm: thousands of clients of a killed
/// instance arrive within a second.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the HTTP/WebSocket listener with [`LISTEN_BACKLOG`].
fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown signal received");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_subcommand_runs_the_server() {
        let cli = Cli::try_parse_from(["switchboard", "--auth", "none"]).expect("parse");
        assert!(cli.command.is_none());
        assert_eq!(cli.server.auth, AuthMode::None);
        let cli = Cli::try_parse_from([
            "switchboard",
            "token",
            "--user",
            "alice",
            "--rooms",
            "lobby,team-42:*",
            "--ttl",
            "1h",
            "--jwt-secret",
            "s",
        ])
        .expect("parse");
        let Some(Command::Token(args)) = cli.command else {
            panic!("token subcommand");
        };
        assert_eq!(args.rooms, ["lobby", "team-42:*"]);
        assert_eq!(args.ttl, std::time::Duration::from_secs(3600));
        // Server flags belong before no subcommand.
        assert!(
            Cli::try_parse_from(["switchboard", "--auth", "none", "token", "--user", "a"]).is_err()
        );
    }
}
