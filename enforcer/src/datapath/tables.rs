//! Typed handles on the pinned maps, and the one operation that writes policy into them:
//! [`Tables::apply`]. The maps are opened from their pins, so the agent, `enforcer status`
//! and `enforcer policy explain` all read the same kernel state.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapInfo, PerCpuArray};
use enforcer_common::{
    maps, reason, verdict, Config, IdentityInfo, PolicyKey, PolicyValue, VERDICT_COUNTERS,
};

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
    pub elapsed: Duration,
}

pub struct Tables {
    cgroup_identity: BpfHashMap<MapData, u64, u32>,
    identities: BpfHashMap<MapData, u32, IdentityInfo>,
    ipcache_host_v4: BpfHashMap<MapData, [u8; 4], u32>,
    ipcache_host_v6: BpfHashMap<MapData, [u8; 16], u32>,
    ipcache_v4: LpmTrie<MapData, [u8; 4], u32>,
    ipcache_v6: LpmTrie<MapData, [u8; 16], u32>,
    policy: [BpfHashMap<MapData, PolicyKey, PolicyValue>; 2],
    config: Array<MapData, Config>,
    last_flip: Option<Instant>,
    /// What this process last wrote to each policy table, so that a swap diffs against memory
    /// instead of reading ~10^5 entries back (two syscalls each). `None` until first read:
    /// an agent starting on pinned maps learns their contents once. The agent is the maps'
    /// only writer (its state-directory lock keeps a second agent out).
    policy_shadow: [Option<HashMap<PolicyKey, PolicyValue>>; 2],
}

fn open_pinned(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("reading the type of map {}", path.display()))
}

macro_rules! typed {
    ($dir:expr, $name:expr) => {
        open_pinned($dir, $name)?
            .try_into()
            .with_context(|| format!("map {} has an unexpected type or layout", $name))?
    };
}

impl Tables {
    /// Opens the policy maps pinned in `dir` (the versioned pin directory).
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self {
            cgroup_identity: typed!(dir, maps::CGROUP_IDENTITY),
            identities: typed!(dir, maps::IDENTITIES),
            ipcache_host_v4: typed!(dir, maps::IPCACHE_HOST_V4),
            ipcache_host_v6: typed!(dir, maps::IPCACHE_HOST_V6),
            ipcache_v4: typed!(dir, maps::IPCACHE_V4),
            ipcache_v6: typed!(dir, maps::IPCACHE_V6),
            policy: [typed!(dir, maps::POLICY_A), typed!(dir, maps::POLICY_B)],
            config: typed!(dir, maps::CONFIG),
            last_flip: None,
            policy_shadow: [None, None],
        })
    }

    pub fn config(&self) -> Result<Config> {
        self.config.get(&0, 0).context("reading CONFIG")
    }

    /// The value the active table holds for a cell (exact port first, then any port), as
    /// the kernel would see it.
    pub fn lookup(&self, key: PolicyKey) -> Result<Option<(PolicyKey, PolicyValue)>> {
        let active = &self.policy[active_table(&self.config()?)];
        for key in [key, PolicyKey { dport: 0, ..key }] {
            if let Ok(value) = active.get(&key, 0) {
                return Ok(Some((key, value)));
            }
        }
        Ok(None)
    }

    /// The generation the next change will write: +1 for a table swap ([`Tables::apply`]),
    /// +2 for a row update ([`Tables::apply_row`]). The agent publishes the policy under it
    /// *before* the change, so an event decided just after the flip finds its policy.
    pub fn next_generation(&self, swap: bool) -> Result<u64> {
        Ok(self.config()?.generation + if swap { 1 } else { 2 })
    }

    /// The subject currently mapped to a cgroup, if any.
    pub fn identity_of_cgroup(&self, cgroup_id: u64) -> Option<u32> {
        self.cgroup_identity.get(&cgroup_id, 0).ok()
    }

    pub fn identity_info(&self, identity: u32) -> Option<IdentityInfo> {
        self.identities.get(&identity, 0).ok()
    }

    /// Writes `desired` so that no connect ever sees a mix of two revisions:
    /// 1. add or update identities, IP-cache entries and cgroups (new names resolve to
    ///    identities before any policy refers to them; stale ones are still there for the
    ///    old policy);
    /// 2. fill the standby policy table and flip to it by advancing `CONFIG.generation` (its
    ///    parity is the active table) in one map write;
    /// 3. remove what only the old revision needed.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<ApplyReport> {
        let started = Instant::now();
        // Host addresses go to the exact-match maps the kernel tries first; shorter
        // prefixes to the tries.
        let (host_v4, prefix_v4) = split_hosts(&desired.ipcache_v4, 32);
        let (host_v6, prefix_v6) = split_hosts(&desired.ipcache_v6, 128);

        let mut stale = 0;
        let identities = upsert(&mut self.identities, &desired.identities, maps::IDENTITIES)?;
        let host_v4 = upsert(&mut self.ipcache_host_v4, &host_v4, maps::IPCACHE_HOST_V4)?;
        let host_v6 = upsert(&mut self.ipcache_host_v6, &host_v6, maps::IPCACHE_HOST_V6)?;
        let prefix_v4 = upsert(&mut self.ipcache_v4, &prefix_v4, maps::IPCACHE_V4)?;
        let prefix_v6 = upsert(&mut self.ipcache_v6, &prefix_v6, maps::IPCACHE_V6)?;
        let cgroups = upsert(
            &mut self.cgroup_identity,
            &desired.cgroups,
            maps::CGROUP_IDENTITY,
        )?;
        let written = identities.written
            + host_v4.written
            + host_v6.written
            + prefix_v4.written
            + prefix_v6.written
            + cgroups.written;

        let policy = self.swap_policy(&desired.allows, desired.audit)?;

        stale += remove(&mut self.identities, &identities.stale, maps::IDENTITIES)?;
        stale += remove(
            &mut self.ipcache_host_v4,
            &host_v4.stale,
            maps::IPCACHE_HOST_V4,
        )?;
        stale += remove(
            &mut self.ipcache_host_v6,
            &host_v6.stale,
            maps::IPCACHE_HOST_V6,
        )?;
        stale += remove(&mut self.ipcache_v4, &prefix_v4.stale, maps::IPCACHE_V4)?;
        stale += remove(&mut self.ipcache_v6, &prefix_v6.stale, maps::IPCACHE_V6)?;
        stale += remove(
            &mut self.cgroup_identity,
            &cgroups.stale,
            maps::CGROUP_IDENTITY,
        )?;
        Ok(ApplyReport {
            written: written + policy.written,
            removed: stale + policy.stale.len(),
            active_table: policy.active,
            generation: policy.generation,
            elapsed: started.elapsed(),
        })
    }

    /// Brings `CGROUP_IDENTITY` in line with the cgroups that exist now (pods started or
    /// gone); the policy itself is untouched.
    pub fn sync_cgroups(&mut self, cgroups: &BTreeMap<u64, u32>) -> Result<()> {
        let sync = upsert(&mut self.cgroup_identity, cgroups, maps::CGROUP_IDENTITY)?;
        remove(
            &mut self.cgroup_identity,
            &sync.stale,
            maps::CGROUP_IDENTITY,
        )?;
        Ok(())
    }

    /// Writes one subject's re-evaluated row into the active table (a risk change). Each
    /// cell changes on its own; no connect sees a cell half-written.
    pub fn apply_row(
        &mut self,
        added: &[(PolicyKey, PolicyValue)],
        removed: &[PolicyKey],
    ) -> Result<u64> {
        let mut config = self.config()?;
        let active = active_table(&config);
        // Forget the shadow first: if a write fails half-way, the next swap reads the table.
        let shadow = self.policy_shadow[active].take();
        let table = &mut self.policy[active];
        for (key, value) in added {
            table.put(key, value, "the active policy table")?;
        }
        remove(table, removed, "the active policy table")?;
        self.policy_shadow[active] = shadow.map(|mut shadow| {
            shadow.extend(added.iter().copied());
            for key in removed {
                shadow.remove(key);
            }
            shadow
        });
        // +2 keeps the parity (the active table) and gives the changed row a revision of its
        // own, so that later events are explained by it.
        config.generation += 2;
        self.config
            .set(0, config, 0)
            .context("advancing CONFIG.generation")?;
        Ok(config.generation)
    }

    /// Sets or clears flag bits of one identity (quarantine), leaving the rest as it is.
    pub fn update_flags(&mut self, identity: u32, set: u32, clear: u32) -> Result<()> {
        let mut info = self
            .identities
            .get(&identity, 0)
            .with_context(|| format!("identity {identity} is not in the kernel"))?;
        info.flags = (info.flags | set) & !clear;
        self.identities.put(&identity, &info, maps::IDENTITIES)
    }

    /// Identities whose kernel entry carries a flag (quarantine survives agent restarts this way).
    pub fn identities_flagged(&self, flag: u32) -> Result<std::collections::BTreeSet<u32>> {
        Ok(self
            .identities
            .entries()?
            .into_iter()
            .filter(|(_, info)| info.flags & flag != 0)
            .map(|(id, _)| id)
            .collect())
    }

    /// Makes the standby table equal to `allows`, then flips the active index to it.
    fn swap_policy(
        &mut self,
        allows: &HashMap<PolicyKey, PolicyValue>,
        audit: bool,
    ) -> Result<PolicySwap> {
        let mut config = self.config()?;
        let standby = active_table(&config) as u32 ^ 1;
        if let Some(flipped) = self.last_flip {
            if let Some(rest) = STANDBY_GRACE.checked_sub(flipped.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        let table = &mut self.policy[standby as usize];
        // Stale entries go first here: the standby table is invisible, and removing first
        // leaves room in a nearly full table.
        let current = match self.policy_shadow[standby as usize].take() {
            Some(shadow) => shadow,
            None => table.entries()?,
        };
        let stale: Vec<PolicyKey> = current
            .keys()
            .filter(|k| !allows.contains_key(k))
            .copied()
            .collect();
        remove(table, &stale, "the standby policy table")?;
        let sync = write_changed(table, current, allows, "the standby policy table")?;
        self.policy_shadow[standby as usize] = Some(allows.clone());
        // +1: the generation's parity, which the programs read, now names the standby table.
        config.generation += 1;
        config.active_policy = standby;
        config.audit = audit as u32;
        self.config
            .set(0, config, 0)
            .context("flipping CONFIG.active_policy")?;
        self.last_flip = Some(Instant::now());
        Ok(PolicySwap {
            written: sync.written,
            stale,
            active: standby,
            generation: config.generation,
        })
    }
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
trait SyncMap<K, V> {
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

struct Upserted<K> {
    written: usize,
    /// Keys the map holds that `desired` does not: removed once nothing refers to them.
    stale: Vec<K>,
}

/// Writes the entries of `desired` that the map lacks or holds with another value.
fn upsert<'a, K, V, M>(
    map: &mut M,
    desired: impl IntoIterator<Item = (&'a K, &'a V)> + Copy,
    what: &str,
) -> Result<Upserted<K>>
where
    K: Eq + Hash + Copy + 'a,
    V: PartialEq + 'a,
    M: SyncMap<K, V>,
{
    let current = map.entries()?;
    write_changed(map, current, desired, what)
}

/// [`upsert`] against contents already read (reading a large map costs two syscalls an entry).
fn write_changed<'a, K, V, M>(
    map: &mut M,
    current: HashMap<K, V>,
    desired: impl IntoIterator<Item = (&'a K, &'a V)> + Copy,
    what: &str,
) -> Result<Upserted<K>>
where
    K: Eq + Hash + Copy + 'a,
    V: PartialEq + 'a,
    M: SyncMap<K, V>,
{
    let mut written = 0;
    let mut wanted = std::collections::HashSet::new();
    for (key, value) in desired {
        wanted.insert(*key);
        if current.get(key) != Some(value) {
            map.put(key, value, what)?;
            written += 1;
        }
    }
    let stale = current
        .into_keys()
        .filter(|k| !wanted.contains(k))
        .collect();
    Ok(Upserted { written, stale })
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
    /// `verdicts[verdict][reason]`, summed over CPUs.
    pub verdicts: Vec<Vec<u64>>,
    pub lost_events: u64,
    pub maps: Vec<MapFill>,
    pub config: ConfigView,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ConfigView {
    pub active_policy: u32,
    pub audit: bool,
    pub generation: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MapFill {
    pub name: &'static str,
    /// None for maps whose entries are not counted (arrays, the ring buffer).
    pub entries: Option<u64>,
    pub capacity: u32,
}

pub fn lost_events(dir: &Path) -> Result<u64> {
    let lost: PerCpuArray<MapData, u64> = typed!(dir, maps::LOST_EVENTS);
    Ok(lost.get(&0, 0).context("reading LOST_EVENTS")?.iter().sum())
}

pub fn kernel_stats(dir: &Path) -> Result<KernelStats> {
    let counters: PerCpuArray<MapData, u64> = typed!(dir, maps::VERDICTS);
    let mut verdicts = vec![vec![0u64; reason::COUNT]; verdict::COUNT];
    for index in 0..VERDICT_COUNTERS {
        let sum: u64 = counters
            .get(&index, 0)
            .context("reading VERDICTS")?
            .iter()
            .sum();
        verdicts[index as usize / reason::COUNT][index as usize % reason::COUNT] = sum;
    }
    let tables = Tables::open(dir)?;
    let config = tables.config()?;
    let mut fills = Vec::new();
    for name in maps::ALL {
        let info = MapInfo::from_pin(dir.join(name))
            .with_context(|| format!("reading map info of {name}"))?;
        let entries = match name {
            maps::CGROUP_IDENTITY => Some(tables.cgroup_identity.keys().count() as u64),
            maps::IDENTITIES => Some(tables.identities.keys().count() as u64),
            maps::IPCACHE_HOST_V4 => Some(tables.ipcache_host_v4.keys().count() as u64),
            maps::IPCACHE_HOST_V6 => Some(tables.ipcache_host_v6.keys().count() as u64),
            maps::IPCACHE_V4 => Some(tables.ipcache_v4.keys().count() as u64),
            maps::IPCACHE_V6 => Some(tables.ipcache_v6.keys().count() as u64),
            maps::POLICY_A => Some(tables.policy[0].keys().count() as u64),
            maps::POLICY_B => Some(tables.policy[1].keys().count() as u64),
            _ => None,
        };
        fills.push(MapFill {
            name,
            entries,
            capacity: info.max_entries(),
        });
    }
    Ok(KernelStats {
        verdicts,
        lost_events: lost_events(dir)?,
        maps: fills,
        config: ConfigView {
            active_policy: config.active_policy,
            audit: config.audit != 0,
            generation: config.generation,
        },
    })
}
