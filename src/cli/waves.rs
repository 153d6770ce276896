//! `mailferry import` and `mailferry wave ...`: requests to the server's admin API and what
//! they print, for a person or (`--json`) a script.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use mailferry::admin::client::AdminClient;
use mailferry::admin::ImportBody;
use mailferry::control::waves::{WaveStarted, WaveView};

use super::import;

/// How often `wave cutover --wait` asks how the wave goes.
const WAIT_POLL: Duration = Duration::from_millis(500);

/// `mailferry import FILE.csv [--wave NAME]`: exit 0 when every line was imported, 1 when
/// some were refused (the others are imported).
pub async fn import_file(
    admin: &AdminClient,
    file: &Path,
    wave: Option<&str>,
    json: bool,
) -> Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let parsed = import::parse(&text, wave);
    let done = admin
        .import(&ImportBody {
            users: parsed.users.clone(),
        })
        .await?;
    if json {
        let rejected: Vec<String> = parsed.rejected.iter().map(|r| r.to_string()).collect();
        let out = serde_json::json!({"imported": done, "rejected": rejected});
        println!("{out}");
    } else {
        println!(
            "{} users read: {} added, {} moved to their wave, {} unchanged",
            parsed.users.len(),
            done.added,
            done.moved,
            done.unchanged
        );
        for r in &parsed.rejected {
            println!("rejected {r}");
        }
    }
    Ok(if parsed.rejected.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `wave list`.
pub fn print_list(waves: &[WaveView]) {
    for w in waves {
        let states: Vec<String> = w.states.iter().map(|(s, n)| format!("{n} {s}")).collect();
        println!("{:<20} {:>6} users  {}", w.name, w.users, states.join(", "));
    }
}

/// `wave show`.
pub fn print_wave(w: &WaveView) {
    let states: Vec<String> = w.states.iter().map(|(s, n)| format!("{n} {s}")).collect();
    println!("wave:       {}", w.name);
    println!("users:      {} ({})", w.users, states.join(", "));
    println!("caught up:  {} of {}", w.caught_up, w.users);
    println!(
        "copied:     {}/{} messages, {:.1}/{:.1} MB",
        w.messages_copied,
        w.messages_total,
        w.bytes_copied as f64 / 1e6,
        w.bytes_total as f64 / 1e6
    );
    if let Some(speed) = w.bytes_per_sec {
        let eta = w.eta_secs.map_or("-".into(), |s| format!("{s} s"));
        println!(
            "speed:      {:.2} MB/s since wave migrate, ETA {eta}",
            speed / 1e6
        );
    }
    if let Some(j) = &w.cutover {
        let took = j
            .took_secs
            .map_or("running".into(), |s| format!("took {s:.1} s"));
        println!(
            "cutover:    {}/{} on new, {} failed, {} skipped ({took})",
            j.done,
            j.total,
            j.failed,
            j.skipped.len()
        );
    }
    for m in &w.members {
        let error = m.last_error.as_deref().unwrap_or("");
        println!(
            "  {:<32} {:<8} {:>6}/{:<6} {}{}",
            m.email,
            m.state.as_str(),
            m.messages.0,
            m.messages.1,
            if m.caught_up { "caught up " } else { "" },
            error
        );
    }
}

/// What `wave migrate` / `wave cutover` started.
pub fn print_started(s: &WaveStarted) {
    println!("wave {}: {} users started", s.name, s.started);
    for why in &s.skipped {
        println!("skipped {why}");
    }
}

/// `wave cutover NAME --wait`: follows the run to its end (a bar on a terminal, one line per
/// change otherwise); exit 0 when every user it took is on new, 1 otherwise.
pub async fn wait_cutover(admin: &AdminClient, name: &str, json: bool) -> Result<ExitCode> {
    let bar = (!json && std::io::stderr().is_terminal()).then(indicatif::ProgressBar::no_length);
    let mut last = None;
    let view = loop {
        let view = admin.wave(name).await?;
        let Some(job) = view.cutover.clone() else {
            anyhow::bail!("the server has no cutover of wave {name} running");
        };
        let now = (job.done, job.failed);
        match &bar {
            Some(b) => {
                b.set_length(job.total);
                b.set_position(job.done + job.failed);
                b.set_message(format!("{} failed", job.failed));
            }
            None if !json && last != Some(now) => println!(
                "wave {name}: {}/{} on new, {} failed",
                job.done, job.total, job.failed
            ),
            None => {}
        }
        last = Some(now);
        if job.finished() {
            break view;
        }
        tokio::time::sleep(WAIT_POLL).await;
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if json {
        println!("{}", serde_json::to_string(&view)?);
    } else {
        print_wave(&view);
    }
    let failed = view.cutover.as_ref().map_or(0, |j| j.failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
