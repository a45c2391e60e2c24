//! Writing the ingress allowlist (`INGRESS_ALLOW`, see `enforcer-ebpf/src/wire.rs`) around a
//! policy change, so that a connection the new policy permits is never refused at the
//! receiver because the list lags behind the sender's table.
//!
//! A tagged SYN between two workloads is judged twice: at the sender's `connect` by the policy
//! table, at the receiver's ingress by this list. On one node both follow the same compiled
//! policy, but the list is a plain hash map outside the double-buffered tables, so it changes
//! in two steps around the table swap, like the rate limits (`datapath::rates`):
//!
//! 1. [`IngressWriter::before_swap`]: the grants, every allow of the new list that the map does
//!    not hold yet (a new cell, a deny exception turned allow). From the moment the new table
//!    lets a sender connect, the receiver lets the SYN in. Written after the swap instead, a
//!    new pod's first call to a vector DB on the same node was refused (`not_allowed`) in the
//!    moment between.
//! 2. [`IngressWriter::after_swap`]: the restrictions, new deny exceptions and the cells the
//!    new list no longer has. They take force with the table that stops the sender, not before
//!    it, so a deny at the receiver is always explained by the policy published for the swap.
//!
//! Between the steps the list allows what either revision allows and denies only what both
//! deny; an address nobody would be permitted to reach in either revision stays refused.
//! Capacity: old and new cells coexist between the steps; a change that cannot fit so removes
//! the old cells first (logged), a moment in which a cell of both lists may be refused. A list
//! above the map's capacity by itself is refused whole before anything is written.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData};
use enforcer_common::{entry, maps, PolicyKey, PolicyValue};

use super::tables::{max_entries, open_pinned};

/// One write to the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    Put(PolicyKey, PolicyValue),
    Remove(PolicyKey),
}

/// The writes that take the map from `present` to `desired`: (before the swap, after it).
/// `capacity` is the map's `max_entries`; `desired` is known to fit it.
fn steps(
    present: &HashMap<PolicyKey, PolicyValue>,
    desired: &HashMap<PolicyKey, PolicyValue>,
    capacity: usize,
) -> (Vec<Write>, Vec<Write>) {
    let changed = |k: &PolicyKey, v: &PolicyValue| present.get(k) != Some(v);
    let grants = desired
        .iter()
        .filter(|(k, v)| v.verdict == entry::ALLOW && changed(k, v))
        .map(|(k, v)| Write::Put(*k, *v));
    let denies = desired
        .iter()
        .filter(|(k, v)| v.verdict != entry::ALLOW && changed(k, v))
        .map(|(k, v)| Write::Put(*k, *v));
    let removals = present
        .keys()
        .filter(|k| !desired.contains_key(k))
        .map(|k| Write::Remove(*k));
    let peak = present.len() + desired.keys().filter(|k| !present.contains_key(k)).count();
    if peak > capacity {
        tracing::warn!(
            peak,
            capacity,
            "the ingress allowlist change does not fit beside the old list: removing first"
        );
        (removals.chain(grants).collect(), denies.collect())
    } else {
        (grants.collect(), denies.chain(removals).collect())
    }
}

/// The pinned `INGRESS_ALLOW` map.
pub struct IngressWriter {
    map: BpfHashMap<MapData, PolicyKey, PolicyValue>,
    capacity: u32,
}

impl IngressWriter {
    /// Opens `INGRESS_ALLOW` under the pin directory `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let capacity = max_entries(pin_dir, maps::INGRESS_ALLOW)?;
        let map = open_pinned(pin_dir, maps::INGRESS_ALLOW)?.try_into()?;
        Ok(Self { map, capacity })
    }

    /// What the map holds now.
    pub fn current(&self) -> HashMap<PolicyKey, PolicyValue> {
        self.map.iter().filter_map(|e| e.ok()).collect()
    }

    /// Refuses a list of `entries` cells above the map's capacity, with an error naming the
    /// map, the need and the capacity. Call it before anything of a change is written.
    pub fn check_fits(&self, entries: usize) -> Result<()> {
        check_capacity(entries, self.capacity)
    }

    /// Step 1 (see the module documentation). Returns the number of writes.
    pub fn before_swap(&mut self, desired: &HashMap<PolicyKey, PolicyValue>) -> Result<usize> {
        self.check_fits(desired.len())?;
        let (before, _) = steps(&self.current(), desired, self.capacity as usize);
        self.write(&before)
    }

    /// Step 2 (see the module documentation). Returns the number of writes.
    pub fn after_swap(&mut self, desired: &HashMap<PolicyKey, PolicyValue>) -> Result<usize> {
        self.check_fits(desired.len())?;
        let (before, after) = steps(&self.current(), desired, self.capacity as usize);
        // After step 1 only step 2 is left; `before` is empty unless the map changed between.
        Ok(self.write(&before)? + self.write(&after)?)
    }

    /// Both steps at once: for a list that no table swap goes with (undoing step 1 after a
    /// failed swap, a benchmark). Returns the number of writes.
    pub fn write_exactly(&mut self, desired: &HashMap<PolicyKey, PolicyValue>) -> Result<usize> {
        self.after_swap(desired)
    }

    fn write(&mut self, writes: &[Write]) -> Result<usize> {
        for w in writes {
            match w {
                Write::Put(k, v) => self
                    .map
                    .insert(k, v, 0)
                    .with_context(|| format!("writing {} {k:?}", maps::INGRESS_ALLOW))?,
                Write::Remove(k) => self
                    .map
                    .remove(k)
                    .with_context(|| format!("removing {} {k:?}", maps::INGRESS_ALLOW))?,
            }
        }
        Ok(writes.len())
    }
}

/// Refuses an ingress allowlist of `entries` above `capacity`.
fn check_capacity(entries: usize, capacity: u32) -> Result<()> {
    if entries > capacity as usize {
        bail!(
            "the ingress allowlist needs {entries} entries, above the capacity of {} ({capacity}); \
             narrow the destinations with `ingress: enforce|audit`, or raise the policy capacity \
             (`enforcer detach` and restart to resize pinned maps)",
            maps::INGRESS_ALLOW
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use enforcer_common::proto;

    fn apply(map: &mut HashMap<PolicyKey, PolicyValue>, writes: &[Write], capacity: usize) {
        for w in writes {
            match w {
                Write::Put(k, v) => {
                    map.insert(*k, *v);
                }
                Write::Remove(k) => {
                    map.remove(k);
                }
            }
            assert!(
                map.len() <= capacity,
                "{} cells above {capacity}",
                map.len()
            );
        }
    }

    fn allows(map: &HashMap<PolicyKey, PolicyValue>, k: &PolicyKey) -> bool {
        map.get(k).is_some_and(|v| v.verdict == entry::ALLOW)
    }

    /// Every pair of lists over three cells, each cell absent, allowed by one of two rules or
    /// a deny exception: 4^3 x 4^3 changes, at a capacity that fits both and at one that
    /// fits only the larger.
    #[test]
    fn between_the_steps_the_list_grants_what_the_new_one_does_and_nothing_neither_does() {
        let cells: Vec<PolicyKey> = (0..3u16)
            .map(|dport| PolicyKey {
                subject: 7,
                destination: 9,
                dport,
                protocol: proto::TCP,
                _pad: 0,
            })
            .collect();
        let states = [
            None,
            Some(PolicyValue::allow(1)),
            Some(PolicyValue::allow(2)),
            Some(PolicyValue::deny(3)),
        ];
        let list = |n: usize| -> HashMap<PolicyKey, PolicyValue> {
            cells
                .iter()
                .enumerate()
                .filter_map(|(i, k)| states[n / 4usize.pow(i as u32) % 4].map(|v| (*k, v)))
                .collect()
        };
        for old in (0..64).map(list) {
            for new in (0..64).map(list) {
                for capacity in [old.len() + new.len(), old.len().max(new.len())] {
                    let (before, after) = steps(&old, &new, capacity);
                    let mut map = old.clone();
                    apply(&mut map, &before, capacity);
                    let roomy = capacity == old.len() + new.len();
                    for k in &cells {
                        let seen = format!("{old:?} -> {new:?}: {k:?} between the steps");
                        // Nothing both lists refuse is let in.
                        if allows(&map, k) {
                            assert!(allows(&old, k) || allows(&new, k), "{seen}");
                        }
                        // The new grants are in force (unless the old cells had to go first,
                        // where they still are once the removals are done).
                        if allows(&new, k) {
                            assert_eq!(map.get(k), new.get(k), "{seen}");
                        }
                        // Restrictions wait for the swap when there is room.
                        if roomy && !allows(&new, k) {
                            assert_eq!(map.get(k), old.get(k), "{seen}");
                        }
                    }
                    apply(&mut map, &after, capacity);
                    assert_eq!(map, new, "{old:?} -> {new:?}: after both steps");
                }
            }
        }
    }

    #[test]
    fn an_ingress_list_above_capacity_is_refused_naming_the_map() {
        assert!(check_capacity(10, 10).is_ok());
        let e = check_capacity(11, 10).unwrap_err().to_string();
        assert!(
            e.contains("INGRESS_ALLOW") && e.contains("11") && e.contains("(10)"),
            "{e}"
        );
    }
}
