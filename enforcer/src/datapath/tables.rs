//! Typed handles on the pinned maps, and the one operation that writes policy into them:
//! [`Tables::apply`]. The maps are opened from their pins, so the agent, `enforcer status`
//! and `enforcer policy explain` all read the same kernel state.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapInfo, PerCpuArray};
use enforcer_common::{
    capacity, flags, hook, identity, maps, reason, verdict, Config, IdentityInfo, PolicyKey,
    PolicyValue, NO_CLASS, VERDICT_COUNTERS,
};
use enforcer_policy::classes::{self, Classes};

use super::locked::{CgroupIdentityMap, IdentitiesMap};

/// How long a policy table stays untouched after it stopped being the active one. A program
/// that read the old active index just before the flip finishes its two lookups well within
/// this (runs take hundreds of nanoseconds); userspace cannot wait for an RCU grace period
/// directly, so it waits this long before rewriting the now-standby table.
const STANDBY_GRACE: Duration = Duration::from_millis(50);

/// Everything the kernel should hold for one policy revision.
#[derive(Debug, Default, Clone)]
pub struct DesiredState {
    pub cgroups: BTreeMap<u64, u32>,
    pub identities: BTreeMap<u32, IdentityInfo>,
    pub ipcache_v4: BTreeMap<(u32, [u8; 4]), u32>,
    pub ipcache_v6: BTreeMap<(u32, [u8; 16]), u32>,
    pub allows: HashMap<PolicyKey, PolicyValue>,
    pub audit: bool,
}

/// What one [`Tables::apply`] changed, for the log.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyReport {
    pub written: usize,
    pub removed: usize,
    pub active_table: u32,
    /// `CONFIG.generation` after the change: deny events carry it (see `DenyEvent`).
    pub generation: u64,
    /// Whether the change went through a transition table (see [`Tables::apply`]).
    pub transition: bool,
    pub elapsed: Duration,
}

/// Why a generation is about to be written: the agent publishes the policy that explains the
/// events stamped with it (see [`Tables::apply_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flip {
    /// The transition table: every cell it allows is allowed by the old and the new policy.
    Transition,
    /// The new policy.
    Final,
    /// Back to the policy that was in force: a write failed.
    Rollback,
}

/// How many entries each map can hold (`max_entries`), by what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Capacities {
    pub cgroups: u32,
    pub identities: u32,
    pub host_v4: u32,
    pub host_v6: u32,
    pub prefix_v4: u32,
    pub prefix_v6: u32,
    /// Each of the two policy tables.
    pub policy: u32,
}

impl Default for Capacities {
    /// The capacities of maps created without overrides (`enforcer_common::capacity`).
    fn default() -> Self {
        Self {
            cgroups: capacity::CGROUPS,
            identities: capacity::IDENTITIES,
            host_v4: capacity::IPCACHE,
            host_v6: capacity::IPCACHE,
            prefix_v4: capacity::IPCACHE,
            prefix_v6: capacity::IPCACHE,
            policy: capacity::POLICY,
        }
    }
}

/// Entries a policy needs in each map. Where a change holds old and new entries together for a
/// moment (see [`Tables::apply`]), `peak` says how many.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    pub cgroups: Need,
    pub identities: Need,
    pub host_v4: Need,
    pub host_v6: Need,
    pub prefix_v4: Need,
    pub prefix_v6: Need,
    pub policy: Need,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// Entries of the policy itself.
    pub entries: usize,
    /// The most the map holds while the change is written (at least `entries`).
    pub peak: usize,
}

impl Need {
    fn exactly(entries: usize) -> Self {
        Self {
            entries,
            peak: entries,
        }
    }
}

impl Needs {
    /// What a state needs on its own (empty maps before it: `policy check`, a fresh agent).
    pub fn of(desired: &DesiredState) -> Self {
        let (host_v4, prefix_v4) = split_hosts(&desired.ipcache_v4, 32);
        let (host_v6, prefix_v6) = split_hosts(&desired.ipcache_v6, 128);
        Self {
            cgroups: Need::exactly(desired.cgroups.len()),
            identities: Need::exactly(desired.identities.len()),
            host_v4: Need::exactly(host_v4.len()),
            host_v6: Need::exactly(host_v6.len()),
            prefix_v4: Need::exactly(prefix_v4.len()),
            prefix_v6: Need::exactly(prefix_v6.len()),
            policy: Need::exactly(Classes::of(&desired.allows).entries.len()),
        }
    }

    /// Every need above its capacity, in words an operator can act on; empty when it all fits.
    pub fn overflows(&self, capacity: &Capacities) -> Vec<String> {
        let rows = [
            (
                self.policy,
                capacity.policy,
                "policy",
                "POLICY_A/POLICY_B",
                "policy",
            ),
            (
                self.identities,
                capacity.identities,
                "identity",
                maps::IDENTITIES,
                "identities",
            ),
            (
                self.cgroups,
                capacity.cgroups,
                "cgroup",
                maps::CGROUP_IDENTITY,
                "cgroups",
            ),
            (
                self.host_v4,
                capacity.host_v4,
                "IPv4 host address",
                maps::IPCACHE_HOST_V4,
                "ipcache",
            ),
            (
                self.host_v6,
                capacity.host_v6,
                "IPv6 host address",
                maps::IPCACHE_HOST_V6,
                "ipcache",
            ),
            (
                self.prefix_v4,
                capacity.prefix_v4,
                "IPv4 prefix",
                maps::IPCACHE_V4,
                "ipcache",
            ),
            (
                self.prefix_v6,
                capacity.prefix_v6,
                "IPv6 prefix",
                maps::IPCACHE_V6,
                "ipcache",
            ),
        ];
        rows.into_iter()
            .filter(|(need, cap, ..)| need.peak > *cap as usize)
            .map(|(need, cap, what, map, flag)| {
                let during = if need.peak > need.entries {
                    format!(
                        " ({} while the change is written: old and new entries together)",
                        need.peak
                    )
                } else {
                    String::new()
                };
                format!(
                    "needs {} {what} entries{during}, capacity {cap} (map {map}; \
                     `enforcer run --capacity {flag}=N` sizes it when the maps are created)",
                    need.entries
                )
            })
            .collect()
    }
}

/// Everything the policy maps hold, read back from the kernel: what `explain` compares and
/// what tests compare before and after a change. The policy tables are given as what they
/// mean, keyed by identity pairs (each class entry fanned out to its members through that
/// table's class slots), and identities without their classes; `kernel_policy` and
/// `kernel_identities` are the raw class-keyed maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapContents {
    pub cgroups: BTreeMap<u64, u32>,
    /// Tenant and flags of each identity (class slots zero).
    pub identities: BTreeMap<u32, IdentityInfo>,
    pub host_v4: BTreeMap<[u8; 4], u32>,
    pub host_v6: BTreeMap<[u8; 16], u32>,
    pub prefix_v4: BTreeMap<(u32, [u8; 4]), u32>,
    pub prefix_v6: BTreeMap<(u32, [u8; 16]), u32>,
    /// `POLICY_A`, `POLICY_B`, decoded to identity pairs.
    pub policy: [BTreeMap<PolicyKey, PolicyValue>; 2],
    pub config: Config,
    /// `POLICY_A`, `POLICY_B` as the kernel holds them: keyed by classes.
    pub kernel_policy: [BTreeMap<PolicyKey, PolicyValue>; 2],
    /// `IDENTITIES` as the kernel holds it, class slots included.
    pub kernel_identities: BTreeMap<u32, IdentityInfo>,
}

impl MapContents {
    /// The table the programs read now.
    pub fn active_policy(&self) -> &BTreeMap<PolicyKey, PolicyValue> {
        &self.policy[active_table(&self.config)]
    }

    /// Everything a decision reads: the mappings and the active table (not the standby table
    /// or the generation, which a rolled-back change may leave different).
    pub fn same_decisions(&self, other: &MapContents) -> bool {
        self.cgroups == other.cgroups
            && self.identities == other.identities
            && self.host_v4 == other.host_v4
            && self.host_v6 == other.host_v6
            && self.prefix_v4 == other.prefix_v4
            && self.prefix_v6 == other.prefix_v6
            && self.active_policy() == other.active_policy()
            && self.config.audit == other.config.audit
    }
}

pub struct Tables {
    cgroup_identity: CgroupIdentityMap,
    identities: IdentitiesMap,
    ipcache_host_v4: BpfHashMap<MapData, [u8; 4], u32>,
    ipcache_host_v6: BpfHashMap<MapData, [u8; 16], u32>,
    ipcache_v4: LpmTrie<MapData, [u8; 4], u32>,
    ipcache_v6: LpmTrie<MapData, [u8; 16], u32>,
    policy: [BpfHashMap<MapData, PolicyKey, PolicyValue>; 2],
    config: Array<MapData, Config>,
    /// `max_entries` of the maps as loaded (userspace may have overridden the defaults).
    capacities: Capacities,
    /// Off only to test the rollback: a write then fails in the kernel instead.
    check_capacity: bool,
    last_flip: Option<Instant>,
    /// What this process last wrote to each policy table, so that a swap diffs against memory
    /// instead of reading ~10^5 entries back (two syscalls each). `None` until first read:
    /// an agent starting on pinned maps learns their contents once. The agent is the maps'
    /// only writer (its state-directory lock keeps a second agent out).
    policy_shadow: [Option<HashMap<PolicyKey, PolicyValue>>; 2],
    /// What each policy map holds, keyed by classes (`None` until first read).
    class_shadow: [Option<HashMap<PolicyKey, PolicyValue>>; 2],
    /// Testing only: called at each step of a table swap (see [`Tables::observe_swaps`]).
    observer: Option<Box<dyn FnMut(SwapStep) + Send>>,
    /// The same for the cgroup, identity and IP-cache maps: what the last successful apply
    /// wrote, so that the next one diffs against memory (at 20,000 pods, reading them back
    /// was a tenth of the agent's CPU per pod change). `None` until first read, and again
    /// after any failed write or a write outside `apply` that does not keep it (the maps
    /// are then read from the kernel once more).
    mappings_shadow: Option<Mappings>,
}

/// A step of a table swap, after which [`Tables::observe_swaps`]'s observer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapStep {
    /// The standby map holds the new class-keyed entries.
    StandbyTableWritten,
    /// One identity's standby class slot was written.
    StandbyClassesWritten(u32),
    /// `CONFIG.generation` names the new table.
    Flipped,
}

/// The map pinned as `name` under `dir`, its type not yet checked.
pub(super) fn open_pinned(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("reading the type of map {}", path.display()))
}

/// The map pinned as `name` under `dir`, as `T` (what [`typed!`] does inside this module).
/// Errors: missing, or of another type or layout.
pub(crate) fn open_typed<T: TryFrom<Map, Error = aya::maps::MapError>>(
    dir: &Path,
    name: &str,
) -> Result<T> {
    T::try_from(open_pinned(dir, name)?)
        .with_context(|| format!("map {name} has an unexpected type or layout"))
}

macro_rules! typed {
    ($dir:expr, $name:expr) => {
        open_pinned($dir, $name)?
            .try_into()
            .with_context(|| format!("map {} has an unexpected type or layout", $name))?
    };
}

/// The kernel's ID of the map pinned as `name` under `dir`: the same for as long as that map
/// lives, another for a map made anew (IDs are not reused while the kernel runs long).
pub fn map_id(dir: &Path, name: &str) -> Result<u32> {
    Ok(MapInfo::from_pin(dir.join(name))
        .with_context(|| format!("reading map info of {name}"))?
        .id())
}

/// The `max_entries` of the map pinned as `name` under `dir`.
pub(super) fn max_entries(dir: &Path, name: &str) -> Result<u32> {
    Ok(MapInfo::from_pin(dir.join(name))
        .with_context(|| format!("reading map info of {name}"))?
        .max_entries())
}

/// The mappings a decision reads besides the policy table, split as the kernel holds them.
#[derive(Debug, Clone, Default)]
struct Mappings {
    cgroups: HashMap<u64, u32>,
    identities: HashMap<u32, IdentityInfo>,
    v4: IpCache<4>,
    v6: IpCache<16>,
}

#[derive(Debug, Clone, Default)]
struct IpCache<const N: usize> {
    host: HashMap<[u8; N], u32>,
    prefix: HashMap<(u32, [u8; N]), u32>,
}

impl Mappings {
    /// What the maps hold once `desired` is written.
    fn of(desired: &DesiredState) -> Self {
        Self {
            cgroups: desired.cgroups.iter().map(|(k, v)| (*k, *v)).collect(),
            identities: desired.identities.iter().map(|(k, v)| (*k, *v)).collect(),
            v4: IpCache::from_desired(&desired.ipcache_v4),
            v6: IpCache::from_desired(&desired.ipcache_v6),
        }
    }
}

impl<const N: usize> IpCache<N> {
    fn from_desired(entries: &BTreeMap<(u32, [u8; N]), u32>) -> Self {
        let bits = N as u32 * 8;
        let (host, prefix) = split_hosts(entries, bits);
        Self {
            host: host.into_iter().collect(),
            prefix: prefix.into_iter().collect(),
        }
    }

    fn to_desired(&self) -> BTreeMap<(u32, [u8; N]), u32> {
        let bits = N as u32 * 8;
        let hosts = self.host.iter().map(|(addr, id)| ((bits, *addr), *id));
        let prefixes = self.prefix.iter().map(|(key, id)| (*key, *id));
        hosts.chain(prefixes).collect()
    }

    /// The identity the kernel finds for the network `(len, addr)`: the longest entry that
    /// covers it (exact host entry first), WORLD when none does.
    #[cfg(test)]
    fn lookup(&self, len: u32, addr: [u8; N]) -> u32 {
        self.lookup_in(&self.prefix_lengths(), len, addr)
    }

    /// The prefix lengths present, longest first: a lookup tries only those (the first apply
    /// of 10^5 host entries would otherwise try 33 or 129 lengths each).
    fn prefix_lengths(&self) -> Vec<u32> {
        let lengths: BTreeSet<u32> = self.prefix.keys().map(|(len, _)| *len).collect();
        lengths.into_iter().rev().collect()
    }

    fn lookup_in(&self, lengths: &[u32], len: u32, addr: [u8; N]) -> u32 {
        let bits = N as u32 * 8;
        if len == bits {
            if let Some(id) = self.host.get(&addr) {
                return *id;
            }
        }
        for &l in lengths.iter().filter(|l| **l <= len.min(bits - 1)) {
            if let Some(id) = self.prefix.get(&(l, mask(addr, l))) {
                return *id;
            }
        }
        identity::WORLD
    }

    /// `(identity before, identity after)` for every network whose answer may change between
    /// `self` and `next` (one pair per added, changed or removed entry; a superset).
    fn changes(&self, next: &Self) -> BTreeSet<(u32, u32)> {
        let bits = N as u32 * 8;
        let mut keys: BTreeSet<(u32, [u8; N])> = BTreeSet::new();
        for (addr, id) in &self.host {
            if next.host.get(addr) != Some(id) {
                keys.insert((bits, *addr));
            }
        }
        for (addr, id) in &next.host {
            if self.host.get(addr) != Some(id) {
                keys.insert((bits, *addr));
            }
        }
        for (key, id) in &self.prefix {
            if next.prefix.get(key) != Some(id) {
                keys.insert(*key);
            }
        }
        for (key, id) in &next.prefix {
            if self.prefix.get(key) != Some(id) {
                keys.insert(*key);
            }
        }
        let (before, after) = (self.prefix_lengths(), next.prefix_lengths());
        keys.into_iter()
            .map(|(len, addr)| {
                (
                    self.lookup_in(&before, len, addr),
                    next.lookup_in(&after, len, addr),
                )
            })
            .filter(|(before, after)| before != after)
            .collect()
    }
}

/// `addr` with all but its first `len` bits cleared.
fn mask<const N: usize>(mut addr: [u8; N], len: u32) -> [u8; N] {
    for (i, byte) in addr.iter_mut().enumerate() {
        let first = i as u32 * 8;
        if first >= len {
            *byte = 0;
        } else if first + 8 > len {
            *byte &= 0xffu8 << (8 - (len - first));
        }
    }
    addr
}

/// The kernel's decision for a key in a table: the exact port's entry decides by its verdict;
/// without one, an any-port entry allows.
fn allows(table: &HashMap<PolicyKey, PolicyValue>, key: &PolicyKey) -> bool {
    if key.dport != 0 {
        if let Some(value) = table.get(key) {
            return value.is_allow();
        }
    }
    table.contains_key(&PolicyKey { dport: 0, ..*key })
}

/// A table that allows a call only where both `old` and `new` allow it, and nothing for the
/// (subject, destination) pairs `excluded` names. While it is active, identities, IP caches
/// and cgroups can change entry by entry without any connect seeing an allow that neither
/// policy gives (see [`Tables::apply`]).
fn transition_table(
    old: &HashMap<PolicyKey, PolicyValue>,
    new: &HashMap<PolicyKey, PolicyValue>,
    excluded: impl Fn(u32, u32) -> bool,
) -> HashMap<PolicyKey, PolicyValue> {
    let both = |key: &PolicyKey| allows(old, key) && allows(new, key);
    let keys: HashSet<&PolicyKey> = old.keys().chain(new.keys()).collect();
    let mut table = HashMap::new();
    for key in keys {
        if excluded(key.subject, key.destination) {
            continue;
        }
        let value = new.get(key).or(old.get(key)).copied().unwrap_or_default();
        let any_port_allowed = both(&PolicyKey { dport: 0, ..*key });
        if key.dport == 0 {
            if any_port_allowed {
                table.insert(*key, PolicyValue::allow(value.rule));
            }
        } else if both(key) {
            // Redundant under an allowed any-port entry.
            if !any_port_allowed {
                table.insert(*key, PolicyValue::allow(value.rule));
            }
        } else if any_port_allowed {
            // One of the two denies this port although both allow the others.
            let rule = [new.get(key), old.get(key)]
                .into_iter()
                .flatten()
                .find(|v| !v.is_allow())
                .map_or(value.rule, |v| v.rule);
            table.insert(*key, PolicyValue::deny(rule));
        }
    }
    table
}

/// Drops whole (subject, destination, protocol) groups until `table` fits `capacity`: a group
/// without entries is denied, so the table only gets stricter (and it is short-lived).
fn shrink_to(table: &mut HashMap<PolicyKey, PolicyValue>, capacity: usize) -> usize {
    if table.len() <= capacity {
        return 0;
    }
    let mut groups: HashMap<(u32, u32, u8), usize> = HashMap::new();
    for key in table.keys() {
        *groups
            .entry((key.subject, key.destination, key.protocol))
            .or_default() += 1;
    }
    let mut groups: Vec<_> = groups.into_iter().collect();
    // Biggest first: the fewest groups dropped. Ties by key, so the result is deterministic.
    groups.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut dropped = BTreeSet::new();
    let mut len = table.len();
    for (group, count) in groups {
        if len <= capacity {
            break;
        }
        dropped.insert(group);
        len -= count;
    }
    table.retain(|k, _| !dropped.contains(&(k.subject, k.destination, k.protocol)));
    dropped.len()
}

/// The subjects and destinations a table has entries for.
fn rows_and_columns(table: &HashMap<PolicyKey, PolicyValue>) -> (HashSet<u32>, HashSet<u32>) {
    let mut rows = HashSet::new();
    let mut columns = HashSet::new();
    for key in table.keys() {
        rows.insert(key.subject);
        columns.insert(key.destination);
    }
    (rows, columns)
}

/// The identity value written while a change is in progress: audit (which lets would-denies
/// pass) only where both revisions have it, quarantine where either has it.
fn interim_info(old: Option<&IdentityInfo>, new: &IdentityInfo) -> IdentityInfo {
    let Some(old) = old else { return *new };
    let audit = old.flags & new.flags & flags::AUDIT;
    let quarantine = (old.flags | new.flags) & flags::QUARANTINED;
    IdentityInfo {
        flags: (new.flags & !(flags::AUDIT | flags::QUARANTINED)) | audit | quarantine,
        ..*new
    }
}

/// How one change reaches the kernel (see [`Tables::apply`]).
struct Plan {
    /// The transition table (and its classes), when the mappings change in a way that no
    /// single flip covers.
    transition: Option<(HashMap<PolicyKey, PolicyValue>, Classes)>,
    /// The classes of the new table.
    classes: Classes,
    /// Cgroup entries written before the flip (all of them with a transition table).
    cgroups_before: Vec<(u64, Option<u32>)>,
    cgroups_after: Vec<(u64, Option<u32>)>,
    /// Whether the IP caches change before the flip (else after it).
    ip_before: bool,
    /// Going back after a failure: the table in force may already be the one wanted.
    rollback: bool,
}

impl Tables {
    /// Opens the policy maps pinned in `dir` (the versioned pin directory).
    pub fn open(dir: &Path) -> Result<Self> {
        let policy = max_entries(dir, maps::POLICY_A)?.min(max_entries(dir, maps::POLICY_B)?);
        Ok(Self {
            cgroup_identity: CgroupIdentityMap::open(dir, maps::CGROUP_IDENTITY)?,
            identities: IdentitiesMap::open(dir, maps::IDENTITIES)?,
            ipcache_host_v4: typed!(dir, maps::IPCACHE_HOST_V4),
            ipcache_host_v6: typed!(dir, maps::IPCACHE_HOST_V6),
            ipcache_v4: typed!(dir, maps::IPCACHE_V4),
            ipcache_v6: typed!(dir, maps::IPCACHE_V6),
            policy: [typed!(dir, maps::POLICY_A), typed!(dir, maps::POLICY_B)],
            config: typed!(dir, maps::CONFIG),
            capacities: Capacities {
                cgroups: max_entries(dir, maps::CGROUP_IDENTITY)?,
                identities: max_entries(dir, maps::IDENTITIES)?,
                host_v4: max_entries(dir, maps::IPCACHE_HOST_V4)?,
                host_v6: max_entries(dir, maps::IPCACHE_HOST_V6)?,
                prefix_v4: max_entries(dir, maps::IPCACHE_V4)?,
                prefix_v6: max_entries(dir, maps::IPCACHE_V6)?,
                policy,
            },
            check_capacity: true,
            last_flip: None,
            policy_shadow: [None, None],
            class_shadow: [None, None],
            observer: None,
            mappings_shadow: None,
        })
    }

    /// The maps' real capacities (`max_entries` as loaded).
    pub fn capacities(&self) -> Capacities {
        self.capacities
    }

    /// Testing only: skip the capacity check, so that an oversize change fails in the kernel
    /// part-way and is rolled back.
    pub fn set_capacity_check(&mut self, on: bool) {
        self.check_capacity = on;
    }

    pub fn config(&self) -> Result<Config> {
        self.config.get(&0, 0).context("reading CONFIG")
    }

    /// `CONFIG.rate_shared` (`enforcer_common::rate::sharing`), written around a
    /// table swap by the agent's own task, never during one.
    pub fn set_rate_shared(&mut self, sharing: u32) -> Result<()> {
        if self.config()?.rate_shared == sharing {
            return Ok(());
        }
        self.update_config("rate_shared", |config| config.rate_shared = sharing)
    }

    /// `CONFIG.socket_lb` (`enforcer run --socket-lb`).
    pub fn set_socket_lb(&mut self, socket_lb: bool) -> Result<()> {
        self.update_config("socket_lb", |config| {
            config.socket_lb = u32::from(socket_lb)
        })
    }

    /// Rewrites `CONFIG` with `change` applied, every other field kept (`what` names the
    /// field in the error). Only the agent's own task writes `CONFIG` (a read-modify-write),
    /// and never while a policy flip is under way, so none can undo one.
    fn update_config(&mut self, what: &str, change: impl FnOnce(&mut Config)) -> Result<()> {
        let mut config = self.config()?;
        change(&mut config);
        self.config
            .set(0, config, 0)
            .with_context(|| format!("writing CONFIG.{what}"))
    }

    /// Sets `CONFIG.event_window_ns` (deny aggregation, zero = off) and
    /// `CONFIG.event_keys_per_workload` (new keys per workload and window, zero = no budget)
    /// and `CONFIG.flow_events_per_workload` (`flow.opened` events per workload and window,
    /// zero = no budget).
    pub fn set_event_window(
        &mut self,
        window: std::time::Duration,
        keys_per_workload: u32,
        flow_events_per_workload: u32,
    ) -> Result<()> {
        self.update_config("event_window_ns", |config| {
            config.event_window_ns = window.as_nanos() as u64;
            config.event_keys_per_workload = keys_per_workload;
            config.flow_events_per_workload = flow_events_per_workload;
        })
    }

    /// Sets `CONFIG.wire_skew_s` and `CONFIG.wire_v1_until_s` (the identity option's
    /// freshness: see `enforcer_common::wire::fresh`). `skew` is whole seconds (sub-second
    /// parts dropped).
    pub fn set_wire_freshness(&mut self, skew: std::time::Duration, v1_until_s: u32) -> Result<()> {
        self.update_config("wire_skew_s", |config| {
            config.wire_skew_s = u32::try_from(skew.as_secs()).unwrap_or(u32::MAX);
            config.wire_v1_until_s = v1_until_s;
        })
    }

    /// Sets `CONFIG.node_netns_cookie` (the node's network namespace, see
    /// [`super::netns_cookie`]).
    pub fn set_node_netns(&mut self, cookie: u64) -> Result<()> {
        self.update_config("node_netns_cookie", |config| {
            config.node_netns_cookie = cookie
        })
    }

    /// Sets `CONFIG.tai_offset_s` when it differs (the identity option's clock is CLOCK_TAI
    /// less it); true when it was written.
    pub fn set_tai_offset(&mut self, offset_s: u32) -> Result<bool> {
        if self.config()?.tai_offset_s == offset_s {
            return Ok(false);
        }
        self.update_config("tai_offset_s", |config| config.tai_offset_s = offset_s)?;
        Ok(true)
    }

    /// Everything the policy maps hold now.
    pub fn contents(&self) -> Result<MapContents> {
        let m = self.read_mappings()?;
        let kernel_policy = [self.policy[0].entries()?, self.policy[1].entries()?];
        let policy = [
            decode_slot(&kernel_policy[0], &m.identities, 0)
                .into_iter()
                .collect(),
            decode_slot(&kernel_policy[1], &m.identities, 1)
                .into_iter()
                .collect(),
        ];
        let [a, b] = kernel_policy;
        Ok(MapContents {
            cgroups: m.cgroups.into_iter().collect(),
            identities: m
                .identities
                .iter()
                .map(|(id, info)| (*id, IdentityInfo::new(info.tenant, info.flags)))
                .collect(),
            host_v4: m.v4.host.into_iter().collect(),
            host_v6: m.v6.host.into_iter().collect(),
            prefix_v4: m.v4.prefix.into_iter().collect(),
            prefix_v6: m.v6.prefix.into_iter().collect(),
            policy,
            config: self.config()?,
            kernel_policy: [a.into_iter().collect(), b.into_iter().collect()],
            kernel_identities: m.identities.into_iter().collect(),
        })
    }

    /// Testing only: `observer` runs after each step of every table swap (the standby table
    /// written, each identity's standby classes written, the flip), so that a test can read
    /// what the kernel would decide at that moment.
    pub fn observe_swaps(&mut self, observer: Box<dyn FnMut(SwapStep) + Send>) {
        self.observer = Some(observer);
    }

    fn observe(&mut self, step: SwapStep) {
        if let Some(observer) = self.observer.as_mut() {
            observer(step);
        }
    }

    /// The destination identity the kernel finds for an address (host entry, then the longest
    /// prefix; WORLD when none), and the map that answered.
    pub fn destination_of(&self, addr: std::net::IpAddr) -> (u32, &'static str) {
        use std::net::IpAddr;
        match addr {
            IpAddr::V4(a) => {
                let bytes = a.octets();
                if let Ok(id) = self.ipcache_host_v4.get(&bytes, 0) {
                    return (id, maps::IPCACHE_HOST_V4);
                }
                match self.ipcache_v4.get(&LpmKey::new(32, bytes), 0) {
                    Ok(id) => (id, maps::IPCACHE_V4),
                    Err(_) => (identity::WORLD, maps::IPCACHE_V4),
                }
            }
            IpAddr::V6(a) => {
                let bytes = a.octets();
                if let Ok(id) = self.ipcache_host_v6.get(&bytes, 0) {
                    return (id, maps::IPCACHE_HOST_V6);
                }
                match self.ipcache_v6.get(&LpmKey::new(128, bytes), 0) {
                    Ok(id) => (id, maps::IPCACHE_V6),
                    Err(_) => (identity::WORLD, maps::IPCACHE_V6),
                }
            }
        }
    }

    /// The value the active table holds for a cell given by identities (exact port first,
    /// then any port), as the kernel would see it: through the two identities' classes in
    /// that table. The key returned is `key` with the port that matched.
    pub fn lookup(&self, key: PolicyKey) -> Result<Option<(PolicyKey, PolicyValue)>> {
        let slot = active_table(&self.config()?);
        let active = &self.policy[slot];
        let (Some(subject), Some(destination)) = (
            self.identity_info(key.subject),
            self.identity_info(key.destination),
        ) else {
            return Ok(None);
        };
        let class_key = PolicyKey {
            subject: subject.subject_class[slot],
            destination: destination.destination_class[slot],
            ..key
        };
        if class_key.subject == NO_CLASS || class_key.destination == NO_CLASS {
            return Ok(None);
        }
        for dport in [key.dport, 0] {
            if let Ok(value) = active.get(&PolicyKey { dport, ..class_key }, 0) {
                return Ok(Some((PolicyKey { dport, ..key }, value)));
            }
        }
        Ok(None)
    }

    /// The generation the next change will write: +1, every change being a table swap
    /// ([`Tables::apply`], [`Tables::apply_row`]). The agent publishes the policy under it
    /// *before* the change, so an event decided just after the flip finds its policy.
    pub fn next_generation(&self) -> Result<u64> {
        Ok(self.config()?.generation + 1)
    }

    /// `CGROUP_IDENTITY` as the kernel holds it: cgroup id -> subject identity (a previous
    /// agent's mapping, at a restart).
    pub fn cgroup_mappings(&self) -> Result<BTreeMap<u64, u32>> {
        Ok(self.cgroup_identity.entries()?.into_iter().collect())
    }

    /// The subject currently mapped to a cgroup, if any.
    pub fn identity_of_cgroup(&self, cgroup_id: u64) -> Option<u32> {
        self.cgroup_identity.get(&cgroup_id)
    }

    pub fn identity_info(&self, identity: u32) -> Option<IdentityInfo> {
        self.identities.get(&identity)
    }

    /// [`Tables::apply_with`] without a generation callback.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<ApplyReport> {
        self.apply_with(desired, &mut |_, _| {})
    }

    /// Writes `desired`, all or nothing, so that no connect ever sees a mixture that allows
    /// what neither the old nor the new revision allows.
    ///
    /// A decision reads four things: the cgroup's subject, the subject's flags, the address's
    /// destination, and the active policy table. The table flips in one write (the generation
    /// in `CONFIG`); the other maps change entry by entry. So:
    /// 1. Nothing is written before every map is known to fit, counted against the maps' real
    ///    `max_entries` with old and new entries together where they coexist.
    /// 2. New identities are added, and existing ones get their new values, except that audit
    ///    is kept only where both revisions have it (quarantine where either has it).
    /// 3. A mapping change whose new identity has no entry in the old table (a new workload, a
    ///    removed cgroup) is written before the flip: under the old table it denies. One whose
    ///    old identity has no entry in the new table (a removed workload) is written after it.
    ///    The IP caches change as a whole, before or after (their entries nest).
    /// 4. A change that is neither (an address or a cgroup moving between identities that both
    ///    revisions know) goes through a transition table: it allows only what both tables
    ///    allow, and nothing between a moving cgroup's subjects and a moving address's
    ///    destinations. It is flipped to, the mappings change under it, then the new table is
    ///    written and flipped to.
    /// 5. Flags get their final values, then identities only the old revision had go.
    ///
    /// In-flight programs: a mapping change after a flip waits until no program can still be
    /// using the table from before the flip. IP-cache entries are written longest prefix first
    /// and removed shortest first, so an address always resolves to its old or its new
    /// identity. If a write fails anyway, every map is brought back to what it held before
    /// (the same way) and the error says so. `publish` is called with each generation before
    /// it is written.
    pub fn apply_with(
        &mut self,
        desired: &DesiredState,
        publish: &mut dyn FnMut(u64, Flip),
    ) -> Result<ApplyReport> {
        let started = Instant::now();
        // Taken: a failure below leaves it `None`, and the maps are read again next time.
        let current = match self.mappings_shadow.take() {
            Some(shadow) => shadow,
            None => self.read_mappings()?,
        };
        let old_config = self.config()?;
        let old_table = self.active_contents(&old_config)?;
        let plan = self.plan(desired, &current, &old_table)?;
        let mut report = ApplyReport {
            transition: plan.transition.is_some(),
            ..Default::default()
        };
        if let Err(error) = self.execute(desired, &current, &plan, publish, &mut report) {
            let previous = DesiredState {
                cgroups: current.cgroups.iter().map(|(k, v)| (*k, *v)).collect(),
                identities: current.identities.iter().map(|(k, v)| (*k, *v)).collect(),
                ipcache_v4: current.v4.to_desired(),
                ipcache_v6: current.v6.to_desired(),
                allows: old_table,
                audit: old_config.audit != 0,
            };
            let error = error.context("writing the new policy into the kernel failed part-way");
            return match self.restore(&previous, publish) {
                Ok(()) => Err(error.context(
                    "every map was rolled back to the policy in force before (nothing changed)",
                )),
                Err(rollback) => Err(error.context(format!(
                    "ROLLING BACK FAILED TOO, the kernel may hold a mixture: {rollback:#}"
                ))),
            };
        }
        // A successful execute leaves exactly `desired` in these maps.
        self.mappings_shadow = Some(Mappings::of(desired));
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Brings every map back to `previous` after a failed change; the kernel state is now a
    /// mixture, and going back is a change like any other.
    fn restore(
        &mut self,
        previous: &DesiredState,
        publish: &mut dyn FnMut(u64, Flip),
    ) -> Result<()> {
        let config = self.config()?;
        // The table in force may already be the old one (a failure before the flip).
        let active = self.active_contents(&config)?;
        let current = self.read_mappings()?;
        let mut plan = self.plan(previous, &current, &active)?;
        plan.rollback = true;
        let mut report = ApplyReport::default();
        let mut rollback = |generation: u64, _: Flip| publish(generation, Flip::Rollback);
        self.execute(previous, &current, &plan, &mut rollback, &mut report)
    }

    fn read_mappings(&self) -> Result<Mappings> {
        Ok(Mappings {
            cgroups: self.cgroup_identity.entries()?,
            identities: self.identities.entries()?,
            v4: IpCache {
                host: self.ipcache_host_v4.entries()?,
                prefix: self.ipcache_v4.entries()?,
            },
            v6: IpCache {
                host: self.ipcache_host_v6.entries()?,
                prefix: self.ipcache_v6.entries()?,
            },
        })
    }

    /// The active table's contents (from memory when this process wrote it).
    /// Read back, a table is decoded through its class slots: an agent adopting pinned maps
    /// learns what they mean.
    fn active_contents(&mut self, config: &Config) -> Result<HashMap<PolicyKey, PolicyValue>> {
        let active = active_table(config);
        if self.policy_shadow[active].is_none() {
            let raw = self.policy[active].entries()?;
            let identities = self.identities.entries()?;
            self.policy_shadow[active] = Some(decode_slot(&raw, &identities, active));
            self.class_shadow[active] = Some(raw);
        }
        Ok(self.policy_shadow[active].clone().unwrap_or_default())
    }

    /// Checks capacity and decides the order of the writes; writes nothing.
    fn plan(
        &self,
        desired: &DesiredState,
        current: &Mappings,
        old_table: &HashMap<PolicyKey, PolicyValue>,
    ) -> Result<Plan> {
        let next_v4 = IpCache::from_desired(&desired.ipcache_v4);
        let next_v6 = IpCache::from_desired(&desired.ipcache_v6);
        let classes = Classes::of(&desired.allows);
        // Old and new entries coexist while IP caches and identities change.
        fn union<K: Eq + Hash, V, W>(now: &HashMap<K, V>, next: &HashMap<K, W>) -> Need {
            let common = now.keys().filter(|k| next.contains_key(*k)).count();
            Need {
                entries: next.len(),
                peak: now.len() + next.len() - common,
            }
        }
        let needs = Needs {
            // Removed cgroups go before added ones: never more than the larger of the two.
            cgroups: Need {
                entries: desired.cgroups.len(),
                peak: desired.cgroups.len().max(current.cgroups.len()),
            },
            identities: union(
                &current.identities,
                &desired
                    .identities
                    .iter()
                    .map(|(k, v)| (*k, *v))
                    .collect::<HashMap<_, _>>(),
            ),
            host_v4: union(&current.v4.host, &next_v4.host),
            host_v6: union(&current.v6.host, &next_v6.host),
            prefix_v4: union(&current.v4.prefix, &next_v4.prefix),
            prefix_v6: union(&current.v6.prefix, &next_v6.prefix),
            // Stale entries leave the (invisible) standby table before new ones are added.
            policy: Need::exactly(classes.entries.len()),
        };
        let overflows = needs.overflows(&self.capacities);
        if self.check_capacity && !overflows.is_empty() {
            anyhow::bail!(
                "the policy does not fit the kernel maps; nothing was written:\n{}",
                overflows.join("\n")
            );
        }

        // Which mapping changes a single flip covers (see `apply_with`).
        let (old_rows, old_columns) = rows_and_columns(old_table);
        let (new_rows, new_columns) = rows_and_columns(&desired.allows);
        let mut cgroups_before = Vec::new();
        let mut cgroups_after = Vec::new();
        let mut moving_subjects = HashSet::new();
        let mut conflict = false;
        let cgroup_ids: BTreeSet<u64> = current
            .cgroups
            .keys()
            .chain(desired.cgroups.keys())
            .copied()
            .collect();
        for cgroup in cgroup_ids {
            let before = current.cgroups.get(&cgroup).copied();
            let after = desired.cgroups.get(&cgroup).copied();
            if before == after {
                continue;
            }
            moving_subjects.extend(before);
            moving_subjects.extend(after);
            if after.is_none_or(|s| !old_rows.contains(&s)) {
                cgroups_before.push((cgroup, after));
            } else if before.is_none_or(|s| !new_rows.contains(&s)) {
                cgroups_after.push((cgroup, after));
            } else {
                conflict = true;
                cgroups_before.push((cgroup, after));
            }
        }
        let address_changes: BTreeSet<(u32, u32)> = current
            .v4
            .changes(&next_v4)
            .into_iter()
            .chain(current.v6.changes(&next_v6))
            .collect();
        let ip_before = address_changes
            .iter()
            .all(|(_, after)| !old_columns.contains(after));
        let ip_after = address_changes
            .iter()
            .all(|(before, _)| !new_columns.contains(before));
        if !ip_before && !ip_after {
            conflict = true;
        }
        if !conflict {
            // Removals first: room in the map before anything is added.
            cgroups_before.sort_by_key(|(_, after)| after.is_some());
            return Ok(Plan {
                transition: None,
                classes,
                cgroups_before,
                cgroups_after,
                ip_before,
                rollback: false,
            });
        }
        let moving_destinations: HashSet<u32> = address_changes
            .iter()
            .flat_map(|(before, after)| [*before, *after])
            .collect();
        let mut transition = transition_table(old_table, &desired.allows, |s, d| {
            moving_subjects.contains(&s) && moving_destinations.contains(&d)
        });
        let mut transition_classes = Classes::of(&transition);
        let capacity = self.capacities.policy as usize;
        // Shrunk by identity pairs, which only over-counts (a class table is a subset).
        let dropped = if transition_classes.entries.len() > capacity {
            let dropped = shrink_to(&mut transition, capacity);
            transition_classes = Classes::of(&transition);
            dropped
        } else {
            0
        };
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "the transition table did not fit: {dropped} (subject, destination) groups are denied until the new policy is in force"
            );
        }
        let mut cgroups = cgroups_before;
        cgroups.extend(cgroups_after);
        cgroups.sort_by_key(|(_, after)| after.is_some());
        Ok(Plan {
            transition: Some((transition, transition_classes)),
            classes,
            cgroups_before: cgroups,
            cgroups_after: Vec::new(),
            ip_before: true,
            rollback: false,
        })
    }

    fn execute(
        &mut self,
        desired: &DesiredState,
        current: &Mappings,
        plan: &Plan,
        publish: &mut dyn FnMut(u64, Flip),
        report: &mut ApplyReport,
    ) -> Result<()> {
        let rollback = plan.rollback;
        // Mappings change under the table in force: no program may still use the one before.
        self.wait_for_in_flight();
        // 2. identities: new ones, and interim values of existing ones.
        // A new identity enters in no class of either table: it is denied until the flip
        // to a table that has its classes.
        for (id, info) in &desired.identities {
            let old = current.identities.get(id);
            let interim = interim_info(old, info);
            if !old.is_some_and(|old| old.same_identity(&interim)) {
                // The class slots come from the kernel, not from `current`: a shadow of
                // the last apply holds what was desired, which has no classes.
                self.put_identity(*id, &interim)?;
                report.written += 1;
            }
        }
        let old_audit = self.config()?.audit != 0;
        if let Some((transition, classes)) = &plan.transition {
            publish(self.next_generation()?, Flip::Transition);
            self.swap_policy(transition, classes, old_audit && desired.audit, false)?;
            self.wait_for_in_flight();
        }
        report.written += self.write_cgroups(&plan.cgroups_before)?;
        if plan.ip_before {
            report.written += self.write_ip_caches(current, desired)?;
        }
        publish(self.next_generation()?, Flip::Final);
        let swap = self.swap_policy(&desired.allows, &plan.classes, desired.audit, rollback)?;
        report.written += swap.written;
        report.removed += swap.stale.len();
        report.active_table = swap.active;
        report.generation = swap.generation;
        if !plan.cgroups_after.is_empty() || !plan.ip_before {
            self.wait_for_in_flight();
            report.written += self.write_cgroups(&plan.cgroups_after)?;
            if !plan.ip_before {
                report.written += self.write_ip_caches(current, desired)?;
            }
        }
        // 5. final flags, then identities of the old revision only.
        for (id, info) in &desired.identities {
            let interim = interim_info(current.identities.get(id), info);
            if interim != *info {
                self.put_identity(*id, info)?;
            }
        }
        let stale: Vec<u32> = current
            .identities
            .keys()
            .filter(|id| !desired.identities.contains_key(id))
            .copied()
            .collect();
        report.removed += remove(&mut self.identities, &stale, maps::IDENTITIES)?;
        Ok(())
    }

    /// Waits until no program can still be running with the table it read before the last
    /// flip (runs take hundreds of nanoseconds; userspace cannot wait for an RCU grace period).
    fn wait_for_in_flight(&self) {
        if let Some(flipped) = self.last_flip {
            if let Some(rest) = STANDBY_GRACE.checked_sub(flipped.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    }

    /// `(cgroup, Some(subject))` writes, `(cgroup, None)` removes; in the order given.
    fn write_cgroups(&mut self, changes: &[(u64, Option<u32>)]) -> Result<usize> {
        for (cgroup, subject) in changes {
            match subject {
                Some(subject) => {
                    self.cgroup_identity
                        .put(cgroup, subject, maps::CGROUP_IDENTITY)?
                }
                None => self.cgroup_identity.delete(cgroup, maps::CGROUP_IDENTITY)?,
            }
        }
        Ok(changes.len())
    }

    /// Every IP-cache change, in an order where any address resolves to its old or its new
    /// identity at every step: added and changed entries longest first (host entries are the
    /// longest), then stale ones shortest first.
    fn write_ip_caches(&mut self, current: &Mappings, desired: &DesiredState) -> Result<usize> {
        let next_v4 = IpCache::from_desired(&desired.ipcache_v4);
        let next_v6 = IpCache::from_desired(&desired.ipcache_v6);
        let mut written = 0;
        written += write_changed(
            &mut self.ipcache_host_v4,
            &current.v4.host,
            &next_v4.host,
            maps::IPCACHE_HOST_V4,
        )?;
        written += write_changed(
            &mut self.ipcache_host_v6,
            &current.v6.host,
            &next_v6.host,
            maps::IPCACHE_HOST_V6,
        )?;
        written += write_prefixes(
            &mut self.ipcache_v4,
            &current.v4.prefix,
            &next_v4.prefix,
            maps::IPCACHE_V4,
        )?;
        written += write_prefixes(
            &mut self.ipcache_v6,
            &current.v6.prefix,
            &next_v6.prefix,
            maps::IPCACHE_V6,
        )?;
        written += remove_prefixes(
            &mut self.ipcache_v4,
            &current.v4.prefix,
            &next_v4.prefix,
            maps::IPCACHE_V4,
        )?;
        written += remove_prefixes(
            &mut self.ipcache_v6,
            &current.v6.prefix,
            &next_v6.prefix,
            maps::IPCACHE_V6,
        )?;
        let stale_v4: Vec<_> = current
            .v4
            .host
            .keys()
            .filter(|k| !next_v4.host.contains_key(*k))
            .copied()
            .collect();
        let stale_v6: Vec<_> = current
            .v6
            .host
            .keys()
            .filter(|k| !next_v6.host.contains_key(*k))
            .copied()
            .collect();
        written += remove(&mut self.ipcache_host_v4, &stale_v4, maps::IPCACHE_HOST_V4)?;
        written += remove(&mut self.ipcache_host_v6, &stale_v6, maps::IPCACHE_HOST_V6)?;
        Ok(written)
    }

    /// Brings `CGROUP_IDENTITY` in line with the cgroups that exist now (pods started or
    /// gone); the policy itself is untouched. Gone cgroups leave first (room before anything
    /// is added); more cgroups than the map holds are refused before any write.
    pub fn sync_cgroups(&mut self, cgroups: &BTreeMap<u64, u32>) -> Result<()> {
        if cgroups.len() > self.capacities.cgroups as usize {
            anyhow::bail!(
                "needs {} cgroup entries, capacity {} (map {}; `enforcer run --capacity cgroups=N`)",
                cgroups.len(),
                self.capacities.cgroups,
                maps::CGROUP_IDENTITY
            );
        }
        let mut shadow = self.mappings_shadow.take();
        let current = match shadow.as_mut() {
            Some(shadow) => std::mem::take(&mut shadow.cgroups),
            None => self.cgroup_identity.entries()?,
        };
        let stale: Vec<u64> = current
            .keys()
            .filter(|k| !cgroups.contains_key(k))
            .copied()
            .collect();
        // A cgroup that leaves its identity: what the kernel judged for its sockets may no
        // longer hold (`CONFIG.flags_revision`, advanced below). A new cgroup is no such change.
        let moved = !stale.is_empty()
            || cgroups
                .iter()
                .any(|(k, v)| current.get(k).is_some_and(|now| now != v));
        // On failure the shadow stays `None`: the map holds part of the change (and the
        // revision moves all the same: some cgroups may have left their identities).
        let written =
            remove(&mut self.cgroup_identity, &stale, maps::CGROUP_IDENTITY).and_then(|_| {
                write_changed(
                    &mut self.cgroup_identity,
                    &current,
                    cgroups,
                    maps::CGROUP_IDENTITY,
                )
            });
        if moved {
            self.advance_flags_revision()?;
        }
        written?;
        if let Some(mut shadow) = shadow {
            shadow.cgroups = cgroups.iter().map(|(k, v)| (*k, *v)).collect();
            self.mappings_shadow = Some(shadow);
        }
        Ok(())
    }

    /// Advances `CONFIG.flags_revision` (wrapping): the judgments the kernel keeps per connected
    /// UDP socket (`skb_egress`) are made again.
    fn advance_flags_revision(&mut self) -> Result<()> {
        self.update_config("flags_revision", |config| {
            config.flags_revision = config.flags_revision.wrapping_add(1)
        })
    }

    /// Writes one subject's re-evaluated row (a risk change): the active table with `added`
    /// written over it and `removed` taken out, written into the standby table with its
    /// classes and flipped to, like any policy change. A row changes classes (its subject may
    /// leave a class, others' answers towards it may split theirs), and only a swap changes
    /// a table and its class numbers together: no connect sees a cell that neither the old
    /// nor the new row allows. A row that does not fit the table is refused before any write;
    /// a write that fails before the flip leaves the active table as it was. Returns the new
    /// generation.
    pub fn apply_row(
        &mut self,
        added: &[(PolicyKey, PolicyValue)],
        removed: &[PolicyKey],
    ) -> Result<u64> {
        let config = self.config()?;
        let mut table = self.active_contents(&config)?;
        for key in removed {
            table.remove(key);
        }
        table.extend(added.iter().copied());
        let classes = Classes::of(&table);
        let need = classes.entries.len();
        if self.check_capacity && need > self.capacities.policy as usize {
            anyhow::bail!(
                "the row does not fit the policy table; nothing was written: needs {need} policy entries, capacity {}",
                self.capacities.policy
            );
        }
        let swap = self
            .swap_policy(&table, &classes, config.audit != 0, false)
            .context("writing the row failed; the table in force is unchanged")?;
        Ok(swap.generation)
    }

    /// Writes an identity's tenant and flags, keeping the class slots the kernel holds (only a
    /// table swap changes classes).
    fn put_identity(&mut self, id: u32, info: &IdentityInfo) -> Result<()> {
        let classes = self.identities.get(&id).unwrap_or_default();
        self.identities
            .put(&id, &info.with_classes_of(&classes), maps::IDENTITIES)
    }

    /// Maps the agent's own cgroup to `identity::AGENT` (exempt), and nothing else: written
    /// into the maps an earlier agent left pinned before this one opens any connection, so
    /// that programs already attached never judge it. Every other entry stays as it is
    /// until the first policy is applied.
    pub fn exempt(&mut self, cgroup_id: u64) -> Result<()> {
        self.mappings_shadow = None;
        self.put_identity(identity::AGENT, &IdentityInfo::new(0, flags::EXEMPT))?;
        self.cgroup_identity
            .put(&cgroup_id, &identity::AGENT, maps::CGROUP_IDENTITY)
    }

    /// Sets or clears flag bits of one identity (quarantine), leaving the rest as it is, then
    /// advances `CONFIG.flags_revision`: judgments the kernel keeps per connected datagram
    /// socket (`skb_egress`) are made again. In that order, so that a program that reads the
    /// new revision reads the new flags too.
    pub fn update_flags(&mut self, identity: u32, set: u32, clear: u32) -> Result<()> {
        self.mappings_shadow = None;
        let mut info = self
            .identities
            .get(&identity)
            .with_context(|| format!("identity {identity} is not in the kernel"))?;
        let before = info;
        info.flags = (info.flags | set) & !clear;
        self.identities.put(&identity, &info, maps::IDENTITIES)?;
        if let Err(error) = self.advance_flags_revision() {
            // All or nothing, as the caller takes it: the flags as they were.
            let _ = self.identities.put(&identity, &before, maps::IDENTITIES);
            return Err(error);
        }
        Ok(())
    }

    /// Identities whose kernel entry carries every one of the flags `all` (quarantine survives
    /// agent restarts this way; `status` counts the workloads in audit mode).
    pub fn identities_flagged(&self, all: u32) -> Result<std::collections::BTreeSet<u32>> {
        Ok(self
            .identities
            .entries()?
            .into_iter()
            .filter(|(_, info)| info.flags & all == all)
            .map(|(id, _)| id)
            .collect())
    }

    /// Makes the standby table equal to `allows` (whose classes are `classes`), then flips
    /// the active index to it. With `keep_if_active`, a table already active with these
    /// contents stays (a rollback of a change that failed before its flip changes nothing).
    ///
    /// The kernel reads the generation once and takes both the table and the two identities'
    /// class slots of that parity. Everything written here is of the standby parity, which
    /// no program reads: the class-keyed entries, then each identity's standby slot. Only the
    /// flip (one write of `CONFIG`) makes them visible, all at once, so a connect sees the old
    /// classes with the old table or the new classes with the new table, never a mixture.
    /// The standby parity was the active one before the previous flip: programs that read it
    /// then have finished once [`Tables::wait_for_in_flight`] returns, which is waited first.
    /// Identities added after this swap enter with [`NO_CLASS`] in both slots (denied until
    /// the next flip gives them classes).
    fn swap_policy(
        &mut self,
        allows: &HashMap<PolicyKey, PolicyValue>,
        classes: &Classes,
        audit: bool,
        keep_if_active: bool,
    ) -> Result<PolicySwap> {
        let mut config = self.config()?;
        let active = active_table(&config);
        if keep_if_active
            && self.policy_shadow[active].as_ref() == Some(allows)
            && (config.audit != 0) == audit
        {
            return Ok(PolicySwap {
                written: 0,
                stale: Vec::new(),
                active: active as u32,
                generation: config.generation,
            });
        }
        let standby = active as u32 ^ 1;
        let slot = standby as usize;
        self.wait_for_in_flight();
        self.policy_shadow[slot] = None;
        let table = &mut self.policy[slot];
        // Stale entries go first here: the standby table is invisible, and removing first
        // leaves room in a nearly full table.
        let current = match self.class_shadow[slot].take() {
            Some(shadow) => shadow,
            None => table.entries()?,
        };
        let stale: Vec<PolicyKey> = current
            .keys()
            .filter(|k| !classes.entries.contains_key(k))
            .copied()
            .collect();
        remove(table, &stale, "the standby policy table")?;
        let mut written = write_changed(
            table,
            &current,
            &classes.entries,
            "the standby policy table",
        )?;
        self.observe(SwapStep::StandbyTableWritten);
        // Every identity the kernel knows gets its classes in the standby slot (NO_CLASS
        // for those the table does not name).
        let identities = self.identities.entries()?;
        let mut ids: Vec<(&u32, &IdentityInfo)> = identities.iter().collect();
        ids.sort_unstable_by_key(|(id, _)| **id);
        for (&id, info) in ids {
            let (s, d) = (classes.subject_class(id), classes.destination_class(id));
            if info.subject_class[slot] == s && info.destination_class[slot] == d {
                continue;
            }
            let mut next = *info;
            next.subject_class[slot] = s;
            next.destination_class[slot] = d;
            self.identities.put(&id, &next, maps::IDENTITIES)?;
            written += 1;
            self.observe(SwapStep::StandbyClassesWritten(id));
        }
        self.policy_shadow[slot] = Some(allows.clone());
        self.class_shadow[slot] = Some(classes.entries.clone());
        // +1: the generation's parity, which the programs read, now names the standby table.
        config.generation += 1;
        config.active_policy = standby;
        config.audit = audit as u32;
        self.config
            .set(0, config, 0)
            .context("flipping CONFIG.active_policy")?;
        self.last_flip = Some(Instant::now());
        self.observe(SwapStep::Flipped);
        Ok(PolicySwap {
            written,
            stale,
            active: standby,
            generation: config.generation,
        })
    }
}

/// The identity-keyed table a class-keyed map means under the class slot `slot` of
/// `identities`.
fn decode_slot(
    raw: &HashMap<PolicyKey, PolicyValue>,
    identities: &HashMap<u32, IdentityInfo>,
    slot: usize,
) -> HashMap<PolicyKey, PolicyValue> {
    classes::decode(
        raw,
        identities
            .iter()
            .map(|(id, info)| (*id, info.subject_class[slot], info.destination_class[slot])),
    )
}

/// Writes added and changed prefixes, longest first.
fn write_prefixes<const N: usize>(
    map: &mut LpmTrie<MapData, [u8; N], u32>,
    current: &HashMap<(u32, [u8; N]), u32>,
    next: &HashMap<(u32, [u8; N]), u32>,
    what: &str,
) -> Result<usize>
where
    [u8; N]: aya::Pod,
{
    let mut changed: Vec<_> = next
        .iter()
        .filter(|(key, id)| current.get(*key) != Some(*id))
        .collect();
    changed.sort_by_key(|((len, addr), _)| (std::cmp::Reverse(*len), *addr));
    for (key, id) in &changed {
        map.put(key, id, what)?;
    }
    Ok(changed.len())
}

/// Removes prefixes the next state lacks, shortest first.
fn remove_prefixes<const N: usize>(
    map: &mut LpmTrie<MapData, [u8; N], u32>,
    current: &HashMap<(u32, [u8; N]), u32>,
    next: &HashMap<(u32, [u8; N]), u32>,
    what: &str,
) -> Result<usize>
where
    [u8; N]: aya::Pod,
{
    let mut stale: Vec<_> = current
        .keys()
        .filter(|key| !next.contains_key(*key))
        .copied()
        .collect();
    stale.sort();
    remove(map, &stale, what)
}

/// The table the programs read: the generation's parity (one load in the kernel, never torn).
fn active_table(config: &Config) -> usize {
    (config.generation & 1) as usize
}

struct PolicySwap {
    written: usize,
    stale: Vec<PolicyKey>,
    active: u32,
    generation: u64,
}

/// The key/value view of a BPF map that [`upsert`] and [`remove`] need. LPM tries are keyed
/// by `(prefix length, address)`.
pub(super) trait SyncMap<K, V> {
    fn entries(&self) -> Result<HashMap<K, V>>;
    fn put(&mut self, key: &K, value: &V, what: &str) -> Result<()>;
    /// Removing a key that is already gone is not an error.
    fn delete(&mut self, key: &K, what: &str) -> Result<()>;
}

impl<K: aya::Pod + Eq + Hash, V: aya::Pod> SyncMap<K, V> for BpfHashMap<MapData, K, V> {
    fn entries(&self) -> Result<HashMap<K, V>> {
        self.iter().map(|r| r.context("reading a map")).collect()
    }
    fn put(&mut self, key: &K, value: &V, what: &str) -> Result<()> {
        self.insert(key, value, 0)
            .with_context(|| format!("writing {what} (is it full? see `enforcer status`)"))
    }
    fn delete(&mut self, key: &K, what: &str) -> Result<()> {
        match self.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(error) => Err(error).with_context(|| format!("removing from {what}")),
        }
    }
}

impl<const N: usize> SyncMap<(u32, [u8; N]), u32> for LpmTrie<MapData, [u8; N], u32>
where
    [u8; N]: aya::Pod,
{
    fn entries(&self) -> Result<HashMap<(u32, [u8; N]), u32>> {
        self.iter()
            .map(|r| {
                let (key, value) = r.context("reading an IP cache")?;
                Ok(((key.prefix_len(), key.data()), value))
            })
            .collect()
    }
    fn put(&mut self, &(len, addr): &(u32, [u8; N]), value: &u32, what: &str) -> Result<()> {
        self.insert(&LpmKey::new(len, addr), value, 0)
            .with_context(|| format!("writing {what} (is it full? see `enforcer status`)"))
    }
    fn delete(&mut self, &(len, addr): &(u32, [u8; N]), what: &str) -> Result<()> {
        match self.remove(&LpmKey::new(len, addr)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(error) => Err(error).with_context(|| format!("removing from {what}")),
        }
    }
}

/// Writes the entries of `desired` that the map (holding `current`, already read: reading a
/// large map costs two syscalls an entry) lacks or holds with another value; returns how many.
fn write_changed<'a, K, V, M>(
    map: &mut M,
    current: &HashMap<K, V>,
    desired: impl IntoIterator<Item = (&'a K, &'a V)>,
    what: &str,
) -> Result<usize>
where
    K: Eq + Hash + Copy + 'a,
    V: PartialEq + 'a,
    M: SyncMap<K, V>,
{
    let mut written = 0;
    for (key, value) in desired {
        if current.get(key) != Some(value) {
            map.put(key, value, what)?;
            written += 1;
        }
    }
    Ok(written)
}

fn remove<K, V, M: SyncMap<K, V>>(map: &mut M, keys: &[K], what: &str) -> Result<usize> {
    for key in keys {
        map.delete(key, what)?;
    }
    Ok(keys.len())
}

/// Splits `(prefix length, address) -> identity` into host entries (full length) and the rest.
#[allow(clippy::type_complexity)]
fn split_hosts<const N: usize>(
    entries: &BTreeMap<(u32, [u8; N]), u32>,
    host_bits: u32,
) -> (BTreeMap<[u8; N], u32>, BTreeMap<(u32, [u8; N]), u32>) {
    let (host, prefix): (BTreeMap<_, _>, BTreeMap<_, _>) =
        entries.iter().partition(|((len, _), _)| *len == host_bits);
    (
        host.into_iter().map(|((_, addr), id)| (addr, id)).collect(),
        prefix,
    )
}

/// Counters and fill levels, read from the pins (works while no agent runs).
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelStats {
    /// `verdicts[verdict][reason]`, summed over CPUs and hooks.
    pub verdicts: Vec<Vec<u64>>,
    /// `verdicts_by_hook[hook][verdict][reason]`, summed over CPUs (`hook::*` codes).
    #[serde(skip)]
    pub verdicts_by_hook: Vec<Vec<Vec<u64>>>,
    pub lost_events: u64,
    pub maps: Vec<MapFill>,
    pub config: ConfigView,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ConfigView {
    pub active_policy: u32,
    pub audit: bool,
    pub generation: u64,
    /// The node's network namespace as the kernel knows it (`Config::node_netns_cookie`); 0:
    /// not known, so a pod's own loopback is judged as World's address.
    pub node_netns_cookie: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MapFill {
    pub name: &'static str,
    /// None for maps whose entries are not counted (arrays, the ring buffer, socket
    /// storage).
    pub entries: Option<u64>,
    /// `max_entries`; None for socket storage (`WIRE_TAGS`, `MPTCP_FIRST_SUBFLOW`,
    /// `JUDGED_DATAGRAMS`), which holds one value per socket and has no capacity of its own.
    pub capacity: Option<u32>,
}

pub fn lost_events(dir: &Path) -> Result<u64> {
    let lost: PerCpuArray<MapData, u64> = typed!(dir, maps::LOST_EVENTS);
    Ok(lost.get(&0, 0).context("reading LOST_EVENTS")?.iter().sum())
}

pub fn kernel_stats(dir: &Path) -> Result<KernelStats> {
    kernel_stats_with(dir, true)
}

/// [`kernel_stats`]; with `count_entries` false the maps' `entries` are left `None` (walking
/// the keyed maps costs a syscall per entry: the metrics reuse an earlier count).
pub fn kernel_stats_with(dir: &Path, count_entries: bool) -> Result<KernelStats> {
    let counters: PerCpuArray<MapData, u64> = typed!(dir, maps::VERDICTS);
    let mut verdicts = vec![vec![0u64; reason::COUNT]; verdict::COUNT];
    let mut verdicts_by_hook = vec![verdicts.clone(); hook::COUNT];
    for index in 0..VERDICT_COUNTERS {
        let sum: u64 = counters
            .get(&index, 0)
            .context("reading VERDICTS")?
            .iter()
            .sum();
        let index = index as usize;
        let (r, rest) = (index % reason::COUNT, index / reason::COUNT);
        let (v, h) = (rest % verdict::COUNT, rest / verdict::COUNT);
        verdicts_by_hook[h][v][r] = sum;
        verdicts[v][r] += sum;
    }
    let tables = Tables::open(dir)?;
    let config = tables.config()?;
    let mut fills = Vec::new();
    for name in maps::ALL {
        let info = MapInfo::from_pin(dir.join(name))
            .with_context(|| format!("reading map info of {name}"))?;
        let entries = if count_entries {
            count_map_entries(&dir.join(name), &info)
                .with_context(|| format!("counting the entries of {name}"))?
        } else {
            None
        };
        let per_socket = matches!(info.map_type(), Ok(aya::maps::MapType::SkStorage));
        fills.push(MapFill {
            name,
            entries,
            capacity: (!per_socket).then(|| info.max_entries()),
        });
    }
    Ok(KernelStats {
        verdicts,
        verdicts_by_hook,
        lost_events: lost_events(dir)?,
        maps: fills,
        config: ConfigView {
            active_policy: config.active_policy,
            audit: config.audit != 0,
            generation: config.generation,
            node_netns_cookie: config.node_netns_cookie,
        },
    })
}

/// Entries of a pinned map of a keyed type (hash maps, LRU hash maps, LPM tries), walked
/// with `BPF_MAP_GET_NEXT_KEY` on raw key bytes of the map's own key size, so every such map
/// is counted without naming its key type here; None for the other types (arrays, per-CPU
/// arrays, the ring buffers), whose size is fixed. A map that changes during the walk gives
/// an approximate count (the kernel restarts from the first key when the current one was
/// deleted; the walk is bounded by twice the capacity).
fn count_map_entries(pin: &Path, info: &MapInfo) -> Result<Option<u64>> {
    use aya::maps::MapType;
    use std::os::fd::{AsFd, AsRawFd};
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    #[repr(C)]
    struct NextKeyAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
    }
    let keyed = matches!(
        info.map_type(),
        Ok(MapType::Hash | MapType::LruHash | MapType::LpmTrie | MapType::PerCpuHash)
    );
    if !keyed {
        return Ok(None);
    }
    let data = MapData::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    let fd = data.fd().as_fd().as_raw_fd() as u32;
    let size = info.key_size() as usize;
    let (mut key, mut next) = (vec![0u8; size], vec![0u8; size]);
    let mut count = 0u64;
    // The first call passes no key: the kernel answers with the first one.
    let mut has_key = false;
    while count <= 2 * u64::from(info.max_entries()) {
        let mut attr = NextKeyAttr {
            map_fd: fd,
            _pad: 0,
            key: if has_key { key.as_ptr() as u64 } else { 0 },
            next_key: next.as_mut_ptr() as u64,
        };
        // SAFETY: attr is a bpf_attr prefix for BPF_MAP_GET_NEXT_KEY; key and next_key point
        // to live buffers of the map's key size.
        if let Err(error) = unsafe { super::bpf_syscall(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            if error.raw_os_error() == Some(libc::ENOENT) {
                break;
            }
            return Err(error).context("BPF_MAP_GET_NEXT_KEY");
        }
        count += 1;
        std::mem::swap(&mut key, &mut next);
        has_key = true;
    }
    Ok(Some(count))
}

/// Capacities an operator asks for (`--capacity KIND=N`): they size the maps when they are
/// created; maps already pinned keep theirs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapacityOverrides {
    pub policy: Option<u32>,
    pub identities: Option<u32>,
    pub cgroups: Option<u32>,
    /// All four IP caches.
    pub ipcache: Option<u32>,
    /// `FLOWS`: tracked flows at once; a connect to a tracked destination beyond it is
    /// refused (`flow_table_full`).
    pub flows: Option<u32>,
    /// `FLOWS` records one tenant may hold at once (`FLOW_TENANT_LIMIT`); by default a
    /// quarter of `FLOWS`. Not a map size: applied at every start.
    pub flows_per_tenant: Option<u32>,
    /// `RATE_LIMITS` entries (and twice as many `RATE_BUCKETS`): half of them hold the limits
    /// in force, so a change's old and new pairs fit beside each other; pairs beyond that
    /// are shared per tenant and destination (`enforcer_policy::rate::fit`).
    pub rate_limits: Option<u32>,
}

/// The most `RATE_LIMITS` entries `--capacity rate-limits=N` may ask for (2^22: its
/// preallocated `RATE_BUCKETS` of twice that many then takes several hundred MiB).
const MAX_RATE_LIMITS: u32 = 1 << 22;

impl CapacityOverrides {
    pub const KINDS: &'static str =
        "policy, identities, cgroups, ipcache, flows, flows-per-tenant, rate-limits";

    /// Adds one `KIND=N`.
    pub fn set(&mut self, spec: &str) -> Result<()> {
        let (kind, n) = spec
            .split_once('=')
            .with_context(|| format!("--capacity {spec:?}: want KIND=N ({})", Self::KINDS))?;
        let n: u32 = n
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .with_context(|| format!("--capacity {spec:?}: N must be a positive number"))?;
        let slot = match kind.trim() {
            "policy" => &mut self.policy,
            "identities" => &mut self.identities,
            "cgroups" => &mut self.cgroups,
            "ipcache" => &mut self.ipcache,
            "flows" => &mut self.flows,
            "flows-per-tenant" => &mut self.flows_per_tenant,
            "rate-limits" => &mut self.rate_limits,
            other => anyhow::bail!(
                "--capacity {other:?}: unknown kind (one of {})",
                Self::KINDS
            ),
        };
        // RATE_BUCKETS is a preallocated LRU of twice as many.
        if kind.trim() == "rate-limits" && n > MAX_RATE_LIMITS {
            anyhow::bail!("--capacity {spec:?}: at most {MAX_RATE_LIMITS} rate-limit entries");
        }
        *slot = Some(n);
        Ok(())
    }

    /// The capacities maps created with these overrides have.
    pub fn over(&self, base: Capacities) -> Capacities {
        let ip = |c: u32| self.ipcache.unwrap_or(c);
        Capacities {
            cgroups: self.cgroups.unwrap_or(base.cgroups),
            identities: self.identities.unwrap_or(base.identities),
            host_v4: ip(base.host_v4),
            host_v6: ip(base.host_v6),
            prefix_v4: ip(base.prefix_v4),
            prefix_v6: ip(base.prefix_v6),
            policy: self.policy.unwrap_or(base.policy),
        }
    }

    /// `(map name, max_entries)` for the loader.
    pub fn map_sizes(&self) -> Vec<(&'static str, u32)> {
        let mut sizes = Vec::new();
        if let Some(n) = self.policy {
            sizes.extend([(maps::POLICY_A, n), (maps::POLICY_B, n)]);
        }
        if let Some(n) = self.identities {
            sizes.push((maps::IDENTITIES, n));
        }
        if let Some(n) = self.cgroups {
            sizes.push((maps::CGROUP_IDENTITY, n));
        }
        if let Some(n) = self.flows {
            sizes.push((maps::FLOWS, n));
        }
        if let Some(n) = self.rate_limits {
            // Twice: the buckets' LRU must not evict a live pair (see the kernel's `rate`).
            sizes.extend([
                (maps::RATE_LIMITS, n),
                (maps::RATE_BUCKETS, n.saturating_mul(2)),
            ]);
        }
        if let Some(n) = self.ipcache {
            sizes.extend([
                (maps::IPCACHE_HOST_V4, n),
                (maps::IPCACHE_HOST_V6, n),
                (maps::IPCACHE_V4, n),
                (maps::IPCACHE_V6, n),
            ]);
        }
        sizes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(subject: u32, destination: u32, dport: u16) -> PolicyKey {
        PolicyKey {
            subject,
            destination,
            dport,
            protocol: 6,
            _pad: 0,
        }
    }

    #[test]
    fn the_transition_table_allows_only_what_both_allow() {
        let old: HashMap<_, _> = [
            (key(1, 10, 0), PolicyValue::allow(1)),
            (key(1, 10, 25), PolicyValue::deny(2)),
            (key(1, 11, 0), PolicyValue::allow(1)),
            (key(2, 10, 80), PolicyValue::allow(3)),
            (key(3, 10, 0), PolicyValue::allow(1)),
        ]
        .into();
        let new: HashMap<_, _> = [
            (key(1, 10, 0), PolicyValue::allow(1)),
            (key(1, 10, 443), PolicyValue::deny(4)),
            (key(2, 10, 0), PolicyValue::allow(5)),
            (key(3, 10, 0), PolicyValue::allow(1)),
        ]
        .into();
        let t = transition_table(&old, &new, |s, _| s == 3);
        for subject in [1, 2, 3] {
            for destination in [10, 11] {
                for port in [22, 25, 80, 443] {
                    let k = key(subject, destination, port);
                    let want = subject != 3 && allows(&old, &k) && allows(&new, &k);
                    assert_eq!(allows(&t, &k), want, "{k:?}");
                }
            }
        }
    }

    /// Property: under the transition table, whatever mixture of old and new cgroup and
    /// address mappings a connect sees, it is allowed only if the old policy (old mappings,
    /// old table) or the new one (new mappings, new table) allows it. Random small worlds
    /// from a fixed seed (xorshift), so a failure reproduces.
    #[test]
    fn no_mixture_under_the_transition_table_allows_more_than_old_or_new() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let subjects = [1u32, 2, 3];
        let destinations = [10u32, 11, 12];
        let ports = [25u16, 80, 443];
        for _ in 0..2000 {
            let table = |next: &mut dyn FnMut(u64) -> u64| {
                let mut t = HashMap::new();
                for s in subjects {
                    for d in destinations {
                        if next(2) == 0 {
                            t.insert(key(s, d, 0), PolicyValue::allow(1));
                            for p in ports {
                                if next(3) == 0 {
                                    t.insert(key(s, d, p), PolicyValue::deny(2));
                                }
                            }
                        } else {
                            for p in ports {
                                if next(3) == 0 {
                                    t.insert(key(s, d, p), PolicyValue::allow(3));
                                }
                            }
                        }
                    }
                }
                t
            };
            let old = table(&mut next);
            let new = table(&mut next);
            // Two cgroups and two addresses, each kept or moved (None: no entry / WORLD-less).
            let pick = |set: &[u32], next: &mut dyn FnMut(u64) -> u64| {
                let i = next(set.len() as u64 + 1) as usize;
                set.get(i).copied()
            };
            let cgroups: Vec<(Option<u32>, Option<u32>)> = (0..2)
                .map(|_| (pick(&subjects, &mut next), pick(&subjects, &mut next)))
                .collect();
            let addresses: Vec<(u32, u32)> = (0..2)
                .map(|_| {
                    let o = pick(&destinations, &mut next).unwrap_or(destinations[0]);
                    let n = pick(&destinations, &mut next).unwrap_or(destinations[0]);
                    (o, n)
                })
                .collect();
            let moving_subjects: HashSet<u32> = cgroups
                .iter()
                .filter(|(o, n)| o != n)
                .flat_map(|(o, n)| o.iter().chain(n.iter()).copied().collect::<Vec<_>>())
                .collect();
            let moving_destinations: HashSet<u32> = addresses
                .iter()
                .filter(|(o, n)| o != n)
                .flat_map(|(o, n)| [*o, *n])
                .collect();
            let t = transition_table(&old, &new, |s, d| {
                moving_subjects.contains(&s) && moving_destinations.contains(&d)
            });
            for (so, sn) in &cgroups {
                for (d_old, d_new) in &addresses {
                    for p in ports {
                        let decided = |table: &HashMap<_, _>, s: Option<u32>, d: u32| {
                            s.is_some_and(|s| allows(table, &key(s, d, p)))
                        };
                        let permitted = decided(&old, *so, *d_old) || decided(&new, *sn, *d_new);
                        for s in [*so, *sn] {
                            for d in [*d_old, *d_new] {
                                assert!(
                                    !decided(&t, s, d) || permitted,
                                    "subject {s:?} -> {d} port {p} allowed by the transition \
                                     table, but neither old ({so:?} -> {d_old}) nor new \
                                     ({sn:?} -> {d_new}) allows it\nold {old:?}\nnew {new:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn shrinking_drops_whole_groups() {
        let mut t: HashMap<_, _> = [
            (key(1, 10, 0), PolicyValue::allow(1)),
            (key(1, 10, 25), PolicyValue::deny(2)),
            (key(2, 10, 0), PolicyValue::allow(1)),
        ]
        .into();
        assert_eq!(shrink_to(&mut t, 2), 1);
        assert_eq!(t.len(), 1);
        assert!(t.contains_key(&key(2, 10, 0)));
    }

    #[test]
    fn address_changes_pair_old_and_new_identities() {
        let old = IpCache::<4>::from_desired(
            &[((32, [127, 0, 0, 5]), 7), ((24, [127, 0, 0, 0]), 8)].into(),
        );
        let new = IpCache::<4>::from_desired(
            &[((24, [127, 0, 0, 0]), 8), ((32, [127, 0, 0, 9]), 9)].into(),
        );
        let changes = old.changes(&new);
        assert_eq!(changes, [(7, 8), (8, 9)].into());
        assert_eq!(new.lookup(32, [127, 0, 0, 77]), 8);
        assert_eq!(new.lookup(32, [10, 0, 0, 1]), identity::WORLD);
        assert_eq!(mask([255u8, 255, 255, 255], 20), [255, 255, 240, 0]);
    }

    #[test]
    fn capacities_are_named_with_the_map_and_the_flag() {
        let needs = Needs {
            policy: Need {
                entries: 10,
                peak: 10,
            },
            host_v4: Need {
                entries: 3,
                peak: 5,
            },
            ..Default::default()
        };
        let capacity = Capacities {
            policy: 8,
            host_v4: 4,
            ..Default::default()
        };
        let overflows = needs.overflows(&capacity);
        assert_eq!(overflows.len(), 2, "{overflows:?}");
        assert!(overflows[0].starts_with("needs 10 policy entries, capacity 8"));
        assert!(overflows[1].contains("(5 while the change is written"));
        let mut o = CapacityOverrides::default();
        o.set("policy=100").unwrap();
        assert!(o.set("policies=1").is_err());
        assert!(o.set("policy=0").is_err());
        assert_eq!(o.over(Capacities::default()).policy, 100);
    }
}
