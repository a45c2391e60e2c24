//! `enforcer run`: the node agent. Startup reads as validate -> compile -> load -> write
//! policy -> attach -> stream events; then it keeps the kernel in step with the policy
//! directory and the cgroup tree until it is told to stop. Stopping leaves the pins, so the
//! kernel keeps enforcing the last policy while no agent runs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use aya::maps::{MapData, RingBuf};
use enforcer_policy::{Bundle, Compiled};
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::datapath::{self, Datapath, LoadOptions};
use crate::desired::{desired_state, resolve_cgroups, Overrides, Unresolved};
use crate::events::{decode, record, Sink};

/// How often the agent looks for edited policy files, new cgroups and new losses.
const RESYNC_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub policies: PathBuf,
    pub cgroup_root: String,
    pub events: String,
    pub audit: bool,
    pub pin_root: PathBuf,
    pub ring_buffer_bytes: Option<u32>,
    pub ready_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub allow_root_cgroup: bool,
}

/// What `enforcer status` reads about the running agent (the kernel side it reads from pins).
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct AgentState {
    pub pid: u32,
    pub policies: PathBuf,
    pub revision: String,
    pub applied_at: String,
    pub cgroup_root: PathBuf,
    pub pin_dir: PathBuf,
    pub unresolved_cgroups: Vec<String>,
}

/// Lines for the SOC that are not denied calls.
#[derive(Debug, Serialize)]
#[serde(tag = "type")]
enum Notice {
    #[serde(rename = "events.lost")]
    EventsLost {
        time: String,
        count: u64,
        total: u64,
    },
    #[serde(rename = "policy.applied")]
    PolicyApplied {
        time: String,
        snapshot: String,
        allows: usize,
    },
    #[serde(rename = "policy.rejected")]
    PolicyRejected {
        time: String,
        policies: String,
        errors: Vec<String>,
        snapshot_in_force: String,
    },
}

fn now() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

/// The bad-input checks that must pass before anything in the kernel changes.
pub struct Prepared {
    pub cgroup_mount: PathBuf,
    pub cgroup_root: PathBuf,
    pub bundle: Bundle,
    pub compiled: Compiled,
}

pub fn prepare(options: &RunOptions) -> Result<Prepared> {
    let cgroup_mount = crate::fs::cgroup2_mount()?;
    let cgroup_root = crate::fs::cgroup_path(&cgroup_mount, &options.cgroup_root)?;
    if !cgroup_root.is_dir() {
        bail!(
            "the cgroup root {} does not exist (--cgroup-root {:?}, relative to the cgroup v2 mount {})",
            cgroup_root.display(),
            options.cgroup_root,
            cgroup_mount.display()
        );
    }
    if cgroup_root == cgroup_mount && !options.allow_root_cgroup {
        bail!(
            "--cgroup-root {:?} is the root of the whole cgroup hierarchy: that would judge every \
             process of the host. Pass --allow-root-cgroup if that is really meant.",
            options.cgroup_root
        );
    }
    let bundle = Bundle::load(&options.policies).map_err(|diagnostics| {
        anyhow::anyhow!(
            "the policy bundle {} is invalid:\n{diagnostics}",
            options.policies.display()
        )
    })?;
    let compiled = bundle
        .compile()
        .with_context(|| format!("compiling {}", options.policies.display()))?;
    Ok(Prepared {
        cgroup_mount,
        cgroup_root,
        bundle,
        compiled,
    })
}

pub async fn run(options: RunOptions) -> Result<()> {
    let Prepared {
        cgroup_mount,
        cgroup_root,
        bundle,
        compiled,
    } = prepare(&options)?;
    let sink = Sink::open(&options.events)?;

    let mut datapath = Datapath::load(&LoadOptions {
        pin_root: &options.pin_root,
        ring_buffer_bytes: options.ring_buffer_bytes,
    })?;
    let quarantined = BTreeSet::new();
    let overrides = Overrides {
        audit: options.audit,
        quarantined: &quarantined,
    };
    let (desired, mut unresolved) = desired_state(&compiled, &cgroup_mount, &overrides);
    report_unresolved(&Unresolved::default(), &unresolved);
    let applied = datapath
        .tables
        .apply(&desired)
        .context("writing the first policy into the kernel")?;
    let attach = datapath.attach(&cgroup_root)?;
    for hook in &attach.hooks {
        tracing::info!(program = hook.program, adopted = hook.adopted, cgroup = %cgroup_root.display(), "hook in place");
    }
    tracing::info!(
        revision = bundle.revision(),
        allows = desired.allows.len(),
        written = applied.written,
        removed = applied.removed,
        elapsed_ms = applied.elapsed.as_secs_f64() * 1e3,
        "policy applied"
    );

    let compiled = Arc::new(compiled);
    let (compiled_tx, compiled_rx) = watch::channel(compiled.clone());
    let (notice_tx, notice_rx) = mpsc::unbounded_channel();
    notice_tx
        .send(Notice::PolicyApplied {
            time: now(),
            snapshot: compiled.revision().to_string(),
            allows: desired.allows.len(),
        })
        .ok();
    let ring = datapath.take_events()?;
    let events = tokio::spawn(stream_events(
        ring,
        datapath.dir().to_path_buf(),
        compiled_rx,
        notice_rx,
        sink,
    ));

    let state_file = options.state_dir.join("state.json");
    write_state(
        &state_file,
        &options,
        &cgroup_root,
        datapath.dir(),
        compiled.revision(),
        &unresolved,
    )?;
    if let Some(ready) = &options.ready_file {
        std::fs::write(ready, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", ready.display()))?;
    }

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut ticker = tokio::time::interval(RESYNC_EVERY);
    let mut fingerprint = bundle_fingerprint(&options.policies);
    let mut current = compiled;
    let mut cgroups = desired.cgroups;

    loop {
        let forced = tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => true,
            _ = ticker.tick() => false,
        };
        if events.is_finished() {
            bail!("the event stream stopped; see the error above");
        }

        let latest = bundle_fingerprint(&options.policies);
        if forced || latest != fingerprint {
            fingerprint = latest;
            match reload(&options, &cgroup_mount, &overrides) {
                Ok((compiled, desired, fresh_unresolved)) => {
                    let started = Instant::now();
                    match datapath.tables.apply(&desired) {
                        Ok(report) => {
                            tracing::info!(
                                revision = compiled.revision(),
                                written = report.written,
                                removed = report.removed,
                                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                                "policy applied"
                            );
                            notice_tx
                                .send(Notice::PolicyApplied {
                                    time: now(),
                                    snapshot: compiled.revision().to_string(),
                                    allows: desired.allows.len(),
                                })
                                .ok();
                            report_unresolved(&unresolved, &fresh_unresolved);
                            unresolved = fresh_unresolved;
                            cgroups = desired.cgroups;
                            current = Arc::new(compiled);
                            compiled_tx.send_replace(current.clone());
                            write_state(
                                &state_file,
                                &options,
                                &cgroup_root,
                                datapath.dir(),
                                current.revision(),
                                &unresolved,
                            )?;
                        }
                        Err(error) => tracing::error!("applying the new policy failed: {error:#}"),
                    }
                }
                Err(error) => {
                    let errors: Vec<String> =
                        format!("{error:#}").lines().map(str::to_string).collect();
                    tracing::error!(
                        revision_in_force = current.revision(),
                        "policy rejected, the last good one stays in force:\n{error:#}"
                    );
                    notice_tx
                        .send(Notice::PolicyRejected {
                            time: now(),
                            policies: options.policies.display().to_string(),
                            errors,
                            snapshot_in_force: current.revision().to_string(),
                        })
                        .ok();
                }
            }
            continue;
        }

        // Pods come and go: re-resolve cgroup paths, write only what changed.
        let mut fresh_unresolved = Unresolved::default();
        let fresh = resolve_cgroups(&current, &cgroup_mount, &mut fresh_unresolved);
        if fresh != cgroups {
            match datapath.tables.sync_cgroups(&fresh) {
                Ok(()) => {
                    tracing::info!(cgroups = fresh.len(), "cgroup map updated");
                    cgroups = fresh;
                }
                Err(error) => tracing::error!("updating the cgroup map failed: {error:#}"),
            }
        }
        if fresh_unresolved != unresolved {
            report_unresolved(&unresolved, &fresh_unresolved);
            unresolved = fresh_unresolved;
            write_state(
                &state_file,
                &options,
                &cgroup_root,
                datapath.dir(),
                current.revision(),
                &unresolved,
            )?;
        }
    }
    tracing::info!("stopping; the pinned programs keep enforcing the last policy");
    events.abort();
    Ok(())
}

fn reload(
    options: &RunOptions,
    cgroup_mount: &Path,
    overrides: &Overrides,
) -> Result<(Compiled, datapath::DesiredState, Unresolved)> {
    let bundle =
        Bundle::load(&options.policies).map_err(|diagnostics| anyhow::anyhow!("{diagnostics}"))?;
    let compiled = bundle.compile()?;
    let (desired, unresolved) = desired_state(&compiled, cgroup_mount, overrides);
    Ok((compiled, desired, unresolved))
}

fn report_unresolved(before: &Unresolved, after: &Unresolved) {
    for missing in after.0.difference(&before.0) {
        tracing::warn!(cgroup = %missing, "inventory cgroup does not exist (yet); its processes will be unknown subjects until it appears");
    }
    for found in before.0.difference(&after.0) {
        tracing::info!(cgroup = %found, "inventory cgroup appeared");
    }
}

/// Cheap change detection for the policy directory: names, sizes and modification times.
fn bundle_fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let meta = entry.metadata().ok()?;
            meta.is_file()
                .then(|| (entry.path(), meta.len(), meta.modified().ok()))
        })
        .collect();
    entries.sort();
    entries
}

fn write_state(
    file: &Path,
    options: &RunOptions,
    cgroup_root: &Path,
    pin_dir: &Path,
    revision: &str,
    unresolved: &Unresolved,
) -> Result<()> {
    let state = AgentState {
        pid: std::process::id(),
        policies: options.policies.clone(),
        revision: revision.to_string(),
        applied_at: now(),
        cgroup_root: cgroup_root.to_path_buf(),
        pin_dir: pin_dir.to_path_buf(),
        unresolved_cgroups: unresolved.0.iter().cloned().collect(),
    };
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = file.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&state)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, file).with_context(|| format!("writing {}", file.display()))?;
    Ok(())
}

/// The event task: drains the ring buffer whenever the kernel signals data, enriches each
/// record with the policy in force, and reports losses the kernel counted.
async fn stream_events(
    ring: RingBuf<MapData>,
    pin_dir: PathBuf,
    compiled: watch::Receiver<Arc<Compiled>>,
    mut notices: mpsc::UnboundedReceiver<Notice>,
    mut sink: Sink,
) -> Result<()> {
    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for as long as the
    // AsyncFd owns the RingBuf.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("polling the EVENTS ring buffer")?;
    let mut lost_seen = datapath::lost_events(&pin_dir)?;
    if lost_seen > 0 {
        tracing::warn!(
            total = lost_seen,
            "events were lost before this agent started (ring buffer full)"
        );
        sink.write(&Notice::EventsLost {
            time: now(),
            count: lost_seen,
            total: lost_seen,
        })?;
    }
    let mut lost_check = tokio::time::interval(RESYNC_EVERY);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the EVENTS ring buffer")?;
                let policy = compiled.borrow().clone();
                // Edge-triggered: drain everything, then clear readiness.
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    match decode::decode(&item) {
                        Ok(event) => sink.write(&record::enrich(&event, &policy))?,
                        Err(error) => tracing::error!(%error, "undecodable ring buffer record"),
                    }
                }
                guard.clear_ready();
            }
            Some(notice) = notices.recv() => sink.write(&notice)?,
            _ = lost_check.tick() => {
                let total = datapath::lost_events(&pin_dir)?;
                if total > lost_seen {
                    let count = total - lost_seen;
                    tracing::warn!(count, total, "ring buffer full: events lost in the kernel");
                    sink.write(&Notice::EventsLost { time: now(), count, total })?;
                    lost_seen = total;
                }
            }
        }
    }
}
