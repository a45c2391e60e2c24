//! The agent's half of deny aggregation (`--events-aggregate`): the summaries of the denies
//! the kernel counted in `AGGREGATE` instead of reporting them one by one.
//!
//! The kernel side (`enforcer-ebpf/src/report.rs`, `enforcer_common::AggregateValue`)
//! reports the first deny of each (key, window) at once and adds every other one to the
//! entry's `suppressed`. Windows are a fixed grid of the monotonic clock (`window` in the key
//! is `ktime / window length`). [`Aggregates::sweep`] reports every entry whose window ended
//! at least a whole window ago as one `DenyEvent` with `count` = `suppressed`, then (once the lines are written, [`Aggregates::forget`]) deletes
//! it: what a SOC sees for a flood is two lines per key per window, whose counts add up to
//! the denies exactly.
//!
//! Why the read is final (no loss, no double count): the kernel writes an entry only in
//! its own window (a deny of a later window has another key), and the agent reads it a whole
//! window after that window ended. A kernel add after the read would need a program
//! invocation that read the clock inside the window and stalled inside the BPF program, with
//! migration disabled, for more than a window (1 s by default) before its atomic add; the
//! kernel's RCU stall detector would report such a stall. Each entry is read and deleted once,
//! so nothing is reported twice; a restarted agent finds the entries the last one left and
//! reports them. The one gap: an agent killed between writing a summary and deleting its
//! entry writes that summary again after the restart (never loses it).
//!
//! Per-workload key budget (`--events-keys-per-workload`): the kernel lets each cgroup make
//! a bounded number of keys per window and counts its further denies under one overflow key
//! (`aggregate_flags::OVERFLOW`, no address). The sweep hands those back apart
//! ([`Swept::overflows`]): the agent reports each as one `events.suppressed` notice
//! ([`suppressed`]), with the same finality argument. It also deletes the windows' budget
//! counters (`AGGREGATE_BUDGET`), which the kernel too writes only in their own window.
//!
//! Flow event budget (`--flow-events-per-workload`): the kernel counts a workload's flows
//! beyond its budget under its flow overflow keys (`aggregate_flags::FLOW_EVENTS`, opened and
//! closed apart, per protocol). The sweep sums them per (window, workload) into
//! [`Swept::flows`], which the agent reports as `flow_events.suppressed` ([`flow_suppressed`]);
//! same finality argument.
//!
//! Limits: a summary names the task of the window's first deny (`pid`, `comm`) and is
//! timestamped at the window's end; an ingress summary has no peer port (the key has none).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use enforcer_common::{
    aggregate_flags, maps, AggregateBudgetKey, AggregateKey, AggregateValue, DenyEvent,
};

use super::decode::{hook_name, reason_name, verdict_name};
use super::Notice;

/// The default window of `--events-aggregate`.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(1);

/// The shortest window `--events-aggregate` takes: the agent's sweep interval.
pub const MIN_WINDOW: Duration = Duration::from_millis(500);

/// `--events-aggregate 1s|500ms|0`: a duration of at least [`MIN_WINDOW`]; 0 turns
/// aggregation off.
pub fn parse_window(text: &str) -> Result<Duration> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    let window = humantime::parse_duration(text.trim()).with_context(|| {
        format!("--events-aggregate {text:?}: want a duration (1s, 500ms) or 0 for off")
    })?;
    // The agent sweeps finished windows every 500 ms: with shorter windows, entries (and
    // each workload's key budget, which is per window) pile up between sweeps, and a few
    // flooding workloads would fill the map.
    anyhow::ensure!(
        window >= MIN_WINDOW,
        "--events-aggregate {text:?}: the window must be at least 500ms (the agent reads the \
         counts every 500 ms); use 0 for off"
    );
    Ok(window)
}

/// The pinned `AGGREGATE` and `AGGREGATE_BUDGET` maps and the window length the kernel uses.
pub struct Aggregates {
    map: BpfHashMap<MapData, AggregateKey, AggregateValue>,
    budget: BpfHashMap<MapData, AggregateBudgetKey, u64>,
    window_ns: u64,
    /// The entries an earlier agent left (in the map when it was opened), until swept: their
    /// window numbers are of `previous_ns`.
    inherited: std::collections::HashSet<AggregateKey>,
    /// The window length in force when the map was opened (`Config::event_window_ns` then,
    /// before this agent set its own).
    previous_ns: u64,
}

/// What one sweep found: summaries of denies' own keys (written like the kernel's events),
/// and the overflow entries' counts (for [`suppressed`]), each with `count` > 0.
#[derive(Debug, Default)]
pub struct Swept {
    pub summaries: Vec<DenyEvent>,
    /// Only the fields of an overflow key are set (`aggregate_flags::OVERFLOW`); each with
    /// the time its calls may have begun since ([`calls_since`]).
    pub overflows: Vec<(DenyEvent, u64)>,
    /// Suppressed flow events, one per (window, workload), in window order.
    pub flows: Vec<FlowOverflow>,
    /// The entries read: for [`Aggregates::forget`] once what they told is written.
    pub done: Vec<AggregateKey>,
}

/// One workload's flow events of one window that the kernel counted instead of writing
/// (`aggregate_flags::FLOW_EVENTS`): `opened` flows whose `flow.opened` was suppressed,
/// `closed` flows whose `flow.closed` was (those of flows whose opened was suppressed,
/// closed in this window). At least one of the two is non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowOverflow {
    pub subject: u32,
    /// CLOCK_MONOTONIC nanoseconds of the window's end.
    pub end_ns: u64,
    pub opened: u64,
    pub closed: u64,
    /// `Config::generation` (low 32 bits) of the first flow counted (names the workload).
    pub policy_generation: u32,
}

/// Opens one pinned hash map of `pin_dir`. Errors: missing, or of another layout.
fn open_hash<K: aya::Pod, V: aya::Pod>(
    pin_dir: &Path,
    name: &str,
) -> Result<BpfHashMap<MapData, K, V>> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Map::from_map_data(data)
        .with_context(|| format!("reading the type of map {}", path.display()))?
        .try_into()
        .with_context(|| format!("map {} has an unexpected type or layout", path.display()))
}

impl Aggregates {
    /// Opens the pinned `AGGREGATE` map of `pin_dir`. `window` must be the kernel's
    /// (`Config::event_window_ns`; zero: off, and every entry left is reported), `previous`
    /// the one in force until now, which numbered the entries in the map now. Errors: the
    /// map is missing or of another layout (a pin directory of another ABI).
    pub fn open(pin_dir: &Path, window: Duration, previous: Duration) -> Result<Self> {
        let map: BpfHashMap<MapData, AggregateKey, AggregateValue> =
            open_hash(pin_dir, maps::AGGREGATE)?;
        let inherited = map.keys().filter_map(|k| k.ok()).collect();
        Ok(Self {
            map,
            budget: open_hash(pin_dir, maps::AGGREGATE_BUDGET)?,
            window_ns: window.as_nanos() as u64,
            inherited,
            previous_ns: previous.as_nanos() as u64,
        })
    }

    /// Summaries (count > 0) of every entry whose window ended at least one window before
    /// `now_ns` (CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`). The entries stay until
    /// [`Aggregates::forget`]: an agent killed before its lines are written leaves them for
    /// the next one to report (twice at worst, never not at all).
    /// An entry of an earlier window length (the agent restarted with another
    /// `--events-aggregate`) is treated the same way by its window number, which only makes
    /// it older. Errors: none from the map walk itself (entries that vanish are skipped).
    pub fn sweep(&mut self, now_ns: u64) -> Swept {
        // Aggregation off: the kernel adds to no entry, so whatever an earlier agent left
        // is final; report it all.
        let current = now_ns.checked_div(self.window_ns).unwrap_or(u64::MAX);
        // Over for a whole window; or numbered beyond the present, which only an entry of a
        // longer window length (an earlier agent's) can be.
        let over =
            |window: u64| window.saturating_add(2) <= current || window > current.saturating_add(1);
        // Budget counters: nothing to report, only to delete (by the same rule).
        let spent: Vec<AggregateBudgetKey> = self
            .budget
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| over(k.window))
            .collect();
        for key in spent {
            if let Err(error) = self.budget.remove(&key) {
                tracing::warn!(%error, "deleting an AGGREGATE_BUDGET counter");
            }
        }
        // Keys first, then each value: deleting while iterating would restart the walk.
        let done: Vec<AggregateKey> = self
            .map
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| over(k.window))
            .collect();
        let mut swept = Swept::default();
        let mut flows = std::collections::BTreeMap::<(u64, u32), FlowOverflow>::new();
        for key in done {
            let Ok(value) = self.map.get(&key, 0) else {
                continue;
            };
            if value.suppressed > 0 {
                let end = match self.window_ns {
                    0 => now_ns,
                    w => key.window.saturating_add(1).saturating_mul(w).min(now_ns),
                };
                let event = summary(&key, &value, value.suppressed, end);
                if key.flags & aggregate_flags::FLOW_EVENTS != 0 {
                    let o = flows
                        .entry((key.window, key.subject))
                        .or_insert(FlowOverflow {
                            subject: key.subject,
                            end_ns: end,
                            opened: 0,
                            closed: 0,
                            policy_generation: value.policy_generation,
                        });
                    if key.flags & aggregate_flags::FLOW_CLOSED != 0 {
                        o.closed += value.suppressed;
                    } else {
                        o.opened += value.suppressed;
                    }
                } else if key.flags & aggregate_flags::OVERFLOW != 0 {
                    let length = if self.inherited.contains(&key) {
                        self.previous_ns
                    } else {
                        self.window_ns
                    };
                    swept
                        .overflows
                        .push((event, calls_since(key.window, length)));
                } else {
                    swept.summaries.push(event);
                }
            }
            swept.done.push(key);
        }
        swept.flows = flows.into_values().collect();
        swept
    }

    /// Deletes the entries a sweep read ([`Swept::done`]), once their lines are written.
    pub fn forget(&mut self, done: &[AggregateKey]) {
        for key in done {
            if let Err(error) = self.map.remove(key) {
                tracing::warn!(%error, "deleting a reported AGGREGATE entry");
            }
            self.inherited.remove(key);
        }
    }
}

/// The `events.suppressed` notice of an overflow entry's summary (`overflow`, from
/// [`Swept::overflows`]): the workload (`workload`/`tenant` as the policy in force names the
/// subject identity; `None` for an identity it does not name, reported as `identity:N`, or
/// `unknown` for the cgroups without one, and tenant `unknown`), the destination identity
/// (`destination` its name, as the workload's), its hook, verdict, reason and the exact
/// number of denies folded in. Overflows are per workload identity, over all
/// its cgroups: the notice names no cgroup. `time` is
/// the RFC 3339 time of the window's end.
pub fn suppressed(
    overflow: &DenyEvent,
    workload: Option<&str>,
    tenant: Option<&str>,
    destination: Option<&str>,
    time: String,
) -> Notice {
    Notice::EventsSuppressed {
        time,
        workload: match workload {
            Some(name) => name.to_string(),
            None if overflow.subject == enforcer_common::identity::UNKNOWN => "unknown".into(),
            None => format!("identity:{}", overflow.subject),
        },
        tenant: tenant.unwrap_or("unknown").to_string(),
        identity: overflow.subject,
        // Zero for ingress, and for an overflow of a kernel from before destinations were
        // kept.
        destination: (overflow.destination != 0).then(|| match destination {
            Some(name) => name.to_string(),
            None => format!("identity:{}", overflow.destination),
        }),
        hook: hook_name(overflow.hook),
        verdict: verdict_name(overflow.verdict),
        reason: reason_name(overflow.reason),
        count: u64::from(overflow.count),
    }
}

/// The `flow_events.suppressed` notice of `overflow` (from [`Swept::flows`]): the workload
/// named as in [`suppressed`], and its exact counts. `time` is the RFC 3339 time of the
/// window's end.
pub fn flow_suppressed(
    overflow: &FlowOverflow,
    workload: Option<&str>,
    tenant: Option<&str>,
    time: String,
) -> Notice {
    Notice::FlowEventsSuppressed {
        time,
        workload: match workload {
            Some(name) => name.to_string(),
            None => format!("identity:{}", overflow.subject),
        },
        tenant: tenant.unwrap_or("unknown").to_string(),
        identity: overflow.subject,
        opened: overflow.opened,
        closed: overflow.closed,
    }
}

/// When the calls counted in an entry of window number `window` may have begun, in
/// CLOCK_MONOTONIC nanoseconds: its window's start, `window_length` the length that numbered
/// it (this agent's, or for an entry an earlier agent left, the one in force then); 0 (any
/// time) when that length is 0 (aggregation off: unknown). Review 56 L3: an earlier agent's
/// entry was given about now, and a quarantine followed none of the moves made after its
/// calls; review 58 F1: 0 for every such entry held moves made before its calls too.
pub fn calls_since(window: u64, window_length: u64) -> u64 {
    window.saturating_mul(window_length)
}

/// The event of `count` denies of `key`, as the kernel would have written one of them.
fn summary(key: &AggregateKey, value: &AggregateValue, count: u64, now_ns: u64) -> DenyEvent {
    let bytes = |w: [u32; 4]| {
        let mut out = [0u8; 16];
        for (i, word) in w.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        out
    };
    DenyEvent {
        timestamp_ns: now_ns,
        // An overflow key names no cgroup: the window's first deny's.
        cgroup_id: if key.cgroup_id != 0 {
            key.cgroup_id
        } else {
            value.cgroup_id
        },
        pid_tgid: value.pid_tgid,
        subject: key.subject,
        destination: key.destination,
        daddr: bytes(key.daddr),
        dport: key.dport,
        family: key.family,
        protocol: key.protocol,
        hook: key.hook,
        verdict: key.verdict,
        reason: key.reason,
        _pad: 0,
        comm: value.comm,
        policy_generation: value.policy_generation,
        sock_type: key.sock_type,
        sock_protocol: key.sock_protocol,
        peer: bytes(key.peer),
        // More than 4 billion denies of one key in one sweep cannot happen (~1 M/s at most).
        count: count.min(u64::from(u32::MAX)) as u32,
        _pad2: 0,
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds (the clock of `bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_zero_is_off() {
        assert_eq!(parse_window("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_window("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_window("250ms").is_err());
        assert_eq!(parse_window("0").unwrap(), Duration::ZERO);
        assert!(parse_window("10us").is_err());
        let error = parse_window("often").unwrap_err().to_string();
        assert!(error.contains("--events-aggregate"), "{error}");
    }

    #[test]
    fn an_entry_began_at_its_window_start_by_the_length_that_numbered_it() {
        const W: u64 = 5_000_000_000;
        assert_eq!(calls_since(6, W), 6 * W);
        assert_eq!(calls_since(6, 0), 0, "numbered by no length: any time");
        assert_eq!(calls_since(u64::MAX, W), u64::MAX, "saturates");
    }

    #[test]
    fn a_summary_carries_the_key_the_task_and_the_count() {
        let key = AggregateKey {
            cgroup_id: 9,
            subject: 256,
            destination: 257,
            daddr: [u32::from_ne_bytes([127, 91, 0, 2]), 0, 0, 0],
            dport: 80,
            family: 4,
            protocol: 6,
            hook: 0,
            verdict: 1,
            reason: 4,
            ..Default::default()
        };
        let mut comm = [0u8; 16];
        comm[..5].copy_from_slice(b"flood");
        let value = AggregateValue {
            suppressed: 1000,
            pid_tgid: 42 << 32,
            cgroup_id: 8,
            comm,
            policy_generation: 3,
            _pad: 0,
        };
        let e = summary(&key, &value, 999, 77);
        assert_eq!(e.cgroup_id, 9, "the key's cgroup");
        assert_eq!(e.count, 999);
        assert_eq!(e.timestamp_ns, 77);
        assert_eq!(&e.daddr[..4], &[127, 91, 0, 2]);
        assert_eq!(e.pid_tgid >> 32, 42);
        assert_eq!(e.policy_generation, 3);
        assert_eq!(super::super::decode::comm(&e), "flood");
    }

    #[test]
    fn an_overflow_summary_becomes_one_suppressed_notice_with_its_count() {
        use enforcer_common::{hook, reason, verdict};
        let key = AggregateKey {
            window: 5,
            subject: 256,
            hook: hook::CONNECT4,
            verdict: verdict::DENY,
            reason: reason::TENANT_MISMATCH,
            flags: aggregate_flags::OVERFLOW,
            ..Default::default()
        };
        let value = AggregateValue {
            suppressed: 123_456,
            cgroup_id: 8,
            ..Default::default()
        };
        let e = summary(&key, &value, value.suppressed, 6_000_000_000);
        // The key names no cgroup: the first deny's, for the quarantine to hold.
        assert_eq!(e.cgroup_id, 8);
        let notice = suppressed(
            &e,
            Some("acme-gateway"),
            Some("acme"),
            Some("globex-vectors"),
            "T".into(),
        );
        assert_eq!(notice.kind(), "events.suppressed");
        let json = serde_json::to_value(&notice).unwrap();
        assert_eq!(json["type"], "events.suppressed");
        assert_eq!(json["workload"], "acme-gateway");
        assert_eq!(json["tenant"], "acme");
        assert_eq!(json["identity"], 256);
        assert!(json.get("cgroup_id").is_none(), "{json}");
        assert_eq!(json["hook"], hook_name(hook::CONNECT4));
        assert_eq!(json["verdict"], "deny");
        assert_eq!(json["reason"], "tenant_mismatch");
        assert_eq!(json["count"], 123_456);
        // An identity the policy does not name is named by its number.
        let unknown = suppressed(&e, None, None, None, "T".into());
        let json = serde_json::to_value(&unknown).unwrap();
        assert_eq!(json["workload"], "identity:256");
        assert_eq!(json["tenant"], "unknown");
    }
}
