//! Typed handles on the pinned maps, and the one operation that writes policy into them:
//! [`Tables::apply`]. The maps are opened from their pins, so the agent, `enforcer status`
//! and `enforcer policy explain` all read the same kernel state.

use std::collections::{BTreeMap, HashMap};
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
    pub elapsed: Duration,
}

pub struct Tables {
    cgroup_identity: BpfHashMap<MapData, u64, u32>,
    identities: BpfHashMap<MapData, u32, IdentityInfo>,
    ipcache_v4: LpmTrie<MapData, [u8; 4], u32>,
    ipcache_v6: LpmTrie<MapData, [u8; 16], u32>,
    policy: [BpfHashMap<MapData, PolicyKey, PolicyValue>; 2],
    config: Array<MapData, Config>,
    last_flip: Option<Instant>,
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
            ipcache_v4: typed!(dir, maps::IPCACHE_V4),
            ipcache_v6: typed!(dir, maps::IPCACHE_V6),
            policy: [typed!(dir, maps::POLICY_A), typed!(dir, maps::POLICY_B)],
            config: typed!(dir, maps::CONFIG),
            last_flip: None,
        })
    }

    pub fn config(&self) -> Result<Config> {
        self.config.get(&0, 0).context("reading CONFIG")
    }

    /// The value the active table holds for a cell (exact port first, then any port), as
    /// the kernel would see it.
    pub fn lookup(&self, key: PolicyKey) -> Result<Option<(PolicyKey, PolicyValue)>> {
        let active = &self.policy[(self.config()?.active_policy & 1) as usize];
        for key in [key, PolicyKey { dport: 0, ..key }] {
            if let Ok(value) = active.get(&key, 0) {
                return Ok(Some((key, value)));
            }
        }
        Ok(None)
    }

    /// The subject currently mapped to a cgroup, if any.
    pub fn identity_of_cgroup(&self, cgroup_id: u64) -> Option<u32> {
        self.cgroup_identity.get(&cgroup_id, 0).ok()
    }

    pub fn identity_info(&self, identity: u32) -> Option<IdentityInfo> {
        self.identities.get(&identity, 0).ok()
    }

    /// Writes `desired` so that no connect ever sees a mix of two revisions:
    /// 1. add or update identities, IP-cache prefixes and cgroups (new names resolve to
    ///    identities before any policy refers to them; stale ones are still there for the
    ///    old policy);
    /// 2. fill the standby policy table and flip `CONFIG.active_policy` in one map write;
    /// 3. remove what only the old revision needed.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<ApplyReport> {
        let started = Instant::now();
        let mut report = ApplyReport::default();

        let current_identities: HashMap<u32, IdentityInfo> = collect(self.identities.iter())?;
        for (id, info) in &desired.identities {
            if current_identities.get(id) != Some(info) {
                self.identities
                    .insert(id, info, 0)
                    .with_context(|| format!("writing IDENTITIES[{id}]"))?;
                report.written += 1;
            }
        }
        let current_v4: HashMap<(u32, [u8; 4]), u32> = collect_lpm(self.ipcache_v4.iter())?;
        for (&(len, addr), id) in &desired.ipcache_v4 {
            if current_v4.get(&(len, addr)) != Some(id) {
                self.ipcache_v4
                    .insert(&LpmKey::new(len, addr), id, 0)
                    .context("writing IPCACHE_V4")?;
                report.written += 1;
            }
        }
        let current_v6: HashMap<(u32, [u8; 16]), u32> = collect_lpm(self.ipcache_v6.iter())?;
        for (&(len, addr), id) in &desired.ipcache_v6 {
            if current_v6.get(&(len, addr)) != Some(id) {
                self.ipcache_v6
                    .insert(&LpmKey::new(len, addr), id, 0)
                    .context("writing IPCACHE_V6")?;
                report.written += 1;
            }
        }
        let current_cgroups: HashMap<u64, u32> = collect(self.cgroup_identity.iter())?;
        for (cgroup, id) in &desired.cgroups {
            if current_cgroups.get(cgroup) != Some(id) {
                self.cgroup_identity
                    .insert(cgroup, id, 0)
                    .context("writing CGROUP_IDENTITY")?;
                report.written += 1;
            }
        }

        let (written, removed, active) = self.swap_policy(&desired.allows, desired.audit)?;
        report.written += written;
        report.removed += removed;
        report.active_table = active;

        for id in current_identities
            .keys()
            .filter(|id| !desired.identities.contains_key(id))
        {
            self.identities
                .remove(id)
                .with_context(|| format!("removing IDENTITIES[{id}]"))?;
            report.removed += 1;
        }
        for (len, addr) in current_v4
            .keys()
            .filter(|k| !desired.ipcache_v4.contains_key(k))
        {
            self.ipcache_v4
                .remove(&LpmKey::new(*len, *addr))
                .context("removing from IPCACHE_V4")?;
            report.removed += 1;
        }
        for (len, addr) in current_v6
            .keys()
            .filter(|k| !desired.ipcache_v6.contains_key(k))
        {
            self.ipcache_v6
                .remove(&LpmKey::new(*len, *addr))
                .context("removing from IPCACHE_V6")?;
            report.removed += 1;
        }
        for cgroup in current_cgroups
            .keys()
            .filter(|k| !desired.cgroups.contains_key(k))
        {
            self.cgroup_identity
                .remove(cgroup)
                .context("removing from CGROUP_IDENTITY")?;
            report.removed += 1;
        }
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Brings `CGROUP_IDENTITY` in line with the cgroups that exist now (pods started or
    /// gone); the policy itself is untouched.
    pub fn sync_cgroups(&mut self, cgroups: &BTreeMap<u64, u32>) -> Result<()> {
        let current: HashMap<u64, u32> = collect(self.cgroup_identity.iter())?;
        for (cgroup, id) in cgroups {
            if current.get(cgroup) != Some(id) {
                self.cgroup_identity
                    .insert(cgroup, id, 0)
                    .context("writing CGROUP_IDENTITY")?;
            }
        }
        for cgroup in current.keys().filter(|k| !cgroups.contains_key(k)) {
            self.cgroup_identity
                .remove(cgroup)
                .context("removing from CGROUP_IDENTITY")?;
        }
        Ok(())
    }

    /// Writes one subject's re-evaluated row into the active table (a risk change). Each
    /// cell changes on its own; no connect sees a cell half-written.
    pub fn apply_row(
        &mut self,
        added: &[(PolicyKey, PolicyValue)],
        removed: &[PolicyKey],
    ) -> Result<()> {
        let active = (self.config()?.active_policy & 1) as usize;
        let table = &mut self.policy[active];
        for (key, value) in added {
            table
                .insert(key, value, 0)
                .map_err(|e| map_full_hint(e, "the policy table"))?;
        }
        for key in removed {
            match table.remove(key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(error) => return Err(error).context("removing a policy entry"),
            }
        }
        Ok(())
    }

    /// Sets or clears flag bits of one identity (quarantine), leaving the rest as it is.
    pub fn update_flags(&mut self, identity: u32, set: u32, clear: u32) -> Result<()> {
        let mut info = self
            .identities
            .get(&identity, 0)
            .with_context(|| format!("identity {identity} is not in the kernel"))?;
        info.flags = (info.flags | set) & !clear;
        self.identities
            .insert(identity, info, 0)
            .with_context(|| format!("writing IDENTITIES[{identity}]"))?;
        Ok(())
    }

    /// Identities whose kernel entry carries a flag (quarantine survives agent restarts this way).
    pub fn identities_flagged(&self, flag: u32) -> Result<std::collections::BTreeSet<u32>> {
        let all: HashMap<u32, IdentityInfo> = collect(self.identities.iter())?;
        Ok(all
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
    ) -> Result<(usize, usize, u32)> {
        let mut config = self.config()?;
        let standby = (config.active_policy & 1) ^ 1;
        if let Some(flipped) = self.last_flip {
            if let Some(rest) = STANDBY_GRACE.checked_sub(flipped.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        let table = &mut self.policy[standby as usize];
        let current: HashMap<PolicyKey, PolicyValue> = collect(table.iter())?;
        let (mut written, mut removed) = (0, 0);
        for key in current.keys().filter(|k| !allows.contains_key(k)) {
            table.remove(key).context("removing a stale policy entry")?;
            removed += 1;
        }
        for (key, value) in allows {
            if current.get(key) != Some(value) {
                table
                    .insert(key, value, 0)
                    .map_err(|e| map_full_hint(e, "the policy table"))?;
                written += 1;
            }
        }
        config.active_policy = standby;
        config.audit = audit as u32;
        config.generation += 1;
        self.config
            .set(0, config, 0)
            .context("flipping CONFIG.active_policy")?;
        self.last_flip = Some(Instant::now());
        Ok((written, removed, standby))
    }
}

fn map_full_hint(error: aya::maps::MapError, what: &str) -> anyhow::Error {
    anyhow::Error::new(error).context(format!(
        "writing {what} (is it full? see `enforcer status`)"
    ))
}

fn collect<K: std::hash::Hash + Eq, V>(
    iter: impl Iterator<Item = Result<(K, V), aya::maps::MapError>>,
) -> Result<HashMap<K, V>> {
    iter.map(|r| r.context("reading a map")).collect()
}

fn collect_lpm<const N: usize>(
    iter: impl Iterator<Item = Result<(LpmKey<[u8; N]>, u32), aya::maps::MapError>>,
) -> Result<HashMap<(u32, [u8; N]), u32>> {
    iter.map(|r| {
        let (key, value) = r.context("reading an IP cache")?;
        Ok(((key.prefix_len(), key.data()), value))
    })
    .collect()
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
