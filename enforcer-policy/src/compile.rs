//! Compilation: every local subject x every destination x each declared port (or the
//! any-port cell), asked of Cedar, written as kernel allows.
//!
//! Asking Cedar per cell costs cells x policies. A decision can only depend on what the
//! policies read (the `cedar::Analysis`): the entity type, the values of the attributes
//! that some policy accesses, the UID where some policy names it (or every UID, if a policy
//! compares entities as values), the action, and the context fields that some policy reads.
//! Identities with the same such *signature* are indistinguishable to the policies, so Cedar
//! is asked once per (subject signature, destination signature, action, context) and the
//! answer fans out to every cell of the group. The answers are kept, so attributing a kernel
//! deny to its determining policies is a lookup.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use enforcer_common::{identity as reserved, PolicyKey, PolicyValue};

use crate::atlas::AtlasTechnique;
use crate::cedar::{Analysis, Answer};
use crate::identity::{Identities, Identity, IdentityKind};
use crate::{Attribution, Bundle, PolicyError, PolicyRef, Protocol};

#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct CompileStats {
    /// Cells considered (subject x destination x port or any-port, per protocol).
    pub cells: usize,
    /// Allow entries written.
    pub allows: usize,
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
pub struct Compiled {
    revision: String,
    identities: Identities,
    allows: Vec<(PolicyKey, PolicyValue)>,
    rules: Vec<PolicyRef>,
    /// Identity ID -> signature number.
    signature: HashMap<u32, u32>,
    actions: HashMap<String, u32>,
    groups: HashMap<GroupKey, u32>,
    answers: Vec<Answer>,
    reads_port: bool,
    reads_protocol: bool,
    implicit_deny_atlas: Vec<AtlasTechnique>,
    unknown_subject_atlas: Vec<AtlasTechnique>,
    stats: CompileStats,
}

/// The destination cells of an identity: (kernel port, Cedar port, protocol, action).
fn cells(d: &Identity) -> Vec<Cell> {
    if d.ports.is_empty() {
        Protocol::ALL
            .iter()
            .map(|&p| (0, p, "connect".to_string()))
            .collect()
    } else {
        d.ports
            .iter()
            .map(|p| (p.port, p.protocol, p.action.clone()))
            .collect()
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
type PolicyKeyed = (u32, u32, u32, Option<u16>, Option<Protocol>);
/// A destination cell: (port, 0 for any; protocol; action).
type Cell = (u16, Protocol, String);

/// One policy's own grouping: identities that look the same to *this* policy share its
/// answer. Policies read few attributes each (tenant-isolation reads only `tenant`), so
/// per-policy groups are far fewer than whole-set groups.
struct PerPolicy {
    /// Identity index -> this policy's signature number.
    sig: Vec<u32>,
    /// Signature number -> an identity with it.
    reps: Vec<usize>,
    reads_port: bool,
    reads_protocol: bool,
    satisfied: HashMap<PolicyKeyed, bool>,
}

impl PerPolicy {
    fn new(ids: &Identities, analysis: &Analysis) -> PerPolicy {
        let mut numbers: HashMap<Signature, u32> = HashMap::new();
        let mut reps = Vec::new();
        let sig = ids
            .iter()
            .enumerate()
            .map(|(i, ident)| {
                let next = numbers.len() as u32;
                *numbers
                    .entry(signature_of(ident, analysis))
                    .or_insert_with(|| {
                        reps.push(i);
                        next
                    })
            })
            .collect();
        PerPolicy {
            sig,
            reps,
            reads_port: analysis.reads_port(),
            reads_protocol: analysis.reads_protocol(),
            satisfied: HashMap::new(),
        }
    }
}

pub(crate) fn compile(bundle: &Bundle) -> Result<Compiled, PolicyError> {
    let start = Instant::now();
    let engine = bundle.engine();
    let ids = bundle.identities();
    let analysis = &engine.analysis;

    // Signatures, numbered.
    let mut sig_numbers: HashMap<Signature, u32> = HashMap::new();
    let mut signature: HashMap<u32, u32> = HashMap::new();
    for ident in ids.iter() {
        let sig = signature_of(ident, analysis);
        let next = sig_numbers.len() as u32;
        let n = *sig_numbers.entry(sig).or_insert(next);
        signature.insert(ident.id, n);
    }

    let mut per_policy: Vec<PerPolicy> = engine
        .singles
        .iter()
        .map(|(_, a)| PerPolicy::new(ids, a))
        .collect();

    let subjects: Vec<(usize, &Identity)> = ids
        .iter()
        .enumerate()
        .filter(|(_, x)| x.is_subject())
        .collect();
    let destinations: Vec<(usize, &Identity, Vec<Cell>)> = ids
        .iter()
        .enumerate()
        .filter(|(_, x)| x.is_destination())
        .map(|(i, x)| (i, x, cells(x)))
        .collect();

    let mut actions: HashMap<String, u32> = HashMap::new();
    let mut groups: HashMap<GroupKey, u32> = HashMap::new();
    let mut answers: Vec<Answer> = Vec::new();
    let mut answer_ids: HashMap<Answer, u32> = HashMap::new();
    let mut allows = Vec::new();
    let mut cells_seen = 0usize;
    let mut decisions = 0usize;
    let (reads_port, reads_protocol) = (analysis.reads_port(), analysis.reads_protocol());
    let mut subject_sigs = std::collections::HashSet::new();
    let mut destination_sigs = std::collections::HashSet::new();

    for &(si, s) in &subjects {
        let ssig = signature[&s.id];
        subject_sigs.insert(ssig);
        for (di, d, dcells) in &destinations {
            let dsig = signature[&d.id];
            destination_sigs.insert(dsig);
            for (port, protocol, action) in dcells {
                cells_seen += 1;
                let next = actions.len() as u32;
                let action_no = *actions.entry(action.clone()).or_insert(next);
                let key = GroupKey {
                    subject: ssig,
                    destination: dsig,
                    action: action_no,
                    port: reads_port.then_some(*port),
                    protocol: reads_protocol.then_some(*protocol),
                };
                let answer = match groups.get(&key) {
                    Some(&a) => a,
                    None => {
                        // Evaluate each policy in its own groups, then combine as Cedar does:
                        // deny if a forbid is satisfied, allow if a permit is, else deny.
                        let (mut permits, mut forbids) = (Vec::new(), Vec::new());
                        for (r, pp) in per_policy.iter_mut().enumerate() {
                            let key = (
                                pp.sig[si],
                                pp.sig[*di],
                                action_no,
                                pp.reads_port.then_some(*port),
                                pp.reads_protocol.then_some(*protocol),
                            );
                            let sat = match pp.satisfied.get(&key) {
                                Some(&sat) => sat,
                                None => {
                                    decisions += 1;
                                    let (rs, rd) =
                                        (pp.reps[key.0 as usize], pp.reps[key.1 as usize]);
                                    let sat = engine
                                        .satisfied(r, rs, action, rd, *port, *protocol)
                                        .map_err(|message| PolicyError::Evaluation {
                                            from: ids.at(rs).name.clone(),
                                            to: ids.at(rd).name.clone(),
                                            port: *port,
                                            protocol: *protocol,
                                            action: action.clone(),
                                            message,
                                        })?;
                                    pp.satisfied.insert(key, sat);
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
                        let next = answers.len() as u32;
                        let a = *answer_ids.entry(answer.clone()).or_insert_with(|| {
                            answers.push(answer);
                            next
                        });
                        groups.insert(key, a);
                        a
                    }
                };
                let answer = &answers[answer as usize];
                if answer.allowed {
                    allows.push((
                        PolicyKey {
                            subject: s.id,
                            destination: d.id,
                            dport: *port,
                            protocol: protocol.number(),
                            _pad: 0,
                        },
                        PolicyValue {
                            rule: answer.rules.first().copied().unwrap_or(u32::MAX),
                        },
                    ));
                }
            }
        }
    }
    allows.sort_by_key(|(k, _)| *k);
    let defaults = &bundle.inventory().defaults;
    let stats = CompileStats {
        cells: cells_seen,
        allows: allows.len(),
        cedar_decisions: decisions,
        cell_groups: groups.len(),
        subject_groups: subject_sigs.len(),
        destination_groups: destination_sigs.len(),
        elapsed: start.elapsed(),
    };
    tracing::info!(
        revision = bundle.revision(),
        cells = stats.cells,
        allows = stats.allows,
        cedar_decisions = stats.cedar_decisions,
        elapsed_ms = stats.elapsed.as_secs_f64() * 1e3,
        "policy compiled"
    );
    Ok(Compiled {
        revision: bundle.revision().to_string(),
        identities: ids.clone(),
        allows,
        rules: engine.rules.clone(),
        signature,
        actions,
        groups,
        answers,
        reads_port,
        reads_protocol,
        implicit_deny_atlas: Bundle::atlas_list(&defaults.implicit_deny_atlas),
        unknown_subject_atlas: Bundle::atlas_list(&defaults.unknown_subject_atlas),
        stats,
    })
}

impl Compiled {
    pub fn revision(&self) -> &str {
        &self.revision
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

    /// The allow entries of the kernel table, sorted by key. `PolicyValue.rule` is the index
    /// in [`Compiled::rules`] of the (first) permit that allowed the cell.
    pub fn allows(&self) -> &[(PolicyKey, PolicyValue)] {
        &self.allows
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
        let subject_ident = self.identities.get(subject).filter(|s| s.is_subject());
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
        // Exact port cell first, then the any-port cell.
        let (port, action) = if dest.ports.is_empty() {
            (0, "connect")
        } else {
            match dest
                .ports
                .iter()
                .find(|p| p.port == dport && p.protocol == proto)
            {
                Some(p) => (dport, p.action.as_str()),
                None => return Err(implicit("undeclared-port", &self.implicit_deny_atlas)),
            }
        };
        let key = GroupKey {
            subject: self.signature[&subject_ident.id],
            destination: self.signature[&dest.id],
            action: self.actions.get(action).copied().unwrap_or(u32::MAX),
            port: self.reads_port.then_some(port),
            protocol: self.reads_protocol.then_some(proto),
        };
        match self.groups.get(&key) {
            Some(&a) => Ok(&self.answers[a as usize]),
            None => Err(implicit("implicit-deny", &self.implicit_deny_atlas)),
        }
    }

    /// Whether the compiled table allows the cell (the kernel's view of it).
    pub fn is_allowed(&self, subject: u32, destination: u32, dport: u16, protocol: u8) -> bool {
        self.cell_answer(subject, destination, dport, protocol)
            .is_ok_and(|a| a.allowed)
    }

    /// Attribution of a kernel deny: which policies decided (subject, destination, dport,
    /// protocol). Exact port cell first, then the any-port cell; a denied cell returns its
    /// forbid policies, or `implicit-deny` with `defaults.implicit_deny_atlas`; a port the
    /// destination does not declare returns `undeclared-port`; a subject that is not a local
    /// identity returns `unknown-subject` with `defaults.unknown_subject_atlas`.
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

    /// Whether a deny of this cell was decided by a `@quarantine` forbid.
    pub fn quarantine_on_deny(
        &self,
        subject: u32,
        destination: u32,
        dport: u16,
        protocol: u8,
    ) -> bool {
        self.attribute(subject, destination, dport, protocol)
            .policies
            .iter()
            .any(|p| p.quarantine)
    }
}
