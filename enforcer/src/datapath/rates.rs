//! Writing the connection-rate limits (`RATE_LIMITS`, see `enforcer_common::rate` and
//! `enforcer_policy::rate`) around a policy change, so that a pair is never held to a looser
//! limit than the one of the policy in force.
//!
//! The limits are not part of the double-buffered policy tables (the kernel reads them by
//! identity, not by class, and only after an allow), so a change is written in two steps
//! around the table swap, like a transition table:
//!
//! 1. [`RateWriter::before_swap`]: every pair of the new table gets the stricter of its old and
//!    new limit (componentwise: the longer interval, the smaller tolerance), a new pair its new
//!    limit. Whichever policy a connect is judged by during the swap, its pair's limit is at
//!    least as strict as that policy's.
//! 2. [`RateWriter::after_swap`]: the new limits exactly; pairs that lost their limit (no
//!    longer allowed, or the endpoint lost its `rate_limit`) are removed.
//!
//! A risk change is the same: its row swap is bracketed by the two steps, so a risk rise
//! tightens the subject's limits before (or as) its new row takes force.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData};
use enforcer_common::{
    maps,
    rate::{RateKey, RateLimit},
};
use enforcer_policy::rate::stricter;

use super::tables::{max_entries, open_pinned};

/// The pinned `RATE_LIMITS` map.
pub struct RateWriter {
    map: BpfHashMap<MapData, RateKey, RateLimit>,
    capacity: u32,
}

impl RateWriter {
    /// Opens `RATE_LIMITS` under the pin directory `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let capacity = max_entries(pin_dir, maps::RATE_LIMITS)?;
        let map = open_pinned(pin_dir, maps::RATE_LIMITS)?.try_into()?;
        Ok(Self { map, capacity })
    }

    /// How many pairs the limits in force may hold: half the map, so that during a change
    /// the old pairs and the new fit beside each other ([`RateWriter::check_fits`]).
    pub fn room(&self) -> usize {
        self.capacity as usize / 2
    }

    /// What the map holds now.
    pub fn current(&self) -> BTreeMap<RateKey, RateLimit> {
        self.map.iter().filter_map(|e| e.ok()).collect()
    }

    /// Refuses `desired` (and the old pairs beside it during the change) above the map's
    /// capacity, before anything is written.
    pub fn check_fits(&self, desired: &BTreeMap<RateKey, RateLimit>) -> Result<()> {
        let present = self.current();
        let peak = present.len() + desired.keys().filter(|k| !present.contains_key(k)).count();
        if peak > self.capacity as usize {
            bail!(
                "the rate limits need {peak} entries (old and new pairs during the change), \
                 above the capacity of {} ({}); fewer local subjects may reach rate-limited \
                 endpoints, or `enforcer detach` and restart to resize the pinned maps",
                maps::RATE_LIMITS,
                self.capacity
            );
        }
        Ok(())
    }

    /// Removes the pairs in the map that `desired` has not: the way out when old and new
    /// together do not fit ([`RateWriter::check_fits`]), which the limits in force (half the
    /// map) never cause, but a map left fuller by an older agent or a crash between the two
    /// steps may; refusing then would refuse every change, and the agent's start. Until the
    /// swap, those pairs are held to no limit. Returns how many were removed.
    pub fn make_room(&mut self, desired: &BTreeMap<RateKey, RateLimit>) -> Result<usize> {
        // Nothing removed for limits that cannot fit even alone: the change is refused and
        // the limits in force stay whole.
        if desired.len() > self.capacity as usize {
            bail!(
                "the rate limits need {} entries, above the capacity of {} ({})",
                desired.len(),
                maps::RATE_LIMITS,
                self.capacity
            );
        }
        let stale: Vec<RateKey> = self
            .current()
            .into_keys()
            .filter(|k| !desired.contains_key(k))
            .collect();
        for key in &stale {
            self.map
                .remove(key)
                .with_context(|| format!("removing {} {key:?}", maps::RATE_LIMITS))?;
        }
        Ok(stale.len())
    }

    /// Step 1 (see the module documentation). Returns the number of entries written.
    pub fn before_swap(&mut self, desired: &BTreeMap<RateKey, RateLimit>) -> Result<usize> {
        let present = self.current();
        let mut written = 0;
        for (key, new) in desired {
            let interim = match present.get(key) {
                Some(old) => stricter(old, new),
                None => *new,
            };
            if present.get(key) != Some(&interim) {
                self.put(key, &interim)?;
                written += 1;
            }
        }
        Ok(written)
    }

    /// Step 2 (see the module documentation). Returns (written, removed).
    pub fn after_swap(&mut self, desired: &BTreeMap<RateKey, RateLimit>) -> Result<(usize, usize)> {
        let present = self.current();
        let mut written = 0;
        for (key, new) in desired {
            if present.get(key) != Some(new) {
                self.put(key, new)?;
                written += 1;
            }
        }
        let mut removed = 0;
        for key in present.keys().filter(|k| !desired.contains_key(k)) {
            self.map
                .remove(key)
                .with_context(|| format!("removing {} {key:?}", maps::RATE_LIMITS))?;
            removed += 1;
        }
        Ok((written, removed))
    }

    fn put(&mut self, key: &RateKey, limit: &RateLimit) -> Result<()> {
        self.map
            .insert(key, limit, 0)
            .with_context(|| format!("writing {} {key:?}", maps::RATE_LIMITS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interim_limit_is_at_least_as_strict_as_both() {
        let loose = RateLimit::from_interval(10_000_000, 100);
        let tight = RateLimit::from_interval(100_000_000, 3);
        let mixed = RateLimit::from_interval(50_000_000, 50);
        for (a, b) in [
            (loose, tight),
            (tight, loose),
            (loose, mixed),
            (mixed, tight),
        ] {
            let s = stricter(&a, &b);
            // Whatever the bucket state, the interim admits nothing either limit refuses.
            for tat in [0u64, 1_000_000_000, 1_200_000_000, 5_000_000_000] {
                let now = 1_000_000_000;
                if s.admit(tat, now).is_some() {
                    assert!(a.admit(tat, now).is_some() && b.admit(tat, now).is_some());
                }
            }
            assert!(s.interval_ns >= a.interval_ns.max(b.interval_ns));
        }
    }
}
