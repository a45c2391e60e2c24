//! Writing the ingress allowlist (`INGRESS_ALLOW`, see `enforcer-ebpf/src/wire.rs`) around a
//! policy change, so that a connection the new policy permits is never refused at the
//! receiver because the list lags behind the sender's table.
//!
//! A tagged SYN between two workloads is judged twice: at the sender's `connect` by the policy
//! table, at the receiver's ingress by this list. On one node both follow the same compiled
//! policy, but the list is a plain hash map outside the double-buffered tables, so it changes
//! in two steps around the table swap, like the rate limits (`datapath::rates`):
//!
//! 1. [`IngressWriter::before_swap`]: the grants, every port the new list lets through that
//!    the map does not (a new cell, a deny exception turned allow or dropped). From the
//!    moment the new table lets a sender connect, the receiver lets the SYN in. Written after
//!    the swap instead, a new pod's first call to a vector DB on the same node was refused
//!    (`not_allowed`) in the moment between.
//! 2. [`IngressWriter::after_swap`]: the restrictions, new deny exceptions and the cells the
//!    new list no longer has. They take force with the table that stops the sender, so a deny
//!    at the receiver is explained by the policy published for the swap; the one exception is
//!    a deny exception under an any-port cell that opens, written just before that cell.
//!
//! The kernel judges a port by its own cell, else by the any-port cell (port 0), so the
//! cells are written in an order (see `steps`) in which, after every single write, each
//! port's verdict is one that the old or the new list gives it: nothing that both refuse is
//! ever let through. Capacity: old and new cells coexist between the steps; a change that
//! cannot fit so removes the old cells first (logged), a moment in which a port of both
//! lists may be refused. A list above the map's capacity by itself is refused whole before
//! anything is written.

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

/// The cell the kernel falls back to for `key`'s port: the any-port cell (port 0) of the same
/// (claimant, destination, protocol). `policy_hit` reads the exact port's cell, and this one
/// only when the port has none.
fn any_port(key: &PolicyKey) -> PolicyKey {
    PolicyKey { dport: 0, ..*key }
}

fn is_allow(value: &PolicyValue) -> bool {
    value.verdict == entry::ALLOW
}

fn allows(map: &HashMap<PolicyKey, PolicyValue>, key: &PolicyKey) -> bool {
    map.get(key).is_some_and(is_allow)
}

/// The writes that take the map from `present` to `desired`: (before the swap, after it).
/// `capacity` is the map's `max_entries`; `desired` is known to fit it.
///
/// Cells are not independent: a port without a cell of its own is judged by the any-port
/// cell, so the order keeps every port's verdict, after every single write, one that the
/// old or the new list gives it:
/// - before: the new deny exceptions under an any-port cell that opens (or their ports would
///   open with it), the exact-port allows, the any-port allows, then the exceptions the new
///   list drops under an allowing any-port cell (their ports open: grants);
/// - after: the other new denies, the any-port cells the new list drops, then the exact-port
///   cells it drops (each port then falls back to the new any-port cell).
fn steps(
    present: &HashMap<PolicyKey, PolicyValue>,
    desired: &HashMap<PolicyKey, PolicyValue>,
    capacity: usize,
) -> (Vec<Write>, Vec<Write>) {
    let is_any = |k: &PolicyKey| k.dport == 0;
    let opens = |k: &PolicyKey| allows(desired, &any_port(k)) && !allows(present, &any_port(k));
    let puts = |pick: &dyn Fn(&PolicyKey, &PolicyValue) -> bool| -> Vec<Write> {
        desired
            .iter()
            .filter(|(k, v)| present.get(k) != Some(v) && pick(k, v))
            .map(|(k, v)| Write::Put(*k, *v))
            .collect()
    };
    let removals = |pick: &dyn Fn(&PolicyKey, &PolicyValue) -> bool| -> Vec<Write> {
        present
            .iter()
            .filter(|(k, v)| !desired.contains_key(k) && pick(k, v))
            .map(|(k, _)| Write::Remove(*k))
            .collect()
    };
    let lifted = |k: &PolicyKey, v: &PolicyValue| {
        !is_any(k) && !is_allow(v) && allows(desired, &any_port(k))
    };
    let exact_allows = puts(&|k, v| !is_any(k) && is_allow(v));
    let any_allows = puts(&|k, v| is_any(k) && is_allow(v));
    let any_removals = removals(&|k, _| is_any(k));
    let peak = present.len() + desired.keys().filter(|k| !present.contains_key(k)).count();
    if peak > capacity {
        tracing::warn!(
            peak,
            capacity,
            "the ingress allowlist change does not fit beside the old list: removing first"
        );
        // Any-port cells first: once those left allow only where the new list's do (an
        // allowing cell turned deny in place, no new cell), a port whose own cell goes falls
        // back to a verdict of the new list.
        let turned_deny =
            |k: &PolicyKey, v: &PolicyValue| is_any(k) && !is_allow(v) && present.contains_key(k);
        let before = [
            puts(&turned_deny),
            any_removals,
            removals(&|k, _| !is_any(k)),
            puts(&|k, v| !is_allow(v) && !turned_deny(k, v)),
            exact_allows,
            any_allows,
        ];
        return (before.concat(), Vec::new());
    }
    let before = [
        puts(&|k, v| !is_any(k) && !is_allow(v) && opens(k)),
        exact_allows,
        any_allows,
        removals(&lifted),
    ];
    let after = [
        puts(&|k, v| !is_allow(v) && (is_any(k) || !opens(k))),
        any_removals,
        removals(&|k, v| !is_any(k) && !lifted(k, v)),
    ];
    (before.concat(), after.concat())
}

/// The pinned `INGRESS_ALLOW` map.
pub struct IngressWriter {
    map: BpfHashMap<MapData, PolicyKey, PolicyValue>,
    capacity: u32,
    /// What the map holds, read once and kept up to date by this writer's own writes (the
    /// agent holds the pin directory's lock: nobody else writes it); `None` until read, and
    /// again after a write failed part-way.
    contents: Option<HashMap<PolicyKey, PolicyValue>>,
}

impl IngressWriter {
    /// Opens `INGRESS_ALLOW` under the pin directory `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let capacity = max_entries(pin_dir, maps::INGRESS_ALLOW)?;
        let map = open_pinned(pin_dir, maps::INGRESS_ALLOW)?.try_into()?;
        Ok(Self {
            map,
            capacity,
            contents: None,
        })
    }

    /// What the map holds now.
    pub fn current(&mut self) -> HashMap<PolicyKey, PolicyValue> {
        self.contents().clone()
    }

    fn contents(&mut self) -> &HashMap<PolicyKey, PolicyValue> {
        let map = &self.map;
        self.contents
            .get_or_insert_with(|| map.iter().filter_map(|e| e.ok()).collect())
    }

    /// Refuses a list of `entries` cells above the map's capacity, with an error naming the
    /// map, the need and the capacity. Call it before anything of a change is written.
    pub fn check_fits(&self, entries: usize) -> Result<()> {
        check_capacity(entries, self.capacity)
    }

    /// Step 1 (see the module documentation). Returns the number of writes.
    pub fn before_swap(&mut self, desired: &HashMap<PolicyKey, PolicyValue>) -> Result<usize> {
        self.check_fits(desired.len())?;
        let capacity = self.capacity as usize;
        let (before, _) = steps(self.contents(), desired, capacity);
        self.write(&before)
    }

    /// Step 2 (see the module documentation). Returns the number of writes.
    pub fn after_swap(&mut self, desired: &HashMap<PolicyKey, PolicyValue>) -> Result<usize> {
        self.check_fits(desired.len())?;
        let capacity = self.capacity as usize;
        let (before, after) = steps(self.contents(), desired, capacity);
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
            let written = match w {
                Write::Put(k, v) => self
                    .map
                    .insert(k, v, 0)
                    .with_context(|| format!("writing {} {k:?}", maps::INGRESS_ALLOW)),
                Write::Remove(k) => self
                    .map
                    .remove(k)
                    .with_context(|| format!("removing {} {k:?}", maps::INGRESS_ALLOW)),
            };
            if let Err(error) = written {
                // Read again next time: the map is whatever the failed write left.
                self.contents = None;
                return Err(error);
            }
            if let Some(contents) = &mut self.contents {
                match w {
                    Write::Put(k, v) => contents.insert(*k, *v),
                    Write::Remove(k) => contents.remove(k),
                };
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

    /// The verdict the kernel gives `port` (`policy_hit`: the exact cell, else the any-port
    /// cell).
    fn passes(map: &HashMap<PolicyKey, PolicyValue>, port: u16) -> bool {
        match map.get(&cell(port)) {
            Some(v) => is_allow(v),
            None => allows(map, &cell(0)),
        }
    }

    fn cell(dport: u16) -> PolicyKey {
        PolicyKey {
            subject: 7,
            destination: 9,
            dport,
            protocol: proto::TCP,
            _pad: 0,
        }
    }

    /// Every pair of lists over the any-port cell and two exact ports, each cell absent,
    /// allowed by one of two rules or a deny (4^3 x 4^3 changes), at a capacity that fits both
    /// and at one that fits only the larger; judged as the kernel does on ports 1 and 2 (their
    /// own cells) and 3 (the any-port cell's), after every single write.
    #[test]
    fn no_write_lets_a_port_through_that_neither_list_lets_and_the_grants_come_first() {
        let states = [
            None,
            Some(PolicyValue::allow(1)),
            Some(PolicyValue::allow(2)),
            Some(PolicyValue::deny(3)),
        ];
        let list = |n: usize| -> HashMap<PolicyKey, PolicyValue> {
            (0..3u16)
                .filter_map(|i| states[n / 4usize.pow(i as u32) % 4].map(|v| (cell(i), v)))
                .collect()
        };
        for old in (0..64).map(list) {
            for new in (0..64).map(list) {
                for capacity in [old.len() + new.len(), old.len().max(new.len())] {
                    let (before, after) = steps(&old, &new, capacity);
                    let seen = format!("{old:?} -> {new:?} at capacity {capacity}");
                    let mut map = old.clone();
                    for w in before.iter().chain(&after) {
                        apply(&mut map, std::slice::from_ref(w), capacity);
                        for port in 1..=3 {
                            assert!(
                                !passes(&map, port) || passes(&old, port) || passes(&new, port),
                                "{seen}: port {port} let through after {w:?}"
                            );
                        }
                    }
                    let mut map = old.clone();
                    apply(&mut map, &before, capacity);
                    let roomy = capacity == old.len() + new.len();
                    let opened = allows(&new, &cell(0)) && !allows(&old, &cell(0));
                    for port in 1..=3 {
                        // The new list's grants are in force before the swap.
                        assert!(
                            !passes(&new, port) || passes(&map, port),
                            "{seen}: port {port} refused before the swap"
                        );
                        // Its restrictions wait for the swap when there is room, but for the
                        // exceptions of an any-port cell that opens, written with it.
                        if roomy && !passes(&new, port) && !opened {
                            assert_eq!(
                                passes(&map, port),
                                passes(&old, port),
                                "{seen}: port {port} before the swap"
                            );
                        }
                    }
                    apply(&mut map, &after, capacity);
                    assert_eq!(map, new, "{seen}: after both steps");
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
