//! The kernel/userspace ABI of the enforcer: map names, keys, values, the deny event and the
//! named verdicts and reasons. Both sides compile this one definition, so they cannot drift.
//!
//! Every struct is `#[repr(C)]` with explicit padding fields, so that the layout is the same
//! for the BPF target and the host and no byte of a map key is left uninitialised (a hash map
//! compares keys byte for byte).
#![no_std]

pub mod locked;

/// Bumped whenever a map or struct below changes incompatibly, or what a map's contents mean
/// does (`wire::spent_slot`, `capacity::SPENT_RECENT_BITS`). Pins live in
/// `<pin root>/v<ABI_VERSION>/`, so an agent of another ABI never adopts incompatible maps.
pub const ABI_VERSION: u32 = 19;

/// Map names, as pinned under the versioned pin directory.
pub mod maps {
    pub const CGROUP_IDENTITY: &str = "CGROUP_IDENTITY";
    pub const IDENTITIES: &str = "IDENTITIES";
    /// Exact host addresses (/32, /128): one hash lookup, tried before the prefix tries.
    pub const IPCACHE_HOST_V4: &str = "IPCACHE_HOST_V4";
    pub const IPCACHE_HOST_V6: &str = "IPCACHE_HOST_V6";
    /// Shorter prefixes (subnets, CIDR ranges): longest-prefix match.
    pub const IPCACHE_V4: &str = "IPCACHE_V4";
    pub const IPCACHE_V6: &str = "IPCACHE_V6";
    pub const POLICY_A: &str = "POLICY_A";
    pub const POLICY_B: &str = "POLICY_B";
    pub const CONFIG: &str = "CONFIG";
    pub const EVENTS: &str = "EVENTS";
    pub const LOST_EVENTS: &str = "LOST_EVENTS";
    pub const VERDICTS: &str = "VERDICTS";
    /// Socket cookie -> [`crate::FlowRecord`]: the live tracked flows (plain hash: a full table
    /// refuses new tracked connects, never evicts a live record).
    pub const FLOWS: &str = "FLOWS";
    /// Flow open/close records ([`crate::FlowEvent`]): a ring buffer of their own, so that a
    /// flood of denies in `EVENTS` cannot push them out.
    pub const FLOW_EVENTS: &str = "FLOW_EVENTS";
    /// Flow events that did not fit in `FLOW_EVENTS` (per CPU).
    pub const LOST_FLOW_EVENTS: &str = "LOST_FLOW_EVENTS";
    /// The two flow-tag keys (`wire::FlowKey`): slot 0 signs and verifies, slot 1 (the
    /// previous key during a rotation) only verifies.
    pub const FLOW_KEYS: &str = "FLOW_KEYS";
    /// Tenant number -> its live `FLOWS` records (u64, kept by the kernel: added at
    /// `connect()`, taken back when the record ends).
    pub const FLOW_TENANTS: &str = "FLOW_TENANTS";
    /// One u64: how many `FLOWS` records one tenant may hold at once (0: no limit), written
    /// by the agent before it attaches the programs.
    pub const FLOW_TENANT_LIMIT: &str = "FLOW_TENANT_LIMIT";
    /// Tenant number -> records the agent deleted itself (`flows::forget`: sockets gone
    /// without their CLOSE callback), u64, written only by the agent: a tenant holds
    /// `FLOW_TENANTS - FLOW_TENANTS_FORGOTTEN` records. Two single-writer counters, because
    /// a userspace read-modify-write of the kernel's counter would race its atomic adds.
    pub const FLOW_TENANTS_FORGOTTEN: &str = "FLOW_TENANTS_FORGOTTEN";
    /// Socket storage (`BPF_MAP_TYPE_SK_STORAGE`): a connecting socket's 20-byte option
    /// (`wire::OPTION_LEN` bytes), written at `TCP_CONNECT_CB` and deleted once the
    /// connection is established; it goes with the socket, so no other socket evicts it.
    pub const WIRE_TAGS: &str = "WIRE_TAGS";
    /// Socket storage: an MPTCP socket's first subflow's cookie (u64), written at the
    /// subflow's `connect()` and read at the MPTCP socket's release, which ends a record the
    /// subflow never armed (no callback of the subflow's reaches that release).
    pub const MPTCP_FIRST_SUBFLOW: &str = "MPTCP_FIRST_SUBFLOW";
    /// Socket storage: a connected UDP socket's call (what its last connect named, where the
    /// socket was before, and the `Config::generation` and `Config::flags_revision` of its
    /// last judgment; 56 bytes), written by `connect4`/`connect6` at each UDP connect they let
    /// through; `skb_egress` judges the call again when either moves. Kernel-only.
    pub const JUDGED_DATAGRAMS: &str = "JUDGED_DATAGRAMS";
    /// `PolicyKey` {claimed identity, local destination identity, port, protocol} -> allow:
    /// the ingress allowlist compiled from the same Cedar decisions as the policy table.
    pub const INGRESS_ALLOW: &str = "INGRESS_ALLOW";
    /// `wire::PeerKey` (the SYN's 4-tuple) -> `wire::Peer`: the verified identity behind each
    /// tagged connection, from the SYN's check until the server's socket closes (LRU: only
    /// an entry whose handshake never completed is left for eviction to clear).
    pub const WIRE_PEERS: &str = "WIRE_PEERS";
    /// `wire::SpentKey` (a closed tagged connection's 4-tuple and option time) -> the option's
    /// full time in seconds: the options already used, refused if they come again within the
    /// skew (`reason::REPLAYED_TAG`).
    pub const SPENT_TAGS: &str = "SPENT_TAGS";
    /// One u64 per slot ([`crate::wire::spent_slot`] of a `wire::SpentKey`): the latest option
    /// time of any `SPENT_TAGS` entry written to that slot (raised by the kernel, never
    /// lowered; the agent only repairs it at start): a filter that spares the usual SYN the
    /// `SPENT_TAGS` lookup.
    pub const SPENT_RECENT: &str = "SPENT_RECENT";
    /// [`crate::rate::RateKey`] {subject, destination identity} -> [`crate::rate::RateLimit`]:
    /// the connection rate each subject may open to each rate-limited destination, at its
    /// current risk (written by the agent; see [`crate::rate`]).
    pub const RATE_LIMITS: &str = "RATE_LIMITS";
    /// [`crate::rate::RateKey`] -> [`crate::rate::RateBucket`]: the kernel's bucket state per
    /// pair (LRU).
    pub const RATE_BUCKETS: &str = "RATE_BUCKETS";
    /// [`crate::AggregateKey`] -> [`crate::AggregateValue`]: repeated denies of one key in
    /// one window of `Config::event_window_ns`, counted instead of reported one by one; and
    /// each workload's overflows: denies beyond its key budget, flow events beyond its flow
    /// event budget ([`crate::aggregate_flags`]).
    pub const AGGREGATE: &str = "AGGREGATE";
    /// [`crate::ContactKey`] {subject, destination} -> [`crate::FlowRecord`]: the contacts
    /// whose opened record did not fit in `FLOW_EVENTS`, kept (first record per pair) until
    /// the agent drains them, so that the learner (`--learn`) sees every contact.
    pub const FLOW_CONTACTS_MISSED: &str = "FLOW_CONTACTS_MISSED";
    /// Tenant number -> the datagram contacts (`flow_flags::DATAGRAM`) of its subjects the
    /// kernel inserted into `FLOW_CONTACTS_MISSED` (u64, atomic adds by the kernel only).
    pub const CONTACT_TENANTS: &str = "CONTACT_TENANTS";
    /// Tenant number -> those the agent drained (u64, written by the agent only; set again
    /// at its start from what the map holds): a tenant holds
    /// `CONTACT_TENANTS - CONTACT_TENANTS_DRAINED` datagram contacts, at most
    /// [`crate::capacity::CONTACTS_PER_TENANT`].
    pub const CONTACT_TENANTS_DRAINED: &str = "CONTACT_TENANTS_DRAINED";
    /// Flows' contacts that fitted neither in `FLOW_EVENTS` nor in `FLOW_CONTACTS_MISSED` (the
    /// map full, or their tenant's share of it held), per CPU. A datagram's contact is never
    /// lost: the datagram is refused instead (`reason::FLOW_TABLE_FULL`).
    pub const LOST_FLOW_CONTACTS: &str = "LOST_FLOW_CONTACTS";
    /// [`crate::AggregateBudgetKey`] {window, identity, direction} -> u64: how many `AGGREGATE`
    /// keys the workload made in that window (the per-workload key budget,
    /// `Config::event_keys_per_workload`), or how many flow events it made
    /// (`Config::flow_events_per_workload`).
    pub const AGGREGATE_BUDGET: &str = "AGGREGATE_BUDGET";
    /// Every map, in the order `enforcer status` reports them.
    pub const ALL: [&str; 34] = [
        CGROUP_IDENTITY,
        IDENTITIES,
        IPCACHE_HOST_V4,
        IPCACHE_HOST_V6,
        IPCACHE_V4,
        IPCACHE_V6,
        POLICY_A,
        POLICY_B,
        CONFIG,
        EVENTS,
        LOST_EVENTS,
        VERDICTS,
        FLOWS,
        FLOW_EVENTS,
        LOST_FLOW_EVENTS,
        FLOW_KEYS,
        FLOW_TENANTS,
        FLOW_TENANT_LIMIT,
        FLOW_TENANTS_FORGOTTEN,
        WIRE_TAGS,
        MPTCP_FIRST_SUBFLOW,
        JUDGED_DATAGRAMS,
        INGRESS_ALLOW,
        WIRE_PEERS,
        SPENT_TAGS,
        SPENT_RECENT,
        AGGREGATE,
        RATE_LIMITS,
        RATE_BUCKETS,
        FLOW_CONTACTS_MISSED,
        CONTACT_TENANTS,
        CONTACT_TENANTS_DRAINED,
        LOST_FLOW_CONTACTS,
        AGGREGATE_BUDGET,
    ];
}

/// Default capacities. Userspace may override them at load time (`EbpfLoader::set_max_entries`).
pub mod capacity {
    pub const CGROUPS: u32 = 65_536;
    pub const IDENTITIES: u32 = 65_536;
    pub const IPCACHE: u32 = 262_144;
    pub const POLICY: u32 = 262_144;
    /// Bytes; a power of two and a multiple of the page size.
    pub const EVENTS_BYTES: u32 = 1 << 20;
    /// Live tracked flows (plain hash, preallocated: ~12 MiB of 128-byte records with the
    /// kernel's per-element overhead; a full table refuses new tracked connects).
    pub const FLOWS: u32 = 65_536;
    /// Bytes of `FLOW_EVENTS`; a power of two and a multiple of the page size.
    pub const FLOW_EVENTS_BYTES: u32 = 1 << 18;
    /// Tenants with live tracked flows on one node (`FLOW_TENANTS`).
    pub const FLOW_TENANTS: u32 = 16_384;
    /// The default share of `FLOWS` one tenant may hold: a quarter, so that no one tenant can
    /// fill the table and refuse every other tenant's tracked connects.
    pub const FLOW_TENANT_SHARE_DIVISOR: u32 = 4;
    /// Verified peers of tagged connections (LRU, preallocated: ~3.8 MiB); the oldest are
    /// evicted first. A version 3 entry is also its option's spent mark while it lives (a
    /// handshake that never completed leaves one to the LRU), so this holds the options of
    /// ~550 such SYNs a second at the default 30 s skew, as `SPENT_TAGS` did when it took
    /// every SYN (ABI 13).
    pub const WIRE_PEERS: u32 = 32_768;
    /// Refused SYNs remembered so that retransmissions are not reported again (LRU).
    pub const WIRE_REPORTED: u32 = 16_384;
    /// Options already taken: the SYN of a closed connection (within the skew), and a version
    /// 3 SYN that passed while another transmission's `WIRE_PEERS` entry held its 4-tuple
    /// (LRU, preallocated: ~3.4 MiB). One is needed while its time is within the skew, up to
    /// twice the skew after it arrived, so this covers ~550 tagged connections closing a
    /// second at the default 30 s; beyond that the oldest are forgotten early (their replay
    /// then passes).
    pub const SPENT_TAGS: u32 = 32_768;
    /// Slots of `SPENT_RECENT` (u64 each: 128 KiB), `2^SPENT_RECENT_BITS`: fixed, since the
    /// slot hash ([`crate::wire::spent_slot`]) keeps that many bits.
    pub const SPENT_RECENT: u32 = 1 << SPENT_RECENT_BITS;
    pub const SPENT_RECENT_BITS: u32 = 14;
    /// (deny key, window) pairs being counted at once (plain hash, preallocated: ~2 MiB); a
    /// flooding key holds two or three. When it is full, a deny of a new key is reported on
    /// its own (count 1): never dropped.
    pub const AGGREGATE: u32 = 16_384;
    /// (window, cgroup) pairs with denies being counted at once (plain hash, ~0.6 MiB): a
    /// denying workload holds two or three. When it is full, a new pair's denies are not
    /// budgeted (aggregated as without a budget).
    pub const AGGREGATE_BUDGET: u32 = 16_384;
    /// The default of `Config::event_keys_per_workload`: distinct `AGGREGATE` keys one cgroup
    /// may make per window and direction (its own calls; SYNs to it) before its further new keys
    /// fold into its overflow keys. A workload flooding both ways holds up to 2 x 64 keys and
    /// an overflow key per (hook, reason) per window, and with the 1 s window and the agent's
    /// 500 ms sweep 2-3 windows' keys are alive at once: about 50 workloads flooding at once
    /// fill `AGGREGATE`.
    pub const AGGREGATE_KEYS_PER_WORKLOAD: u32 = 64;
    /// The default of `Config::flow_events_per_workload`: `flow.opened` events one workload
    /// may have written per aggregation window; its further flows are counted, not written
    /// (`flow_events.suppressed`). `FLOW_EVENTS` (256 KiB) holds ~1,700 events: about seven
    /// workloads at their whole budget fill it between two of the agent's reads only if the
    /// agent stalls.
    pub const FLOW_EVENTS_PER_WORKLOAD: u32 = 256;
    /// (subject, destination) pairs with a rate limit: local subjects x the rate-limited
    /// destinations they may reach.
    pub const RATE_LIMITS: u32 = 65_536;
    /// Bucket states (LRU, preallocated: ~4 MiB). Twice `RATE_LIMITS`, so that the LRU's
    /// per-CPU free lists never make it evict a live pair's bucket (which would refill it).
    pub const RATE_BUCKETS: u32 = 2 * RATE_LIMITS;
    /// Distinct (subject, destination) contacts whose opened record was lost between two
    /// drains of the agent (every 500 ms): a repeated contact takes no more room.
    pub const FLOW_CONTACTS_MISSED: u32 = 4_096;
    /// The datagram contacts one tenant's subjects may hold in `FLOW_CONTACTS_MISSED` at
    /// once: an eighth, so that one tenant's datagrams to many tracked pairs cannot take the
    /// room another tenant's contacts need (red-team review 42).
    pub const CONTACTS_PER_TENANT: u64 = FLOW_CONTACTS_MISSED as u64 / 8;
}

/// The kernel programs, by the name of their function in the object file.
pub mod programs {
    pub const CONNECT4: &str = "connect4";
    pub const CONNECT6: &str = "connect6";
    pub const SENDMSG4: &str = "sendmsg4";
    pub const SENDMSG6: &str = "sendmsg6";
    /// `cgroup/sock_create`: refuses the inet socket kinds the four hooks above cannot judge.
    pub const SOCK_CREATE: &str = "sock_create";
    /// `sockops`: follows tracked TCP flows from established to close (`flows`) and writes
    /// the identity option on the SYN of a tagged flow (`wire`).
    pub const SOCK_OPS: &str = "sock_ops";
    /// `cgroup/sock_release`: ends the records of connected UDP sockets (no TCP-like state
    /// callback follows them).
    pub const SOCK_RELEASE: &str = "sock_release";
    /// `cgroup_skb/ingress`: checks the identity option of SYNs to local destinations whose
    /// ingress mode is enforce or audit.
    pub const SKB_INGRESS: &str = "skb_ingress";
    /// `cgroup/bind4` / `cgroup/bind6`: refuse binding an address the IP cache gives another
    /// identity (so that no workload can listen in another's name).
    pub const BIND4: &str = "bind4";
    pub const BIND6: &str = "bind6";
    /// `cgroup_skb/egress`: drops packets to a loopback address that leave through a device
    /// (`reason::MARTIAN_DESTINATION`).
    pub const SKB_EGRESS: &str = "skb_egress";
    pub const ALL: [&str; 11] = [
        CONNECT4,
        CONNECT6,
        SENDMSG4,
        SENDMSG6,
        SOCK_CREATE,
        SOCK_OPS,
        SOCK_RELEASE,
        SKB_INGRESS,
        BIND4,
        BIND6,
        SKB_EGRESS,
    ];
}

/// Identity IDs. Values below `FIRST_DYNAMIC` are reserved.
pub mod identity {
    /// Never stored; what a socket of an unmanaged cgroup would be.
    pub const UNKNOWN: u32 = 0;
    /// Any address the IP cache does not know.
    pub const WORLD: u32 = 1;
    /// The node the agent runs on: its addresses as the cluster reports them (its pods'
    /// `status.hostIPs`, its `hostNetwork` pods' addresses). Cilium's reserved `host`. Never
    /// WORLD: a policy that lets a workload reach the internet must not let it reach the
    /// kubelet or any other server of the node (Cedar `Node::"host"`).
    pub const HOST: u32 = 2;
    /// An address the agent knows belongs to the cluster but to which it gave no identity: a
    /// pod it refused (a namespace without a tenant where one is required, an undeclared
    /// tenant, a quota hit), an address two owners claim, a Service over its tenant's quota.
    /// Never WORLD (a policy that lets a workload reach the internet must not let it reach
    /// these): no policy entry ever names it, so every call to it is denied, reason
    /// `reason::UNIDENTIFIED_DESTINATION`.
    pub const UNIDENTIFIED: u32 = 3;
    /// The agent's own cgroup, when it lies inside the enforced subtree (a DaemonSet pod under
    /// `kubepods`): its `IDENTITIES` entry carries `flags::EXEMPT`, so the agent always
    /// reaches the API server and the PDP it learns everything else from.
    pub const AGENT: u32 = 4;
    /// Every other node of the cluster, by the same addresses: Cilium's reserved
    /// `remote-node` (Cedar `Node::"remote-node"`).
    pub const REMOTE_NODE: u32 = 5;
    pub const FIRST_DYNAMIC: u32 = 256;
}

/// Bits of [`IdentityInfo::flags`].
pub mod flags {
    /// Every connection of this subject is denied with reason `quarantined`.
    pub const QUARANTINED: u32 = 1 << 0;
    /// A vector database: flows to it are tagged by sock_ops.
    pub const VECTOR_DB: u32 = 1 << 1;
    /// Would-deny calls of this subject pass and are reported as `audit`.
    pub const AUDIT: u32 = 1 << 2;
    /// Calls of this subject are never judged (allowed, counted, no event): set only on
    /// `identity::AGENT`.
    pub const EXEMPT: u32 = 1 << 3;
    /// A tracked destination (kind `vector_db`, or `track: true` in the inventory): every
    /// allowed TCP or connected-UDP flow to it gets a `FLOWS` record.
    pub const TRACKED: u32 = 1 << 4;
    /// Ingress mode `enforce` (inventory `ingress: enforce`): SYNs to this destination without
    /// a valid identity option, or from an identity the allowlist does not name, are dropped.
    pub const INGRESS_ENFORCE: u32 = 1 << 5;
    /// Ingress mode `audit`: the same checks, reported as `audit`, nothing dropped.
    pub const INGRESS_AUDIT: u32 = 1 << 6;
    /// A Kubernetes Service: its addresses are virtual (kube-proxy translates them to a
    /// backend's before any socket sees them), so no socket of its own answers them and the
    /// address rules of `reason::FOREIGN_ADDRESS` do not apply to them (a Service's
    /// `externalIPs` may name a pod's or the node's address: refusing that address's own
    /// sockets would hand any tenant a way to cut another off).
    pub const SERVICE: u32 = 1 << 7;
    /// A Kubernetes workload (a label set) whose addresses are pod IPs: each lives in its
    /// pod's own network namespace (a `hostNetwork` pod has no address of its own), where no
    /// other identity's socket can bind or answer it, so the address rules of
    /// `reason::FOREIGN_ADDRESS` are not needed, and are left out: a recycled pod IP that the
    /// IP cache still gives the old pod's identity must not cost the new pod its binds and
    /// SYNs.
    pub const OWN_NETNS: u32 = 1 << 8;
    /// A workload of this node whose servers share the node's network namespace (an
    /// inventory workload with cgroups here, a label set with a `hostNetwork` pod here):
    /// callers reach its wildcard listeners through addresses nobody holds (the node's,
    /// `127.0.0.1`), which `skb_ingress` judges again as caller -> listener. It is a
    /// destination even without addresses of its own (it has a column in the policy table),
    /// and `INGRESS_ALLOW` holds the row to it of every workload with no row in this node's
    /// table (a pod of another node), so that such a caller is judged too.
    pub const SHARED_NETNS: u32 = 1 << 9;
    /// A workload (a Cedar `Workload`: an inventory workload or a Kubernetes label set), not
    /// an endpoint, a Service or a reserved identity: only a workload's address names a
    /// caller that a policy can judge (the schema makes only workloads principals).
    pub const WORKLOAD: u32 = 1 << 10;
    /// Flows to a destination with any of these flags carry the identity option.
    pub const TAGGED: u32 = TRACKED | VECTOR_DB | INGRESS_ENFORCE | INGRESS_AUDIT;

    /// Each flag and its name in the CLI's output (`policy explain`), lowest bit first.
    pub const NAMES: [(u32, &str); 11] = [
        (QUARANTINED, "quarantined"),
        (VECTOR_DB, "vector_db"),
        (AUDIT, "audit"),
        (EXEMPT, "exempt"),
        (TRACKED, "tracked"),
        (INGRESS_ENFORCE, "ingress_enforce"),
        (INGRESS_AUDIT, "ingress_audit"),
        (SERVICE, "service"),
        (OWN_NETNS, "own_netns"),
        (SHARED_NETNS, "shared_netns"),
        (WORKLOAD, "workload"),
    ];
}

/// What the kernel did with a call.
pub mod verdict {
    pub const ALLOW: u8 = 0;
    pub const DENY: u8 = 1;
    /// Would have been denied, let through because of audit mode.
    pub const AUDIT: u8 = 2;
    pub const COUNT: usize = 3;
}

/// Why. `ALLOWED` goes with `verdict::ALLOW`, the others with `DENY` or `AUDIT`.
pub mod reason {
    pub const ALLOWED: u8 = 0;
    /// The socket's cgroup is inside the enforced subtree but maps to no identity.
    pub const UNKNOWN_SUBJECT: u8 = 1;
    pub const QUARANTINED: u8 = 2;
    /// No permit, and the two identities belong to different tenants.
    pub const TENANT_MISMATCH: u8 = 3;
    /// No permit, same tenant (or the destination has none, like WORLD).
    pub const NO_PERMIT: u8 = 4;
    /// The destination is the unspecified address (0.0.0.0, ::ffff:0.0.0.0) and the kernel
    /// would pick the real one from state the hook cannot see (a device chosen with
    /// `IP_UNICAST_IF` / `IP_PKTINFO` / `SO_BINDTODEVICE`, or a socket bound to a broadcast or
    /// multicast address): the call is refused rather than judged on a guess.
    pub const UNSPECIFIED_DESTINATION: u8 = 5;
    /// `sock_create`: an inet socket the connect/sendmsg hooks cannot judge (ICMP "ping"
    /// datagram, raw, or any protocol other than TCP, MPTCP and UDP).
    pub const UNSUPPORTED_SOCKET: u8 = 6;
    /// The destination is `identity::UNIDENTIFIED`: an address of the cluster that the agent
    /// refused to identify (see there).
    pub const UNIDENTIFIED_DESTINATION: u8 = 7;
    /// `ingress`: a SYN from an address the IP cache knows as a cluster identity (not WORLD)
    /// carries no identity option.
    pub const MISSING_TAG: u8 = 8;
    /// `ingress`: the identity option's tag verifies with neither flow key (forged, or signed
    /// with a key that is no longer valid).
    pub const BAD_TAG: u8 = 9;
    /// `ingress`: the claimed (verified) identity, or WORLD for an untagged peer outside the
    /// cluster, is not in the destination's ingress allowlist for this port.
    pub const NOT_ALLOWED: u8 = 10;
    /// `connect`: the call is allowed to a tracked destination but `FLOWS` is full, or the
    /// subject's tenant holds its whole share of it (`FLOW_TENANT_LIMIT`), so the flow could
    /// not be recorded (and could never be revoked): refused, fail closed.
    /// `sendmsg`: a datagram to a tracked destination whose contact could not be kept for the
    /// learner (`FLOW_CONTACTS_MISSED` is full, or the subject's tenant holds its share of
    /// it, [`crate::capacity::CONTACTS_PER_TENANT`]): it would reach its dataset unseen.
    pub const FLOW_TABLE_FULL: u8 = 11;
    /// `connect`: the call is allowed, but the subject has used up its connection budget to
    /// this destination (`RATE_LIMITS`, see [`crate::rate`]). Audit mode lets it through as
    /// `audit` (uncharged), like any would-deny.
    pub const RATE_LIMITED: u8 = 12;
    /// `ingress`: the identity option's tag verifies, but its timestamp is outside the
    /// accepted skew of this node's clock (a replayed SYN, or a sender whose clock is off), or
    /// it is a version 1 option (no timestamp) outside the configured grace. See
    /// [`wire::fresh`].
    pub const STALE_TAG: u8 = 13;
    /// `ingress`: the identity option verifies and is fresh, but this very option (4-tuple
    /// and time) was already taken here (version 3: by an earlier SYN that passed; version 2:
    /// by a connection accepted here that has closed): the SYN is a copy (a replay within the
    /// skew, e.g. by the pod that got the sender's IP, or a duplicate). See `SPENT_TAGS`.
    pub const REPLAYED_TAG: u8 = 14;
    /// The address belongs to another identity: the IP cache holds it as an exact (host)
    /// address of a workload or endpoint (an identity from `identity::FIRST_DYNAMIC` on,
    /// neither `flags::SERVICE` nor `flags::OWN_NETNS`) other than the caller's.
    /// `bind4`/`bind6`: the socket would receive what callers send to that identity (the
    /// event's `destination` is the owner, `dport` the port). `sendmsg4`/`sendmsg6`: a
    /// datagram whose source (`IP_PKTINFO`) is another identity's address. `ingress`: a SYN to
    /// another identity's address reached a socket of this cgroup (a wildcard listener in a
    /// shared network namespace): `destination` is the address's owner, `cgroup_id` the
    /// listener's.
    pub const FOREIGN_ADDRESS: u8 = 15;
    /// `egress`: a packet to a loopback address (`127.0.0.0/8`, `::1`) leaving its network
    /// namespace through a device, not `lo`: a "martian destination" (RFC 1812 5.3.7), which
    /// a node's `route_localnet` (set by kube-proxy) delivers to the node's own loopback
    /// servers (CVE-2020-8558). A socket bound to a device after its connect was judged
    /// (`SO_BINDTODEVICE`, a TCP Fast Open connect whose SYN waits for the first send), a
    /// datagram's `IP_PKTINFO` interface or a route can send it so. Also a packet of a socket
    /// connected to a loopback address that leaves through a device for another address (its
    /// namespace's own `DNAT`, with `NET_ADMIN`, rewrote an allowed loopback connect). Never
    /// softened but by global audit.
    pub const MARTIAN_DESTINATION: u8 = 16;
    pub const COUNT: usize = 17;
}

/// The hook that decided.
pub mod hook {
    pub const CONNECT4: u8 = 0;
    pub const CONNECT6: u8 = 1;
    pub const SENDMSG4: u8 = 2;
    pub const SENDMSG6: u8 = 3;
    /// `cgroup/sock_create`: the event has no destination (`daddr` zero) but the socket's
    /// `sock_type` and `sock_protocol`.
    pub const SOCK_CREATE: u8 = 4;
    /// `cgroup_skb/ingress`: a SYN arriving at a local destination. `subject` is the claimed
    /// identity (verified or not; for an untagged SYN, the source address's IP-cache identity),
    /// `destination`/`daddr`/`dport` the local end, `cgroup_id` the listener's cgroup,
    /// `pid_tgid` 0 and `comm` empty (no task: softirq), the peer's address in
    /// [`DenyEvent::peer`] and its port in `sock_type`.
    pub const INGRESS: u8 = 5;
    /// `cgroup/bind4` / `cgroup/bind6`: a `bind()` to an address another identity owns (see
    /// `reason::FOREIGN_ADDRESS`); `dport` is the port being bound (0: any).
    pub const BIND4: u8 = 6;
    pub const BIND6: u8 = 7;
    /// `cgroup_skb/egress`: a packet leaving a socket of the subtree (see
    /// `reason::MARTIAN_DESTINATION`); `cgroup_id` the socket's, `pid_tgid` 0 and `comm`
    /// empty, `dport` the TCP/UDP destination port (0 for other protocols), the source
    /// address in [`DenyEvent::peer`].
    pub const EGRESS: u8 = 8;
    pub const COUNT: usize = 9;
}

/// IP protocol numbers as the kernel reports them in `bpf_sock_addr.protocol`.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// [`FlowRecord::state`] values.
pub mod flow_state {
    /// Recorded at `connect()`; TCP: the handshake has not completed yet.
    pub const CONNECTING: u8 = 0;
    /// TCP: established (`sock_ops` filled the local address). Connected UDP records stay
    /// `CONNECTING`: no kernel callback follows them after `connect()`.
    pub const ESTABLISHED: u8 = 1;
}

/// Bits of [`FlowRecord::flags`].
pub mod flow_flags {
    /// The peer's FIN was received (the socket went through CLOSE_WAIT or CLOSING): it counts
    /// one in `bytes_received`, which userspace subtracts.
    pub const FIN_IN: u8 = 1 << 0;
    /// The connect ran the IPv6 hook (`connect6`): the socket is AF_INET6 (an IPv4-mapped
    /// destination has `family` 4 but an IPv6 socket). Clear does not mean AF_INET: an IPv6
    /// UDP socket connected with a `sockaddr_in` runs `connect4` (red-team review 68 I1), so
    /// the agent reads no socket's family from it (its `SOCK_DESTROY` and socket lookups try
    /// both families for an IPv4 flow).
    pub const SOCK_V6: u8 = 1 << 1;
    /// The flow's opened event was not written: its workload was over its flow event budget
    /// (`Config::flow_events_per_workload`). Its closed event is not written either, only
    /// counted (`aggregate_flags::FLOW_CLOSED`): the SOC sees pairs, or counts.
    pub const UNREPORTED: u8 = 1 << 2;
    /// TCP: the record holds this connect's identity option (`wire_stamp`), set by
    /// `sock_ops` at `TCP_CONNECT_CB`; the write callback tags a SYN from a record only with
    /// it.
    pub const WIRE_OPTION: u8 = 1 << 3;
    /// TCP: the socket asked for state callbacks (`sock_ops` at `TCP_CONNECT_CB`, when the
    /// SYN goes out), which end its record at CLOSE. A record without it at the socket's
    /// release never gets one (a `TCP_FASTOPEN_CONNECT` connect defers its SYN to the first
    /// write; closed before any, its socket leaves SYN_SENT for CLOSE with no callback) and
    /// ends there.
    pub const ARMED: u8 = 1 << 4;
    /// UDP: the socket's `connect()` hook ended or replaced an earlier flow of this socket
    /// (it connected again, elsewhere). The kernel makes a connect only after the hook and
    /// may refuse it (a broadcast address without `SO_BROADCAST`, no route, `::ffff:` on an
    /// IPv6-only socket), leaving the socket connected where it was, which the record keeps
    /// (`peer`, read from the socket): before it re-decides such a flow, the agent reads
    /// where the socket is (`sock_diag`), and looks whether it is still there when that
    /// listing cannot say.
    pub const CONNECTED_AGAIN: u8 = 1 << 5;
    /// UDP: the flow ended when the socket connected to an untracked destination (its closed
    /// event is written then); the record stays, with `CONNECTED_AGAIN`, so that the agent
    /// still finds the socket if the kernel refused that connect. Ended without an event at
    /// the socket's release or next connect.
    pub const ENDED: u8 = 1 << 6;
    /// Only in `FLOW_CONTACTS_MISSED`: the contact of a datagram naming a tracked destination
    /// (`sendmsg4`/`sendmsg6`), not of a flow: no socket of a flow to name, and no lost
    /// `flow.opened` behind it.
    pub const DATAGRAM: u8 = 1 << 7;
}

/// Bits of [`FlowRecord::marks`].
pub mod flow_marks {
    /// The destination is a Kubernetes Service (`flags::SERVICE`, tracked because a backend
    /// is): the flow gets no identity option, whose tag covers the ClusterIP 4-tuple the
    /// caller sees, which no backend does after kube-proxy's translation (it would fail
    /// there as a forged tag).
    pub const UNTAGGED: u8 = 1 << 0;
}

/// [`FlowEvent::kind`] values.
pub mod flow_event {
    /// TCP: the handshake completed; connected UDP: `connect()` was allowed.
    pub const OPENED: u8 = 0;
    /// TCP: the socket reached CLOSE (`bytes_*` and `last_state` are set); connected UDP: the
    /// socket was released (closed by its last owner; no byte counts).
    pub const CLOSED: u8 = 1;
}

/// TCP states (`include/net/tcp_states.h`), as `sock_ops` reports them.
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
}

/// Index into the per-CPU `VERDICTS` array: one counter per (hook, verdict, reason), so that
/// the metrics can say which hook decided (`enforcer_verdicts_total{hook=...}`).
#[inline(always)]
pub const fn verdict_counter_index(hook: u8, verdict: u8, reason: u8) -> u32 {
    (hook as u32 * verdict::COUNT as u32 + verdict as u32) * reason::COUNT as u32 + reason as u32
}
pub const VERDICT_COUNTERS: u32 = (hook::COUNT * verdict::COUNT * reason::COUNT) as u32;

/// Value of `IDENTITIES[identity]`.
///
/// The policy tables are keyed by *classes*, not identities: identities whose rows (as
/// subjects) or columns (as destinations) are equal in a table share one class, so a table
/// holds one entry per (subject class, destination class, port) instead of one per identity
/// pair. A class number is the smallest identity id of the class (so a class table is the
/// subset of the identity-keyed table whose subject and destination are the smallest of
/// their classes); [`NO_CLASS`] means "no entry names this identity": every call is denied.
/// Each table has its own classes: slot 0 goes with `POLICY_A`, slot 1 with `POLICY_B`, and
/// the kernel reads the slot of the table it reads, so a table and its class numbers change
/// together on the one write that flips `Config::generation`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityInfo {
    /// Tenant number: a hash of the tenant's name (`enforcer_policy::cluster::tenant_number`),
    /// the same on every node; 0 = no tenant (WORLD, HOST, UNIDENTIFIED, AGENT).
    pub tenant: u32,
    /// `flags::*`.
    pub flags: u32,
    /// The identity's subject class in `POLICY_A` (index 0) and `POLICY_B` (index 1).
    pub subject_class: [u32; 2],
    /// The identity's destination class in `POLICY_A` and `POLICY_B`.
    pub destination_class: [u32; 2],
}

/// The class of an identity no table entry names (identity 0, `identity::UNKNOWN`, is never
/// a class's smallest member): nothing is keyed by it, so its calls are denied.
pub const NO_CLASS: u32 = 0;

impl IdentityInfo {
    /// An identity with a tenant and flags, in no class of either table yet.
    pub const fn new(tenant: u32, flags: u32) -> Self {
        Self {
            tenant,
            flags,
            subject_class: [NO_CLASS; 2],
            destination_class: [NO_CLASS; 2],
        }
    }

    /// The same identity with the class slots of `classes` (what a write of tenant or flags
    /// keeps: only a table swap changes classes).
    pub const fn with_classes_of(self, classes: &IdentityInfo) -> Self {
        Self {
            subject_class: classes.subject_class,
            destination_class: classes.destination_class,
            ..self
        }
    }

    /// Equal tenant and flags (what the identity is, whatever its classes).
    pub const fn same_identity(&self, other: &IdentityInfo) -> bool {
        self.tenant == other.tenant && self.flags == other.flags
    }
}

/// Key of `POLICY_A` / `POLICY_B`: `subject` and `destination` are classes (see
/// [`IdentityInfo`]); userspace reasons about the same keys with identity ids, and a class
/// table is the identity-keyed table restricted to each class's smallest member. The kernel looks up the exact port first: an entry there
/// decides by its [`PolicyValue::verdict`]. Otherwise the any-port entry (`dport` 0), which is
/// always an allow. No entry at all means deny.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub subject: u32,
    pub destination: u32,
    /// Destination port in host byte order; 0 = any port.
    pub dport: u16,
    /// `proto::TCP` or `proto::UDP`.
    pub protocol: u8,
    /// Always zero: hash keys compare every byte.
    pub _pad: u8,
}

/// [`PolicyValue::verdict`] values.
pub mod entry {
    /// The cell is allowed.
    pub const ALLOW: u8 = 0;
    /// An exact-port exception under an any-port allow: this port is denied although the
    /// destination's other ports are allowed (a policy that reads `context.port` on a
    /// destination that declares no ports). Never stored with `dport` 0.
    pub const DENY: u8 = 1;
}

/// Value of `POLICY_A` / `POLICY_B`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    /// Userspace's number for the Cedar policy that decided the cell (for `explain`): the
    /// first determining permit of an allow, the first forbid of a deny exception.
    pub rule: u32,
    /// `entry::ALLOW` or `entry::DENY`.
    pub verdict: u8,
    /// Always zero.
    pub _pad: [u8; 3],
}

impl PolicyValue {
    /// An allow entry decided by `rule`.
    pub const fn allow(rule: u32) -> Self {
        Self {
            rule,
            verdict: entry::ALLOW,
            _pad: [0; 3],
        }
    }
    /// A deny exception decided by `rule`.
    pub const fn deny(rule: u32) -> Self {
        Self {
            rule,
            verdict: entry::DENY,
            _pad: [0; 3],
        }
    }
    pub const fn is_allow(&self) -> bool {
        self.verdict == entry::ALLOW
    }
}

/// The single entry of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Which policy table is active: 0 = `POLICY_A`, 1 = `POLICY_B`. Always equal to
    /// `generation & 1`, which is what the programs read (one load, never torn); kept for
    /// `enforcer status`.
    pub active_policy: u32,
    /// Non-zero: global audit mode.
    pub audit: u32,
    /// Advanced by userspace on every policy change, each a table swap: +1 (its parity names
    /// the active table, and the identities' class slot of that table). The kernel copies it
    /// into each event so that the event is explained by the policy that decided it.
    pub generation: u64,
    /// Nanoseconds of a deny-aggregation window (`--events-aggregate`); 0 = every deny is
    /// reported on its own. See [`AggregateValue`].
    pub event_window_ns: u64,
    /// Seconds an identity option's timestamp may differ from this node's wall clock, either
    /// way (`--wire-max-skew`, default [`wire::DEFAULT_SKEW_S`]); see [`wire::fresh`]. 0 means
    /// the default, so that a zeroed entry never refuses every option.
    pub wire_skew_s: u32,
    /// Until this wall-clock second (POSIX, the option's clock: see [`wire::seconds`]), version 1
    /// options (no timestamp) are still accepted
    /// (`--wire-accept-v1-until`, for a rolling upgrade); 0 = refused.
    pub wire_v1_until_s: u32,
    /// Distinct `AGGREGATE` keys one cgroup may make per window (`--events-keys-per-workload`);
    /// a deny of a further new key is counted under the cgroup's overflow key
    /// ([`aggregate_flags::OVERFLOW`]). 0 = no budget.
    pub event_keys_per_workload: u32,
    /// CLOCK_TAI minus CLOCK_REALTIME in whole seconds: the kernel's TAI offset, as the agent reads it
    /// (refreshed every tick: a time daemon may set the kernel's TAI offset after boot); the
    /// identity option's time is CLOCK_TAI less this ([`wire::seconds`]).
    pub tai_offset_s: u32,
    /// `flow.opened` events one workload identity may have written per window of
    /// `event_window_ns` (`--flow-events-per-workload`); its further flows are counted under
    /// its flow overflow keys ([`aggregate_flags::FLOW_EVENTS`]) and not written, nor are
    /// their closed events. 0, or aggregation off (`event_window_ns` 0) = no budget.
    pub flow_events_per_workload: u32,
    /// How some subjects' rate limits are shared ([`rate::sharing`]; the kind is for people,
    /// the kernel reads zero or not): when not [`rate::SHARING_NONE`], a pair without its own
    /// `RATE_LIMITS` entry is looked up again under its tenant's shared key, then under the
    /// destination's key shared across tenants, whichever kind the agent wrote (during a
    /// change, both may hold). [`rate::SHARING_NONE`] (the usual case) spares every unlimited
    /// connect those lookups.
    pub rate_shared: u32,
    /// The cookie of the node's network namespace (the agent's own: it runs with
    /// `hostNetwork`), as `SO_NETNS_COOKIE` (Linux 5.14) and `bpf_get_netns_cookie` give it:
    /// a pod's socket outside it that dials loopback reaches its own pod, no other workload
    /// (see the kernel's `outside_node_netns`). 0 = not known: loopback is judged as any
    /// address.
    pub node_netns_cookie: u64,
    /// Advanced (wrapping) by userspace each time it changes what a judgment reads outside a
    /// policy change, which leaves `generation` as it is: an identity's flags (a quarantine set
    /// or lifted by hand, by `risk` or by a step-up, written to `IDENTITIES` alone), a cgroup
    /// leaving its identity (the cgroup map's resync). A connected UDP socket's judgment is
    /// kept per socket under (`generation`, this) by `skb_egress`, and made again when either
    /// moves.
    pub flags_revision: u32,
    /// Non-zero (`enforcer run --socket-lb`): a socket load balancer rewrites connects after
    /// the enforcer's hooks, so a connected UDP socket elsewhere than the Kubernetes Service
    /// its connect named (and than where it was before) is taken as at one of its backends,
    /// and judged as that Service. Zero: it is judged where it is.
    pub socket_lb: u32,
}

/// One denied (or audited) call, as written to the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenyEvent {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub timestamp_ns: u64,
    pub cgroup_id: u64,
    /// `bpf_get_current_pid_tgid()`: tgid in the upper 32 bits.
    pub pid_tgid: u64,
    pub subject: u32,
    pub destination: u32,
    /// IPv4 in the first 4 bytes (network order), or the IPv6 address.
    pub daddr: [u8; 16],
    /// Host byte order.
    pub dport: u16,
    /// 4 or 6: how `daddr` is to be read (an IPv4-mapped IPv6 connect reports 4); for
    /// `sock_create`, the socket's family.
    pub family: u8,
    pub protocol: u8,
    pub hook: u8,
    pub verdict: u8,
    pub reason: u8,
    pub _pad: u8,
    pub comm: [u8; 16],
    /// `Config::generation` (low 32 bits) when the call was decided: userspace explains the
    /// event with the policy revision that was in force then, not the one in force when it
    /// reads the ring buffer.
    pub policy_generation: u32,
    /// `sock_create` events: the socket's type (`SOCK_DGRAM` 2, `SOCK_RAW` 3, ...) and
    /// protocol number (which need not fit `protocol`: MPTCP is 262). Zero for the other hooks.
    pub sock_type: u16,
    pub sock_protocol: u16,
    /// `hook::INGRESS` only: the peer's (the SYN's source) address, in the form of `daddr`
    /// (same `family`). Zero for the other hooks.
    pub peer: [u8; 16],
    /// How many denies this event stands for: 1 for a deny reported as it happened, N for
    /// the summary of N denies of one [`AggregateKey`] that were counted, not reported,
    /// within a window (userspace builds those from `AGGREGATE`; the kernel writes 1).
    pub count: u32,
    /// Always zero.
    pub _pad2: u32,
}

impl DenyEvent {
    pub const SIZE: usize = core::mem::size_of::<DenyEvent>();
}

/// Key of `AGGREGATE`: what makes two denies "the same" for aggregation, and the window they
/// fell in. Every field of the event except the time, the task (`pid_tgid`, `comm`), the
/// policy generation and, for `hook::INGRESS`, the peer's port: a loop of `connect()` to one
/// denied address, or SYNs from one peer, is one key per window. Address words as in
/// [`DenyEvent::daddr`] (memory order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AggregateKey {
    /// `bpf_ktime_get_ns() / Config::event_window_ns`: windows are a fixed grid of the
    /// monotonic clock, so an entry is only ever written during its own window.
    pub window: u64,
    pub cgroup_id: u64,
    pub subject: u32,
    pub destination: u32,
    pub daddr: [u32; 4],
    pub peer: [u32; 4],
    /// Host byte order.
    pub dport: u16,
    /// `sock_create` only (zero for ingress, whose `DenyEvent::sock_type` is the peer port).
    pub sock_type: u16,
    pub sock_protocol: u16,
    pub family: u8,
    pub protocol: u8,
    pub hook: u8,
    pub verdict: u8,
    pub reason: u8,
    /// [`aggregate_flags`]: 0 for a deny's own key.
    pub flags: u8,
    /// Always zero: hash keys compare every byte (explicit up to the struct's 8-byte
    /// alignment, so that no byte of the key is left uninitialised on the BPF stack).
    pub _pad: [u8; 4],
}

/// Bits of [`AggregateKey::flags`].
pub mod aggregate_flags {
    /// The workload's overflow key of the window: the denies of keys beyond its identity's
    /// budget (`Config::event_keys_per_workload`), all counted (none reported at once). Only
    /// `window`, `subject` (for ingress, the destination), `hook`, `verdict`, `reason` and,
    /// except for ingress, `destination` (the identity) and `protocol` are set; `cgroup_id`,
    /// addresses, ports and family are zero.
    pub const OVERFLOW: u8 = 1 << 0;
    /// With `OVERFLOW`: the workload's flow events beyond its flow event budget
    /// (`Config::flow_events_per_workload`), counted and not written: `flow.opened` events,
    /// or with `FLOW_CLOSED` the `flow.closed` events of those flows. Only `window`,
    /// `subject`, `protocol` (the flows') and `flags` are set.
    pub const FLOW_EVENTS: u8 = 1 << 1;
    /// See `FLOW_EVENTS`.
    pub const FLOW_CLOSED: u8 = 1 << 2;
}

/// [`AggregateBudgetKey::direction`] values: the budgets one workload has per window.
pub mod budget_direction {
    /// New `AGGREGATE` keys of its own denied calls.
    pub const OUTBOUND: u32 = 0;
    /// New `AGGREGATE` keys of SYNs denied at it (`hook::INGRESS`).
    pub const INBOUND: u32 = 1;
    /// Its `flow.opened` events (`Config::flow_events_per_workload`).
    pub const FLOW_EVENTS: u32 = 2;
}

/// Key of `AGGREGATE_BUDGET`: one workload's budget of one kind in one window (as
/// [`AggregateKey::window`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AggregateBudgetKey {
    pub window: u64,
    /// The workload's identity: the subject of its own calls, the destination of SYNs to
    /// it. Not its cgroup: a pod that may create cgroups (a delegated subtree) would get a
    /// budget per cgroup it made, and with them fill `AGGREGATE` for everyone.
    pub identity: u32,
    /// [`budget_direction`]: `INBOUND` for the ingress hook (denied SYNs *to* the workload,
    /// keyed by peer), `OUTBOUND` for the workload's own calls: two budgets, so that peers
    /// flooding a server with (spoofable) SYNs cannot push the server workload's own denies
    /// into its overflow key, nor the workload's own junk denies hide the peers.
    /// `FLOW_EVENTS`: the count of its `flow.opened` events, a budget of its own.
    pub direction: u32,
}

/// Value of `AGGREGATE`.
///
/// The kernel, for a deny of key K in window W, when aggregation is on: no entry (K, W) yet:
/// inserts one and reports the deny at once (count 1); an entry: adds 1 to its `suppressed`
/// (atomic: two CPUs may hit one key), reports nothing. A full map: the deny is reported on
/// its own (never dropped); a first deny whose ring-buffer reserve fails is added to
/// `suppressed` instead of being lost.
///
/// The agent reports each entry once its window has been over for a whole window (one event,
/// `count` = `suppressed`) and deletes it. The kernel never writes an entry after its window,
/// so the agent's read is final: an add could only come from a program invocation that read
/// the clock inside the window and stalled for more than a window before adding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AggregateValue {
    /// Denies of the window counted and not reported by the kernel.
    pub suppressed: u64,
    /// The task of the window's first deny (a summary names it).
    pub pid_tgid: u64,
    /// The cgroup of the window's first deny. An overflow key has none (it is per workload),
    /// and a `@quarantine` deny counted there must still name a cgroup: the quarantine
    /// holds it, so a pod relabelled before the summary is read takes the quarantine along.
    pub cgroup_id: u64,
    pub comm: [u8; 16],
    /// `Config::generation` (low 32 bits) of that deny.
    pub policy_generation: u32,
    /// Always zero.
    pub _pad: u32,
}

/// Value of `FLOWS[socket cookie]`: one tracked flow, written by `connect4`/`connect6` when
/// they allow a TCP or connected-UDP call to a [`flags::TRACKED`] destination, completed by
/// `sock_ops` at ACTIVE_ESTABLISHED and deleted by it at TCP_CLOSE.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowRecord {
    /// `bpf_ktime_get_ns()` at `connect()`: CLOCK_MONOTONIC nanoseconds.
    pub start_ns: u64,
    /// The connecting task's cgroup and `pid_tgid` (tgid in the upper 32 bits).
    pub cgroup_id: u64,
    pub pid_tgid: u64,
    pub subject: u32,
    pub destination: u32,
    /// Local address, as `daddr` in the family of `peer` (`peer_family`); zero until the TCP
    /// handshake completes (and for UDP).
    pub saddr: [u8; 16],
    /// IPv4 in the first 4 bytes (network order), or the IPv6 address: the address judged at
    /// `connect()` (and re-judged by the agent after a change).
    pub daddr: [u8; 16],
    /// Host byte order; `sport` zero until known (as `saddr`).
    pub sport: u16,
    pub dport: u16,
    /// 4 or 6: how the addresses are to be read (an IPv4-mapped destination reports 4).
    pub family: u8,
    /// `proto::TCP` or `proto::UDP`.
    pub protocol: u8,
    /// `flow_state::*`.
    pub state: u8,
    /// `flow_flags::*`.
    pub flags: u8,
    /// `Config::generation` (low 32 bits) of the policy that allowed the connect.
    pub policy_generation: u32,
    /// The subject's tenant number (`IdentityInfo::tenant`): the share of `FLOWS` this
    /// record counts against (`FLOW_TENANTS`).
    pub tenant: u32,
    /// `bpf_get_netns_cookie` of the socket at `connect()`: the network namespace the
    /// agent must be in to reset the flow (`SO_NETNS_COOKIE` on a socket it creates there
    /// tells it that it is).
    pub netns_cookie: u64,
    /// The connecting task's `comm`, NUL-padded.
    pub comm: [u8; 16],
    /// TCP: the identity option's time field ([`wire::stamp`]) for the flow's next SYN
    /// transmission to go past, when the option lives here: set by `sock_ops` at
    /// `TCP_CONNECT_CB` (one second before now, or the socket's last SYN's time if later),
    /// then the time each SYN carried. The option of a tracked flow lives here rather than in
    /// socket storage, whose allocation (two `kzalloc`s) was the dearest step of a tracked
    /// `connect()`; it is in socket storage when the socket has storage already or the record
    /// may not be this connect's (then this stays 0). Flow events carry it; userspace
    /// ignores it. UDP: how many times the socket's connect hooks moved or ended its flow
    /// (wrapping), which tells the agent a record written again from one it has looked at
    /// (`flow_flags::CONNECTED_AGAIN`).
    pub wire_stamp: u16,
    /// TCP, from the handshake's end: the port (host order) and address (as `daddr`) the
    /// socket is connected to, which `SOCK_DESTROY` must name. They differ from `dport` and
    /// `daddr` when a socket load balancer's `connect4` (Cilium's, Calico's) rewrote a
    /// Service address to a backend's after the judgement, also of the other family (an IPv6
    /// Service's backend at `::ffff:a.b.c.d`). `peer_port` 0: not known (a handshake not
    /// completed): use `daddr`. UDP, marked `flow_flags::CONNECTED_AGAIN`: where the socket
    /// was connected before the connect that wrote the record (port 0: nowhere).
    pub peer_port: u16,
    /// 4 or 6, as `family`: how `peer` and `saddr` are to be read; 0 (records written before
    /// it was kept): as `family`.
    pub peer_family: u8,
    /// Bits of [`flow_marks`] (`flags` has no bit left).
    pub marks: u8,
    /// Always zero.
    pub _pad: [u8; 2],
    pub peer: [u8; 16],
}

/// One flow record, as written to the `FLOW_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns()` when the event was written.
    pub timestamp_ns: u64,
    /// The socket cookie (`FLOWS` key).
    pub cookie: u64,
    /// Closed events: the socket's `bytes_acked` and `bytes_received` at CLOSE, in bytes of
    /// sequence space: `bytes_acked` counts the SYN, and the FIN when it was acked;
    /// `bytes_received` the peer's FIN when one came (`flow_flags::FIN_IN`). Zero in opened
    /// events.
    pub bytes_acked: u64,
    pub bytes_received: u64,
    /// `flow_event::*`.
    pub kind: u8,
    /// Closed events: the TCP state the socket left for CLOSE (`tcp_state::*`).
    pub last_state: u8,
    /// Always zero.
    pub _pad: [u8; 6],
    pub record: FlowRecord,
}

impl FlowEvent {
    pub const SIZE: usize = core::mem::size_of::<FlowEvent>();
}

/// Key of `FLOW_CONTACTS_MISSED`: one contact of a subject identity with a destination
/// identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContactKey {
    pub subject: u32,
    pub destination: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, contain only integers and arrays of integers,
    // and have explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for super::IdentityInfo {}
    unsafe impl aya::Pod for super::locked::LockedCgroupIdentity {}
    unsafe impl aya::Pod for super::locked::LockedIdentity {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::DenyEvent {}
    unsafe impl aya::Pod for super::AggregateKey {}
    unsafe impl aya::Pod for super::AggregateValue {}
    unsafe impl aya::Pod for super::AggregateBudgetKey {}
    unsafe impl aya::Pod for super::FlowRecord {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::ContactKey {}
    unsafe impl aya::Pod for super::wire::FlowKey {}
    unsafe impl aya::Pod for super::wire::PeerKey {}
    unsafe impl aya::Pod for super::wire::Peer {}
    unsafe impl aya::Pod for super::wire::SpentKey {}
    unsafe impl aya::Pod for super::rate::RateKey {}
    unsafe impl aya::Pod for super::rate::RateLimit {}
    unsafe impl aya::Pod for super::rate::RateBucket {}
}

// Layout checks: the kernel and userspace must agree on these sizes.
const _: () = assert!(core::mem::size_of::<IdentityInfo>() == 24);
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);
const _: () = assert!(core::mem::size_of::<Config>() == 64);
const _: () = assert!(core::mem::size_of::<FlowRecord>() == 128);
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 168);
const _: () = assert!(core::mem::size_of::<DenyEvent>() == 104);
const _: () = assert!(core::mem::size_of::<AggregateKey>() == 72);
const _: () = assert!(core::mem::size_of::<AggregateValue>() == 48);
const _: () = assert!(core::mem::size_of::<AggregateBudgetKey>() == 16);

/// Identity on the wire: the TCP option a tagged flow's SYN carries, and its MAC.
///
/// The option (RFC 6994 shared experimental kind 253, 20 bytes, all integers big-endian):
///
/// ```text
///  0      1      2      4          8       10       11        12                 20
///  | 253  |  20  | ExID | identity | time  | key id | version | tag (8 bytes)      |
/// ```
///
/// - `ExID` 0xA1E5: this project's experiment identifier.
/// - `identity`: the subject's identity number (node-independent: derived from its name or
///   label set). The tenant is not carried: the receiver reads it from its own `IDENTITIES`
///   (the tenant number is a hash of the tenant's name, the same on every node), which saves
///   4 of the ~20 bytes a Linux SYN leaves free after MSS, SACK-permitted, timestamps and
///   window scale.
/// - `time` (version 3): the sender's wall-clock (POSIX) seconds modulo 2^16 when this SYN was
///   sent ([`stamp`]): each transmission of a connect's SYN gets its own time, later than the
///   one before (a retransmission within the same second takes the next second), so that the
///   receiver can accept every (4-tuple, time) once and refuse any copy. The receiver accepts it
///   within a skew of its own clock ([`fresh`]). In version 2 the time was the connect's, which
///   every retransmission repeated: the receiver could only refuse a copy once the connection had
///   been accepted and closed. In version 1 these bits were the low 16 bits of the sender's
///   policy generation.
/// - `key id`: which flow key made the tag (never 0).
/// - `version`: [`VERSION`].
/// - `tag`: SipHash-2-4 ([`siphash24`]) with the 128-bit flow key over the 48-byte string of
///   [`message`]: identity, time, key id, version, the SYN's source and destination
///   addresses (IPv6, IPv4 as `::ffff:a.b.c.d`), source and destination ports, ExID.
pub mod wire {
    /// TCP option kind: RFC 6994 / RFC 4727 shared experimental.
    pub const KIND: u8 = 253;
    /// This project's 16-bit experiment identifier.
    pub const EXID: u16 = 0xA1E5;
    /// Length of the whole option in bytes (kind and length included).
    pub const OPTION_LEN: usize = 20;
    /// The option version this code writes: 3, the time of each SYN transmission.
    pub const VERSION: u8 = 3;
    /// The previous version: the connect's time, repeated by retransmissions. Accepted (its
    /// copies are refused only after the connection closed: `SPENT_TAGS` at close), so that
    /// nodes of the previous release keep connecting during a rolling upgrade.
    pub const VERSION_2: u8 = 2;
    /// The first version: bytes 8-9 held the sender's policy generation, with no freshness.
    /// Refused, except before `Config::wire_v1_until_s`.
    pub const VERSION_1: u8 = 1;
    /// Default of `Config::wire_skew_s`: seconds. Covers NTP-synced clocks (milliseconds
    /// apart), a version 3 sender's retransmissions running a few seconds ahead, and a version
    /// 2 sender's retransmissions of the first 15 s of a connect (1, 3, 7 and 15 s after it);
    /// far below 2^15, so the modulo-2^16 comparison is never ambiguous.
    pub const DEFAULT_SKEW_S: u32 = 30;
    /// Largest accepted `Config::wire_skew_s`: a window of 2^15 s or more would make "ahead"
    /// and "behind" indistinguishable modulo 2^16.
    pub const MAX_SKEW_S: u32 = 3600;
    /// Slots of `FLOW_KEYS`.
    pub const CURRENT_KEY: u32 = 0;
    pub const PREVIOUS_KEY: u32 = 1;
    /// Holds the old previous key while the other two slots are rewritten, so that a swap
    /// ("OLD NEW" -> "NEW OLD") never passes through a state that verifies only one of them;
    /// empty otherwise.
    pub const TRANSITION_KEY: u32 = 2;
    pub const KEY_SLOTS: u32 = 3;

    /// A flow key in `FLOW_KEYS`. `id` 0 marks an empty slot.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct FlowKey {
        pub id: u32,
        pub _pad: u32,
        /// SipHash key words: the key's bytes 0..8 and 8..16, little-endian.
        pub k0: u64,
        pub k1: u64,
    }

    /// Key of `WIRE_PEERS`: the SYN's 4-tuple as the server sees it.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct PeerKey {
        /// The client's address (IPv4 as `::ffff:a.b.c.d`), network order.
        pub saddr: [u8; 16],
        /// The server's address.
        pub daddr: [u8; 16],
        /// Host byte order.
        pub sport: u16,
        pub dport: u16,
        pub _pad: u32,
    }

    /// Key of `SPENT_TAGS`: a SYN's 4-tuple (as [`PeerKey`]) and its option's time field
    /// ([`Peer::stamp`]): what a copy of that SYN would carry again: the SYN of a connection
    /// that closed (versions 2 and 3); version 3 also a SYN that passed while another
    /// transmission's `WIRE_PEERS` entry held the 4-tuple, and the option of an unaccepted
    /// entry replaced by a later SYN.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct SpentKey {
        pub saddr: [u8; 16],
        pub daddr: [u8; 16],
        /// Host byte order.
        pub sport: u16,
        pub dport: u16,
        pub stamp: u16,
        /// The time's high 16 bits ([`epoch`]): with them the key holds the whole time, so
        /// an option is taken by one insert (`BPF_NOEXIST`), with no namesake 2^16 s away
        /// sharing its key.
        pub epoch: u16,
    }

    /// Value of `WIRE_PEERS`: what the verified option claimed, and the server's socket once
    /// the handshake completed.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Peer {
        pub identity: u32,
        /// The local destination identity the SYN was judged for.
        pub destination: u32,
        /// The option's time field (versions 2 and 3: the sender's wall-clock seconds modulo
        /// 2^16; version 1: its policy generation) and the key id that verified.
        pub stamp: u16,
        pub key_id: u8,
        /// [`peer_state`]: `VERIFIED` from the SYN's check, `ACCEPTED` once the server's socket
        /// is established (then `cookie` and `accepted_ns` are set).
        pub state: u8,
        /// The option's version ([`VERSION`], [`VERSION_2`] or [`VERSION_1`]): a version 2
        /// or 3 option is spent at close (`SPENT_TAGS`); a version 3 entry is also its
        /// option's spent mark while it lives.
        pub version: u8,
        pub _pad: [u8; 3],
        /// Socket cookie of the server's (accepted) socket; 0 before.
        pub cookie: u64,
        /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) at the server's `PASSIVE_ESTABLISHED_CB`.
        pub accepted_ns: u64,
    }

    /// [`Peer::state`].
    pub mod peer_state {
        /// The SYN's option verified and was allowed; no established socket yet.
        pub const VERIFIED: u8 = 0;
        /// The server's socket is established; the entry goes when it reaches TCP CLOSE.
        pub const ACCEPTED: u8 = 1;
    }

    /// The option's time for CLOCK_TAI nanoseconds `tai_ns` on a node whose kernel TAI offset
    /// is `tai_offset_s` (`Config::tai_offset_s`): POSIX (UTC) seconds. Not CLOCK_TAI itself:
    /// its offset is whatever the node's time daemon set (37 with chrony's `leapsectz` or an
    /// ntpd leapfile, 0 with systemd-timesyncd), so two synced nodes may differ by 37 s.
    #[inline(always)]
    pub fn seconds(tai_ns: u64, tai_offset_s: u32) -> u32 {
        (tai_ns / 1_000_000_000).wrapping_sub(tai_offset_s as u64) as u32
    }

    /// The option's time field (bytes 8-9): `seconds` modulo 2^16.
    #[inline(always)]
    pub fn stamp(seconds: u32) -> u16 {
        seconds as u16
    }

    /// The high 16 bits of the option's time: not sent, but MAC'd ([`message`]), so that a SYN
    /// replayed 2^16 s (~18.2 h) later, when its 16-bit field reads fresh again, fails its tag.
    #[inline(always)]
    pub fn epoch(seconds: u32) -> u16 {
        (seconds >> 16) as u16
    }

    /// The time an option stamped `stamp` names, taken as the one nearest to the receiver's
    /// `now_s` (within 2^15 s either way: any stamp fresh enough to pass is).
    #[inline(always)]
    pub fn claimed_seconds(stamp: u16, now_s: u32) -> u32 {
        now_s.wrapping_add(stamp.wrapping_sub(now_s as u16) as i16 as i32 as u32)
    }

    /// The `SPENT_RECENT` slot (0 to `capacity::SPENT_RECENT - 1`) of a `SPENT_TAGS` key: its
    /// fields folded into one word (the destination rotated, so that a loopback connection's
    /// equal addresses do not cancel), spread by a multiplicative (Fibonacci) hash, top
    /// `capacity::SPENT_RECENT_BITS` bits kept. The kernel raises and reads slots with it, the
    /// agent repairs them at start with it. A slot means something only under the hash that
    /// raised it: a change here is an ABI change (the golden test says so). Not keyed: a
    /// sender that makes its options share a slot with another's only sends that other's SYNs
    /// to the exact lookup.
    #[inline(always)]
    pub fn spent_slot(key: &SpentKey) -> u32 {
        let word =
            |b: &[u8; 16], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut folded = u32::from(key.stamp) | u32::from(key.epoch) << 16;
        folded ^= u32::from(key.sport) << 16 | u32::from(key.dport);
        folded ^=
            word(&key.saddr, 0) ^ word(&key.saddr, 4) ^ word(&key.saddr, 8) ^ word(&key.saddr, 12);
        folded ^= (word(&key.daddr, 0)
            ^ word(&key.daddr, 4)
            ^ word(&key.daddr, 8)
            ^ word(&key.daddr, 12))
        .rotate_left(16);
        folded.wrapping_mul(0x9E37_79B1) >> (32 - crate::capacity::SPENT_RECENT_BITS)
    }

    /// Whether an option stamped `stamp` is fresh at `now` (both [`stamp`] values) within
    /// `skew_s` seconds either way (a sender's clock may be a little ahead). Compared modulo
    /// 2^16, so the wrap every ~18 hours is seamless as long as `skew_s` < 2^15.
    #[inline(always)]
    pub fn fresh(stamp: u16, now: u16, skew_s: u32) -> bool {
        ((now.wrapping_sub(stamp) as i16).unsigned_abs() as u32) <= skew_s
    }

    /// The MAC input as six little-endian 64-bit words (the 48-byte string described in the
    /// module documentation). `stamp` is the option's bytes 8-9 (the time in version 2),
    /// `version` its byte 11, `epoch` the time's high 16 bits ([`epoch`]; 0 in version 1).
    /// Addresses are 16 bytes in network order; ports in host order.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn message(
        identity: u32,
        stamp: u16,
        key_id: u8,
        version: u8,
        saddr: &[u8; 16],
        daddr: &[u8; 16],
        sport: u16,
        dport: u16,
        epoch: u16,
    ) -> [u64; 6] {
        let word = |a: &[u8; 16], i: usize| {
            u64::from_le_bytes([
                a[i],
                a[i + 1],
                a[i + 2],
                a[i + 3],
                a[i + 4],
                a[i + 5],
                a[i + 6],
                a[i + 7],
            ])
        };
        [
            identity as u64 | (stamp as u64) << 32 | (key_id as u64) << 48 | (version as u64) << 56,
            word(saddr, 0),
            word(saddr, 8),
            word(daddr, 0),
            word(daddr, 8),
            sport as u64 | (dport as u64) << 16 | (EXID as u64) << 32 | (epoch as u64) << 48,
        ]
    }

    #[inline(always)]
    fn sipround(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13);
        v[1] ^= v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16);
        v[3] ^= v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21);
        v[3] ^= v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17);
        v[1] ^= v[2];
        v[2] = v[2].rotate_left(32);
    }

    /// SipHash-2-4 of the 48-byte string `m` (six little-endian words) under the key
    /// (`k0`, `k1`): the reference algorithm (Aumasson and Bernstein), unrolled to a fixed
    /// length so that the BPF verifier sees straight-line code.
    #[inline(always)]
    pub fn siphash24(k0: u64, k1: u64, m: &[u64; 6]) -> u64 {
        let mut v = [
            k0 ^ 0x736f_6d65_7073_6575,
            k1 ^ 0x646f_7261_6e64_6f6d,
            k0 ^ 0x6c79_6765_6e65_7261,
            k1 ^ 0x7465_6462_7974_6573,
        ];
        macro_rules! block {
            ($w:expr) => {{
                let w = $w;
                v[3] ^= w;
                sipround(&mut v);
                sipround(&mut v);
                v[0] ^= w;
            }};
        }
        block!(m[0]);
        block!(m[1]);
        block!(m[2]);
        block!(m[3]);
        block!(m[4]);
        block!(m[5]);
        // The final block: the length (48) in the top byte, no remaining bytes.
        block!(48u64 << 56);
        v[2] ^= 0xff;
        sipround(&mut v);
        sipround(&mut v);
        sipround(&mut v);
        sipround(&mut v);
        v[0] ^ v[1] ^ v[2] ^ v[3]
    }

    /// The 20 option bytes for these fields and tag.
    #[inline(always)]
    pub fn option_bytes(
        identity: u32,
        stamp: u16,
        key_id: u8,
        version: u8,
        tag: u64,
    ) -> [u8; OPTION_LEN] {
        let i = identity.to_be_bytes();
        let g = stamp.to_be_bytes();
        let e = EXID.to_be_bytes();
        let t = tag.to_be_bytes();
        [
            KIND,
            OPTION_LEN as u8,
            e[0],
            e[1],
            i[0],
            i[1],
            i[2],
            i[3],
            g[0],
            g[1],
            key_id,
            version,
            t[0],
            t[1],
            t[2],
            t[3],
            t[4],
            t[5],
            t[6],
            t[7],
        ]
    }
}

const _: () = assert!(core::mem::size_of::<wire::FlowKey>() == 24);
const _: () = assert!(core::mem::size_of::<wire::PeerKey>() == 40);
const _: () = assert!(core::mem::size_of::<wire::SpentKey>() == 40);
const _: () = assert!(core::mem::size_of::<wire::Peer>() == 32);

/// Connection-rate limits per (subject, destination): GCRA, the "virtual scheduling" form of
/// a token bucket, in integer nanoseconds (no floats in the kernel).
///
/// A limit of `r` connections per second with burst `b` is two numbers: the emission
/// interval `T = ceil(1e9 / r)` ns (what one connection costs) and the tolerance
/// `tau = (b - 1) * T` ns (how far ahead of the clock the bucket may be drawn). The state of a
/// pair is one time, the theoretical arrival time `tat`. A connect at `now`
/// (`bpf_ktime_get_ns`) is allowed iff `max(tat, now) - now <= tau`, and then
/// `tat = max(tat, now) + T`; a refused connect changes nothing. So `b` back-to-back connects
/// pass after an idle period, then one every `T`: over `t` seconds of continuous attempts,
/// `b + floor(t * 1e9 / T)` pass (`r * t + b`, give or take one).
///
/// Equivalent token bucket: tokens `= (now + tau + T - max(tat, now)) / T`, at most `b`. A
/// limit made stricter (a risk rise) applies on the very next connect, since the kernel reads
/// `T` and `tau` on each one: the tokens left are at most the new `b` (the bucket is capped to
/// the new burst) and refill at the new rate. A limit made looser applies at once too.
///
/// Overflow: `now` is below 2^62 ns (146 years of uptime); userspace keeps `T <=`
/// [`MAX_INTERVAL_NS`] and `b <=` [`MAX_BURST`], so `tau < 2^59`, and a stored `tat` is at
/// most `now + tau + T` < 2^63: every sum fits a `u64`, and `max(tat, now) - now` never
/// underflows.
pub mod rate {
    /// The longest emission interval userspace writes: one connection per hour. A rate that
    /// risk shrinks below that is clamped to it (quarantine is what stops a subject entirely).
    pub const MAX_INTERVAL_NS: u64 = 3_600 * NS_PER_SECOND;
    /// The largest burst the inventory accepts.
    pub const MAX_BURST: u64 = 100_000;
    pub const NS_PER_SECOND: u64 = 1_000_000_000;

    /// The `subject` of a tenant's shared entry for a destination in `RATE_LIMITS` and
    /// `RATE_BUCKETS` (key `{SHARED_SUBJECT, destination, tenant}`): the limit (and the one
    /// bucket) of every subject of that tenant whose own pair did not fit in the map (the
    /// tenants' fair shares of it, `enforcer_policy::rate::fit`), the strictest of theirs.
    /// Never shared across tenants (red-team review 43 M1: one tenant's flood, or one
    /// subject's risk, would have starved another tenant's pairs). Identity 0
    /// (`identity::UNKNOWN`) is never a subject the kernel charges: an unknown subject is
    /// refused before any rate limit.
    pub const SHARED_SUBJECT: u32 = crate::identity::UNKNOWN;

    /// The `subject` of a destination's entry shared by every tenant (key
    /// `{SHARED_ACROSS_TENANTS, destination, 0}`), written instead of the tenants' own shared
    /// entries only when those would not fit in the room (the limited (tenant, destination)
    /// pairs alone outnumber it), for the destinations most tenants reach, as few as that
    /// takes (`enforcer_policy::rate::fit`). A reserved
    /// identity number (below `identity::FIRST_DYNAMIC`, none of the named ones): no subject
    /// has it.
    pub const SHARED_ACROSS_TENANTS: u32 = 255;

    /// `CONFIG.rate_shared`: no shared entry; a miss is not limited.
    pub const SHARING_NONE: u32 = 0;
    /// `CONFIG.rate_shared`: the shared entries are the tenants' ([`RateKey::shared`]).
    pub const SHARING_PER_TENANT: u32 = 1;
    /// `CONFIG.rate_shared`: the shared entries are the destinations', across tenants
    /// ([`RateKey::across_tenants`]).
    pub const SHARING_ACROSS_TENANTS: u32 = 2;

    /// The `CONFIG.rate_shared` value for a `RATE_LIMITS` holding `keys`: across tenants when
    /// any entry is, per tenant when any entry is a tenant's shared one, else none.
    pub fn sharing<'a>(keys: impl IntoIterator<Item = &'a RateKey>) -> u32 {
        let mut sharing = SHARING_NONE;
        for key in keys {
            match key.subject {
                SHARED_ACROSS_TENANTS => return SHARING_ACROSS_TENANTS,
                SHARED_SUBJECT => sharing = SHARING_PER_TENANT,
                _ => {}
            }
        }
        sharing
    }

    /// Key of `RATE_LIMITS` and `RATE_BUCKETS`: identities (not policy classes). 12 bytes,
    /// no padding.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct RateKey {
        /// The subject's identity, or [`SHARED_SUBJECT`] in a tenant's shared entry.
        pub subject: u32,
        pub destination: u32,
        /// In a shared entry, the tenant (`IdentityInfo::tenant`, 0 for subjects of none)
        /// whose pairs it holds; 0 in a pair's own entry (its subject says the tenant).
        pub tenant: u32,
    }

    impl RateKey {
        /// The entry of `subject`'s own pair to `destination`.
        pub const fn own(subject: u32, destination: u32) -> Self {
            Self {
                subject,
                destination,
                tenant: 0,
            }
        }

        /// `tenant`'s shared entry for `destination`.
        pub const fn shared(tenant: u32, destination: u32) -> Self {
            Self {
                subject: SHARED_SUBJECT,
                destination,
                tenant,
            }
        }

        /// `destination`'s entry shared by every tenant ([`SHARED_ACROSS_TENANTS`]).
        pub const fn across_tenants(destination: u32) -> Self {
            Self {
                subject: SHARED_ACROSS_TENANTS,
                destination,
                tenant: 0,
            }
        }
    }

    /// Value of `RATE_LIMITS`: the pair's limit at the subject's current risk.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct RateLimit {
        /// `T`: nanoseconds one connection costs (1 to [`MAX_INTERVAL_NS`]).
        pub interval_ns: u64,
        /// `tau = (burst - 1) * T`: how far `tat` may run ahead of the clock.
        pub tolerance_ns: u64,
    }

    impl RateLimit {
        /// The limit with emission interval `interval_ns` and `burst`, clamped to 1 ns ..
        /// [`MAX_INTERVAL_NS`] and 1 .. [`MAX_BURST`] (userspace turns a rate per second into
        /// the interval, rounding up: never faster than asked).
        pub const fn from_interval(interval_ns: u64, burst: u64) -> Self {
            let interval_ns = if interval_ns == 0 {
                1
            } else if interval_ns > MAX_INTERVAL_NS {
                MAX_INTERVAL_NS
            } else {
                interval_ns
            };
            let burst = if burst == 0 {
                1
            } else if burst > MAX_BURST {
                MAX_BURST
            } else {
                burst
            };
            Self {
                interval_ns,
                tolerance_ns: (burst - 1) * interval_ns,
            }
        }

        /// The burst this limit allows: `tau / T + 1`.
        pub const fn burst(&self) -> u64 {
            self.tolerance_ns / self.interval_ns + 1
        }

        /// The GCRA step for a connect at `now` with bucket state `tat`: `Some(new tat)` when
        /// it conforms, `None` when it is over budget (the state stays). See the module
        /// documentation for the arithmetic and its bounds.
        #[inline(always)]
        pub const fn admit(&self, tat: u64, now: u64) -> Option<u64> {
            let start = if tat > now { tat } else { now };
            if start - now > self.tolerance_ns {
                None
            } else {
                Some(start + self.interval_ns)
            }
        }
    }

    /// Value of `RATE_BUCKETS`: the pair's theoretical arrival time, `bpf_ktime_get_ns`
    /// nanoseconds.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct RateBucket {
        pub tat_ns: u64,
    }
}

const _: () = assert!(core::mem::size_of::<rate::RateKey>() == 12);
// No subject ever has the number of the entries shared across tenants.
const _: () = assert!(
    rate::SHARED_ACROSS_TENANTS < identity::FIRST_DYNAMIC
        && rate::SHARED_ACROSS_TENANTS > identity::REMOTE_NODE
);
const _: () = assert!(core::mem::size_of::<rate::RateLimit>() == 16);
const _: () = assert!(core::mem::size_of::<rate::RateBucket>() == 8);
const _: () = assert!(rate::MAX_BURST * rate::MAX_INTERVAL_NS < 1 << 59);

#[cfg(test)]
mod tests {
    extern crate std;
    use super::wire::*;
    use std::vec::Vec;

    /// The slot hash is ABI: slots pinned by one agent are read by the next, so a change that
    /// moves these slots must bump `ABI_VERSION` (and then these values).
    #[test]
    fn spent_slot_is_the_abi_19_hash() {
        let key = |saddr: [u8; 16], daddr: [u8; 16], sport, stamp| SpentKey {
            saddr,
            daddr,
            sport,
            dport: 6334,
            stamp,
            epoch: 27_415,
        };
        let v6 = |last: u8| {
            let mut a = [0xfd, 0x84, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            a[15] = last;
            a
        };
        let v4 = |a: [u8; 4]| {
            [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
            ]
        };
        let slots = [
            spent_slot(&key(v6(0x99), v6(2), 38_406, 4_660)),
            spent_slot(&key(v6(0x99), v6(2), 38_407, 4_660)),
            spent_slot(&key(v6(0x99), v6(2), 38_406, 4_661)),
            spent_slot(&key(v4([127, 0, 0, 1]), v4([127, 0, 0, 1]), 40_000, 0)),
        ];
        assert_eq!(crate::ABI_VERSION, 19, "a new ABI: check these values anew");
        const GOLDEN: [u32; 4] = [15_456, 6_860, 5_330, 9_562];
        assert_eq!(
            slots, GOLDEN,
            "the SPENT_RECENT slot hash moved: bump ABI_VERSION"
        );
    }

    /// A general-length SipHash-2-4, checked against the paper's test vector (appendix A:
    /// key 00..0f, message 00..0e gives a129ca6149be45e5), as the reference for the
    /// fixed-length one.
    fn general(k0: u64, k1: u64, data: &[u8]) -> u64 {
        let mut v = [
            k0 ^ 0x736f_6d65_7073_6575,
            k1 ^ 0x646f_7261_6e64_6f6d,
            k0 ^ 0x6c79_6765_6e65_7261,
            k1 ^ 0x7465_6462_7974_6573,
        ];
        let round = |v: &mut [u64; 4]| {
            v[0] = v[0].wrapping_add(v[1]);
            v[1] = v[1].rotate_left(13) ^ v[0];
            v[0] = v[0].rotate_left(32);
            v[2] = v[2].wrapping_add(v[3]);
            v[3] = v[3].rotate_left(16) ^ v[2];
            v[0] = v[0].wrapping_add(v[3]);
            v[3] = v[3].rotate_left(21) ^ v[0];
            v[2] = v[2].wrapping_add(v[1]);
            v[1] = v[1].rotate_left(17) ^ v[2];
            v[2] = v[2].rotate_left(32);
        };
        let chunks = data.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            let w = u64::from_le_bytes(c.try_into().unwrap());
            v[3] ^= w;
            round(&mut v);
            round(&mut v);
            v[0] ^= w;
        }
        let mut last = (data.len() as u64 & 0xff) << 56;
        for (i, b) in rest.iter().enumerate() {
            last |= (*b as u64) << (8 * i);
        }
        v[3] ^= last;
        round(&mut v);
        round(&mut v);
        v[0] ^= last;
        v[2] ^= 0xff;
        for _ in 0..4 {
            round(&mut v);
        }
        v[0] ^ v[1] ^ v[2] ^ v[3]
    }

    const K0: u64 = 0x0706_0504_0302_0100;
    const K1: u64 = 0x0f0e_0d0c_0b0a_0908;

    #[test]
    fn general_siphash_matches_the_paper() {
        let msg: Vec<u8> = (0u8..15).collect();
        assert_eq!(general(K0, K1, &msg), 0xa129_ca61_49be_45e5);
    }

    #[test]
    fn fixed_length_siphash_is_siphash_of_the_48_byte_string() {
        let saddr = [0xfd, 0x84, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let daddr = [0xfd, 0x84, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let m = message(300, 0x1234, 7, VERSION, &saddr, &daddr, 40000, 6333, 0);
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&300u32.to_le_bytes());
        bytes.extend_from_slice(&0x1234u16.to_le_bytes());
        bytes.push(7);
        bytes.push(VERSION);
        bytes.extend_from_slice(&saddr);
        bytes.extend_from_slice(&daddr);
        bytes.extend_from_slice(&40000u16.to_le_bytes());
        bytes.extend_from_slice(&6333u16.to_le_bytes());
        bytes.extend_from_slice(&EXID.to_le_bytes());
        bytes.extend_from_slice(&[0, 0]);
        assert_eq!(bytes.len(), 48);
        assert_eq!(siphash24(K0, K1, &m), general(K0, K1, &bytes));
        // Any 48 bytes, not only the ones `message` produces.
        let seq: Vec<u8> = (0u8..48).collect();
        let words: Vec<u64> = seq
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let fixed = siphash24(K0, K1, &words.try_into().unwrap());
        assert_eq!(fixed, general(K0, K1, &seq));
    }

    #[test]
    fn gcra_admits_burst_then_one_per_interval() {
        use super::rate::RateLimit;
        let limit = RateLimit::from_interval(50_000_000, 5);
        assert_eq!(limit.interval_ns, 50_000_000);
        assert_eq!(limit.burst(), 5);
        // Attempts every millisecond for 10 s from an idle bucket.
        let (mut tat, mut admitted) = (0u64, 0u64);
        let start = 1_000_000_000_000u64;
        for i in 0..10_000u64 {
            if let Some(next) = limit.admit(tat, start + i * 1_000_000) {
                tat = next;
                admitted += 1;
            }
        }
        // 5 at once, then one every 50 ms: 20 * 10 s (the last attempt is at 9.999 s).
        assert_eq!(admitted, 5 + 199);
    }

    #[test]
    fn a_tighter_limit_caps_the_bucket_at_once() {
        use super::rate::RateLimit;
        let loose = RateLimit::from_interval(10_000_000, 100);
        let tight = RateLimit::from_interval(100_000_000, 3);
        let now = 5_000_000_000u64;
        // A full bucket under the loose limit: the tight one allows its own burst, no more.
        let mut tat = 0;
        let mut admitted = 0;
        while let Some(next) = tight.admit(tat, now) {
            tat = next;
            admitted += 1;
        }
        assert_eq!(admitted, 3);
        assert!(loose.admit(tat, now).is_some());
        // Bounds: the largest limit at the far end of the clock does not overflow.
        let max = RateLimit::from_interval(u64::MAX, u64::MAX);
        let now = 1u64 << 62;
        let mut tat = 0;
        for _ in 0..3 {
            tat = max.admit(tat, now).unwrap();
        }
        assert!(tat > now);
    }
}
