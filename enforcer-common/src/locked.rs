//! The values of `CGROUP_IDENTITY` and `IDENTITIES`: each carries a `bpf_spin_lock` and its
//! own key, so that a kernel program never acts on a recycled or half-written element.
//!
//! Why: a program reads a hash map value through the pointer its lookup returned, and the
//! kernel recycles a replaced or deleted element at once (the preallocated freelist and this
//! CPU's spare element; `bpf_mem_alloc` without preallocation), so without these a `decide`
//! racing the agent could read another cgroup's identity or another identity's tenant.
//!
//! The protocol (see [`LockedCgroupIdentity`] and [`LockedIdentity`]):
//! - readers (the kernel): look up, take the value's lock, copy the fields they need, release
//!   the lock; accept the copy only when its key field equals the key they looked up,
//!   otherwise treat the key as absent (unknown: fail closed);
//! - the writer (the agent): updates with `BPF_F_LOCK` only, so an existing key's element is
//!   rewritten in place under its lock and never replaced; before deleting a key it writes a
//!   tombstone (key field [`TOMBSTONE`]) under the lock; a new key is inserted as a
//!   tombstone first and only then written, in place under the lock.
//!
//! Every interleaving then yields a consistent value of the right key, or fail closed:
//! - an in-place update and a reader hold the same lock: the reader sees all old or all new;
//! - an element is recycled only after its key was deleted, i.e. after its tombstone was
//!   written under the lock. A reader that took the lock before the tombstone saw the last
//!   value of the right key (the key still existed); one that takes it after sees either the
//!   tombstone or the reuser's unlocked copy in progress (the kernel's initialisation of a
//!   new element does not take the lock). That copy is always a tombstone (new keys are
//!   inserted as tombstones), so the reader copies tombstone over tombstone: rejected. The
//!   real value of a new key is written afterwards, in place under the lock, which the
//!   reader's lock excludes. (Were a real value copied unlocked, a reader of the same key
//!   deleted and added again could mix its old tombstone with new fields, e.g. a class
//!   without the `TRACKED` flag: relaxed, not closed.)
//! - a new element taken from the freelist or the CPU's spare held a tombstone or zeroes
//!   (key field 0) before: the same argument.
//!
//! Each field is an aligned word. Should a copy split the 8-byte cgroup id, a mixture of
//! the tombstone's 0 and another id K2 is 0, K2, or K2 with one half zeroed; cgroup ids are
//! inode numbers (below 2^32 in practice), so the only such mixture equal to a real id is
//! K2 itself.
//!
//! The lock is the first field: the kernel finds it through the map's BTF (the maps are
//! BTF-defined for that), by the struct name `bpf_spin_lock`, and never copies it to or from
//! userspace (a lookup returns it zeroed).

/// `struct bpf_spin_lock` of the kernel's uapi: the name is what the verifier looks for in
/// the value's BTF. Only the kernel writes it (`bpf_spin_lock` / `BPF_F_LOCK`).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct bpf_spin_lock {
    pub val: u32,
}

/// The key field of a value being deleted: no cgroup id and no identity is 0
/// (`identity::UNKNOWN` is never stored).
pub const TOMBSTONE: u32 = 0;

/// `BPF_F_LOCK`: an update or lookup that copies the value under its `bpf_spin_lock`.
pub const BPF_F_LOCK: u64 = 4;

/// Value of `CGROUP_IDENTITY[cgroup id]`: the subject identity of the cgroup, checked by its
/// own copy of the cgroup id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockedCgroupIdentity {
    pub lock: bpf_spin_lock,
    /// The subject identity.
    pub identity: u32,
    /// The key this value was written for; 0 ([`TOMBSTONE`]) while its key is being deleted.
    pub cgroup: u64,
}

impl LockedCgroupIdentity {
    pub const fn new(cgroup: u64, identity: u32) -> Self {
        Self {
            lock: bpf_spin_lock { val: 0 },
            identity,
            cgroup,
        }
    }

    /// What is written under the lock before the key is deleted.
    pub const fn tombstone() -> Self {
        Self::new(TOMBSTONE as u64, crate::identity::UNKNOWN)
    }
}

/// Value of `IDENTITIES[identity]`: the [`crate::IdentityInfo`], checked by its own copy of
/// the identity number.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockedIdentity {
    pub lock: bpf_spin_lock,
    /// The key this value was written for; [`TOMBSTONE`] while its key is being deleted.
    pub identity: u32,
    pub info: crate::IdentityInfo,
}

impl LockedIdentity {
    pub const fn new(identity: u32, info: crate::IdentityInfo) -> Self {
        Self {
            lock: bpf_spin_lock { val: 0 },
            identity,
            info,
        }
    }

    /// What is written under the lock before the key is deleted: no tenant, in no class,
    /// quarantined (a reader that accepted it anyway would deny).
    pub const fn tombstone() -> Self {
        Self::new(
            TOMBSTONE,
            crate::IdentityInfo::new(0, crate::flags::QUARANTINED),
        )
    }
}
