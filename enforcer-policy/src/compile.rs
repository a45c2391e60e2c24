//! Compilation: every local subject x every destination x each declared port (or the
//! any-port cell), asked of Cedar, written as kernel entries.
//!
//! A destination without declared ports gets one any-port entry per protocol when Cedar
//! allows it on most ports. When some policy reads `context.port`, Cedar is asked at the
//! port breakpoints of [`crate::ports`], and the ports decided otherwise than the majority
//! get exact entries: deny exceptions (`entry::DENY`, attributed to the first determining
//! forbid) under an any-port allow, allows under a default deny. The kernel looks up the
//! exact port first and obeys its verdict, then the any-port entry: it decides what Cedar
//! decides on every port 1..=65535 (port 0, where nothing can listen, follows the any-port
//! entry).
//!
//! Asking Cedar per cell costs cells x policies. A decision can only depend on what the
//! policies read (the `cedar::Analysis`): the entity type, the values of the attributes
//! that some policy accesses, the UID where some policy names it (or every UID, if a policy
//! compares entities as values), the action, and the context fields that some policy reads.
//! Identities with the same such *signature* are indistinguishable to the policies, so Cedar
//! is asked once per (subject signature, destination signature, action, context) and the
//! answer fans out to every cell of the group. The answers are kept, so attributing a kernel
//! deny to its determining policies is a lookup.
//!
//! A Service destination (a ClusterIP) is judged as the ready backends of each of its ports:
//! its cell is allowed only if a direct call to every backend (to the identity its address
//! leads to, at its target port) is allowed, and the answer is the first denying backend's
//! (by address and port), or the first backend's when all allow; without ready backends it
//! is denied, and so is every port of a Service in front of another tenant's step-up
//! endpoint (see `Identity::fronts_foreign_step_up`). The backends' answers come from the
//! same group caches as direct calls, so a Service costs no Cedar request its backends did
//! not already need; the combined answers are kept per (subject signature, Service, port)
//! for attribution.
//!
//! A compile of an edited inventory under the same policies ([`Bundle::compile_incremental`])
//! starts from the previous table's answers: a signature number of the new bundle is mapped
//! to the previous bundle's number of the same signature, and an answer found there is taken
//! instead of asking Cedar. Caches fill in the same order as in a full compile, so the result
//! is the same, caches included.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use enforcer_common::{identity as reserved, PolicyKey, PolicyValue};

use crate::atlas::AtlasTechnique;
use crate::cedar::{Analysis, Answer, Engine};
use crate::identity::{Identities, Identity, IdentityKind};
use crate::{Attribution, Bundle, PolicyError, PolicyRef, Protocol};

#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct CompileStats {
    /// Cells considered (subject x destination x port or any-port, per protocol).
    pub cells: usize,
    /// Cells of the ingress allowlist considered (claimant x destination x TCP cell).
    pub ingress_cells: usize,
    /// Entries written: allows, and deny exceptions (`deny_entries` of them).
    pub allows: usize,
    /// Exact-port deny entries under an any-port allow (policies that read `context.port`
    /// on destinations without declared ports).
    pub deny_entries: usize,
    /// Requests actually sent to Cedar (single-policy evaluations, one per policy group).
    pub cedar_decisions: usize,
    /// Distinct (subject, destination, action, context) signatures: cells that share one
    /// share their decision.
    pub cell_groups: usize,
    /// Distinct subject and destination signatures.
    pub subject_groups: usize,
    pub destination_groups: usize,
    #[serde(with = "duration_secs")]
    pub elapsed: Duration,
}

mod duration_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// A fast hasher for the grouping caches (FxHash's multiply-rotate, with a final mix):
/// keys are small integers and inventory strings, hashed hundreds of thousands of times per
/// compile, and SipHash dominated the compile. Not DoS-resistant: the signature keys hold
/// attribute values that tenants write (a pod's purpose and ring labels, its service account
/// in the SPIFFE ID), but each tenant has at most `max_identities_per_tenant` label sets
/// ([`crate::cluster::ClusterOptions`]), so values crafted to collide cost at most that many
/// probes per lookup.
#[derive(Clone, Copy, Default)]
struct FastHasher(u64);

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(n as u64);
    }
    #[inline]
    fn write_u16(&mut self, n: u16) {
        self.add(n as u64);
    }
    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.add(n as u64);
    }
    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        // The murmur3 finalizer: hashbrown takes bucket bits from the bottom and tag bits
        // from the top, and the multiply leaves the bottom bits weak.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// A Service port's distinct backend targets: (identity index, target port).
type Targets = Vec<(usize, u16)>;

/// What one group request is keyed by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct GroupKey {
    subject: u32,
    destination: u32,
    action: u32,
    /// `None` when no policy reads it.
    port: Option<u16>,
    protocol: Option<Protocol>,
}

/// The policy table of one bundle revision, and what is needed to explain its denies.
///
/// `Clone` so that the agent can publish it and still change it (`Arc::make_mut`).
#[derive(Clone)]
pub struct Compiled {
    /// The snapshot: bundle revision plus the risk overrides suffix.
    revision: String,
    bundle_revision: String,
    /// The bundle revision and cluster revision (`Bundle::base_snapshot`): what the table's
    /// identities and cells are of.
    base_snapshot: String,
    risk_overrides: BTreeMap<String, String>,
    identities: Identities,
    allows: Vec<(PolicyKey, PolicyValue)>,
    /// The ingress column (`Compiled::ingress`), sorted by key.
    ingress: Vec<(PolicyKey, PolicyValue)>,
    rules: Vec<PolicyRef>,
    /// The grouping caches, kept for attribution and for incremental recompiles.
    grouping: Grouping,
    /// The bundle's policy hash and the data of the entities the policies dereference:
    /// equal fingerprints answer equal signatures equally (see `compile_incremental`).
    policy_fingerprint: String,
    implicit_deny_atlas: Vec<AtlasTechnique>,
    unknown_subject_atlas: Vec<AtlasTechnique>,
    stats: CompileStats,
}

/// What a re-evaluation of one subject changed in the kernel table: write `added` (new
/// entries, or entries with another verdict or rule: an insert overwrites), then delete
/// `removed`, each in the order given. The order is such that no moment of the writing
/// allows a call that neither the old nor the new table allows (see
/// `RowDelta::order_for_writing`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowDelta {
    pub added: Vec<(PolicyKey, PolicyValue)>,
    pub removed: Vec<PolicyKey>,
    /// Cells re-evaluated (the row, plus the column when the identity is a destination).
    pub cells: usize,
    /// Single-policy Cedar evaluations it took (the rest came from the grouping caches).
    pub cedar_decisions: usize,
    pub elapsed: Duration,
}

impl RowDelta {
    fn log(&self, subject: &str, snapshot: &str, what: &str) {
        tracing::info!(
            subject,
            snapshot,
            cells = self.cells,
            added = self.added.len(),
            removed = self.removed.len(),
            cedar_decisions = self.cedar_decisions,
            elapsed_ms = self.elapsed.as_secs_f64() * 1e3,
            "{what}"
        );
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }

    /// Deny entries are written before allows (an any-port allow only once the exceptions
    /// under it are in), and allows are deleted before deny entries (an any-port allow
    /// before the exceptions under it go); `old` is the table being changed. Each in key
    /// order otherwise.
    fn order_for_writing(&mut self, old: impl Fn(&PolicyKey) -> Option<PolicyValue>) {
        self.added.sort_by_key(|(k, v)| (v.is_allow(), *k));
        self.removed
            .sort_by_key(|k| (old(k).is_some_and(|v| !v.is_allow()), *k));
    }
}

/// The values of the attributes policies read, in `analysis.attrs` order, plus the UID when
/// it matters: two identities with equal signatures get equal decisions.
fn signature_of(ident: &Identity, analysis: &Analysis) -> Signature {
    let values = analysis
        .attrs
        .iter()
        .map(|attr| {
            let s = |v: &Option<String>| Some(v.clone().unwrap_or_default());
            match (ident.kind, attr.as_str()) {
                (IdentityKind::Workload | IdentityKind::Endpoint, "tenant") => s(&ident.tenant),
                (IdentityKind::Workload, "purpose") => s(&ident.purpose),
                (IdentityKind::Workload, "ring") => s(&ident.ring),
                (IdentityKind::Workload, "spiffe_id") => s(&ident.spiffe_id),
                (IdentityKind::Workload, "risk") => Some(ident.risk.clone()),
                (IdentityKind::Endpoint, "kind") => s(&ident.endpoint_kind),
                (IdentityKind::Endpoint, "datasets") => {
                    let mut d = ident.datasets.clone();
                    d.sort();
                    d.dedup();
                    Some(d.join("\0"))
                }
                _ => None,
            }
        })
        .collect();
    let named = analysis.uid_sensitive
        || analysis
            .uids
            .contains(&(ident.kind.cedar_type().to_string(), ident.name.clone()));
    (ident.kind, values, named.then(|| ident.name.clone()))
}

type Signature = (IdentityKind, Vec<Option<String>>, Option<String>);
/// (subject signature, destination signature, action, port if read, protocol if read).
type PolicyGroupKey = (u32, u32, u32, Option<u16>, Option<Protocol>);

/// A destination cell: the port (0 for the any-port cell) and protocol the kernel keys it
/// by and Cedar is asked with, and the action.
#[derive(Clone)]
struct Cell {
    port: u16,
    protocol: Protocol,
    action: String,
    /// `action`'s number in `Grouping::actions`.
    action_no: u32,
}

/// A destination: its identity index, the identity, its cells.
type Destination<'a> = (usize, &'a Identity, Vec<Cell>);

/// Signature numbering: identities with equal signatures share a number. A number, once
/// given, always means the same signature (cached answers stay valid); an identity whose
/// attributes change moves to another number, new or shared with identities that look like
/// it now.
#[derive(Clone, Default)]
struct Numbering {
    numbers: FastMap<Signature, u32>,
    /// Identity index -> signature number.
    sig: Vec<u32>,
    /// Signature number -> an identity that has it now (`None`: nobody has it any more).
    reps: Vec<Option<usize>>,
}

impl Numbering {
    fn new(ids: &Identities, analysis: &Analysis) -> Numbering {
        let mut n = Numbering {
            sig: Vec::with_capacity(ids.len()),
            ..Numbering::default()
        };
        for (i, ident) in ids.iter().enumerate() {
            let s = n.number(signature_of(ident, analysis), i);
            n.sig.push(s);
        }
        n
    }

    /// A policy's numbering, from the whole-set one: identities with the same whole-set
    /// signature have the same signature for each policy (a policy reads a subset of what
    /// all read), so each policy signature is computed once per whole-set signature. Numbers
    /// and representatives are those of `Numbering::new(ids, analysis)`: both go to the
    /// first identity, in order, with the signature.
    fn derived(ids: &Identities, analysis: &Analysis, whole: &Numbering) -> Numbering {
        let mut n = Numbering {
            sig: Vec::with_capacity(ids.len()),
            ..Numbering::default()
        };
        let mut by_whole: Vec<Option<u32>> = vec![None; whole.reps.len()];
        for (i, ident) in ids.iter().enumerate() {
            let w = whole.sig[i] as usize;
            let s = match by_whole[w] {
                Some(s) => s,
                None => {
                    let s = n.number(signature_of(ident, analysis), i);
                    by_whole[w] = Some(s);
                    s
                }
            };
            n.sig.push(s);
        }
        n
    }

    fn number(&mut self, sig: Signature, i: usize) -> u32 {
        let next = self.numbers.len() as u32;
        *self.numbers.entry(sig).or_insert_with(|| {
            self.reps.push(Some(i));
            next
        })
    }

    /// Identity `i`'s attributes changed: renumber it, and find its old number another
    /// representative if it was one.
    fn renumber(&mut self, ident: &Identity, i: usize, analysis: &Analysis) {
        let old = self.sig[i];
        let new = self.number(signature_of(ident, analysis), i);
        if new == old {
            return;
        }
        self.sig[i] = new;
        if self.reps[new as usize].is_none() {
            self.reps[new as usize] = Some(i);
        }
        if self.reps[old as usize] == Some(i) {
            self.reps[old as usize] = self.sig.iter().position(|&s| s == old);
        }
    }

    fn rep(&self, sig: u32) -> usize {
        #[allow(clippy::expect_used)]
        self.reps[sig as usize].expect("a signature in use has a representative")
    }
}

/// One policy's own grouping: identities that look the same to *this* policy share its
/// answer. Policies read few attributes each (tenant-isolation reads only `tenant`), so
/// per-policy groups are far fewer than whole-set groups.
#[derive(Clone)]
struct PerPolicy {
    numbering: Numbering,
    reads_port: bool,
    reads_protocol: bool,
    satisfied: FastMap<PolicyGroupKey, bool>,
}

/// Everything compilation caches: signatures (whole-set and per policy), the answer of every
/// cell group seen, and the per-policy answers they were combined from. Kept in `Compiled`:
/// attribution is a lookup in it, and an incremental recompile reuses it.
#[derive(Clone)]
struct Grouping {
    whole: Numbering,
    per_policy: Vec<PerPolicy>,
    actions: HashMap<String, u32>,
    groups: FastMap<GroupKey, u32>,
    answers: Vec<Answer>,
    answer_ids: FastMap<Answer, u32>,
    reads_port: bool,
    reads_protocol: bool,
    /// Where Cedar is asked about destinations without declared ports when some policy
    /// reads `context.port` ([`crate::ports::breakpoints`]); empty when none does.
    port_points: Vec<u16>,
    /// The port plan of each any-port cell group (keyed with `port: None`).
    port_plans: FastMap<GroupKey, Arc<PortPlan>>,
    /// Single-policy Cedar evaluations so far.
    decisions: usize,
    /// Service cells: (subject whole-set signature, Service identity index, port,
    /// protocol) -> the combined answer of the port's backends.
    service_cells: FastMap<(u32, u32, u16, Protocol), u32>,
    /// A Service port's distinct backend targets, in backend order: (Service identity
    /// index, port, protocol) -> (identity index, target port).
    service_targets: FastMap<(u32, u16, Protocol), Arc<Targets>>,
}

/// How an any-port cell is written when some policy reads `context.port`: Cedar's answer at
/// each of `Grouping::port_points`, which determines every port 1..=65535.
struct PortPlan {
    /// The answer of the any-port entry (and of port 0): the majority verdict, its largest
    /// region's answer.
    any: u32,
    /// The ports decided otherwise than `any`, ascending, with their answers.
    exceptions: Vec<(u16, u32)>,
}

impl Grouping {
    fn new(ids: &Identities, engine: &Engine) -> Grouping {
        let analysis = &engine.analysis;
        let whole = Numbering::new(ids, analysis);
        Grouping {
            per_policy: engine
                .singles
                .iter()
                .map(|(_, a)| PerPolicy {
                    numbering: Numbering::derived(ids, a, &whole),
                    reads_port: a.reads_port(),
                    reads_protocol: a.reads_protocol(),
                    satisfied: FastMap::default(),
                })
                .collect(),
            actions: HashMap::new(),
            groups: FastMap::default(),
            answers: Vec::new(),
            answer_ids: FastMap::default(),
            reads_port: analysis.reads_port(),
            reads_protocol: analysis.reads_protocol(),
            port_points: if analysis.reads_port() {
                crate::ports::breakpoints(engine.port_reads.iter().flat_map(|(l, _)| l))
            } else {
                Vec::new()
            },
            port_plans: FastMap::default(),
            whole,
            decisions: 0,
            service_cells: FastMap::default(),
            service_targets: FastMap::default(),
        }
    }

    /// Identity `i` changed (its risk): new signatures, whole-set and per policy.
    fn renumber(&mut self, ids: &Identities, engine: &Engine, i: usize) {
        let ident = ids.at(i);
        self.whole.renumber(ident, i, &engine.analysis);
        for (pp, (_, analysis)) in self.per_policy.iter_mut().zip(&engine.singles) {
            pp.numbering.renumber(ident, i, analysis);
        }
    }

    /// Every destination of `ids`, with its cells.
    fn destinations<'a>(&mut self, ids: &'a Identities) -> Vec<Destination<'a>> {
        ids.iter()
            .enumerate()
            .filter(|(_, x)| x.is_destination())
            .map(|(i, x)| (i, x, self.cells(x)))
            .collect()
    }

    /// A destination's cells: each declared port, or the any-port cell per protocol.
    fn cells(&mut self, d: &Identity) -> Vec<Cell> {
        let mut cell = |port, protocol, action: &str| Cell {
            port,
            protocol,
            action: action.to_string(),
            action_no: self.action_number(action),
        };
        if d.ports.is_empty() {
            Protocol::ALL
                .iter()
                .map(|&p| cell(0, p, crate::DEFAULT_ACTION))
                .collect()
        } else {
            d.ports
                .iter()
                .map(|p| cell(p.port, p.protocol, &p.action))
                .collect()
        }
    }

    fn action_number(&mut self, action: &str) -> u32 {
        if let Some(&n) = self.actions.get(action) {
            return n;
        }
        let n = self.actions.len() as u32;
        self.actions.insert(action.to_string(), n);
        n
    }

    fn key(&self, si: usize, di: usize, action: u32, port: u16, protocol: Protocol) -> GroupKey {
        GroupKey {
            subject: self.whole.sig[si],
            destination: self.whole.sig[di],
            action,
            port: self.reads_port.then_some(port),
            protocol: self.reads_protocol.then_some(protocol),
        }
    }

    /// The number of `answer` in `answers`, added if new.
    fn intern(&mut self, answer: Answer) -> u32 {
        match self.answer_ids.get(&answer) {
            Some(&a) => a,
            None => {
                let a = self.answers.len() as u32;
                self.answer_ids.insert(answer.clone(), a);
                self.answers.push(answer);
                a
            }
        }
    }

    /// The answer (index into `answers`) for subject `si` x destination `di` x `cell`,
    /// asking Cedar only for policy groups not seen before (here, or in `carried`).
    fn answer(
        &mut self,
        engine: &Engine,
        ids: &Identities,
        si: usize,
        di: usize,
        cell: &Cell,
        carried: Option<&mut Carried>,
    ) -> Result<u32, PolicyError> {
        self.answer_at(engine, ids, si, di, cell, cell.port, carried)
    }

    /// [`Grouping::answer`] with Cedar asked at `port` instead of the cell's own.
    #[allow(clippy::too_many_arguments)]
    fn answer_at(
        &mut self,
        engine: &Engine,
        ids: &Identities,
        si: usize,
        di: usize,
        cell: &Cell,
        port: u16,
        mut carried: Option<&mut Carried>,
    ) -> Result<u32, PolicyError> {
        let Cell {
            protocol,
            action_no,
            ..
        } = *cell;
        let action = &cell.action;
        let key = self.key(si, di, action_no, port, protocol);
        if let Some(&a) = self.groups.get(&key) {
            return Ok(a);
        }
        if let Some(c) = carried.as_deref_mut() {
            if let Some(previous) = c.group(&key) {
                let a = match c.answers[previous as usize] {
                    Some(a) => a,
                    None => {
                        let a = self.intern(c.prev.answers[previous as usize].clone());
                        c.answers[previous as usize] = Some(a);
                        a
                    }
                };
                c.group_hits += 1;
                self.groups.insert(key, a);
                return Ok(a);
            }
        }
        // Evaluate each policy in its own groups, then combine as Cedar does: deny if a
        // forbid is satisfied, allow if a permit is, else deny.
        let (mut permits, mut forbids) = (Vec::new(), Vec::new());
        for (r, pp) in self.per_policy.iter_mut().enumerate() {
            let pkey = (
                pp.numbering.sig[si],
                pp.numbering.sig[di],
                action_no,
                pp.reads_port.then_some(port),
                pp.reads_protocol.then_some(protocol),
            );
            let sat = match pp.satisfied.get(&pkey) {
                Some(&sat) => sat,
                None => {
                    let reused = carried.as_deref_mut().and_then(|c| c.satisfied(r, &pkey));
                    let sat = match reused {
                        Some(sat) => sat,
                        None => {
                            self.decisions += 1;
                            let (rs, rd) = (pp.numbering.rep(pkey.0), pp.numbering.rep(pkey.1));
                            engine
                                .satisfied(r, rs, action, rd, port, protocol)
                                .map_err(|message| PolicyError::Evaluation {
                                    from: ids.at(rs).name.clone(),
                                    to: ids.at(rd).name.clone(),
                                    port,
                                    protocol,
                                    action: action.clone(),
                                    message,
                                })?
                        }
                    };
                    pp.satisfied.insert(pkey, sat);
                    sat
                }
            };
            if sat {
                match engine.rules[r].effect {
                    crate::Effect::Permit => permits.push(r as u32),
                    crate::Effect::Forbid => forbids.push(r as u32),
                }
            }
        }
        let answer = if forbids.is_empty() && !permits.is_empty() {
            Answer {
                allowed: true,
                rules: permits,
            }
        } else {
            Answer {
                allowed: false,
                rules: forbids,
            }
        };
        let a = self.intern(answer);
        self.groups.insert(key, a);
        Ok(a)
    }

    /// Whether `cell` (of a destination without declared ports) is decided port by port.
    fn by_port(&self, cell: &Cell) -> bool {
        cell.port == 0 && !self.port_points.is_empty()
    }

    /// The port plan of an any-port cell decided port by port ([`Grouping::by_port`]).
    #[allow(clippy::too_many_arguments)]
    fn port_plan(
        &mut self,
        engine: &Engine,
        ids: &Identities,
        si: usize,
        di: usize,
        cell: &Cell,
        mut carried: Option<&mut Carried>,
    ) -> Result<Arc<PortPlan>, PolicyError> {
        let key = GroupKey {
            port: None,
            ..self.key(si, di, cell.action_no, 0, cell.protocol)
        };
        if let Some(p) = self.port_plans.get(&key) {
            return Ok(p.clone());
        }
        let points = std::mem::take(&mut self.port_points);
        let mut answers = Vec::with_capacity(points.len());
        let mut failed = None;
        for &p in &points {
            match self.answer_at(engine, ids, si, di, cell, p, carried.as_deref_mut()) {
                Ok(a) => answers.push(a),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        self.port_points = points;
        if let Some(e) = failed {
            return Err(e);
        }
        // Region i: points[i] up to the next point (exclusive), the last up to 65535.
        let points = &self.port_points;
        let end = |i: usize| points.get(i + 1).map_or(65536, |&p| p as u32);
        let span = |i: usize| end(i) - points[i] as u32;
        let allowed = |i: usize| self.answers[answers[i] as usize].allowed;
        let allowed_ports: u32 = (0..points.len()).filter(|&i| allowed(i)).map(span).sum();
        // 65,535 ports: never a tie.
        let majority = allowed_ports * 2 > 65535;
        let mut any = None::<usize>;
        let mut minority = 0usize;
        for i in 0..points.len() {
            if allowed(i) == majority {
                if any.is_none_or(|a| span(i) > span(a)) {
                    any = Some(i);
                }
            } else {
                minority += span(i) as usize;
            }
        }
        if minority > crate::ports::MAX_PORT_EXCEPTIONS {
            return Err(self.too_many_port_entries(engine, ids, di, cell, &answers, minority));
        }
        let mut exceptions = Vec::with_capacity(minority);
        for i in (0..points.len()).filter(|&i| allowed(i) != majority) {
            exceptions.extend((points[i] as u32..end(i)).map(|p| (p as u16, answers[i])));
        }
        #[allow(clippy::expect_used)]
        let any = answers[any.expect("the majority verdict has a region")];
        let plan = Arc::new(PortPlan { any, exceptions });
        self.port_plans.insert(key, plan.clone());
        Ok(plan)
    }

    /// The error for a port plan with `entries` exact entries: at the first policy that
    /// reads `context.port` and determines a region's answer (else the first that reads it).
    fn too_many_port_entries(
        &self,
        engine: &Engine,
        ids: &Identities,
        di: usize,
        cell: &Cell,
        answers: &[u32],
        entries: usize,
    ) -> PolicyError {
        let reads = |r: &u32| {
            engine
                .port_reads
                .get(*r as usize)
                .is_some_and(|(_, at)| at.is_some())
        };
        let determining = answers
            .iter()
            .flat_map(|&a| self.answers[a as usize].rules.iter())
            .filter(|r| reads(r))
            .min()
            .copied();
        let rule = determining
            .or_else(|| (0..engine.rules.len() as u32).find(|r| reads(r)))
            .unwrap_or(0) as usize;
        let (line, column) = engine
            .port_reads
            .get(rule)
            .and_then(|(_, at)| *at)
            .unwrap_or((1, 1));
        let policy = engine.rules.get(rule);
        let d = ids.at(di);
        let remedy = if matches!(d.kind, IdentityKind::World | IdentityKind::Node) {
            format!(
                "{} takes every port: narrow the rule to at most {} ports decided otherwise than the rest, or write it for endpoints that declare their ports",
                d.kind.cedar_type(),
                crate::ports::MAX_PORT_EXCEPTIONS
            )
        } else {
            format!("declare ports on `{}` in {}", d.name, crate::INVENTORY_FILE)
        };
        PolicyError::TooManyPortEntries {
            policy: policy.map(|p| p.id.clone()).unwrap_or_default(),
            file: policy.map(|p| p.file.clone()).unwrap_or_default(),
            line,
            column,
            destination: d.name.clone(),
            protocol: cell.protocol,
            entries,
            remedy,
        }
    }

    /// The answer of a direct call from subject `si` to `di` (not a Service) at
    /// `port`/`protocol` (`port` >= 1), as the kernel's table decides it and attributes it:
    /// the declared port's cell, or the any-port cell's (asked at the port's region where
    /// some policy reads the port). `None`: `di` does not declare the port (denied).
    #[allow(clippy::too_many_arguments)]
    fn direct_answer(
        &mut self,
        engine: &Engine,
        ids: &Identities,
        si: usize,
        di: usize,
        port: u16,
        protocol: Protocol,
        carried: Option<&mut Carried>,
    ) -> Result<Option<u32>, PolicyError> {
        let d = ids.at(di);
        if d.kind == IdentityKind::Unidentified {
            return Ok(None); // Denied: an address the merge refused (a Service backend).
        }
        let Some((_, action)) = d.cell_of(port, protocol) else {
            return Ok(None);
        };
        let cell = Cell {
            port: if d.ports.is_empty() { 0 } else { port },
            protocol,
            action: action.to_string(),
            action_no: self.action_number(action),
        };
        if self.by_port(&cell) {
            // Cedar decides alike across a region (see `ports`): its point answers for it.
            let at = self.port_points[crate::ports::region(&self.port_points, port)];
            return self
                .answer_at(engine, ids, si, di, &cell, at, carried)
                .map(Some);
        }
        self.answer(engine, ids, si, di, &cell, carried).map(Some)
    }

    /// The distinct (identity index, target port) of a Service port's backends, in the
    /// order of the backends.
    fn service_targets(
        &mut self,
        ids: &Identities,
        di: usize,
        port: u16,
        protocol: Protocol,
    ) -> Arc<Vec<(usize, u16)>> {
        let key = (di as u32, port, protocol);
        if let Some(t) = self.service_targets.get(&key) {
            return t.clone();
        }
        let mut seen = HashSet::new();
        let targets: Vec<(usize, u16)> = ids
            .at(di)
            .service_port(port, protocol)
            .map_or(&[][..], |p| &p.backends[..])
            .iter()
            .map(|b| (ids.backend_index(&b.ip), b.port))
            .filter(|t| seen.insert(*t))
            .collect();
        let targets = Arc::new(targets);
        self.service_targets.insert(key, targets.clone());
        targets
    }

    /// The answer of subject `si` x Service `di` x `cell`: the first denying backend's,
    /// else the first backend's; a deny without policies when there is no backend, and for
    /// a backend that does not declare its target port.
    #[allow(clippy::too_many_arguments)]
    fn service_answer(
        &mut self,
        engine: &Engine,
        ids: &Identities,
        si: usize,
        di: usize,
        cell: &Cell,
        mut carried: Option<&mut Carried>,
    ) -> Result<u32, PolicyError> {
        let key = (self.whole.sig[si], di as u32, cell.port, cell.protocol);
        if let Some(&a) = self.service_cells.get(&key) {
            return Ok(a);
        }
        let denied = Answer {
            allowed: false,
            rules: vec![],
        };
        if ids.at(di).fronts_foreign_step_up.is_some() {
            let a = self.intern(denied);
            self.service_cells.insert(key, a);
            return Ok(a);
        }
        let mut first = None;
        let mut deciding = None;
        for &(bi, port) in self
            .service_targets(ids, di, cell.port, cell.protocol)
            .iter()
        {
            let a = match self.direct_answer(
                engine,
                ids,
                si,
                bi,
                port,
                cell.protocol,
                carried.as_deref_mut(),
            )? {
                Some(a) => a,
                None => self.intern(denied.clone()),
            };
            first.get_or_insert(a);
            if !self.answers[a as usize].allowed {
                deciding = Some(a);
                break;
            }
        }
        let a = match deciding.or(first) {
            Some(a) => a,
            None => self.intern(denied),
        };
        self.service_cells.insert(key, a);
        Ok(a)
    }

    /// The kernel entries of subject `si` x destination `di` x `cell`, appended to `out`.
    #[allow(clippy::too_many_arguments)]
    fn entries(
        &mut self,
        engine: &Engine,
        ids: &Identities,
        si: usize,
        di: usize,
        cell: &Cell,
        carried: Option<&mut Carried>,
        out: &mut Vec<(PolicyKey, PolicyValue)>,
    ) -> Result<(), PolicyError> {
        let (s, d) = (ids.at(si), ids.at(di));
        if d.kind == IdentityKind::Service {
            let answer = self.service_answer(engine, ids, si, di, cell, carried)?;
            out.extend(self.allow(answer, s, d, cell));
            return Ok(());
        }
        if !self.by_port(cell) {
            let answer = self.answer(engine, ids, si, di, cell, carried)?;
            out.extend(self.allow(answer, s, d, cell));
            return Ok(());
        }
        let plan = self.port_plan(engine, ids, si, di, cell, carried)?;
        let key = |dport: u16| PolicyKey {
            subject: s.id,
            destination: d.id,
            dport,
            protocol: cell.protocol.number(),
            _pad: 0,
        };
        let first = |a: &Answer| a.rules.first().copied().unwrap_or(u32::MAX);
        let any = &self.answers[plan.any as usize];
        if any.allowed {
            out.push((key(0), PolicyValue::allow(first(any))));
        }
        out.reserve(plan.exceptions.len());
        for &(port, a) in &plan.exceptions {
            let answer = &self.answers[a as usize];
            let value = if answer.allowed {
                PolicyValue::allow(first(answer))
            } else {
                // The first determining forbid names the deny (u32::MAX: no policy, an
                // implicit deny on this port).
                PolicyValue::deny(first(answer))
            };
            out.push((key(port), value));
        }
        Ok(())
    }

    /// The allow entry of a cell, if its answer allows it.
    fn allow(
        &self,
        answer: u32,
        s: &Identity,
        d: &Identity,
        cell: &Cell,
    ) -> Option<(PolicyKey, PolicyValue)> {
        let answer = &self.answers[answer as usize];
        answer.allowed.then(|| {
            (
                PolicyKey {
                    subject: s.id,
                    destination: d.id,
                    dport: cell.port,
                    protocol: cell.protocol.number(),
                    _pad: 0,
                },
                PolicyValue::allow(answer.rules.first().copied().unwrap_or(u32::MAX)),
            )
        })
    }
}

/// The caches of a previous compile under the same policies (same fingerprint), read
/// through this compile's numbering: a signature (or action) number here is mapped to the
/// previous compile's number for the same signature, if it had one.
struct Carried<'a> {
    prev: &'a Grouping,
    whole: Vec<Option<u32>>,
    per_policy: Vec<Vec<Option<u32>>>,
    actions: Vec<Option<u32>>,
    /// Previous answer index -> this compile's, once interned.
    answers: Vec<Option<u32>>,
    /// Cell groups and single-policy answers taken from `prev` instead of asking Cedar.
    group_hits: usize,
    policy_hits: usize,
}

impl<'a> Carried<'a> {
    /// `now` must have its actions numbered (`Grouping::destinations`).
    fn new(prev: &'a Grouping, now: &Grouping) -> Carried<'a> {
        let map = |now: &Numbering, prev: &Numbering| {
            let mut m = vec![None; now.reps.len()];
            for (sig, &n) in &now.numbers {
                m[n as usize] = prev.numbers.get(sig).copied();
            }
            m
        };
        let mut actions = vec![None; now.actions.len()];
        for (name, &n) in &now.actions {
            actions[n as usize] = prev.actions.get(name).copied();
        }
        Carried {
            prev,
            whole: map(&now.whole, &prev.whole),
            per_policy: now
                .per_policy
                .iter()
                .zip(&prev.per_policy)
                .map(|(now, prev)| map(&now.numbering, &prev.numbering))
                .collect(),
            actions,
            answers: vec![None; prev.answers.len()],
            group_hits: 0,
            policy_hits: 0,
        }
    }

    fn translate(map: &[Option<u32>], n: u32) -> Option<u32> {
        map.get(n as usize).copied().flatten()
    }

    /// The previous answer index of this compile's cell group `key`.
    fn group(&self, key: &GroupKey) -> Option<u32> {
        let previous = GroupKey {
            subject: Self::translate(&self.whole, key.subject)?,
            destination: Self::translate(&self.whole, key.destination)?,
            action: Self::translate(&self.actions, key.action)?,
            port: key.port,
            protocol: key.protocol,
        };
        self.prev.groups.get(&previous).copied()
    }

    /// Whether policy `rule` was satisfied for this compile's policy group `key`, if the
    /// previous compile knew.
    fn satisfied(&mut self, rule: usize, key: &PolicyGroupKey) -> Option<bool> {
        let map = &self.per_policy[rule];
        let (s, d, action, port, protocol) = *key;
        let previous = (
            Self::translate(map, s)?,
            Self::translate(map, d)?,
            Self::translate(&self.actions, action)?,
            port,
            protocol,
        );
        let sat = self.prev.per_policy[rule].satisfied.get(&previous).copied();
        if sat.is_some() {
            self.policy_hits += 1;
        }
        sat
    }
}

/// What decides how a signature is answered, besides the signature: the schema and policies
/// ([`Bundle::policy_hash`]) and the attributes of the entities the policies dereference by
/// name (`Workload::"w".tenant`).
fn policy_fingerprint(bundle: &Bundle) -> String {
    let ids = bundle.identities();
    let mut parts = vec![("policies".to_string(), bundle.policy_hash().to_string())];
    for (ty, name) in &bundle.engine().analysis.derefs {
        let data = ids
            .index_of(name)
            .map(|i| ids.at(i))
            .filter(|x| x.kind.cedar_type() == ty)
            .map_or_else(
                || "absent".to_string(),
                |x| {
                    let mut datasets = x.datasets.clone();
                    datasets.sort();
                    datasets.dedup();
                    format!(
                        "{:?}",
                        (
                            &x.tenant,
                            &x.purpose,
                            &x.ring,
                            &x.spiffe_id,
                            &x.risk,
                            &x.endpoint_kind,
                            datasets
                        )
                    )
                },
            );
        parts.push((format!("{ty}::{name}"), data));
    }
    crate::hash_pairs(parts.iter().map(|(k, v)| (k.as_str(), v.as_str())), 16)
}

/// The ingress column: for every destination whose ingress mode is `enforce` or `audit`,
/// the entries of every identity that can claim itself on the wire (each workload of the
/// inventory and of the cluster, local or not) x each TCP cell; for every workload of this
/// node that shares its network namespace (`flags::SHARED_NETNS`), those of the claimants
/// that are no local subject (the kernel judges a local one by the table). WORLD has no entries: the
/// schema does not make it a principal (policies read a principal's `tenant`), so an
/// untagged peer from outside the cluster is the implicit deny, as before. A remote pod has no row in the table (it is not a local subject), but it is a
/// claimant at this node's ingress. The cells come from the same group caches as the table:
/// Cedar is asked once per (subject signature, destination signature, cell), so a thousand
/// remote pods of a few label sets cost a few decisions.
fn ingress_column(
    grouping: &mut Grouping,
    engine: &Engine,
    ids: &Identities,
    mut carried: Option<&mut Carried>,
) -> Result<(Vec<(PolicyKey, PolicyValue)>, usize), PolicyError> {
    use enforcer_common::flags;
    let ingress = flags::INGRESS_ENFORCE | flags::INGRESS_AUDIT | flags::SHARED_NETNS;
    let destinations: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|(_, d)| d.is_destination() && d.flags & ingress != 0)
        .map(|(i, _)| i)
        .collect();
    let mut out = Vec::new();
    let mut cells_seen = 0;
    if destinations.is_empty() {
        return Ok((out, cells_seen));
    }
    let claimants: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|(_, x)| x.kind == IdentityKind::Workload)
        .map(|(i, _)| i)
        .collect();
    // A workload of the node's namespace needs the rows of callers with no row in the table
    // only (the kernel judges a local subject by the table): N local workloads cost N x the
    // remote ones, not N x N.
    let remote: Vec<usize> = claimants
        .iter()
        .copied()
        .filter(|&i| !ids.at(i).is_subject())
        .collect();
    for di in destinations {
        let cells: Vec<Cell> = grouping
            .cells(ids.at(di))
            .into_iter()
            .filter(|c| c.protocol == Protocol::Tcp)
            .collect();
        let of_ingress = ids.at(di).flags & (flags::INGRESS_ENFORCE | flags::INGRESS_AUDIT) != 0;
        for &si in if of_ingress { &claimants } else { &remote } {
            for cell in &cells {
                cells_seen += 1;
                grouping.entries(engine, ids, si, di, cell, carried.as_deref_mut(), &mut out)?;
            }
        }
    }
    out.sort_by_key(|(k, _)| *k);
    Ok((out, cells_seen))
}

/// The deny exceptions among `entries`.
fn deny_entries(entries: &[(PolicyKey, PolicyValue)]) -> usize {
    entries.iter().filter(|(_, v)| !v.is_allow()).count()
}

/// A full compile, or with `previous`, one that reuses its answers if its fingerprint is
/// this bundle's.
pub(crate) fn compile(
    bundle: &Bundle,
    previous: Option<&Compiled>,
) -> Result<Compiled, PolicyError> {
    let start = Instant::now();
    let engine = bundle.engine();
    let ids = bundle.identities();
    let mut grouping = Grouping::new(ids, engine);

    let subjects: Vec<(usize, &Identity)> = ids
        .iter()
        .enumerate()
        .filter(|(_, x)| x.is_subject())
        .collect();
    let destinations = grouping.destinations(ids);
    let fingerprint = policy_fingerprint(bundle);
    let mut carried = previous.and_then(|p| {
        let same = p.policy_fingerprint == fingerprint
            && p.grouping.per_policy.len() == grouping.per_policy.len();
        if !same {
            tracing::debug!(
                previous = %p.bundle_revision,
                revision = bundle.revision(),
                "policies or the entities they name changed: compiling in full"
            );
        }
        same.then(|| Carried::new(&p.grouping, &grouping))
    });
    if let Some(c) = &carried {
        // About as many groups as last time: no rehashing while the table fills.
        grouping.groups.reserve(c.prev.groups.len());
        grouping.answer_ids.reserve(c.prev.answers.len());
        grouping.answers.reserve(c.prev.answers.len());
    }

    let mut allows = Vec::new();
    let mut cells_seen = 0usize;
    for &(si, _) in &subjects {
        for (di, _, dcells) in &destinations {
            for cell in dcells {
                cells_seen += 1;
                grouping.entries(engine, ids, si, *di, cell, carried.as_mut(), &mut allows)?;
            }
        }
    }
    allows.sort_by_key(|(k, _)| *k);
    let (ingress, ingress_cells) = ingress_column(&mut grouping, engine, ids, carried.as_mut())?;
    let sig = |i: usize| grouping.whole.sig[i];
    let subject_sigs: HashSet<u32> = subjects.iter().map(|&(si, _)| sig(si)).collect();
    // Counted over the cells compiled: without subjects, no destination takes part.
    let destination_sigs: HashSet<u32> = if subjects.is_empty() {
        HashSet::new()
    } else {
        destinations.iter().map(|&(di, _, _)| sig(di)).collect()
    };
    let defaults = &bundle.inventory().defaults;
    let stats = CompileStats {
        cells: cells_seen,
        ingress_cells,
        allows: allows.len(),
        deny_entries: deny_entries(&allows),
        cedar_decisions: grouping.decisions,
        cell_groups: grouping.groups.len(),
        subject_groups: subject_sigs.len(),
        destination_groups: destination_sigs.len(),
        elapsed: start.elapsed(),
    };
    let (reused_groups, reused_answers) = carried
        .as_ref()
        .map_or((0, 0), |c| (c.group_hits, c.policy_hits));
    tracing::info!(
        revision = bundle.revision(),
        incremental = carried.is_some(),
        cells = stats.cells,
        allows = stats.allows,
        deny_entries = stats.deny_entries,
        cedar_decisions = stats.cedar_decisions,
        reused_groups,
        reused_answers,
        elapsed_ms = stats.elapsed.as_secs_f64() * 1e3,
        "policy compiled"
    );
    Ok(Compiled {
        revision: bundle.snapshot(),
        bundle_revision: bundle.revision().to_string(),
        base_snapshot: bundle.base_snapshot(),
        risk_overrides: bundle.risk_overrides().clone(),
        identities: ids.clone(),
        allows,
        ingress,
        rules: engine.rules.clone(),
        grouping,
        policy_fingerprint: fingerprint,
        implicit_deny_atlas: crate::atlas::lookup_all(&defaults.implicit_deny_atlas),
        unknown_subject_atlas: crate::atlas::lookup_all(&defaults.unknown_subject_atlas),
        stats,
    })
}

impl Compiled {
    /// The policy snapshot this table was compiled from: the bundle revision, followed by
    /// `+risk(N):HHHHHHHH` while N risk overrides are in force (see
    /// [`crate::risk::overrides_suffix`]). Events carry it as `policy.snapshot`.
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// The bundle's content revision alone ([`Bundle::revision`]).
    pub fn bundle_revision(&self) -> &str {
        &self.bundle_revision
    }

    /// What decides how a signature is answered, besides the signature: the bundle's
    /// [`Bundle::policy_hash`] and the attributes of the entities its policies dereference
    /// by name. [`Bundle::compile_incremental`] reuses this table's answers only for a
    /// bundle with the same fingerprint.
    pub fn policy_fingerprint(&self) -> &str {
        &self.policy_fingerprint
    }

    /// The risk overrides this table reflects: workload name -> canonical score.
    pub fn risk_overrides(&self) -> &BTreeMap<String, String> {
        &self.risk_overrides
    }

    /// Re-evaluate one workload after a risk change ([`Bundle::set_risk`]) and return what
    /// changed in the kernel table.
    ///
    /// Re-evaluated: `subject`'s row (every destination x port cell, if it is a local
    /// subject) and, since a workload with addresses is a destination too, its column (every
    /// local subject to it). The same is done for any other identity whose risk in `bundle`
    /// differs from this table's (several `set_risk` before one recompile). `allows`, the
    /// deny attribution, the identity's `risk` and [`Compiled::revision`] are updated; the
    /// other cells are not touched. Cedar is asked only for policy groups not seen before.
    ///
    /// Exception: when some policy reads a changed identity's attributes by name
    /// (`Workload::"w1".risk`), any cell may change. Then `self` becomes a full compile of
    /// `bundle`, and the delta is the exact difference between the old and the new table
    /// (`cells` and `cedar_decisions` are the full compile's).
    ///
    /// `bundle` must be the bundle this table was compiled from (same revision and cluster
    /// revision), or [`PolicyError::StaleCompiled`]. On error, `self` may hold a partly updated grouping
    /// cache but its table is unchanged; compile in full to recover.
    pub fn recompile_subject(
        &mut self,
        bundle: &Bundle,
        subject: &str,
    ) -> Result<RowDelta, PolicyError> {
        let start = Instant::now();
        let base = bundle.base_snapshot();
        if base != self.base_snapshot {
            return Err(PolicyError::StaleCompiled {
                compiled: self.base_snapshot.clone(),
                bundle: base,
            });
        }
        let fresh = bundle.identities();
        let target = crate::workload_index(fresh, subject, PolicyError::NotASubject)?;
        let engine = bundle.engine();
        let decisions_before = self.grouping.decisions;

        // Bring every drifted identity up to date first, so that every signature's
        // representative has the attributes Cedar now sees for it.
        let mut changed: Vec<usize> = (0..fresh.len())
            .filter(|&i| self.identities.at(i).risk != fresh.at(i).risk)
            .collect();
        let derefs = &engine.analysis.derefs;
        if changed
            .iter()
            .map(|&i| fresh.at(i))
            .any(|x| derefs.contains(&(x.kind.cedar_type().to_string(), x.name.clone())))
        {
            // A policy reads a changed entity's attributes by name (`Workload::"w".risk`):
            // any cell may change, and every cached answer may be stale.
            return self.recompile_in_full(bundle, subject, start);
        }
        if !changed.contains(&target) {
            changed.push(target);
        }
        for &i in &changed {
            self.identities.set_risk(i, fresh.at(i).risk.clone());
            self.grouping.renumber(&self.identities, engine, i);
        }

        let ids = &self.identities;
        let changed_where = |role: fn(&Identity) -> bool| -> HashSet<u32> {
            changed
                .iter()
                .map(|&i| ids.at(i))
                .filter(|x| role(x))
                .map(|x| x.id)
                .collect()
        };
        let rows = changed_where(Identity::is_subject);
        let mut columns = changed_where(Identity::is_destination);
        // A Service is judged as its backends, and any of them may be a changed identity:
        // every Service column is re-evaluated (from the group caches: cheap).
        columns.extend(
            ids.iter()
                .filter(|x| x.kind == IdentityKind::Service && x.is_destination())
                .map(|x| x.id),
        );
        self.grouping.service_cells.clear();
        let affected =
            |k: &PolicyKey| rows.contains(&k.subject) || columns.contains(&k.destination);

        let mut fresh_allows: BTreeMap<PolicyKey, PolicyValue> = BTreeMap::new();
        let mut entries = Vec::new();
        let mut cells_seen = 0usize;
        let destinations = self.grouping.destinations(ids);
        let row: Vec<&Destination> = destinations.iter().collect();
        let column: Vec<&Destination> = destinations
            .iter()
            .filter(|(_, d, _)| columns.contains(&d.id))
            .collect();
        for (si, s) in ids.iter().enumerate().filter(|(_, x)| x.is_subject()) {
            let dests = if rows.contains(&s.id) { &row } else { &column };
            for &&(di, _, ref dcells) in dests {
                for cell in dcells {
                    cells_seen += 1;
                    self.grouping
                        .entries(engine, ids, si, di, cell, None, &mut entries)?;
                    fresh_allows.extend(entries.drain(..));
                }
            }
        }

        // The delta against the old table, then the new table: the untouched entries and
        // the re-evaluated ones, merged in key order.
        let mut delta = RowDelta::default();
        let mut kept = Vec::with_capacity(self.allows.len());
        for &(k, v) in &self.allows {
            if !affected(&k) {
                kept.push((k, v));
                continue;
            }
            match fresh_allows.get(&k) {
                None => delta.removed.push(k),
                Some(&fresh) if fresh != v => delta.added.push((k, fresh)),
                Some(_) => {} // Unchanged.
            }
        }
        let old: HashSet<PolicyKey> = self
            .allows
            .iter()
            .filter(|(k, _)| affected(k))
            .map(|(k, _)| *k)
            .collect();
        delta.added.extend(
            fresh_allows
                .iter()
                .filter(|(k, _)| !old.contains(k))
                .map(|(k, v)| (*k, *v)),
        );
        let table = &self.allows;
        delta.order_for_writing(|k| {
            table
                .binary_search_by_key(k, |(k, _)| *k)
                .ok()
                .map(|i| table[i].1)
        });
        let mut merged = Vec::with_capacity(kept.len() + fresh_allows.len());
        let mut fresh_iter = fresh_allows.into_iter().peekable();
        for entry in kept {
            while let Some(f) = fresh_iter.next_if(|(k, _)| *k < entry.0) {
                merged.push(f);
            }
            merged.push(entry);
        }
        merged.extend(fresh_iter);
        self.allows = merged;

        // Risk changes move claimants between signatures too: the column is recomputed
        // whole (group cache lookups, Cedar only for groups not seen before).
        self.ingress = ingress_column(&mut self.grouping, engine, &self.identities, None)?.0;
        self.risk_overrides = bundle.risk_overrides().clone();
        self.revision = bundle.snapshot();
        self.stats.allows = self.allows.len();
        self.stats.deny_entries = deny_entries(&self.allows);
        self.stats.cell_groups = self.grouping.groups.len();
        delta.cells = cells_seen;
        delta.cedar_decisions = self.grouping.decisions - decisions_before;
        delta.elapsed = start.elapsed();
        delta.log(subject, &self.revision, "subject re-evaluated");
        Ok(delta)
    }

    /// [`Compiled::recompile_subject`] when a changed identity is read by name by some
    /// policy: a full compile of `bundle` replaces `self`, and the delta is the exact
    /// difference between the two tables. On error `self` is unchanged.
    fn recompile_in_full(
        &mut self,
        bundle: &Bundle,
        subject: &str,
        start: Instant,
    ) -> Result<RowDelta, PolicyError> {
        let full = compile(bundle, None)?;
        let old: BTreeMap<PolicyKey, PolicyValue> = self.allows.iter().copied().collect();
        let mut delta = RowDelta {
            added: full
                .allows
                .iter()
                .filter(|(k, v)| old.get(k) != Some(v))
                .copied()
                .collect(),
            ..RowDelta::default()
        };
        let new: HashSet<PolicyKey> = full.allows.iter().map(|(k, _)| *k).collect();
        delta.removed = self
            .allows
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| !new.contains(k))
            .collect();
        delta.order_for_writing(|k| old.get(k).copied());
        delta.cells = full.stats.cells;
        delta.cedar_decisions = full.stats.cedar_decisions;
        *self = full;
        delta.elapsed = start.elapsed();
        delta.log(
            subject,
            &self.revision,
            "subject re-evaluated in full: a policy reads it by name",
        );
        Ok(delta)
    }

    /// Every identity, WORLD included.
    pub fn identities(&self) -> impl Iterator<Item = &Identity> {
        self.identities.iter()
    }

    pub fn identity(&self, id: u32) -> Option<&Identity> {
        self.identities.get(id)
    }

    pub fn identity_by_name(&self, name: &str) -> Option<&Identity> {
        self.identities.by_name(name)
    }

    /// The identity a Service backend at `ip` leads to (the IP cache's answer, WORLD when
    /// no workload or endpoint holds it).
    pub(crate) fn backend_identity(&self, ip: &std::net::IpAddr) -> &Identity {
        self.identities.at(self.identities.backend_index(ip))
    }

    /// The entries of the kernel table, sorted by key: allows, and deny exceptions
    /// (`entry::DENY`, exact ports of a destination without declared ports whose any-port
    /// entry allows). `PolicyValue.rule` is the index in [`Compiled::rules`] of the first
    /// permit that allowed the cell, or of the first forbid that denied the port
    /// (`u32::MAX`: no policy, an implicit deny).
    pub fn allows(&self) -> &[(PolicyKey, PolicyValue)] {
        &self.allows
    }

    /// The ingress allowlist of this node (the kernel's `INGRESS_ALLOW`), sorted by key:
    /// for every destination whose ingress mode is `enforce` or `audit`, and every workload of
    /// this node that shares its network namespace (`flags::SHARED_NETNS`; there, claimants
    /// that are no local subject only: the kernel judges those by the table), the entries of each
    /// claimant (every workload identity, local or remote; never WORLD) x each TCP cell, as
    /// the policy table would hold them if the claimant were a local subject: allows, and
    /// deny exceptions under an any-port allow (looked up exact port first, then port 0).
    pub fn ingress(&self) -> &[(PolicyKey, PolicyValue)] {
        &self.ingress
    }

    pub fn rules(&self) -> &[PolicyRef] {
        &self.rules
    }

    pub fn unknown_subject_atlas(&self) -> &[AtlasTechnique] {
        &self.unknown_subject_atlas
    }

    pub fn implicit_deny_atlas(&self) -> &[AtlasTechnique] {
        &self.implicit_deny_atlas
    }

    pub fn stats(&self) -> CompileStats {
        self.stats
    }

    /// The compiled answer for a cell, or why there is none. `Err` carries the attribution
    /// of a cell that has no compiled answer.
    fn cell_answer(
        &self,
        subject: u32,
        destination: u32,
        dport: u16,
        protocol: u8,
    ) -> Result<&Answer, Attribution> {
        let implicit = |id: &str, atlas: &[AtlasTechnique]| Attribution {
            policy_id: id.to_string(),
            policies: vec![],
            atlas: atlas.to_vec(),
        };
        // Any workload, local or not: a remote pod is a claimant at this node's ingress, and
        // its cells there are in the group caches (`ingress_column`).
        let subject_ident = self
            .identities
            .get(subject)
            .filter(|s| s.kind == IdentityKind::Workload);
        let Some(subject_ident) = subject_ident else {
            return Err(implicit("unknown-subject", &self.unknown_subject_atlas));
        };
        let dest = self
            .identities
            .get(destination)
            .filter(|d| d.is_destination())
            .or_else(|| self.identities.get(reserved::WORLD));
        let (Some(dest), Some(proto)) = (dest, Protocol::from_number(protocol)) else {
            return Err(implicit("implicit-deny", &self.implicit_deny_atlas));
        };
        if dest.kind == IdentityKind::Service {
            return self.service_cell_answer(subject_ident, dest, dport, proto);
        }
        let Some((port, action)) = dest.cell_of(dport, proto) else {
            return Err(implicit("undeclared-port", &self.implicit_deny_atlas));
        };
        let (Some(si), Some(di)) = (
            self.identities.index_of_id(subject_ident.id),
            self.identities.index_of_id(dest.id),
        ) else {
            return Err(implicit("implicit-deny", &self.implicit_deny_atlas));
        };
        let g = &self.grouping;
        let action = g.actions.get(action).copied().unwrap_or(u32::MAX);
        let port = match (dest.ports.is_empty(), g.port_points.is_empty()) {
            (false, _) => port,
            // No policy reads the port: one answer, asked at port 0.
            (true, true) => 0,
            (true, false) => {
                let plan = GroupKey {
                    port: None,
                    ..g.key(si, di, action, 0, proto)
                };
                let Some(plan) = g.port_plans.get(&plan) else {
                    return Err(implicit("implicit-deny", &self.implicit_deny_atlas));
                };
                if port == 0 {
                    // The kernel judges port 0 by the any-port entry.
                    return Ok(&g.answers[plan.any as usize]);
                }
                g.port_points[crate::ports::region(&g.port_points, port)]
            }
        };
        match g.groups.get(&g.key(si, di, action, port, proto)) {
            Some(&a) => Ok(&g.answers[a as usize]),
            None => Err(implicit("implicit-deny", &self.implicit_deny_atlas)),
        }
    }

    /// [`Compiled::cell_answer`] for a Service destination.
    fn service_cell_answer(
        &self,
        subject: &Identity,
        service: &Identity,
        dport: u16,
        protocol: Protocol,
    ) -> Result<&Answer, Attribution> {
        let implicit = |id: &str| Attribution {
            policy_id: id.to_string(),
            policies: vec![],
            atlas: self.implicit_deny_atlas.clone(),
        };
        let Some(port) = service.service_port(dport, protocol) else {
            return Err(implicit("undeclared-port"));
        };
        // Before the backends' count: `policy explain` says the same for a port without any.
        if service.fronts_foreign_step_up.is_some() {
            return Err(implicit("foreign-step-up-backend"));
        }
        if port.backends.is_empty() {
            return Err(implicit("no-ready-backends"));
        }
        let (Some(si), Some(di)) = (
            self.identities.index_of_id(subject.id),
            self.identities.index_of_id(service.id),
        ) else {
            return Err(implicit("implicit-deny"));
        };
        let g = &self.grouping;
        match g
            .service_cells
            .get(&(g.whole.sig[si], di as u32, dport, protocol))
        {
            Some(&a) => Ok(&g.answers[a as usize]),
            None => Err(implicit("implicit-deny")),
        }
    }

    /// Whether the compiled table allows the cell, looked up as the kernel does: the exact
    /// port's entry decides by its verdict, else an any-port entry allows, else deny. A
    /// destination id that is not a destination is WORLD (as the kernel's IP cache has it).
    pub fn is_allowed(&self, subject: u32, destination: u32, dport: u16, protocol: u8) -> bool {
        let destination = self
            .identities
            .get(destination)
            .filter(|d| d.is_destination())
            .map_or(reserved::WORLD, |d| d.id);
        let key = PolicyKey {
            subject,
            destination,
            dport,
            protocol,
            _pad: 0,
        };
        let find = |k: &PolicyKey| {
            self.allows
                .binary_search_by_key(k, |(k, _)| *k)
                .ok()
                .map(|i| self.allows[i].1)
        };
        match find(&key) {
            Some(v) => v.is_allow(),
            None => find(&PolicyKey { dport: 0, ..key }).is_some_and(|v| v.is_allow()),
        }
    }

    /// Attribution of a kernel deny: which policies decided (subject, destination, dport,
    /// protocol). Exact port cell first, then the any-port cell; a denied cell returns its
    /// forbid policies, or `implicit-deny` with `defaults.implicit_deny_atlas`; a port the
    /// destination does not declare returns `undeclared-port`; a subject that is not a local
    /// identity returns `unknown-subject` with `defaults.unknown_subject_atlas`. A Service
    /// cell returns the deciding backend's forbids (see [`Bundle::decide`]), or (with the
    /// implicit-deny techniques) `no-ready-backends` when the port has none and
    /// `foreign-step-up-backend` when the Service fronts another tenant's step-up endpoint.
    pub fn attribute(
        &self,
        subject: u32,
        destination: u32,
        dport: u16,
        protocol: u8,
    ) -> Attribution {
        match self.cell_answer(subject, destination, dport, protocol) {
            Err(a) => a,
            Ok(answer) if answer.allowed => Attribution {
                policy_id: "not-denied".into(),
                policies: vec![],
                atlas: vec![],
            },
            Ok(answer) if answer.rules.is_empty() => Attribution {
                policy_id: "implicit-deny".into(),
                policies: vec![],
                atlas: self.implicit_deny_atlas.clone(),
            },
            Ok(answer) => {
                let policies: Vec<PolicyRef> = answer
                    .rules
                    .iter()
                    .map(|&r| self.rules[r as usize].clone())
                    .collect();
                let mut atlas: Vec<AtlasTechnique> = Vec::new();
                for t in policies.iter().flat_map(|p| &p.atlas) {
                    if !atlas.contains(t) {
                        atlas.push(t.clone());
                    }
                }
                Attribution {
                    policy_id: policies[0].id.clone(),
                    policies,
                    atlas,
                }
            }
        }
    }

    /// The `@quarantine` forbid (its `@id`) that decided some deny of `subject` to
    /// `destination` over `protocol`, at any of its declared ports or the any-port cell: for
    /// the denies the kernel counted without their port (a workload's overflow beyond its
    /// key budget). A Service's ports are its own.
    pub fn quarantine_on_some_deny(
        &self,
        subject: u32,
        destination: u32,
        protocol: u8,
    ) -> Option<String> {
        let ports: Vec<u16> = self
            .identities
            .get(destination)
            .map(|d| {
                d.ports
                    .iter()
                    .filter(|p| p.protocol.number() == protocol)
                    .map(|p| p.port)
                    .collect()
            })
            .unwrap_or_default();
        std::iter::once(0)
            .chain(ports)
            .find_map(|port| self.quarantine_on_deny(subject, destination, port, protocol))
    }

    /// The `@quarantine` forbid (its `@id`) that decided a deny of this cell, if one did.
    pub fn quarantine_on_deny(
        &self,
        subject: u32,
        destination: u32,
        dport: u16,
        protocol: u8,
    ) -> Option<String> {
        self.attribute(subject, destination, dport, protocol)
            .policies
            .into_iter()
            .find(|p| p.quarantine)
            .map(|p| p.id)
    }
}
