//! The command line (a contract): `run`, `check`, and the cluster commands `task`, `service`,
//! `node` that read and write etcd like `docker service ps` / `docker node ls`.

pub mod cluster;
pub mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::app::{self, Control};
use crate::config::{Config, DiscoveryBackend, LogFormat};
use crate::upgrade::{Takeover, UpgradeError};

#[derive(Debug, Parser)]
#[command(
    name = "routemesh",
    version,
    about = "Ingress routing-mesh load balancer"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon (without -c: the embedded static demo config).
    Run {
        /// Config file (TOML).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Take the sockets and the etcd lease over from the daemon running with this config
        /// (its [admin] upgrade_socket); it then drains and exits. `--upgrade=if-running`
        /// starts afresh when no daemon runs there.
        #[arg(
            long,
            value_name = "WHEN",
            num_args = 0..=1,
            default_missing_value = "always",
            require_equals = true
        )]
        upgrade: Option<UpgradeWhen>,
    },
    /// Validate a config file: every error as FILE:LINE:COL, exit 2; or a summary, exit 0.
    Check {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Register and remove tasks.
    #[command(subcommand)]
    Task(TaskCmd),
    /// List services and their tasks.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// List nodes and set their availability.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Publish ports on every node (listeners in etcd).
    #[command(subcommand)]
    Publish(PublishCmd),
    /// The cluster's ACME certificates ([acme]).
    #[command(subcommand)]
    Cert(CertCmd),
}

#[derive(Debug, Subcommand)]
pub enum CertCmd {
    /// Certificates with their names, expiry, issuer and state.
    Ls {
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

/// Where the cluster commands find etcd.
#[derive(Debug, Args, Clone)]
pub struct ClusterArgs {
    /// etcd endpoints, comma-separated.
    #[arg(long, env = "ROUTEMESH_ETCD", value_name = "URL[,URL…]", global = true)]
    pub etcd: Option<String>,
    /// Key prefix.
    #[arg(long, env = "ROUTEMESH_PREFIX", global = true)]
    pub prefix: Option<String>,
    /// Take endpoints and prefix from this config file.
    #[arg(short, long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum TaskCmd {
    /// Register a task; prints its id.
    Add {
        service: String,
        /// IP:PORT of the task.
        addr: String,
        #[arg(long)]
        id: Option<String>,
        /// Attach the task to this node's liveness lease: it vanishes when the node dies.
        #[arg(long)]
        node: Option<String>,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Ports every node publishes for the service while this task is registered
        /// (PORT[/PROTOCOL], protocol tcp by default; repeat or separate with commas).
        #[arg(long, value_name = "PORT[/PROTOCOL]", value_delimiter = ',')]
        publish: Vec<String>,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Remove a task.
    Rm {
        service: String,
        id: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Services with their task counts.
    Ls {
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Tasks of one service.
    Ps {
        service: String,
        /// Also show STATE and WHY as this node's daemon sees them (its admin address,
        /// e.g. 127.0.0.1:9901).
        #[arg(long, env = "ROUTEMESH_ADMIN", value_name = "HOST:PORT")]
        admin: Option<String>,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Nodes with their status and availability.
    Ls {
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Drain a node (its tasks get no new connections from any node) or make it active again.
    Update {
        /// `active` or `drain`.
        #[arg(long, value_name = "active|drain")]
        availability: AvailabilityArg,
        node: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

/// `run --upgrade[=WHEN]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpgradeWhen {
    /// Fail when no daemon runs.
    Always,
    /// Start afresh when no daemon runs (systemd units that take turns).
    IfRunning,
}

/// `node update --availability`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum AvailabilityArg {
    Active,
    Drain,
}

#[derive(Debug, Subcommand)]
pub enum PublishCmd {
    /// Publish a port of SERVICE on every node; prints the listener's name.
    Add {
        service: String,
        /// PORT[/PROTOCOL]: tcp (default), http or tls.
        #[arg(value_name = "PORT[/PROTOCOL]")]
        port: String,
        /// Listener name (default SERVICE-PORT-PROTOCOL).
        #[arg(long)]
        name: Option<String>,
        /// The IP every node binds (default 0.0.0.0, all addresses).
        #[arg(long, value_name = "IP")]
        listen: Option<String>,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Stop publishing a listener on every node.
    Rm {
        name: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// The cluster's published listeners, with how many Ready nodes bind each.
    Ls {
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// The state of one published listener on each node.
    Ps {
        name: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

/// Runs a parsed command line; the exit code follows the contract (2 for config errors).
pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok: node {}, {} listener(s), {} service setting(s), {} task(s), discovery {}",
                    config.display(),
                    c.node.name,
                    c.listeners.len(),
                    c.services.len(),
                    c.tasks.len(),
                    match c.discovery.backend {
                        DiscoveryBackend::Etcd => "etcd",
                        DiscoveryBackend::Static => "static",
                    }
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config, upgrade } => match load_or_default(config.as_deref()) {
            Ok(c) => run_daemon(c, upgrade),
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Task(cmd) => cluster::main(cluster::Op::Task(cmd)),
        Command::Service(cmd) => cluster::main(cluster::Op::Service(cmd)),
        Command::Node(cmd) => cluster::main(cluster::Op::Node(cmd)),
        Command::Publish(cmd) => cluster::main(cluster::Op::Publish(cmd)),
        Command::Cert(cmd) => cluster::main(cluster::Op::Cert(cmd)),
    }
}

/// The embedded default config (static backend, no etcd): config/static.toml.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/static.toml");

fn load_or_default(path: Option<&std::path::Path>) -> Result<Config, crate::config::ConfigError> {
    match path {
        Some(p) => Config::load(p),
        None => Config::parse(
            std::path::Path::new("<embedded config/static.toml>"),
            EMBEDDED_DEFAULT,
        ),
    }
}

fn init_tracing(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

fn run_daemon(config: Config, upgrade: Option<UpgradeWhen>) -> ExitCode {
    init_tracing(&config);
    // Every line of this process carries its pid and upgrade generation: the span is entered
    // on every runtime thread for good (and on this one, which runs block_on).
    let span = tracing::info_span!(
        "routemesh",
        pid = std::process::id(),
        generation = tracing::field::Empty
    );
    let _entered = span.clone().entered();
    // One worker: a current-thread runtime (no work-stealing queues or cross-thread wakeups,
    // the same shape as a single-threaded event loop). More: the multi-threaded scheduler.
    let mut builder = if config.runtime.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(config.runtime.worker_threads);
        b
    };
    let thread_span = span.clone();
    builder.on_thread_start(move || enter_for_good(&thread_span));
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let (control_tx, control_rx) = mpsc::channel(4);
        if let Err(e) = spawn_signal_handlers(shutdown.clone(), control_tx) {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
        let upgrade_when = upgrade;
        let upgrade = match upgrade_when {
            None => None,
            Some(when) => match take_over(&config, when).await {
                Ok(u) => u,
                Err(e) => {
                    eprintln!("error: upgrade failed: {e}");
                    return ExitCode::from(UPGRADE_FAILED);
                }
            },
        };
        let generation = upgrade.as_ref().map_or(1, |u| u.inherited.generation);
        span.record("generation", generation);
        if upgrade_when.is_some() && upgrade.is_none() {
            tracing::info!(path = ?config.admin.upgrade_socket, "--upgrade=if-running: no routemesh runs there; starting afresh");
        }
        match &upgrade {
            Some(u) => tracing::info!(node = %config.node.name, version = env!("CARGO_PKG_VERSION"), previous_pid = u.inherited.previous_pid, previous_version = %u.inherited.previous_version, "routemesh starting: taking over from the running process"),
            None => tracing::info!(node = %config.node.name, version = env!("CARGO_PKG_VERSION"), "routemesh starting"),
        }
        let taking_over = upgrade.is_some();
        match app::run(config, control_rx, shutdown, upgrade).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("error: {e}");
                // Started with --upgrade, any failure is before the takeover completed:
                // the running daemon serves on.
                if taking_over {
                    ExitCode::from(UPGRADE_FAILED)
                } else {
                    ExitCode::FAILURE
                }
            }
        }
    })
}

/// The exit code of a `run --upgrade` that did not take over (the running daemon serves on);
/// 2 is a config error, 1 any other failure.
pub const UPGRADE_FAILED: u8 = 3;

/// Connects to the running daemon's upgrade socket and receives its sockets and lease;
/// `None` when none runs and `when` allows a fresh start.
async fn take_over(
    config: &Config,
    when: UpgradeWhen,
) -> Result<Option<app::Upgrade>, UpgradeError> {
    let path = config
        .admin
        .upgrade_socket
        .as_deref()
        .ok_or(UpgradeError::Disabled)?;
    match Takeover::connect(path).await {
        Ok((takeover, inherited)) => Ok(Some(app::Upgrade {
            takeover,
            inherited,
        })),
        Err(e) if e.nothing_running() && when == UpgradeWhen::IfRunning => Ok(None),
        Err(e) => Err(e),
    }
}

thread_local! {
    static THREAD_SPAN: std::cell::RefCell<Option<tracing::span::EnteredSpan>> =
        const { std::cell::RefCell::new(None) };
}

/// Enters `span` on this thread until the thread ends.
fn enter_for_good(span: &tracing::Span) {
    let entered = span.clone().entered();
    THREAD_SPAN.with(|s| *s.borrow_mut() = Some(entered));
}

fn spawn_signal_handlers(
    shutdown: CancellationToken,
    control: mpsc::Sender<Control>,
) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM received"); shutdown.cancel(); }
                _ = int.recv() => { tracing::info!("SIGINT received"); shutdown.cancel(); }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP received: reloading the config");
                    let _ = control.try_send(Control::Reload);
                    continue;
                }
            }
            break;
        }
    });
    Ok(())
}
