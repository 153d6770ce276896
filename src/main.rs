//! The `mailferry` command line (DESIGN.md §6). Exit codes: 0 success, 1 the thing asked for
//! is not true or failed, 2 usage or connection error.
#![forbid(unsafe_code)]

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use mailferry::admin::client::{AdminClient, ClientError};
use mailferry::config::{read_secret, Config};
use mailferry::control::{RouteChange, StateChange, UserView};
use mailferry::route::Route;
use mailferry::store::Open;
use serde::Serialize;

/// Attempts of `sync --once` when a pass fails on a transient error.
const SYNC_ONCE_ATTEMPTS: u32 = 3;

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
    /// Machine-readable output (JSON on stdout); accepted before or after the command.
    #[arg(long, global = true)]
    json: bool,
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
    /// Validate the configuration, certificates, secrets, directory and backend reachability.
    CheckConfig {
        /// Also look this user up in the directory and say what it holds (entry, route).
        #[arg(long)]
        user: Option<String>,
    },
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
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Sync even a user already routed to new (their mail on new is never deleted, but
        /// what they deleted there since may come back from legacy).
        #[arg(long)]
        force: bool,
    },
    /// Compare legacy and new for a user: exit 0 same, 1 different, 2 error.
    Verify {
        /// The user's login.
        email: String,
    },
    /// Load users from a file: `email[,wave]` per line (`#` comments and blank lines allowed).
    Import {
        /// The file.
        file: PathBuf,
        /// The wave of lines that name none.
        #[arg(long)]
        wave: Option<String>,
    },
    /// Groups of users migrated and cut over together.
    Wave {
        #[command(subcommand)]
        action: WaveCommand,
    },
}

#[derive(Subcommand)]
enum WaveCommand {
    /// Every wave with its users per state.
    List,
    /// A wave's users, totals per state, copy progress, speed and ETA.
    Show {
        /// Wave name.
        name: String,
    },
    /// Every user of the wave starts syncing.
    Migrate {
        /// Wave name.
        name: String,
    },
    /// Cut the wave's users over, `[cutover] wave_concurrency` at a time.
    Cutover {
        /// Wave name.
        name: String,
        /// Follow the cutover to its end: exit 0 when every user is on new.
        #[arg(long)]
        wait: bool,
        /// Also users whose sync has not caught up (else they are skipped and reported).
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Route, state, progress and last error of a user.
    Show {
        /// The user's login.
        email: String,
    },
    /// Force the route now; live sessions are told to reconnect.
    Route {
        /// The user's login.
        email: String,
        /// Where the user goes.
        #[arg(value_parser = parse_route)]
        route: Route,
    },
    /// State `syncing`: the server copies the user's mail in the background, then keeps it current.
    Migrate {
        /// The user's login.
        email: String,
    },
    /// Move the user to new: defer LMTP, hold logins, kick sessions, final delta sync,
    /// verification gate, route new (DESIGN.md §2).
    Cutover {
        /// The user's login.
        email: String,
        /// Wait for the outcome: exit 0 when the user is on new, 1 when the cutover failed.
        #[arg(long)]
        wait: bool,
    },
    /// Move the user back to legacy, carrying what happened on new since the cutover.
    Rollback {
        /// The user's login.
        email: String,
        /// Wait for the outcome: exit 0 when the user is on legacy, 1 when it failed.
        #[arg(long)]
        wait: bool,
    },
    /// The user's audit log: every transition, who asked, why, and the outcome.
    Events {
        /// The user's login.
        email: String,
    },
}

fn parse_route(s: &str) -> Result<Route, String> {
    s.parse()
        .map_err(|_| format!("route must be legacy or new, not {s:?}"))
}

/// jemalloc, with a background thread returning freed memory within about a second
/// (`.cargo/config.toml`): with glibc's allocator the memory of thousands of idle sessions
/// stayed with the process after they closed (docs/memory.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    mailferry::logging::init(match format {
        LogFormat::Human => mailferry::logging::Format::Human,
        LogFormat::Json => mailferry::logging::Format::Json,
    });
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let json = cli.json;
    match cli.command {
        Command::Serve => {
            let cfg = Config::load(&cli.config)?;
            let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .context("installing the metrics recorder")?;
            mailferry::server::serve(cfg, metrics).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { user } => {
            match mailferry::check::check_config(&cli.config, user.as_deref()).await {
                Ok(report) => Ok(print_check(&report)),
                Err(e) => {
                    println!("{e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::User { action } => {
            let cfg = Config::load(&cli.config)?;
            user(&cfg, action, json).await
        }
        Command::Sync {
            email,
            once,
            quiet,
            force,
        } => {
            if !once {
                eprintln!("mailferry: only `sync EMAIL --once` runs without a server; `user migrate EMAIL` starts continuous sync");
                return Ok(ExitCode::from(2));
            }
            let cfg = Config::load(&cli.config)?;
            let how = SyncOnce { json, quiet, force };
            sync_once(&cfg, &email, how).await
        }
        Command::Verify { email } => {
            let cfg = Config::load(&cli.config)?;
            verify(&cfg, &email, json).await
        }
        Command::Import { file, wave } => {
            let admin = admin_client(&Config::load(&cli.config)?)?;
            cli::waves::import_file(&admin, &file, wave.as_deref(), json).await
        }
        Command::Wave { action } => {
            let admin = admin_client(&Config::load(&cli.config)?)?;
            wave(&admin, action, json).await
        }
    }
}

async fn wave(admin: &AdminClient, action: WaveCommand, json: bool) -> Result<ExitCode> {
    use cli::waves::{print_list, print_started, print_wave, wait_cutover};
    let shown = match action {
        WaveCommand::List => admin
            .waves()
            .await
            .map(|w| print_view(&w, json, |w| print_list(w))),
        WaveCommand::Show { name } => admin
            .wave(&name)
            .await
            .map(|w| print_view(&w, json, print_wave)),
        WaveCommand::Migrate { name } => admin
            .wave_start(&name, None)
            .await
            .map(|s| print_view(&s, json, print_started)),
        WaveCommand::Cutover { name, wait, all } => {
            let started = match admin.wave_start(&name, Some(all)).await {
                Ok(s) => s,
                Err(e) => return refused(e),
            };
            if !wait {
                print_view(&started, json, print_started)?;
                return Ok(ExitCode::SUCCESS);
            }
            if !json {
                print_started(&started);
            }
            return wait_cutover(admin, &name, json).await;
        }
    };
    match shown {
        Ok(printed) => {
            printed?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => refused(e),
    }
}

/// Prints what `check-config` found; exit 2 when the state store cannot be used (missing,
/// unreachable, too new), 1 for any other problem.
fn print_check(report: &mailferry::check::Report) -> ExitCode {
    for p in &report.problems {
        println!("- {p}");
    }
    if let Some(found) = &report.found {
        println!("directory: {found}");
    }
    let (url, store) = &report.store;
    match store {
        Ok(s) => {
            let users: Vec<String> = s.users.iter().map(|(st, n)| format!("{n} {st}")).collect();
            let users = if users.is_empty() {
                "no users".to_owned()
            } else {
                users.join(", ")
            };
            println!(
                "state store {url}: schema version {}, {users}",
                s.schema_version
            );
        }
        Err(e) => println!("- state store {url}: {e}"),
    }
    if store.is_err() {
        ExitCode::from(2)
    } else if report.ok() {
        println!("configuration OK");
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
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

/// How `sync --once` runs and reports.
struct SyncOnce {
    json: bool,
    quiet: bool,
    force: bool,
}

async fn sync_once(cfg: &Config, email: &str, how: SyncOnce) -> Result<ExitCode> {
    use mailferry::sync::{pass_with_retry, Engine, Progress};
    let email = cfg.directory.identity().key(email);
    let (store, routes) = match mailferry::server::open_directory(cfg, Open::Existing).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mailferry: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let engine = match Engine::from_config(cfg, store, routes) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("mailferry: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let progress = std::sync::Arc::new(Progress::default());
    let bar = (!how.quiet && !how.json).then(|| ProgressBar::start(progress.clone()));
    let attempts = SYNC_ONCE_ATTEMPTS;
    let result = pass_with_retry(&engine, &email, Some(progress), how.force, attempts).await;
    if let Some(bar) = bar {
        bar.finish();
    }
    match result {
        Ok(r) => {
            print_report(&email, &r, how.json)?;
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

/// What `sync --once` did, for a person or (`json`) a script.
fn print_report(email: &str, r: &mailferry::sync::PassReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        println!(
            "{email}: {} folders ({} changed), {} messages appended ({} bytes), {} recovered, {} re-matched, \
             {} flag updates, {} expunged, {} not copyable, {} ms",
            r.folders, r.folders_changed, r.appended, r.appended_bytes, r.recovered, r.rematched,
            r.flag_updates, r.expunged, r.failed, r.duration_ms
        );
        for folder in &r.kept {
            println!("warning: {folder} is gone from legacy but kept on new: it holds mail the sync did not put there");
        }
    }
    Ok(())
}

/// A pass's progress on stderr, redrawn every `REDRAW_EVERY`.
struct ProgressBar {
    bar: indicatif::ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

/// How often the progress bar is redrawn.
const REDRAW_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

impl ProgressBar {
    fn start(progress: std::sync::Arc<mailferry::sync::Progress>) -> ProgressBar {
        use std::sync::atomic::Ordering::Relaxed;
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(0),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        ) {
            bar.set_style(style);
        }
        let (b, p) = (bar.clone(), progress);
        let ticker = tokio::spawn(async move {
            loop {
                b.set_length(p.bytes_total.load(Relaxed));
                b.set_position(p.bytes_done.load(Relaxed));
                let folder = p.folder.lock().map(|f| f.clone()).unwrap_or_default();
                let (done, total) = (
                    p.messages_done.load(Relaxed),
                    p.messages_total.load(Relaxed),
                );
                b.set_message(format!("{done}/{total} messages {folder}"));
                tokio::time::sleep(REDRAW_EVERY).await;
            }
        });
        ProgressBar { bar, ticker }
    }

    fn finish(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

async fn verify(cfg: &Config, email: &str, json: bool) -> Result<ExitCode> {
    use mailferry::sync::client::Endpoint;
    let email = cfg.directory.identity().key(email);
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
                    r.differences.len() + r.extras.len(),
                    r.folders,
                    r.messages
                );
                for d in r.differences.iter().chain(&r.extras) {
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

async fn user(cfg: &Config, action: UserCommand, json: bool) -> Result<ExitCode> {
    let admin = admin_client(cfg)?;
    let shown = match action {
        UserCommand::Show { email } => admin
            .show_user(&email)
            .await
            .map(|v| print_view(&v, json, print_user)),
        UserCommand::Route { email, route } => admin
            .set_route(&email, route)
            .await
            .map(|c| print_view(&c, json, print_route_change)),
        UserCommand::Migrate { email } => admin
            .migrate(&email)
            .await
            .map(|c| print_view(&c, json, print_migrated)),
        UserCommand::Cutover { email, wait } => {
            return moving(&admin, &email, false, wait, json).await;
        }
        UserCommand::Rollback { email, wait } => {
            return moving(&admin, &email, true, wait, json).await;
        }
        UserCommand::Events { email } => admin
            .events(&email)
            .await
            .map(|e| print_view(&e, json, print_events)),
    };
    match shown {
        Ok(printed) => {
            printed?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => refused(e),
    }
}

/// The admin API of the server named by the config.
fn admin_client(cfg: &Config) -> Result<AdminClient> {
    let addr = cfg
        .listen
        .admin
        .context("listen.admin is not set: the CLI talks to the server through it")?;
    let token = read_secret(&cfg.resolve(&cfg.admin.token_file))
        .with_context(|| format!("reading {}", cfg.admin.token_file.display()))?;
    Ok(AdminClient::new(addr, token))
}

/// Exit code of a refused request: 2 for a wrong token, 1 when the server said no.
fn refused(e: ClientError) -> Result<ExitCode> {
    match e {
        e @ ClientError::Refused { status, .. } => {
            eprintln!("mailferry: {e}");
            Ok(ExitCode::from(if status == 401 { 2 } else { 1 }))
        }
        e => Err(e.into()),
    }
}

/// How often `--wait` asks the server how a sequence goes.
const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// `user cutover` / `user rollback`: starts the sequence; with `wait`, follows it to its end,
/// one line per state, and exits 0 when the user arrived, 1 when the sequence failed.
async fn moving(
    admin: &AdminClient,
    email: &str,
    rollback: bool,
    wait: bool,
    json: bool,
) -> Result<ExitCode> {
    let started = match admin.start(email, rollback).await {
        Ok(c) => c,
        Err(e) => return refused(e),
    };
    if !wait {
        print_view(&started, json, |c| {
            println!("{}: {} started", c.email, c.state)
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut last = None;
    let view = loop {
        let view = admin.show_user(email).await?;
        if !json && last != Some(view.state) {
            println!("{}: {}", view.email, view.state);
            last = Some(view.state);
        }
        if !view.state.is_moving() {
            break view;
        }
        tokio::time::sleep(WAIT_POLL).await;
    };
    let arrived = view.route == if rollback { Route::Legacy } else { Route::New }
        && view.state != mailferry::store::UserState::Failed;
    if json {
        println!("{}", serde_json::to_string(&view)?);
    } else if let Some(e) = view.last_error.as_deref().filter(|_| !arrived) {
        println!("{}: failed: {e}", view.email);
    } else if let Some(ev) = view.evidence.as_ref().filter(|_| !rollback) {
        println!(
            "{}: on {}; gate ({}) clean: {} folders, {} messages",
            view.email,
            view.route,
            ev.mode,
            ev.folders.len(),
            ev.legacy_messages
        );
    }
    Ok(if arrived {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Prints what the server answered: as JSON with `--json`, else for a human.
fn print_view<T: Serialize>(view: &T, json: bool, human: fn(&T)) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(view)?);
    } else {
        human(view);
    }
    Ok(())
}

fn print_user(v: &UserView) {
    let or_dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
    println!("user:       {}", v.email);
    println!(
        "route:      {}{}",
        v.route,
        if v.known {
            ""
        } else {
            " (default: not in directory)"
        }
    );
    println!("state:      {}", v.state);
    println!("sessions:   {}", v.sessions);
    println!("last error: {}", or_dash(&v.last_error));
    let p = &v.sync;
    let pct = |a: u64, t: u64| {
        if t == 0 {
            100.0
        } else {
            a as f64 * 100.0 / t as f64
        }
    };
    println!(
        "sync:       {}/{} messages ({:.1}%), {:.1}/{:.1} MB, {} folders, {} passes",
        p.messages_copied,
        p.messages_total,
        pct(p.messages_copied, p.messages_total),
        p.bytes_copied as f64 / 1e6,
        p.bytes_total as f64 / 1e6,
        p.folders,
        p.passes
    );
    let ago = p.last_pass_at.map_or("never".to_string(), |t| {
        format!(
            "{} s ago, {} ms, {} appended",
            mailferry::store::now() - t,
            p.last_pass_ms.unwrap_or(0),
            p.last_appended.unwrap_or(0)
        )
    });
    println!("last pass:  {ago}");
    println!(
        "delta lag:  {} messages pending",
        p.messages_total.saturating_sub(p.messages_copied)
    );
    println!("sync error: {}", or_dash(&p.last_error));
    for w in &p.warnings {
        println!("warning:    {w}");
    }
    println!("wave:       {}", or_dash(&v.wave));
    if let Some(at) = v.updated_at {
        println!("changed:    {}", utc_time(at * 1000));
    }
    if let Some(ev) = &v.evidence {
        print_evidence(ev);
    }
}

/// What the last cutover's verification gate compared and found.
fn print_evidence(ev: &mailferry::sync::gate::Evidence) {
    println!(
        "gate:       {} at {}: {}, {} folders, {} messages on legacy, {} on new",
        ev.mode,
        utc_time(ev.at.saturating_mul(1000)),
        if ev.clean() { "clean" } else { "DIFFERENT" },
        ev.folders.len(),
        ev.legacy_messages,
        ev.new_messages
    );
    for d in &ev.differences {
        println!("difference: {d}");
    }
    for n in &ev.notes {
        println!("gate note:  {n}");
    }
}

fn print_events(events: &Vec<mailferry::store::Event>) {
    for e in events {
        let at = utc_time(e.at_ms);
        let from = e.from.map_or("-".to_owned(), |s| s.to_string());
        println!(
            "{at}  {from:>8} -> {:<8}  {:<10} {:<7} {}",
            e.to.as_str(),
            e.actor,
            e.outcome,
            e.reason
        );
    }
}

/// `2026-12-06 07:31:02.123Z` from milliseconds since the epoch.
fn utc_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string(),
    )
}

fn print_route_change(c: &RouteChange) {
    println!(
        "{} now routed to {} ({} live session(s) told to reconnect)",
        c.email, c.route, c.kicked
    );
}

fn print_migrated(c: &StateChange) {
    println!("{} is now {}: background sync started", c.email, c.state);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn json_is_one_flag_accepted_before_or_after_the_command() {
        for args in [
            &["mailferry", "user", "show", "x@y", "--json"][..],
            &["mailferry", "user", "show", "--json", "x@y"],
            &["mailferry", "--json", "user", "show", "x@y"],
            &["mailferry", "verify", "x@y", "--json"],
            &["mailferry", "sync", "x@y", "--once", "--json"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert!(cli.json, "{args:?}");
        }
        let cli = Cli::try_parse_from(["mailferry", "user", "show", "x@y"]).unwrap();
        assert!(!cli.json);
    }
}
