//! Contacts whose `flow.opened` record the kernel could not write (`FLOW_EVENTS` full): the
//! kernel keeps each (subject, destination) pair with its first record in
//! `FLOW_CONTACTS_MISSED`, and the agent drains them to the learner (`--learn`), so that a
//! workload that floods the ring with its own flows cannot hide a contact behind the flood.
//! A pair that fitted in neither is counted in `LOST_FLOW_CONTACTS`. The contacts of
//! datagrams (`flow_flags::DATAGRAM`) are kept here too; each tenant's subjects may hold at
//! most `capacity::CONTACTS_PER_TENANT` of them (`CONTACT_TENANTS`, counted by the kernel);
//! the agent returns each one it drains to its tenant (`CONTACT_TENANTS_DRAINED`, its own
//! counter), and sets that counter again at its start from what the map holds, so that counts
//! an older agent, a crash mid-drain or a failed write left cannot shrink a share for good.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData, PerCpuArray};
use enforcer_common::{capacity, flow_flags, maps, ContactKey, FlowRecord};

use crate::datapath::open_typed;

/// The pinned maps, opened once.
pub struct MissedContacts {
    contacts: HashMap<MapData, ContactKey, FlowRecord>,
    drained: HashMap<MapData, u32, u64>,
    /// Drained datagram contacts not yet written to `drained` (its write failed).
    returning: BTreeMap<u32, u64>,
    lost: PerCpuArray<MapData, u64>,
    /// `LOST_FLOW_CONTACTS` (summed over CPUs) when last read.
    lost_seen: u64,
}

impl MissedContacts {
    /// Opens the maps pinned in `dir` (the versioned pin directory). Losses counted before
    /// this agent started are returned by the first [`MissedContacts::newly_lost`]. Errors: a
    /// map is missing or of another layout.
    pub fn open(dir: &Path) -> Result<MissedContacts> {
        let contacts = open_typed(dir, maps::FLOW_CONTACTS_MISSED)?;
        let drained = open_typed(dir, maps::CONTACT_TENANTS_DRAINED)?;
        let lost = open_typed(dir, maps::LOST_FLOW_CONTACTS)?;
        let taken: HashMap<MapData, u32, u64> = open_typed(dir, maps::CONTACT_TENANTS)?;
        let mut missed = MissedContacts {
            contacts,
            drained,
            returning: BTreeMap::new(),
            lost,
            lost_seen: 0,
        };
        missed.reconcile(&taken)?;
        Ok(missed)
    }

    /// Sets each tenant's drained count to what it took less the datagram contacts the map
    /// holds. The map is read first: a contact the kernel adds meanwhile is then counted as
    /// drained too, which leaves the share one larger, never smaller.
    fn reconcile(&mut self, taken: &HashMap<MapData, u32, u64>) -> Result<()> {
        let mut held: BTreeMap<u32, u64> = BTreeMap::new();
        for record in self.contacts.iter().filter_map(Result::ok).map(|(_, r)| r) {
            if record.flags & flow_flags::DATAGRAM != 0 {
                *held.entry(record.tenant).or_default() += 1;
            }
        }
        for (tenant, took) in taken.iter().filter_map(Result::ok) {
            let drained = took.saturating_sub(held.get(&tenant).copied().unwrap_or(0));
            self.drained
                .insert(tenant, drained, 0)
                .with_context(|| format!("writing {}", maps::CONTACT_TENANTS_DRAINED))?;
        }
        Ok(())
    }

    /// Takes every kept contact out of the map (at most its capacity per call). A pair the
    /// kernel keeps again between the read and the delete is a contact already returned
    /// (same subject and destination), so nothing is lost by the race. A record whose delete
    /// fails is returned all the same (and again next time: a contact seen twice is one
    /// contact to the learner); the first such error is logged. Each entry deleted here is
    /// returned to its tenant's share.
    pub fn drain(&mut self) -> Vec<FlowRecord> {
        let keys: Vec<ContactKey> = self
            .contacts
            .keys()
            .filter_map(Result::ok)
            .take(capacity::FLOW_CONTACTS_MISSED as usize)
            .collect();
        let mut out = Vec::with_capacity(keys.len());
        let mut failed = None;
        let mut returned = std::mem::take(&mut self.returning);
        for key in keys {
            let Ok(record) = self.contacts.get(&key, 0) else {
                continue;
            };
            match self.contacts.remove(&key) {
                // The kernel inserts a pair only while it is absent, so this delete ends the
                // insert that counted this record's tenant.
                Ok(()) if record.flags & flow_flags::DATAGRAM != 0 => {
                    *returned.entry(record.tenant).or_default() += 1
                }
                Ok(()) => {}
                Err(aya::maps::MapError::KeyNotFound) => {}
                // aya reports a key deleted meanwhile as the syscall's ENOENT.
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(error) => {
                    failed.get_or_insert(error);
                }
            }
            out.push(record);
        }
        if let Some(error) = failed {
            tracing::error!(
                "deleting a FLOW_CONTACTS_MISSED entry: {error} (its contact is shown anyway)"
            );
        }
        for (tenant, n) in returned {
            let before = match self.drained.get(&tenant, 0) {
                Ok(count) => Ok(count),
                Err(aya::maps::MapError::KeyNotFound) => Ok(0),
                Err(error) => Err(error),
            };
            let written =
                before.and_then(|before| self.drained.insert(tenant, before.wrapping_add(n), 0));
            if let Err(error) = written {
                // Kept for the next drain: meanwhile that tenant's share is smaller.
                tracing::error!(
                    tenant,
                    "returning {n} drained contacts to the tenant's share ({}): {error}",
                    maps::CONTACT_TENANTS_DRAINED
                );
                self.returning.insert(tenant, n);
            }
        }
        out
    }

    /// Contacts the kernel could keep nowhere since the last call (the map was full).
    pub fn newly_lost(&mut self) -> Result<u64> {
        let total: u64 = self
            .lost
            .get(&0, 0)
            .context("reading LOST_FLOW_CONTACTS")?
            .iter()
            .sum();
        let new = total.saturating_sub(self.lost_seen);
        self.lost_seen = total;
        Ok(new)
    }
}
