//! Identity on the wire, userspace side: the flow keys (`--flow-key-file` -> `FLOW_KEYS`), the
//! ingress allowlist (compiled decisions; `datapath::IngressWriter` writes it), the verified peers
//! (`WIRE_PEERS`), and the option's MAC as a proxy (or a test) computes it.
//!
//! The option's layout and MAC are `enforcer_common::wire`: the kernel compiles the same
//! functions, so the tag computed here is the tag the kernel writes and checks.
//!
//! Key file: one key a line, `ID HEX` (ID 1-255, HEX 32 hex digits = 128 bits); blank lines
//! and `#` comments ignored. The first key signs; the first two verify. A rotation without a
//! gap, every node reading the same file (from the PDP or a config map):
//!
//! 1. `OLD` alone;
//! 2. `OLD` then `NEW`: every node learns NEW (verify only) while still signing with OLD;
//! 3. `NEW` then `OLD`: nodes sign with NEW; SYNs a slower node still signs with OLD verify;
//! 4. `NEW` alone: OLD is refused from here on.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use enforcer_common::{maps, wire as abi, PolicyKey, PolicyValue};
use enforcer_policy::Compiled;

/// A 128-bit flow key and its id (1-255, carried in the option).
#[derive(Clone, PartialEq, Eq)]
pub struct FlowKey {
    pub id: u8,
    pub key: [u8; 16],
}

impl std::fmt::Debug for FlowKey {
    // Never print the key itself (logs end up in places keys must not).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FlowKey {{ id: {} }}", self.id)
    }
}

impl FlowKey {
    fn words(&self) -> (u64, u64) {
        let (a, b) = self.key.split_at(8);
        (
            u64::from_le_bytes(a.try_into().expect("8 bytes")),
            u64::from_le_bytes(b.try_into().expect("8 bytes")),
        )
    }

    fn slot(&self) -> abi::FlowKey {
        let (k0, k1) = self.words();
        abi::FlowKey {
            id: self.id as u32,
            _pad: 0,
            k0,
            k1,
        }
    }
}

/// The keys of a key file: `current` signs, `previous` (if any) also verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowKeys {
    pub current: FlowKey,
    pub previous: Option<FlowKey>,
}

/// Parses a key file's text (see the module documentation); errors name `file:line`.
pub fn parse_keys(file: &Path, text: &str) -> Result<FlowKeys> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("{}:{}", file.display(), n + 1);
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(id), Some(hex), None) = (parts.next(), parts.next(), parts.next()) else {
            bail!(
                "{}: expected `ID HEX` (a key id 1-255 and 32 hex digits)",
                at()
            );
        };
        let id: u8 = match id.parse() {
            Ok(id) if id != 0 => id,
            _ => bail!("{}: key id `{id}` is not a number from 1 to 255", at()),
        };
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!(
                "{}: key {id} must be 32 hex digits (128 bits), found {} characters",
                at(),
                hex.len()
            );
        }
        let mut key = [0u8; 16];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex");
        }
        if keys.iter().any(|k: &FlowKey| k.id == id) {
            bail!("{}: key id {id} appears twice", at());
        }
        keys.push(FlowKey { id, key });
    }
    let mut keys = keys.into_iter();
    let Some(current) = keys.next() else {
        bail!("{}: no key (expected `ID HEX` lines)", file.display());
    };
    let previous = keys.next();
    if keys.next().is_some() {
        bail!(
            "{}: more than two keys (the kernel holds a current and a previous one)",
            file.display()
        );
    }
    Ok(FlowKeys { current, previous })
}

pub fn read_keys(file: &Path) -> Result<FlowKeys> {
    let bytes = crate::fs::read_secret(
        file,
        "sign any workload's identity into a SYN that every node's ingress check accepts",
    )
    .with_context(|| format!("reading the flow key file {}", file.display()))?;
    let text = String::from_utf8(bytes)
        .with_context(|| format!("the flow key file {} is not UTF-8", file.display()))?;
    parse_keys(file, &text)
}

/// The 64-bit tag of a version 3 ([`abi::VERSION`]) option, as the kernel computes it: `stamp` is the option's
/// time in whole seconds ([`now_stamp`] for a SYN sent now; the option carries its low 16
/// bits, the tag covers all 32: a verifier holding only the option's 16-bit field passes
/// `abi::claimed_seconds(field, now_stamp()?)`, the time nearest its own clock), `saddr`/`daddr`/ports those of the SYN
/// (IPv4 addresses are taken as `::ffff:a.b.c.d`).
#[allow(clippy::too_many_arguments)]
pub fn tag(
    key: &FlowKey,
    identity: u32,
    stamp: u32,
    saddr: IpAddr,
    daddr: IpAddr,
    sport: u16,
    dport: u16,
) -> u64 {
    tag_version(
        key,
        identity,
        stamp,
        abi::VERSION,
        saddr,
        daddr,
        sport,
        dport,
    )
}

/// [`tag`] for an option of another version (`abi::VERSION_1`: `stamp` is then the sender's
/// policy generation): what a node of an older release sends.
#[allow(clippy::too_many_arguments)]
pub fn tag_version(
    key: &FlowKey,
    identity: u32,
    stamp: u32,
    version: u8,
    saddr: IpAddr,
    daddr: IpAddr,
    sport: u16,
    dport: u16,
) -> u64 {
    // Version 1 carries the sender's policy generation there and MACs no epoch.
    let epoch = if version == abi::VERSION_1 {
        0
    } else {
        abi::epoch(stamp)
    };
    let m = abi::message(
        identity,
        abi::stamp(stamp),
        key.id,
        version,
        &mapped(saddr),
        &mapped(daddr),
        sport,
        dport,
        epoch,
    );
    let (k0, k1) = key.words();
    abi::siphash24(k0, k1, &m)
}

/// The version 3 ([`abi::VERSION`]) option bytes a SYN from `saddr:sport` to `daddr:dport` carries for
/// `identity`, stamped `stamp`.
pub fn option(
    key: &FlowKey,
    identity: u32,
    stamp: u32,
    saddr: IpAddr,
    daddr: IpAddr,
    sport: u16,
    dport: u16,
) -> [u8; abi::OPTION_LEN] {
    option_version(
        key,
        identity,
        stamp,
        abi::VERSION,
        saddr,
        daddr,
        sport,
        dport,
    )
}

/// [`option`] of another version (see [`tag_version`]).
#[allow(clippy::too_many_arguments)]
pub fn option_version(
    key: &FlowKey,
    identity: u32,
    stamp: u32,
    version: u8,
    saddr: IpAddr,
    daddr: IpAddr,
    sport: u16,
    dport: u16,
) -> [u8; abi::OPTION_LEN] {
    let t = tag_version(key, identity, stamp, version, saddr, daddr, sport, dport);
    abi::option_bytes(identity, abi::stamp(stamp), key.id, version, t)
}

/// This host's CLOCK_TAI in nanoseconds (what `bpf_ktime_get_tai_ns` reads). Errors: the
/// clock cannot be read (never on Linux 3.10+).
pub fn tai_now_ns() -> Result<u64> {
    clock_ns(libc::CLOCK_TAI).context("reading CLOCK_TAI")
}

fn clock_ns(clock: libc::clockid_t) -> std::io::Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// The option's time for a SYN sent now (whole POSIX seconds, what the kernel computes as
/// CLOCK_TAI less [`tai_offset_s`]); the option carries its low 16 bits. Errors: a clock
/// before 1970.
pub fn now_stamp() -> Result<u32> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the wall clock is before 1970")?;
    Ok(now.as_secs() as u32)
}

/// CLOCK_TAI minus CLOCK_REALTIME in whole seconds (`Config::tai_offset_s`): the kernel's
/// integer TAI offset, which this host's time daemon set (37 with chrony's `leapsectz`, 0
/// when none set it), read with `adjtimex` (modes 0: read only, unprivileged). Not the
/// difference of two clock reads: a step of CLOCK_REALTIME between them would be taken for
/// an offset (and widen the replay window by the step). Errors: the call fails, or a
/// negative offset.
pub fn tai_offset_s() -> Result<u32> {
    // SAFETY: all-zero is a valid `timex` (modes 0: nothing is set, the kernel only fills it).
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: `tx` is a valid, writable timex.
    if unsafe { libc::adjtimex(&mut tx) } < 0 {
        return Err(std::io::Error::last_os_error()).context("adjtimex (reading the TAI offset)");
    }
    #[allow(clippy::unnecessary_cast)] // c_long on glibc, c_int on musl
    let tai = tx.tai as i64;
    u32::try_from(tai).context("the kernel's TAI offset is negative")
}

/// Whether a version 2 or 3 option stamped `stamp` (its 16-bit field) is fresh now on this host
/// within `skew_s` seconds (what the ingress check decides, for a proxy verifying a saved
/// SYN; the tag is checked with the time [`abi::claimed_seconds`] gives).
pub fn is_fresh(stamp: u16, skew_s: u32) -> Result<bool> {
    Ok(abi::fresh(stamp, abi::stamp(now_stamp()?), skew_s))
}

/// `--wire-accept-v1-until`: the wall-clock deadline in whole POSIX seconds, what the kernel
/// compares with (`Config::wire_v1_until_s`, the option's clock). Errors: a deadline before
/// 1970 or after 2106 (u32 seconds).
pub fn v1_until_s(deadline: std::time::SystemTime) -> Result<u32> {
    let unix = deadline
        .duration_since(std::time::UNIX_EPOCH)
        .context("--wire-accept-v1-until before 1970")?
        .as_secs();
    u32::try_from(unix).context("--wire-accept-v1-until beyond 2106")
}

fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn open_map(pin_dir: &Path, name: &str) -> Result<Map> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

/// The writes that turn `FLOW_KEYS` holding `old` (current, previous, transition) into
/// `keys`, in order: the old previous key into the transition slot, then the new previous,
/// then the new current, then the transition slot emptied. Until the current slot changes
/// every state verifies all keys of the old file; from then on, all keys of the new one; so a
/// swap ("OLD NEW" -> "NEW OLD") never passes through (OLD, OLD).
pub fn key_writes(old: [abi::FlowKey; 3], keys: &FlowKeys) -> Vec<(u32, abi::FlowKey)> {
    let previous = keys
        .previous
        .as_ref()
        .map(FlowKey::slot)
        .unwrap_or_default();
    vec![
        (abi::TRANSITION_KEY, old[abi::PREVIOUS_KEY as usize]),
        (abi::PREVIOUS_KEY, previous),
        (abi::CURRENT_KEY, keys.current.slot()),
        (abi::TRANSITION_KEY, abi::FlowKey::default()),
    ]
}

/// Writes `keys` into `FLOW_KEYS` in the order of [`key_writes`]: whichever key signs at any
/// moment of the update, this node verifies it, and every key of the old file verifies until
/// the new current key signs.
pub fn write_keys(pin_dir: &Path, keys: &FlowKeys) -> Result<()> {
    let mut slots: Array<MapData, abi::FlowKey> = open_map(pin_dir, maps::FLOW_KEYS)?.try_into()?;
    let mut old = [abi::FlowKey::default(); 3];
    for (slot, key) in old.iter_mut().enumerate() {
        *key = slots
            .get(&(slot as u32), 0)
            .with_context(|| format!("reading flow key slot {slot}"))?;
    }
    for (slot, key) in key_writes(old, keys) {
        slots
            .set(slot, key, 0)
            .with_context(|| format!("writing flow key slot {slot}"))?;
    }
    Ok(())
}

/// The ids of the keys in `FLOW_KEYS` (current, previous; 0 = empty slot).
pub fn key_ids(pin_dir: &Path) -> Result<(u32, u32)> {
    let slots: Array<MapData, abi::FlowKey> = open_map(pin_dir, maps::FLOW_KEYS)?.try_into()?;
    Ok((
        slots.get(&abi::CURRENT_KEY, 0)?.id,
        slots.get(&abi::PREVIOUS_KEY, 0)?.id,
    ))
}

/// The ingress allowlist a compiled policy gives ([`Compiled::ingress`]): for every
/// destination with ingress `enforce` or `audit`, every workload identity of the inventory
/// and the cluster (local or on another node) as Cedar lets it reach each TCP cell.
pub fn ingress_allows(compiled: &Compiled) -> HashMap<PolicyKey, PolicyValue> {
    compiled.ingress().iter().copied().collect()
}

/// One verified peer of an accepted tagged connection, as `WIRE_PEERS` holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifiedPeer {
    pub client: std::net::SocketAddr,
    pub server: std::net::SocketAddr,
    /// The identity the option claimed (and its tag proved).
    pub identity: u32,
    pub destination: u32,
    /// The option's time field: the sender's wall-clock seconds modulo 2^16 (a version 1
    /// option's: its policy generation).
    pub stamp: u16,
    pub key_id: u8,
    /// The server's socket is established (`PASSIVE_ESTABLISHED_CB` saw it); false while only
    /// the SYN was verified (a handshake in progress, or one that never completed).
    pub accepted: bool,
    /// Socket cookie of the server's socket (0 before it is accepted).
    pub cookie: u64,
    /// CLOCK_MONOTONIC nanoseconds when the server's socket was established (0 before).
    pub accepted_ns: u64,
}

fn unmapped(bytes: [u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Every verified peer in `WIRE_PEERS` (works while no agent runs: it reads the pin): the
/// live accepted connections, and SYNs verified whose handshake has not completed (or never
/// will: those stay until the LRU evicts them). An accepted entry leaves the map when the
/// server's socket reaches TCP CLOSE. Sorted by server, then client address.
pub fn verified_peers(pin_dir: &Path) -> Result<Vec<VerifiedPeer>> {
    // aya reads an LRU hash map through its `HashMap`.
    let map: BpfHashMap<MapData, abi::PeerKey, abi::Peer> =
        open_map(pin_dir, maps::WIRE_PEERS)?.try_into()?;
    let mut peers = Vec::new();
    for entry in map.iter() {
        let (k, v) = entry.context("reading WIRE_PEERS")?;
        peers.push(VerifiedPeer {
            client: (unmapped(k.saddr), k.sport).into(),
            server: (unmapped(k.daddr), k.dport).into(),
            identity: v.identity,
            destination: v.destination,
            stamp: v.stamp,
            key_id: v.key_id,
            accepted: v.state == abi::peer_state::ACCEPTED,
            cookie: v.cookie,
            accepted_ns: v.accepted_ns,
        });
    }
    peers.sort_by_key(|p| (p.server, p.client));
    Ok(peers)
}

/// Every option in `SPENT_TAGS`, the options already taken (works while no agent runs: it
/// reads the pin), with its full time in Unix seconds ([`abi::claimed_seconds`]). Which
/// options the kernel writes there: the map's documentation in `enforcer-ebpf/src/wire.rs`;
/// an entry leaves when the LRU evicts it. Errors: the pin cannot be opened or read.
pub fn spent_options(pin_dir: &Path) -> Result<Vec<(abi::SpentKey, u32)>> {
    // aya reads an LRU hash map through its `HashMap`.
    let map: BpfHashMap<MapData, abi::SpentKey, u32> =
        open_map(pin_dir, maps::SPENT_TAGS)?.try_into()?;
    map.iter()
        .map(|entry| entry.with_context(|| format!("reading {}", maps::SPENT_TAGS)))
        .collect()
}

/// Restores the invariant of `SPENT_RECENT`, the kernel's filter in front of `SPENT_TAGS`:
/// every option in `SPENT_TAGS` that can still be fresh has its slot
/// ([`abi::spent_slot`]) at or above its time, or the kernel's check skips the lookup that
/// refuses a copy of it. The kernel keeps it (each write raises first); it breaks when the
/// filter is made anew beside a pinned `SPENT_TAGS` (its pin removed alone, an interrupted
/// `detach`), and while a previous agent's programs, still linked, spend under the filter
/// they were loaded with. Run at every start, before this agent's programs run and again
/// once they are in place, so that an agent stopped before it finished is repaired by the
/// next: a filter that holds writes nothing. A slot found below an option's time is set
/// above any time that can still be fresh (now + `MAX_SKEW_S` + 60 s, or the option's own
/// time if later: also above whatever a kernel program may write there meanwhile), so every
/// option of that slot is looked up for the next hour. Returns the number of slots set.
/// Errors: a pin cannot be opened, read or written.
pub fn repair_spent_filter(pin_dir: &Path) -> Result<usize> {
    let spent = spent_options(pin_dir)?;
    let mut filter: Array<MapData, u64> = open_map(pin_dir, maps::SPENT_RECENT)?.try_into()?;
    let now = u64::from(now_stamp()?);
    let look = now + u64::from(abi::MAX_SKEW_S) + 60;
    let mut set = 0;
    for (key, at) in spent {
        if u64::from(at) + u64::from(abi::MAX_SKEW_S) + 60 < now {
            continue; // stale at any skew: a copy is `stale_tag` before the lookup
        }
        let slot = abi::spent_slot(&key);
        let held = filter
            .get(&slot, 0)
            .with_context(|| format!("reading {} slot {slot}", maps::SPENT_RECENT))?;
        if held < u64::from(at) {
            // `at` itself when it lies beyond `look` (the clock stepped back since).
            filter
                .set(slot, look.max(u64::from(at)), 0)
                .with_context(|| format!("writing {} slot {slot}", maps::SPENT_RECENT))?;
            set += 1;
        }
    }
    Ok(set)
}

/// The agent's flow-key file, reloaded when its content changes.
#[derive(Debug)]
pub struct KeyFile {
    path: PathBuf,
    loaded: Option<FlowKeys>,
    /// The last refresh error, so that a broken file is reported once, not every tick.
    last_error: Option<String>,
}

impl KeyFile {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            loaded: None,
            last_error: None,
        }
    }

    /// [`KeyFile::refresh`] for the agent's tick: an error is logged once per distinct error
    /// and the keys in force stay.
    pub fn refresh_logged(&mut self, pin_dir: &Path) {
        match self.refresh(pin_dir) {
            Ok(_) => self.last_error = None,
            Err(error) => {
                let text = format!("{error:#}");
                if self.last_error.as_deref() != Some(text.as_str()) {
                    tracing::error!(
                        "flow keys not reloaded, the loaded ones stay in force: {text}"
                    );
                    self.last_error = Some(text);
                }
            }
        }
    }

    /// Reads the file and writes its keys into the kernel when they differ from the ones
    /// loaded; `Ok(true)` when it wrote. An unreadable or invalid file is an error and the
    /// keys in force stay.
    pub fn refresh(&mut self, pin_dir: &Path) -> Result<bool> {
        let keys = read_keys(&self.path)?;
        if self.loaded.as_ref() == Some(&keys) {
            return Ok(false);
        }
        write_keys(pin_dir, &keys)?;
        tracing::info!(
            file = %self.path.display(),
            current = keys.current.id,
            previous = ?keys.previous.as_ref().map(|k| k.id),
            "flow keys loaded"
        );
        self.loaded = Some(keys);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ids a `FLOW_KEYS` state verifies (as the kernel does: any non-empty slot).
    fn verified(state: &[abi::FlowKey; 3]) -> std::collections::BTreeSet<u32> {
        state.iter().map(|k| k.id).filter(|&id| id != 0).collect()
    }

    #[test]
    fn every_intermediate_key_state_verifies_the_old_or_the_new_file() {
        let k = |id: u8| FlowKey { id, key: [id; 16] };
        let file = |current: u8, previous: Option<u8>| FlowKeys {
            current: k(current),
            previous: previous.map(k),
        };
        let ids = |f: &FlowKeys| -> std::collections::BTreeSet<u32> {
            std::iter::once(f.current.id as u32)
                .chain(f.previous.as_ref().map(|p| p.id as u32))
                .collect()
        };
        // (old file, new file): a swap, a rotation, a first key, dropping the previous.
        let cases = [
            (file(1, Some(2)), file(2, Some(1))),
            (file(1, Some(2)), file(3, Some(1))),
            (file(1, None), file(2, Some(1))),
            (file(2, Some(1)), file(2, None)),
        ];
        for (old, new) in cases {
            let mut state = [abi::FlowKey::default(); 3];
            state[abi::CURRENT_KEY as usize] = old.current.slot();
            state[abi::PREVIOUS_KEY as usize] =
                old.previous.as_ref().map(FlowKey::slot).unwrap_or_default();
            let (old_ids, new_ids) = (ids(&old), ids(&new));
            for (slot, key) in key_writes(state, &new) {
                state[slot as usize] = key;
                let now = verified(&state);
                // The signing key always verifies here; every key of the file whose current
                // key signs verifies too.
                let signer = state[abi::CURRENT_KEY as usize].id;
                let file_ids = if signer == new.current.id as u32 {
                    &new_ids
                } else {
                    &old_ids
                };
                assert!(
                    now.is_superset(file_ids),
                    "{old:?} -> {new:?}: state {now:?} misses a key of {file_ids:?}"
                );
            }
            assert_eq!(verified(&state), new_ids, "{old:?} -> {new:?}: final state");
            assert_eq!(state[abi::TRANSITION_KEY as usize].id, 0);
        }
    }

    #[test]
    fn key_file_errors_name_the_line() {
        let f = Path::new("keys");
        let k = parse_keys(
            f,
            "# c\n1 000102030405060708090a0b0c0d0e0f\n2 ff0102030405060708090a0b0c0d0e0f # old\n",
        )
        .unwrap();
        assert_eq!(k.current.id, 1);
        assert_eq!(k.current.key[15], 0x0f);
        assert_eq!(k.previous.unwrap().id, 2);
        let e = parse_keys(f, "\n0 000102030405060708090a0b0c0d0e0f\n").unwrap_err();
        assert!(e.to_string().starts_with("keys:2:"), "{e}");
        let e = parse_keys(f, "1 00010203\n").unwrap_err();
        assert!(
            e.to_string().contains("keys:1:") && e.to_string().contains("32 hex"),
            "{e}"
        );
        let e = parse_keys(f, "").unwrap_err();
        assert!(e.to_string().contains("no key"), "{e}");
        let three = "1 000102030405060708090a0b0c0d0e0f\n2 000102030405060708090a0b0c0d0e0f\n3 000102030405060708090a0b0c0d0e0f\n";
        assert!(parse_keys(f, three)
            .unwrap_err()
            .to_string()
            .contains("more than two"));
        let twice = "1 000102030405060708090a0b0c0d0e0f\n1 000102030405060708090a0b0c0d0e0f\n";
        assert!(parse_keys(f, twice)
            .unwrap_err()
            .to_string()
            .contains("twice"));
    }

    #[test]
    fn option_layout() {
        let key = FlowKey {
            id: 3,
            key: [7; 16],
        };
        let o = option(
            &key,
            0x0102_0304,
            0x0506,
            "fd84::1".parse().unwrap(),
            "fd84::2".parse().unwrap(),
            40000,
            6333,
        );
        assert_eq!(
            &o[..12],
            &[253, 20, 0xA1, 0xE5, 1, 2, 3, 4, 5, 6, 3, abi::VERSION]
        );
        let t = tag(
            &key,
            0x0102_0304,
            0x0506,
            "fd84::1".parse().unwrap(),
            "fd84::2".parse().unwrap(),
            40000,
            6333,
        );
        assert_eq!(&o[12..], &t.to_be_bytes());
        // Every field is covered: change one, the tag changes.
        let other = tag(
            &key,
            0x0102_0304,
            0x0506,
            "fd84::1".parse().unwrap(),
            "fd84::2".parse().unwrap(),
            40001,
            6333,
        );
        assert_ne!(t, other);
    }

    #[test]
    fn freshness_is_compared_modulo_2_16_both_ways() {
        // Within the skew either way, the wrap included; outside it, stale.
        assert!(abi::fresh(100, 100, 30));
        assert!(abi::fresh(70, 100, 30));
        assert!(!abi::fresh(69, 100, 30));
        assert!(abi::fresh(130, 100, 30));
        assert!(!abi::fresh(131, 100, 30));
        assert!(abi::fresh(65_530, 4, 30));
        assert!(abi::fresh(4, 65_530, 30));
        assert!(!abi::fresh(65_530, 40, 30));
        // Half a wrap away is never fresh under the largest skew the agent accepts.
        assert!(!abi::fresh(0, 1 << 15, abi::MAX_SKEW_S));
        assert_eq!(
            abi::stamp(abi::seconds(65_536_000_000_000 + 5_999_999_999, 0)),
            5
        );
        assert_eq!(abi::seconds(100_000_000_000 + 37_000_000_000, 37), 100);
        // The nearest time to the receiver's clock, across the 16-bit wrap either way.
        assert_eq!(abi::claimed_seconds(65_530, 0x2_0004), 0x1_fffa);
        assert_eq!(abi::claimed_seconds(4, 0x1_fffa), 0x2_0004);
        assert_eq!(abi::claimed_seconds(100, 0x5_0064), 0x5_0064);
    }

    #[test]
    fn the_time_and_the_version_are_covered_by_the_tag() {
        let key = FlowKey {
            id: 1,
            key: [9; 16],
        };
        let (s, d): (IpAddr, IpAddr) =
            ("127.96.0.1".parse().unwrap(), "127.96.0.2".parse().unwrap());
        let t = tag(&key, 5, 1000, s, d, 40000, 6333);
        // An old option re-stamped with the current time no longer verifies...
        assert_ne!(t, tag(&key, 5, 1001, s, d, 40000, 6333));
        // ...nor does one relabelled as version 1 (the untimed version).
        assert_ne!(
            t,
            tag_version(&key, 5, 1000, abi::VERSION_1, s, d, 40000, 6333)
        );
        let o = option_version(&key, 5, 1000, abi::VERSION_1, s, d, 40000, 6333);
        assert_eq!(o[11], abi::VERSION_1);
    }

    #[test]
    fn the_v1_deadline_is_in_posix_seconds_and_the_tai_offset_is_read_off_the_clocks() {
        let until =
            v1_until_s(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000)).unwrap();
        assert_eq!(until, 1_000);
        assert!(v1_until_s(std::time::UNIX_EPOCH - std::time::Duration::from_secs(1)).is_err());
        // CLOCK_TAI less the offset is the wall clock (the kernel's `abi::seconds`).
        let offset = tai_offset_s().unwrap();
        let seconds = abi::seconds(tai_now_ns().unwrap(), offset);
        assert!(
            seconds.abs_diff(now_stamp().unwrap()) <= 1,
            "{seconds} offset {offset}"
        );
    }
}
