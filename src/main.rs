//! The `mailferry` command line (DESIGN.md §6). Exit codes: 0 success, 1 the thing asked for
//! is not true or failed, 2 usage or connection error.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use hyper::Method;
use mailferry::admin::client::{self, segment};
use mailferry::config::{read_secret, Config};
use mailferry::route::Route;

#[derive(Parser)]
#[command(name = "mailferry", version, about = "Transparent IMAP/LMTP proxy for live mailbox migrations")]
struct Cli {
    /// Configuration file.
    #[arg(short, long, global = true, default_value = "config/mailferry.toml", env = "MAILFERRY_CONFIG")]
    config: PathBuf,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the IMAP and LMTP proxy, admin API and sync workers.
    Serve,
    /// Validate the configuration, certificates, secrets and backend reachability.
    CheckConfig,
    /// Per-user operations.
    User {
        #[command(subcommand)]
        action: UserCommand,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Route, state, progress and last error of a user.
    Show {
        /// The user's login.
        email: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Force the route now; live sessions are told to reconnect.
    Route {
        /// The user's login.
        email: String,
        /// Where the user goes.
        #[arg(value_parser = parse_route)]
        route: Route,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn parse_route(s: &str) -> Result<Route, String> {
    s.parse().map_err(|_| format!("route must be legacy or new, not {s:?}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mailferry: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mailferry: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAILFERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve => {
            let cfg = Config::load(&cli.config)?;
            let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .context("installing the metrics recorder")?;
            mailferry::server::serve(cfg, metrics).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig => check_config(&cli.config).await,
        Command::User { action } => {
            let cfg = Config::load(&cli.config)?;
            user(&cfg, action).await
        }
    }
}

async fn check_config(path: &std::path::Path) -> Result<ExitCode> {
    let cfg = match Config::load(path) {
        Ok(cfg) => cfg,
        Err(e) => {
            println!("{e}");
            return Ok(ExitCode::from(1));
        }
    };
    let mut problems = Vec::new();
    if let Err(e) = mailferry::net::tls::server_config(&cfg.resolve(&cfg.tls.cert), &cfg.resolve(&cfg.tls.key)) {
        problems.push(format!("tls: {e}"));
    }
    if let Err(e) = read_secret(&cfg.resolve(&cfg.admin.token_file)) {
        problems.push(format!("admin.token_file {}: {e}", cfg.admin.token_file.display()));
    }
    for route in [Route::Legacy, Route::New] {
        let b = cfg.backends.get(route);
        if let Some(f) = &b.master_password_file {
            if let Err(e) = read_secret(&cfg.resolve(f)) {
                problems.push(format!("backends.{route}.master_password_file {}: {e}", f.display()));
            }
        }
        if let Some(ca) = &b.ca_file {
            if let Err(e) = mailferry::net::tls::client_config(Some(&cfg.resolve(ca))) {
                problems.push(format!("backends.{route}.ca_file: {e}"));
            }
        }
        let addrs = [("imap", Some(&b.imap)), ("lmtp", b.lmtp.as_ref())];
        for (what, addr) in addrs {
            let Some(addr) = addr else { continue };
            let probe = tokio::time::timeout(
                std::time::Duration::from_secs(3),
                tokio::net::TcpStream::connect(addr.as_str()),
            )
            .await;
            if !matches!(probe, Ok(Ok(_))) {
                problems.push(format!("backends.{route}.{what} {addr} is unreachable"));
            }
        }
    }
    if let Err(e) = mailferry::server::open_directory(&cfg).await {
        problems.push(format!("state/directory: {e}"));
    }
    if problems.is_empty() {
        println!("configuration OK");
        Ok(ExitCode::SUCCESS)
    } else {
        for p in &problems {
            println!("- {p}");
        }
        Ok(ExitCode::from(1))
    }
}

async fn user(cfg: &Config, action: UserCommand) -> Result<ExitCode> {
    let addr = cfg
        .listen
        .admin
        .context("listen.admin is not set: the CLI talks to the server through it")?;
    let token = read_secret(&cfg.resolve(&cfg.admin.token_file))
        .with_context(|| format!("reading {}", cfg.admin.token_file.display()))?;
    let (method, path, body, json) = match &action {
        UserCommand::Show { email, json } => (Method::GET, format!("/api/users/{}", segment(email)), None, *json),
        UserCommand::Route { email, route, json } => (
            Method::PUT,
            format!("/api/users/{}/route", segment(email)),
            Some(serde_json::json!({ "route": route })),
            *json,
        ),
    };
    let resp = client::call(addr, &token, method, &path, body).await?;
    if resp.status != 200 {
        let msg = resp.body.get("error").and_then(|e| e.as_str()).unwrap_or("request failed");
        eprintln!("mailferry: server answered {}: {msg}", resp.status);
        return Ok(ExitCode::from(if resp.status == 401 { 2 } else { 1 }));
    }
    if json {
        println!("{}", resp.body);
        return Ok(ExitCode::SUCCESS);
    }
    let b = &resp.body;
    let s = |k: &str| b.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_owned();
    match action {
        UserCommand::Show { .. } => {
            println!("user:       {}", s("email"));
            let known = b.get("known").and_then(|v| v.as_bool()).unwrap_or(false);
            println!("route:      {}{}", s("route"), if known { "" } else { " (default: not in directory)" });
            println!("state:      {}", s("state"));
            println!("sessions:   {}", b.get("sessions").and_then(|v| v.as_u64()).unwrap_or(0));
            println!("last error: {}", s("last_error"));
        }
        UserCommand::Route { .. } => {
            let kicked = b.get("kicked").and_then(|v| v.as_u64()).unwrap_or(0);
            println!("{} now routed to {} ({kicked} live session(s) told to reconnect)", s("email"), s("route"));
        }
    }
    Ok(ExitCode::SUCCESS)
}
