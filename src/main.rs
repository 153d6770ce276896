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
#[command(
    name = "mailferry",
    version,
    about = "Transparent IMAP/LMTP proxy for live mailbox migrations"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        short,
        long,
        global = true,
        default_value = "config/mailferry.toml",
        env = "MAILFERRY_CONFIG"
    )]
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
    /// Copy a user's mail from legacy to new (needs `master_user` and `master_password_file`
    /// on both backends; state goes to the `[state]` store, so passes resume and never duplicate).
    Sync {
        /// The user's login.
        email: String,
        /// One pass now, without a server (continuous sync runs in `serve`: `user migrate`).
        #[arg(long)]
        once: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Compare legacy and new for a user: exit 0 same, 1 different, 2 error.
    Verify {
        /// The user's login.
        email: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
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
    /// State `syncing`: the server copies the user's mail in the background, then keeps it current.
    Migrate {
        /// The user's login.
        email: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn parse_route(s: &str) -> Result<Route, String> {
    s.parse()
        .map_err(|_| format!("route must be legacy or new, not {s:?}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
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
        Command::Sync {
            email,
            once,
            json,
            quiet,
        } => {
            if !once {
                eprintln!("mailferry: only `sync EMAIL --once` runs without a server; `user migrate EMAIL` starts continuous sync");
                return Ok(ExitCode::from(2));
            }
            let cfg = Config::load(&cli.config)?;
            sync_once(&cfg, &email, json, quiet).await
        }
        Command::Verify { email, json } => {
            let cfg = Config::load(&cli.config)?;
            verify(&cfg, &email, json).await
        }
    }
}

/// Exit code for a sync error: 2 when a backend or the config could not be used, else 1.
fn sync_exit(e: &mailferry::sync::SyncError) -> ExitCode {
    if e.is_connection_error() {
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}

async fn sync_once(cfg: &Config, email: &str, json: bool, quiet: bool) -> Result<ExitCode> {
    use mailferry::sync::{pass_with_retry, Engine, Progress};
    use std::sync::atomic::Ordering::Relaxed;
    let email = mailferry::route::normalize_user(email);
    let store = mailferry::store::open(&cfg.state.url).await?;
    let engine = match Engine::from_config(cfg, store) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("mailferry: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let progress = std::sync::Arc::new(Progress::default());
    let bar = (!quiet && !json).then(|| {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(0),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        ) {
            bar.set_style(style);
        }
        bar
    });
    let ticker = bar.clone().map(|bar| {
        let p = progress.clone();
        tokio::spawn(async move {
            loop {
                bar.set_length(p.bytes_total.load(Relaxed));
                bar.set_position(p.bytes_done.load(Relaxed));
                let folder = p.folder.lock().map(|f| f.clone()).unwrap_or_default();
                bar.set_message(format!(
                    "{}/{} messages {folder}",
                    p.messages_done.load(Relaxed),
                    p.messages_total.load(Relaxed)
                ));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
    });
    let result = pass_with_retry(&engine, &email, Some(progress), 3).await;
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match result {
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{email}: {} folders ({} changed), {} messages appended ({} bytes), {} recovered, {} re-matched, \
                     {} flag updates, {} expunged, {} not copyable, {} ms",
                    r.folders, r.folders_changed, r.appended, r.appended_bytes, r.recovered, r.rematched,
                    r.flag_updates, r.expunged, r.failed, r.duration_ms
                );
            }
            Ok(if r.failed > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Err(e) => {
            eprintln!("mailferry: sync of {email} failed: {e}");
            Ok(sync_exit(&e))
        }
    }
}

async fn verify(cfg: &Config, email: &str, json: bool) -> Result<ExitCode> {
    use mailferry::sync::client::Endpoint;
    let email = mailferry::route::normalize_user(email);
    let setup = || -> Result<_, mailferry::sync::SyncError> {
        mailferry::net::tls::install_provider();
        let rules = mailferry::sync::mailboxes::Rules::from_config(&cfg.sync)
            .map_err(|e| mailferry::sync::SyncError::Config(e.to_string()))?;
        Ok((
            Endpoint::from_config(cfg, Route::Legacy)?,
            Endpoint::from_config(cfg, Route::New)?,
            rules,
        ))
    };
    let result = match setup() {
        Ok((legacy, new, rules)) => {
            mailferry::sync::verify::verify(&legacy, &new, &rules, &email).await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else if r.same() {
                println!(
                    "{email}: same ({} folders, {} messages)",
                    r.folders, r.messages
                );
            } else {
                println!(
                    "{email}: {} difference(s) ({} folders, {} messages on legacy):",
                    r.differences.len(),
                    r.folders,
                    r.messages
                );
                for d in &r.differences {
                    println!("  - {d}");
                }
            }
            Ok(if r.same() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Err(e) => {
            eprintln!("mailferry: verify of {email} failed: {e}");
            Ok(ExitCode::from(2))
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
    if let Err(e) =
        mailferry::net::tls::server_config(&cfg.resolve(&cfg.tls.cert), &cfg.resolve(&cfg.tls.key))
    {
        problems.push(format!("tls: {e}"));
    }
    if let Err(e) = read_secret(&cfg.resolve(&cfg.admin.token_file)) {
        problems.push(format!(
            "admin.token_file {}: {e}",
            cfg.admin.token_file.display()
        ));
    }
    for route in [Route::Legacy, Route::New] {
        let b = cfg.backends.get(route);
        if let Some(f) = &b.master_password_file {
            if let Err(e) = read_secret(&cfg.resolve(f)) {
                problems.push(format!(
                    "backends.{route}.master_password_file {}: {e}",
                    f.display()
                ));
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
        UserCommand::Show { email, json } => (
            Method::GET,
            format!("/api/users/{}", segment(email)),
            None,
            *json,
        ),
        UserCommand::Route { email, route, json } => (
            Method::PUT,
            format!("/api/users/{}/route", segment(email)),
            Some(serde_json::json!({ "route": route })),
            *json,
        ),
        UserCommand::Migrate { email, json } => (
            Method::POST,
            format!("/api/users/{}/migrate", segment(email)),
            None,
            *json,
        ),
    };
    let resp = client::call(addr, &token, method, &path, body).await?;
    if resp.status != 200 {
        let msg = resp
            .body
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("request failed");
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
            println!(
                "route:      {}{}",
                s("route"),
                if known {
                    ""
                } else {
                    " (default: not in directory)"
                }
            );
            println!("state:      {}", s("state"));
            println!(
                "sessions:   {}",
                b.get("sessions").and_then(|v| v.as_u64()).unwrap_or(0)
            );
            println!("last error: {}", s("last_error"));
            if let Some(p) = b.get("sync") {
                let n = |k: &str| p.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
                let pct = |a: u64, t: u64| {
                    if t == 0 {
                        100.0
                    } else {
                        a as f64 * 100.0 / t as f64
                    }
                };
                println!(
                    "sync:       {}/{} messages ({:.1}%), {:.1}/{:.1} MB, {} folders, {} passes",
                    n("messages_copied"),
                    n("messages_total"),
                    pct(n("messages_copied"), n("messages_total")),
                    n("bytes_copied") as f64 / 1e6,
                    n("bytes_total") as f64 / 1e6,
                    n("folders"),
                    n("passes")
                );
                let last = p.get("last_pass_at").and_then(|v| v.as_i64());
                let ago = last.map_or("never".to_string(), |t| {
                    format!(
                        "{} s ago, {} ms, {} appended",
                        mailferry::store::now() - t,
                        n("last_pass_ms"),
                        n("last_appended")
                    )
                });
                println!("last pass:  {ago}");
                let err = p.get("last_error").and_then(|v| v.as_str()).unwrap_or("-");
                println!("sync error: {err}");
            }
        }
        UserCommand::Migrate { .. } => {
            println!(
                "{} is now {}: background sync started",
                s("email"),
                s("state")
            );
        }
        UserCommand::Route { .. } => {
            let kicked = b.get("kicked").and_then(|v| v.as_u64()).unwrap_or(0);
            println!(
                "{} now routed to {} ({kicked} live session(s) told to reconnect)",
                s("email"),
                s("route")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
