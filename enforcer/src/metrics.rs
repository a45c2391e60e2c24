//! `enforcer run --metrics ADDR`: Prometheus metrics on `GET /metrics`.
//!
//! Two kinds of numbers are served:
//!
//! - read from the kernel at scrape time, from the pins (what `enforcer status` shows): the
//!   per-CPU verdict counters, the ring buffer's loss counter and the fill of every pinned
//!   map. These go on counting while no agent runs; a restarted agent serves the kernel's
//!   totals, not totals since its own start.
//! - kept by the agent in atomics and short-lived snapshots: events emitted, compile and
//!   apply durations, the policy in force and its age, quarantined subjects, the PDP sync.
//!
//! Scraping never waits on the agent's work: the event task and the reload only increment
//! atomics or replace a small snapshot under a lock held for a copy (never across I/O), and
//! the kernel is read on a blocking thread of its own.
//!
//! The body is OpenMetrics 1.0 when the scraper asks for it (`Accept:
//! application/openmetrics-text`, as Prometheus does), otherwise the Prometheus text format
//! 0.0.4 (curl, `promtool check metrics`). The families are listed in the README ("Metrics").

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use bytes::Bytes;
use enforcer_common::{reason, verdict};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::datapath;
use crate::events::decode::{hook_name, reason_name, verdict_name};
use crate::pdp::PdpStatus;

/// The path metrics are served on; every other path is 404.
pub const PATH: &str = "/metrics";

/// `Content-Type` of the OpenMetrics text exposition.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the Prometheus text exposition 0.0.4.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// At most this many scrapes at once (Prometheus holds one connection per target).
const MAX_CONNECTIONS: usize = 16;

/// One label pair with a name fixed at compile time.
type Label = [(&'static str, &'static str); 1];

/// The agent's metrics: the families it updates, and what it reads at scrape time.
///
/// Cheap to share (`Arc<Metrics>`); every update is an atomic or a short lock.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    events: Family<Label, Counter>,
    event_write_errors: Counter,
    compile_seconds: Histogram,
    apply_seconds: Histogram,
    rejections: Counter,
    quarantined: Gauge,
    consumer_dropped: Family<Label, Counter>,
    suppressed: Family<[(&'static str, &'static str); 2], Counter>,
    flow_suppressed: Family<Label, Counter>,
    policy: Arc<Mutex<Option<PolicySnapshot>>>,
    pdp: Arc<Mutex<Option<PdpSource>>>,
}

/// The policy in force, as far as metrics are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySnapshot {
    /// The bundle revision (`sha256:...`), as in events' `policy.snapshot`.
    pub revision: String,
    /// When it was written to the kernel.
    pub applied_at: SystemTime,
}

/// Where the PDP sync task's status is read at scrape time.
struct PdpSource(Box<dyn Fn() -> PdpStatus + Send + Sync>);

impl fmt::Debug for PdpSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PdpSource")
    }
}

impl Metrics {
    /// The families of an agent whose maps are pinned in `pin_dir` (read at every scrape).
    pub fn new(pin_dir: PathBuf) -> Self {
        let mut registry = Registry::default();
        let events = Family::<Label, Counter>::default();
        registry.register(
            "enforcer_events",
            "Events the agent emitted (formatted and handed to the events output), by type \
             (connection.denied, policy.applied, events.lost...)",
            events.clone(),
        );
        let event_write_errors = Counter::default();
        registry.register(
            "enforcer_events_write_errors",
            "Event lines the events output refused (a full disk, say): each is lost, leaving a \
             gap in seq",
            event_write_errors.clone(),
        );
        // Per consumer of `enforcer events`: the stream calls `consumer_dropped` when a
        // consumer falls behind and its queue overflows. Until
        // then the family has no series, and an empty family is left out of the exposition.
        let consumer_dropped = Family::<Label, Counter>::default();
        registry.register(
            "enforcer_events_consumer_dropped",
            "Events a slow consumer of the live event stream missed, by consumer (no series \
             until one missed any)",
            consumer_dropped.clone(),
        );
        // Bounded labels only (hooks x reasons): never the workload, which the event names.
        let suppressed = Family::<[(&'static str, &'static str); 2], Counter>::default();
        registry.register(
            "enforcer_events_suppressed",
            "Denies folded into a workload's overflow count (its distinct denied destinations \
             in one window went beyond --events-keys-per-workload), by hook and reason; each \
             events.suppressed event names the workload and its count",
            suppressed.clone(),
        );
        // Bounded labels only (opened, closed): never the workload, which the event names.
        let flow_suppressed = Family::<Label, Counter>::default();
        registry.register(
            "enforcer_flow_events_suppressed",
            "Flow events counted instead of written (a workload's tracked flows in one window \
             went beyond --flow-events-per-workload), by kind (opened, closed); each \
             flow_events.suppressed event names the workload and its counts",
            flow_suppressed.clone(),
        );
        // Compiles take from under a millisecond (an identity change, incremental) to tens
        // of seconds (a cold compile of a large cluster): 0.5 ms doubling to ~33 s.
        let compile_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 17));
        registry.register_with_unit(
            "enforcer_policy_compile_duration",
            "Time to load, validate and compile a policy bundle (merged with the cluster)",
            Unit::Seconds,
            compile_seconds.clone(),
        );
        let apply_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 17));
        registry.register_with_unit(
            "enforcer_policy_apply_duration",
            "Time to write a compiled policy into the kernel maps (all or nothing)",
            Unit::Seconds,
            apply_seconds.clone(),
        );
        let rejections = Counter::default();
        registry.register(
            "enforcer_policy_rejections",
            "Policy bundles rejected (invalid, failed to compile or to apply); the last good \
             policy stayed in force",
            rejections.clone(),
        );
        let quarantined = Gauge::default();
        registry.register(
            "enforcer_quarantined_subjects",
            "Subject identities quarantined now (every connection they make is denied)",
            quarantined.clone(),
        );
        let policy = Arc::new(Mutex::new(None));
        let pdp = Arc::new(Mutex::new(None));
        registry.register_collector(Box::new(AgentCollector {
            policy: policy.clone(),
            pdp: pdp.clone(),
        }));
        registry.register_collector(Box::new(KernelCollector {
            pin_dir,
            fills: Mutex::new(None),
        }));
        Metrics {
            registry,
            events,
            event_write_errors,
            compile_seconds,
            apply_seconds,
            rejections,
            quarantined,
            consumer_dropped,
            suppressed,
            flow_suppressed,
            policy,
            pdp,
        }
    }

    /// `count` events of `kind` (their JSON `type`) were emitted.
    pub fn events_emitted(&self, kind: &'static str, count: u64) {
        self.events.get_or_create(&[("type", kind)]).inc_by(count);
    }

    /// `count` denies of `hook` and `reason` were reported in one `events.suppressed`.
    pub fn events_suppressed(&self, hook: &'static str, reason: &'static str, count: u64) {
        self.suppressed
            .get_or_create(&[("hook", hook), ("reason", reason)])
            .inc_by(count);
    }

    /// The events output refused `lines` lines (one batch).
    pub fn events_write_failed(&self, lines: u64) {
        self.event_write_errors.inc_by(lines);
    }

    /// `opened` and `closed` flow events were reported in one `flow_events.suppressed`.
    pub fn flow_events_suppressed(&self, opened: u64, closed: u64) {
        for (kind, count) in [("opened", opened), ("closed", closed)] {
            if count > 0 {
                self.flow_suppressed
                    .get_or_create(&[("kind", kind)])
                    .inc_by(count);
            }
        }
    }

    /// The place for `enforcer events`: `consumer` missed `count` events.
    pub fn consumer_dropped(&self, consumer: &'static str, count: u64) {
        self.consumer_dropped
            .get_or_create(&[("consumer", consumer)])
            .inc_by(count);
    }

    /// A bundle was loaded and compiled in `elapsed`.
    pub fn compiled(&self, elapsed: Duration) {
        self.compile_seconds.observe(elapsed.as_secs_f64());
    }

    /// A compiled policy was written to the kernel in `elapsed`; it is now `revision`.
    pub fn applied(&self, elapsed: Duration, revision: &str) {
        self.apply_seconds.observe(elapsed.as_secs_f64());
        *self.policy.lock().unwrap_or_else(|e| e.into_inner()) = Some(PolicySnapshot {
            revision: revision.to_string(),
            applied_at: SystemTime::now(),
        });
    }

    /// A bundle was rejected; the policy in force did not change.
    pub fn rejected(&self) {
        self.rejections.inc();
    }

    /// `count` subjects are quarantined now.
    pub fn set_quarantined(&self, count: usize) {
        self.quarantined.set(count as i64);
    }

    /// Where to read the PDP sync's status at scrape time (`--pdp`).
    pub fn set_pdp(&self, status: impl Fn() -> PdpStatus + Send + Sync + 'static) {
        *self.pdp.lock().unwrap_or_else(|e| e.into_inner()) = Some(PdpSource(Box::new(status)));
    }

    /// The exposition: OpenMetrics text (with its `# EOF`) or the Prometheus text format.
    /// Reads the pinned maps: call it on a blocking thread.
    ///
    /// Writing into a String fails only if an encoder reports an error itself (none of ours
    /// does); the server then answers 500 rather than half an exposition, which a scraper
    /// would read as reset counters.
    pub fn try_encode(&self, openmetrics: bool) -> Result<String, fmt::Error> {
        let mut out = String::new();
        if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        }
        Ok(out)
    }

    /// [`Metrics::try_encode`] for tests and tools: panics on an encoder error.
    pub fn encode(&self, openmetrics: bool) -> String {
        self.try_encode(openmetrics)
            .expect("encoding metrics into a String")
    }
}

/// Families read from the agent's snapshots at scrape time.
#[derive(Debug)]
struct AgentCollector {
    policy: Arc<Mutex<Option<PolicySnapshot>>>,
    pdp: Arc<Mutex<Option<PdpSource>>>,
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let policy = self
            .policy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(policy) = policy {
            encoder
                .encode_descriptor(
                    "enforcer_policy",
                    "The policy revision in force (the bundle's sha256, as in events' \
                     policy.snapshot)",
                    None,
                    MetricType::Info,
                )?
                .encode_info(&[("revision", policy.revision.as_str())])?;
            let age = SystemTime::now()
                .duration_since(policy.applied_at)
                .unwrap_or_default();
            gauge(
                &mut encoder,
                "enforcer_policy_age",
                "Time since the policy in force was written to the kernel",
                Some(&Unit::Seconds),
                age.as_secs_f64(),
            )?;
        }
        // The status is cloned under the sync task's lock, which it holds only to update it.
        let pdp = self
            .pdp
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|source| (source.0)());
        if let Some(pdp) = pdp {
            counter(
                &mut encoder,
                "enforcer_pdp_sync_errors",
                "Failed attempts to sync the policy bundle from the PDP",
                pdp.errors_total,
            )?;
            gauge(
                &mut encoder,
                "enforcer_pdp_sync_consecutive_failures",
                "Failed PDP sync attempts since the last success",
                None,
                pdp.consecutive_failures as f64,
            )?;
            // Absent until the PDP was reached once: a staleness of "never" has no number,
            // and `enforcer_pdp_synced` says so.
            gauge(
                &mut encoder,
                "enforcer_pdp_synced",
                "1 when the PDP was reached at least once (persisted across restarts), else 0",
                None,
                if pdp.stale_seconds.is_some() {
                    1.0
                } else {
                    0.0
                },
            )?;
            if let Some(stale) = pdp.stale_seconds {
                gauge(
                    &mut encoder,
                    "enforcer_pdp_staleness",
                    "Time since the PDP last answered with a bundle or confirmed ours",
                    Some(&Unit::Seconds),
                    stale as f64,
                )?;
            }
        }
        Ok(())
    }
}

/// Families read from the pinned maps at scrape time.
#[derive(Debug)]
struct KernelCollector {
    pin_dir: PathBuf,
    /// The map fill levels and when they were counted: counting walks every keyed map (a
    /// syscall per entry, up to a few hundred thousand), so scrapes within
    /// `FILL_COUNT_EVERY` reuse the last count; the counters are read at every scrape.
    fills: Mutex<Option<(std::time::Instant, Vec<datapath::MapFill>)>>,
}

/// How long a count of the maps' entries serves the scrapes (see `KernelCollector::fills`).
const FILL_COUNT_EVERY: Duration = Duration::from_secs(10);

impl KernelCollector {
    fn stats(&self) -> Result<datapath::KernelStats> {
        let mut fills = self.fills.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = fills
            .as_ref()
            .filter(|(at, _)| at.elapsed() < FILL_COUNT_EVERY)
            .map(|(_, maps)| maps.clone());
        let mut stats = datapath::kernel_stats_with(&self.pin_dir, fresh.is_none())?;
        match fresh {
            Some(maps) => stats.maps = maps,
            None => *fills = Some((std::time::Instant::now(), stats.maps.clone())),
        }
        Ok(stats)
    }
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let stats = match self.stats() {
            Ok(stats) => stats,
            Err(error) => {
                tracing::warn!("metrics: reading the pinned maps: {error:#}");
                return gauge(
                    &mut encoder,
                    "enforcer_datapath_readable",
                    "1 when the pinned maps could be read for this scrape, else 0 (the agent's \
                     log says why)",
                    None,
                    0.0,
                );
            }
        };
        gauge(
            &mut encoder,
            "enforcer_datapath_readable",
            "1 when the pinned maps could be read for this scrape, else 0 (the agent's log \
             says why)",
            None,
            1.0,
        )?;
        encode_kernel(&mut encoder, &stats)
    }
}

/// The kernel's counters and map fill, as [`datapath::kernel_stats`] read them.
fn encode_kernel(encoder: &mut DescriptorEncoder, stats: &datapath::KernelStats) -> fmt::Result {
    {
        let mut family = encoder.encode_descriptor(
            "enforcer_verdicts",
            "Decisions of the kernel programs, by hook, verdict (allow, deny, audit) and \
             reason, summed over CPUs since the maps were created (they outlive agent restarts)",
            None,
            MetricType::Counter,
        )?;
        for (h, by_verdict) in stats.verdicts_by_hook.iter().enumerate() {
            for (v, row) in by_verdict.iter().enumerate() {
                for (r, &count) in row.iter().enumerate() {
                    // Only the pairs the kernel can count: allow goes with `allowed` alone.
                    if (v as u8 == verdict::ALLOW) != (r as u8 == reason::ALLOWED) {
                        continue;
                    }
                    let labels = [
                        ("hook", hook_name(h as u8)),
                        ("verdict", verdict_name(v as u8)),
                        ("reason", reason_name(r as u8)),
                    ];
                    ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
                }
            }
        }
    }
    counter(
        encoder,
        "enforcer_kernel_events_lost",
        "Deny events the kernel could not write because the ring buffer was full (each one \
         was still counted in enforcer_verdicts_total)",
        stats.lost_events,
    )?;
    {
        let mut family = encoder.encode_descriptor(
            "enforcer_map_entries",
            "Entries in a pinned BPF map (hash and LPM maps; arrays and ring buffers have none)",
            None,
            MetricType::Gauge,
        )?;
        for map in &stats.maps {
            if let Some(entries) = map.entries {
                ConstGauge::new(entries as i64)
                    .encode(family.encode_family(&[("map", map.name)])?)?;
            }
        }
    }
    {
        let mut family = encoder.encode_descriptor(
            "enforcer_map_capacity",
            "max_entries of a pinned BPF map",
            None,
            MetricType::Gauge,
        )?;
        // Socket storage has no capacity: no series.
        for map in &stats.maps {
            if let Some(capacity) = map.capacity {
                ConstGauge::new(capacity as i64)
                    .encode(family.encode_family(&[("map", map.name)])?)?;
            }
        }
    }
    gauge(
        encoder,
        "enforcer_policy_generation",
        "The policy generation the kernel stamps on its decisions (bumped by every change)",
        None,
        stats.config.generation as f64,
    )?;
    gauge(
        encoder,
        "enforcer_audit_mode",
        "1 when the kernel is in global audit mode (would-be denies are let through)",
        None,
        if stats.config.audit { 1.0 } else { 0.0 },
    )
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: f64,
) -> fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// Parses `--metrics ADDR`: `IP:PORT` (`127.0.0.1:9464`, `[::1]:9464`, `0.0.0.0:9464`).
pub fn parse_addr(addr: &str) -> Result<SocketAddr> {
    addr.trim().parse().with_context(|| {
        format!(
            "--metrics {addr:?} is not an address to listen on: give IP:PORT, like \
             127.0.0.1:9464, [::1]:9464 or 0.0.0.0:9464 (a host name is not accepted)"
        )
    })
}

/// The running metrics server. Dropping it stops serving.
pub struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    /// The address it listens on (the port chosen when `:0` was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves `metrics` on [`PATH`]. Must run inside a tokio runtime.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<Server> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} for --metrics"))?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let serve = move |stream, peer: crate::pdp::listen::Peer| {
            let metrics = metrics.clone();
            async move {
                crate::pdp::listen::serve_http(stream, peer.addr, move |request| {
                    respond(metrics.clone(), request)
                })
                .await
            }
        };
        let forever = std::future::pending::<()>();
        if let Err(error) =
            crate::pdp::listen::accept_until(&listener, None, MAX_CONNECTIONS, forever, serve).await
        {
            tracing::error!("the metrics server stopped: {error:#}");
        }
    });
    Ok(Server { addr, task })
}

async fn respond(metrics: Arc<Metrics>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.uri().path() != PATH {
        return plain(StatusCode::NOT_FOUND, format!("not found: try {PATH}\n"));
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    let openmetrics = wants_openmetrics(
        request
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    // Reading the pinned maps is a few syscalls per entry: off the runtime's threads.
    let body = match tokio::task::spawn_blocking(move || metrics.try_encode(openmetrics)).await {
        Ok(Ok(body)) => body,
        Ok(Err(error)) => {
            tracing::error!("metrics: encoding failed: {error}");
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding failed\n".into(),
            );
        }
        Err(error) => {
            tracing::error!("metrics: encoding failed: {error}");
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding failed\n".into(),
            );
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if openmetrics {
            OPENMETRICS
        } else {
            PROMETHEUS_TEXT
        }),
    );
    response
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Whether an `Accept` header asks for OpenMetrics (any mention of its media type with a
/// non-zero quality: Prometheus lists it first, with text/plain as a fallback).
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|accept| {
        accept.split(',').any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let media = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        })
    })
}

#[cfg(test)]
mod tests;
