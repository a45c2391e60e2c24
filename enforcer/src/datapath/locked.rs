//! Writers (and readers) of the two maps whose values carry a `bpf_spin_lock` and their own
//! key: `CGROUP_IDENTITY` and `IDENTITIES` (`enforcer_common::locked` has the argument).
//!
//! The writer's half of the protocol: every update is `BPF_F_LOCK` (an existing key's
//! element is rewritten in place under its lock, never replaced by a new element, so no
//! element a program may be reading is recycled by an update), and a key is deleted only
//! after a tombstone was written under the lock, and a new key is inserted as a tombstone
//! before its value is written in place. Reads go through the same lock and drop a
//! value whose key field is not its key (a tombstone left by an interrupted delete).
//!
//! One writer per key: a write racing another writer's tombstone-then-delete of the same
//! key could be deleted without its tombstone. The agent is the maps' only writer (its
//! state-directory lock keeps a second agent out) and writes from one thread.

use std::collections::HashMap;
use std::hash::Hash;
use std::marker::PhantomData;
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError};
use enforcer_common::locked::{LockedCgroupIdentity, LockedIdentity, BPF_F_LOCK};
use enforcer_common::IdentityInfo;

use super::tables::SyncMap;

/// `BPF_NOEXIST`: create only (`EEXIST` when the key is present).
pub(crate) const BPF_NOEXIST: u64 = 1;
/// `BPF_EXIST`: update only (`ENOENT` when the key is absent).
const BPF_F_EXIST: u64 = 2;

/// A kernel value that carries its own key: how to wrap a plain value, and unwrap it.
pub trait KeyedValue<K>: aya::Pod {
    /// What the rest of the agent reasons with (`u32` identity, [`IdentityInfo`]).
    type Plain;
    fn wrap(key: &K, plain: &Self::Plain) -> Self;
    /// Written under the lock before the key is deleted.
    fn tombstone() -> Self;
    /// The plain value, or `None` when the value is not `key`'s (a tombstone).
    fn unwrap(&self, key: &K) -> Option<Self::Plain>;
}

impl KeyedValue<u64> for LockedCgroupIdentity {
    type Plain = u32;
    fn wrap(key: &u64, identity: &u32) -> Self {
        Self::new(*key, *identity)
    }
    fn tombstone() -> Self {
        Self::tombstone()
    }
    fn unwrap(&self, key: &u64) -> Option<u32> {
        (self.cgroup == *key).then_some(self.identity)
    }
}

impl KeyedValue<u32> for LockedIdentity {
    type Plain = IdentityInfo;
    fn wrap(key: &u32, info: &IdentityInfo) -> Self {
        Self::new(*key, *info)
    }
    fn tombstone() -> Self {
        Self::tombstone()
    }
    fn unwrap(&self, key: &u32) -> Option<IdentityInfo> {
        (self.identity == *key).then_some(self.info)
    }
}

/// A pinned hash map of [`KeyedValue`]s, read and written with the protocol above.
pub struct LockedMap<K, L> {
    map: BpfHashMap<MapData, K, L>,
    _key: PhantomData<K>,
}

/// `CGROUP_IDENTITY`: cgroup id -> subject identity.
pub type CgroupIdentityMap = LockedMap<u64, LockedCgroupIdentity>;
/// `IDENTITIES`: identity -> [`IdentityInfo`].
pub type IdentitiesMap = LockedMap<u32, LockedIdentity>;

impl<K: aya::Pod + Eq + Hash, L: KeyedValue<K>> LockedMap<K, L> {
    /// Opens the map pinned as `dir/name`.
    ///
    /// Errors: no such pin, or a map of another type or layout (an older ABI).
    pub fn open(dir: &Path, name: &str) -> Result<Self> {
        let path = dir.join(name);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let map = Map::from_map_data(data)
            .with_context(|| format!("reading the type of map {}", path.display()))?;
        let map = map
            .try_into()
            .with_context(|| format!("map {name} has an unexpected type or layout"))?;
        Ok(Self {
            map,
            _key: PhantomData,
        })
    }

    /// `key`'s value, read under its lock; `None` when absent (or being deleted).
    pub fn get(&self, key: &K) -> Option<L::Plain> {
        self.map.get(key, BPF_F_LOCK).ok()?.unwrap(key)
    }

    /// The keys present (tombstones of an interrupted delete included: they are entries).
    pub fn keys(&self) -> impl Iterator<Item = Result<K, MapError>> + '_ {
        self.map.keys()
    }

    /// Writes `key`'s value in place under its lock; an absent key is first inserted as a
    /// tombstone, then written in place. Why two steps: the kernel copies a *new* element's
    /// value without the lock, and the element may be one a stale reader still holds (a key
    /// deleted and re-added reuses it at once): copying a real value there could show that
    /// reader the old key with some new fields (a flag like `TRACKED` missing relaxes
    /// enforcement). Copying a tombstone over a tombstone (every delete leaves one) shows it
    /// nothing but tombstone, and the value then lands under the lock.
    ///
    /// Errors: the map is full (a new key), or the kernel refused the write.
    pub fn write(&mut self, key: &K, value: &L::Plain) -> std::io::Result<()> {
        match self.map.insert(key, L::tombstone(), BPF_NOEXIST) {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(std::io::Error::other(e)),
        }
        self.map
            .insert(key, L::wrap(key, value), BPF_F_LOCK | BPF_F_EXIST)
            .map_err(std::io::Error::other)
    }

    /// Tombstones `key` under its lock, then deletes it. Absent keys are not an error.
    pub fn tombstone_and_delete(&mut self, key: &K) -> std::io::Result<()> {
        // The tombstone must land on the existing element (`BPF_F_EXIST`): a tombstone
        // inserted for an absent key would only be deleted again.
        match self
            .map
            .insert(key, L::tombstone(), BPF_F_LOCK | BPF_F_EXIST)
        {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(())
            }
            Err(e) => return Err(std::io::Error::other(e)),
        }
        match self.map.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

impl<K: aya::Pod + Eq + Hash, L: KeyedValue<K>> SyncMap<K, L::Plain> for LockedMap<K, L> {
    fn entries(&self) -> Result<HashMap<K, L::Plain>> {
        let mut out = HashMap::new();
        for key in self.map.keys() {
            let key = key.context("reading a map")?;
            if let Some(value) = self.get(&key) {
                out.insert(key, value);
            }
        }
        Ok(out)
    }
    fn put(&mut self, key: &K, value: &L::Plain, what: &str) -> Result<()> {
        self.write(key, value)
            .with_context(|| format!("writing {what} (is it full? see `enforcer status`)"))
    }
    fn delete(&mut self, key: &K, what: &str) -> Result<()> {
        self.tombstone_and_delete(key)
            .with_context(|| format!("removing from {what}"))
    }
}
