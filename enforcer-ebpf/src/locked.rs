//! `CGROUP_IDENTITY` and `IDENTITIES`, read under their values' `bpf_spin_lock`.
//!
//! The kernel recycles a hash map element as soon as its key is replaced or deleted, so a
//! program reading a value field by field through its lookup's pointer could read another
//! key's value (another cgroup's identity, another identity's tenant). These two maps carry
//! a lock and their own key in each value (`enforcer_common::locked`, where the argument
//! is): a reader copies what it needs under the lock and accepts the copy only when its key
//! field is the key it looked up; anything else reads as absent, which fails closed.
//!
//! The verifier finds the lock through the map's BTF, so both maps are BTF-defined (`.maps`
//! section; the object is linked with `--btf`), pinned by name like the legacy maps.

use core::ptr::{addr_of, addr_of_mut, read_volatile};

use aya_ebpf::{
    bindings::bpf_map_type::BPF_MAP_TYPE_HASH,
    helpers::generated::{bpf_map_lookup_elem, bpf_spin_lock, bpf_spin_unlock},
    macros::btf_map,
};
use enforcer_common::{
    capacity, identity,
    locked::{LockedCgroupIdentity, LockedIdentity},
};

/// `LIBBPF_PIN_BY_NAME`: pinned under the loader's pin directory by the map's name.
const PIN_BY_NAME: usize = 1;

/// A BTF hash map definition with `pinning` (aya-ebpf 0.2.1's `btf_maps::HashMap` has no
/// pinning field). The fields are what libbpf and aya read from the BTF, never accessed.
#[repr(C)]
pub struct PinnedHashMap<K, V, const MAX_ENTRIES: usize> {
    r#type: *const [i32; BPF_MAP_TYPE_HASH as usize],
    key: *const K,
    value: *const V,
    max_entries: *const [i32; MAX_ENTRIES],
    map_flags: *const [i32; 0],
    pinning: *const [i32; PIN_BY_NAME],
}

// SAFETY: placeholder pointers that the loader reads from BTF; never dereferenced.
unsafe impl<K, V, const MAX_ENTRIES: usize> Sync for PinnedHashMap<K, V, MAX_ENTRIES> {}

impl<K, V, const MAX_ENTRIES: usize> PinnedHashMap<K, V, MAX_ENTRIES> {
    pub const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
            pinning: core::ptr::null(),
        }
    }

    /// The value's pointer, or null. Read it only under its lock.
    #[inline(always)]
    fn lookup(&self, key: &K) -> *mut V {
        // SAFETY: the map definition and the key are valid for the helper; it returns a
        // value pointer or null.
        unsafe {
            bpf_map_lookup_elem(
                core::ptr::from_ref(self).cast_mut().cast(),
                core::ptr::from_ref(key).cast(),
            )
        }
        .cast()
    }
}

/// cgroup v2 id (of the task's leaf cgroup) -> subject identity.
#[btf_map]
static CGROUP_IDENTITY: PinnedHashMap<u64, LockedCgroupIdentity, { capacity::CGROUPS as usize }> =
    PinnedHashMap::new();

/// identity -> tenant, flags, and its classes in each policy table.
#[btf_map]
static IDENTITIES: PinnedHashMap<u32, LockedIdentity, { capacity::IDENTITIES as usize }> =
    PinnedHashMap::new();

/// The subject identity of a cgroup; `None` when it has none (or its element is being
/// deleted or was recycled under the reader).
#[inline(always)]
pub fn subject_of(cgroup_id: u64) -> Option<u32> {
    let p = CGROUP_IDENTITY.lookup(&cgroup_id);
    if p.is_null() {
        return None;
    }
    // SAFETY: a non-null value pointer stays valid memory for the program's run (the element
    // may be reused, which the key check catches); no helper is called under the lock.
    let (key, subject) = unsafe {
        bpf_spin_lock(addr_of_mut!((*p).lock).cast());
        let key = read_volatile(addr_of!((*p).cgroup));
        let subject = read_volatile(addr_of!((*p).identity));
        bpf_spin_unlock(addr_of_mut!((*p).lock).cast());
        (key, subject)
    };
    (key == cgroup_id && subject != identity::UNKNOWN).then_some(subject)
}

/// The fields of an `IDENTITIES` value the programs read, copied under its lock; the class
/// slots are those of one policy table.
pub struct Identity {
    pub tenant: u32,
    pub flags: u32,
    pub subject_class: u32,
    pub destination_class: u32,
}

/// `IDENTITIES[id]` with the classes of `POLICY_B` (`slot_b`) or `POLICY_A`; `None` when the
/// identity has no entry (or its element is being deleted or was recycled under the reader).
#[inline(always)]
pub fn identity_info(id: u32, slot_b: bool) -> Option<Identity> {
    let p = IDENTITIES.lookup(&id);
    if p.is_null() {
        return None;
    }
    // SAFETY: as in `subject_of`; constant indices (the verifier checks the offsets).
    let (key, i) = unsafe {
        bpf_spin_lock(addr_of_mut!((*p).lock).cast());
        let key = read_volatile(addr_of!((*p).identity));
        let i = Identity {
            tenant: read_volatile(addr_of!((*p).info.tenant)),
            flags: read_volatile(addr_of!((*p).info.flags)),
            subject_class: if slot_b {
                read_volatile(addr_of!((*p).info.subject_class[1]))
            } else {
                read_volatile(addr_of!((*p).info.subject_class[0]))
            },
            destination_class: if slot_b {
                read_volatile(addr_of!((*p).info.destination_class[1]))
            } else {
                read_volatile(addr_of!((*p).info.destination_class[0]))
            },
        };
        bpf_spin_unlock(addr_of_mut!((*p).lock).cast());
        (key, i)
    };
    (key == id).then_some(i)
}

/// The flags of `IDENTITIES[id]` (as [`identity_info`]).
#[inline(always)]
pub fn identity_flags(id: u32) -> Option<u32> {
    identity_info(id, false).map(|i| i.flags)
}
