//! The Policy Decision Point: a policy bundle (Cedar schema and policies, and the inventory
//! of workloads and endpoints) loaded, validated, asked, and compiled into the kernel's
//! policy table.
//!
//! The central invariant: the compiled table decides exactly what Cedar decides.
//! [`Bundle::decide`] asks Cedar about one cell directly (the oracle); [`Bundle::compile`]
//! asks it once per group of equivalent cells and must agree with the oracle on every cell
//! (property tests in `tests.rs`).
//!
//! Modules, in data-flow order: [`inventory`] (YAML with locations) and [`cluster`] (the
//! Kubernetes state, merged by `merge`) -> [`identity`] (stable IDs) -> `cedar` (schema,
//! policies, entities, the oracle) -> [`compile`] (cells, grouping,
//! deny attribution) -> [`explain`]. [`diagnostics`] carries located errors, [`atlas`] the
//! MITRE ATLAS data, [`risk`] Cedar decimals and risk overrides, [`limits`] the bounds on
//! what a (possibly hostile) bundle may make the loader do.
//!
//! Risk at run time: [`Bundle::set_risk`] overrides one workload's `risk` attribute (the
//! oracle and later compiles see it, until the bundle is replaced);
//! [`Compiled::recompile_subject`] then re-evaluates that subject's row (and its column,
//! as a destination; the whole table if a policy reads that workload by name, e.g.
//! `Workload::"w".risk`) and returns the [`RowDelta`] to write into the kernel table. While
//! overrides are in force, the policy snapshot ([`Bundle::snapshot`],
//! [`Compiled::revision`], events' `policy.snapshot`) is the bundle revision followed by
//! `+risk(N):HHHHHHHH` (see [`risk::overrides_suffix`]).
//!
//! Inventory edits at run time: [`Bundle::compile_incremental`] compiles a reloaded bundle
//! from the previous [`Compiled`], asking Cedar only about signatures it has not seen, as
//! long as the schema and policies are unchanged ([`Compiled::policy_fingerprint`]).
//!
//! Kubernetes: [`Bundle::load_with_cluster`] merges a [`cluster::ClusterState`] (pods grouped
//! by security label set, Services and their ready backends) into the bundle. Each label set
//! becomes a Cedar `Workload` exactly like an inventory workload, so the same policies apply;
//! each Service's ClusterIPs are judged as all its ready backends (see `compile`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use enforcer_common::{PolicyKey, PolicyValue};

pub mod atlas;
mod cedar;
pub mod classes;
pub mod cluster;
pub mod compile;
pub mod diagnostics;
pub mod explain;
pub mod identity;
pub mod inventory;
pub mod limits;
mod merge;
pub mod ports;
pub mod rate;
pub mod risk;
#[cfg(any(test, feature = "bench"))]
pub mod testutil;

pub use atlas::AtlasTechnique;
pub use compile::{CompileStats, Compiled, RowDelta};
pub use diagnostics::{Diagnostic, Diagnostics};
pub use explain::{BackendExplanation, Explanation, ServiceExplanation};
pub use identity::{Identities, Identity, IdentityKind, IpNet};
pub use inventory::Inventory;

use sha2::{Digest, Sha256};

/// A transport protocol the enforcer judges.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const ALL: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

    /// The IP protocol number (`enforcer_common::proto`).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => enforcer_common::proto::TCP,
            Protocol::Udp => enforcer_common::proto::UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            enforcer_common::proto::TCP => Some(Protocol::Tcp),
            enforcer_common::proto::UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(format!("unknown protocol `{s}` (tcp or udp)")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Permit,
    Forbid,
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Effect::Permit => "permit",
            Effect::Forbid => "forbid",
        })
    }
}

/// A Cedar policy as events and `explain` name it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PolicyRef {
    /// The `@id` annotation, or `<file>:<Cedar policy id>`.
    pub id: String,
    pub effect: Effect,
    pub file: PathBuf,
    pub line: u32,
    /// From the `@atlas("AML.T...,AML.T...")` annotation.
    pub atlas: Vec<AtlasTechnique>,
    /// `@quarantine`: a deny by this forbid quarantines the subject.
    pub quarantine: bool,
}

/// Cedar's answer for one cell.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// The action asked (`connect` for a destination without declared ports, or for a port
    /// the destination does not declare).
    pub action: String,
    /// The determining policies: satisfied permits if allowed, satisfied forbids if denied
    /// (empty: implicit deny, or an undeclared port).
    pub policies: Vec<PolicyRef>,
    /// The destination declares ports, and not this one: denied without asking Cedar (the
    /// kernel has no entry for it).
    pub undeclared_port: bool,
    /// The destination declares no ports: any port is asked of Cedar as itself, with action
    /// `connect`; the kernel holds an any-port entry plus exact entries for the ports
    /// decided otherwise (see [`ports`]).
    pub any_port: bool,
}

/// Why a deny happened (kernel deny events are enriched with this).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Attribution {
    /// The first determining forbid's id, or `implicit-deny`, `undeclared-port`,
    /// `unknown-subject`, `not-denied`, and for a Service `no-ready-backends` or
    /// `foreign-step-up-backend`.
    pub policy_id: String,
    pub policies: Vec<PolicyRef>,
    pub atlas: Vec<AtlasTechnique>,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("unknown workload or endpoint `{0}`")]
    UnknownName(String),
    #[error("`{0}` is not a workload, so it cannot be a subject")]
    NotASubject(String),
    #[error("`{0}` is not a destination (no addresses)")]
    NotADestination(String),
    #[error("`{0}` is an endpoint: only workloads have a risk score")]
    NoRisk(String),
    #[error("invalid risk score for `{workload}`: {reason}")]
    InvalidRisk {
        workload: String,
        score: String,
        reason: String,
    },
    #[error("the compiled policy is of bundle revision {compiled}, not {bundle}: compile the new bundle in full")]
    StaleCompiled { compiled: String, bundle: String },
    #[error(
        "{path}:{line}:{column}: error: policy `{policy}` reads context.port in a way that needs {entries} kernel entries for destination `{destination}` ({protocol}), more than {max}; {remedy}",
        path = .file.display(), max = ports::MAX_PORT_EXCEPTIONS
    )]
    TooManyPortEntries {
        policy: String,
        file: PathBuf,
        line: u32,
        column: u32,
        destination: String,
        protocol: Protocol,
        entries: usize,
        remedy: String,
    },
    #[error(
        "Cedar failed on {from} -> {to} port {port}/{protocol} (action `{action}`): {message}"
    )]
    Evaluation {
        from: String,
        to: String,
        port: u16,
        protocol: Protocol,
        action: String,
        message: String,
    },
}

/// A loaded and validated policy bundle directory.
pub struct Bundle {
    dir: PathBuf,
    revision: String,
    /// Hash of the schema and the policy files (names and texts): what decides how a
    /// signature is answered, see [`Bundle::compile_incremental`].
    policy_hash: String,
    inventory: Inventory,
    identities: Identities,
    engine: cedar::Engine,
    /// Workload name -> canonical risk score, where it differs from the inventory's.
    risk_overrides: BTreeMap<String, String>,
    /// What the merge with the cluster state refused or reported, one line each.
    cluster_problems: Vec<String>,
    /// 16 hex digits naming the cluster identities and Services merged in (numbers, names,
    /// attributes, addresses, local pods, backends); `None` when there are none.
    cluster_revision: Option<String>,
}

/// The Cedar action of a destination's any-port cell, and of a declared port that names none.
pub(crate) const DEFAULT_ACTION: &str = "connect";

pub const INVENTORY_FILE: &str = "inventory.yaml";
pub const SCHEMA_FILE: &str = "schema.cedarschema";

impl Bundle {
    /// Read, parse and validate everything in `dir`; every problem is reported.
    ///
    /// Runs on a thread of its own with a [`limits::LOAD_STACK_BYTES`] stack: whatever the
    /// bundle holds, loading it cannot overflow the caller's stack (the parsers recurse; the
    /// [`limits`] bound what they are given, and this is the second line of defence). A
    /// panic while loading is reported as an error, not passed on.
    ///
    /// The same as [`Bundle::load_with_cluster`] with an empty cluster state.
    pub fn load(dir: &Path) -> Result<Bundle, Diagnostics> {
        Bundle::load_with_cluster(
            dir,
            &cluster::ClusterState::default(),
            &cluster::ClusterOptions::default(),
        )
    }

    /// [`Bundle::load`], plus the identities and Services of a cluster state. The bundle's
    /// diagnostics are the same as [`Bundle::load`]'s (and a schema that cannot hold a cluster
    /// workload is one); what the merge refuses is no error but a line of
    /// [`Bundle::cluster_problems`], and the object concerned is left out: its pods are
    /// unknown subjects (fail closed), its addresses WORLD.
    ///
    /// - Identity: each [`cluster::ClusterIdentity`] (a distinct label set) is a `Workload`
    ///   entity with the attributes of an inventory workload: `tenant`, `purpose`, `ring`
    ///   ("" when unset), `spiffe_id` `spiffe://<trust domain>/ns/<namespace>/sa/<service
    ///   account>`, `risk` 0.0. It is a local subject when it has pods on
    ///   `options.node_name` ([`Identity::pod_uids`]), a destination by its pods' addresses
    ///   (host-network pods have none of their own).
    /// - Name: `<namespace>/<service account>#<8 hex digits of the label-set hash>`, always
    ///   suffixed: a name that changed when another label set of the same service account
    ///   came or went would let a tenant make a policy naming it stop applying. (Where two
    ///   label sets of one service account have alike suffixes, or the inventory has the
    ///   name, more digits.) A Service is `service/<namespace>/<name>` (suffixed only where
    ///   the inventory has that name). Names never clash with inventory names and depend on
    ///   the label set alone, so every node names alike.
    /// - Number: [`cluster::identity_number`] of the label set, [`cluster::service_number`] of
    ///   a Service, in [`cluster::CLUSTER_IDS`]: the same on every node, whatever the order of
    ///   the state or which other identities exist. Two keys that prefer one number are a
    ///   collision (reported, never merged): the first in canonical order (label sets before
    ///   Services, then by content) keeps it, the other takes the next number upwards that no
    ///   key of the state prefers. Every node that sees the same label sets resolves it alike.
    ///   (31 bits can be searched offline: a tenant can craft a label set that collides with
    ///   another's number. The effect is at most that the later one in canonical order is
    ///   renumbered, reported with both label sets; two label sets are never merged.)
    /// - Tenant: must be declared in the inventory's `tenants:` (the operator's list of
    ///   tenants, with their audit flags); label sets naming another tenant are left out,
    ///   reported once per tenant, and so are their Services. Label sets without a tenant
    ///   (the source's system namespaces) are identities with tenant "" and share one quota
    ///   with the Services of every namespace without a declared tenant, those of namespaces
    ///   with tenantless label sets first.
    /// - Quota: at most `options.max_identities_per_tenant` label sets per tenant, the ones
    ///   whose oldest pod is oldest (then by label set; sets without pods last), and at most
    ///   as many Services per tenant (by namespace and name), so that one tenant's thousands
    ///   of label sets or Services cost the others nothing: the rest are left out, reported
    ///   once per tenant. A tenant's problem lines are bounded too (see `merge`).
    /// - Addresses: an address in a network of an inventory workload or endpoint stays the
    ///   inventory's (the operator's inventory wins; reported). An address two cluster
    ///   identities or Services claim is nobody's (UNIDENTIFIED, which no policy opens) until
    ///   one claim is gone (reported); so is every address of a pod or Service the merge
    ///   leaves out, and of a pod the source refused (`ClusterState::unidentified_ips`).
    /// - Services: each ClusterIP and port is judged as all the port's ready backends: allowed
    ///   only if the call is allowed to every backend at its target port (each asked as a
    ///   direct call to the identity its address leads to, WORLD for an address no identity
    ///   has); denied without ready backends; ports the Service does not declare are denied.
    ///   See [`Bundle::decide`] and [`Explanation::service`].
    pub fn load_with_cluster(
        dir: &Path,
        cluster: &cluster::ClusterState,
        options: &cluster::ClusterOptions,
    ) -> Result<Bundle, Diagnostics> {
        let internal = |msg: String| Err(Diagnostic::new(dir, 1, 1, msg).into());
        std::thread::scope(|scope| {
            let spawned = std::thread::Builder::new()
                .name("bundle-load".into())
                .stack_size(limits::LOAD_STACK_BYTES)
                .spawn_scoped(scope, || Bundle::load_here(dir, cluster, options));
            match spawned {
                Ok(handle) => handle.join().unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    internal(format!("internal error while loading the bundle: {what}"))
                }),
                Err(e) => internal(format!("cannot start the bundle loader thread: {e}")),
            }
        })
    }

    fn load_here(
        dir: &Path,
        cluster: &cluster::ClusterState,
        options: &cluster::ClusterOptions,
    ) -> Result<Bundle, Diagnostics> {
        let mut diags = Diagnostics::default();
        let policy_files = bundle_policy_files(dir, &mut diags)?;
        let inv_path = dir.join(INVENTORY_FILE);
        let schema_path = dir.join(SCHEMA_FILE);

        let mut hashed: Vec<(String, String)> = Vec::new();
        let mut load_text =
            |path: &Path, limit: u64, what: &str, diags: &mut Diagnostics| match limits::read_text(
                path, limit, what,
            ) {
                Ok(t) => {
                    let name = path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    hashed.push((name, t.clone()));
                    Some(t)
                }
                Err(d) => {
                    diags.push(d);
                    None
                }
            };
        let inv_text = load_text(
            &inv_path,
            limits::INVENTORY_BYTES,
            "the inventory",
            &mut diags,
        );
        let schema_text = load_text(&schema_path, limits::SCHEMA_BYTES, "the schema", &mut diags);
        let mut policies = Vec::new();
        let mut total = 0u64;
        for p in &policy_files {
            if let Some(t) = load_text(p, limits::POLICY_FILE_BYTES, "a policy file", &mut diags) {
                total += t.len() as u64;
                if total > limits::POLICY_TOTAL_BYTES {
                    diags.push(
                        Diagnostic::new(
                            p,
                            1,
                            1,
                            format!(
                                "the policy files reach {total} bytes with this one; the limit for all *.cedar files together is {} bytes",
                                limits::POLICY_TOTAL_BYTES
                            ),
                        ),
                    );
                    break;
                }
                policies.push((p.clone(), t));
            }
        }
        if policy_files.is_empty() {
            diags.push(
                Diagnostic::new(dir, 1, 1, "no Cedar policy files (*.cedar)").with_hint(
                    "without a permit everything is denied; add at least one policy file",
                ),
            );
        }
        hashed.sort();
        let revision = revision_of(&hashed);
        let policy_hash = hash_pairs(
            hashed
                .iter()
                .filter(|(name, _)| name != INVENTORY_FILE)
                .map(|(n, c)| (n.as_str(), c.as_str())),
            16,
        );

        // An inventory with problems is still walked as far as it goes, so that the Cedar
        // checks of its entities and actions are reported in the same run.
        let inventory = inv_text.and_then(|t| {
            let (inv, d) = Inventory::parse_partial(&inv_path, &t);
            diags.0.extend(d.0);
            inv
        });
        let (mut identities, mut cluster_problems) = match inventory.as_ref() {
            Some(inv) => {
                let (ids, problems) = Identities::allocate_with_cluster(inv, cluster, options);
                (Some(ids), problems)
            }
            None => (None, Vec::new()),
        };
        let engine = schema_text.and_then(|schema| {
            let src = cedar::Sources {
                schema: (schema_path.clone(), schema),
                policies,
            };
            cedar::Engine::load(&src, inventory.as_ref(), identities.as_mut(), &mut diags)
        });
        if let Some(n) = engine
            .as_ref()
            .map(|e| e.nodes_unidentified)
            .filter(|&n| n > 0)
        {
            cluster_problems.push(format!(
                "{}: no `entity Node` is declared, so the nodes' {n} addresses and networks (link-local ones included) are unidentified (every call to them is denied); declare `entity Node;` and list `Node` among the resources of `connect`, then permit `Node::\"host\"` or `Node::\"remote-node\"` where workloads must reach a node",
                schema_path.display()
            ));
        }
        if !diags.is_empty() {
            diags.sort();
            if diags.len() > limits::DIAGNOSTICS {
                // A bundle of a million mistakes must not become a million-line event.
                let more = diags.len() - limits::DIAGNOSTICS;
                diags.0.truncate(limits::DIAGNOSTICS);
                diags.push(Diagnostic::new(
                    dir,
                    1,
                    1,
                    format!(
                        "{more} more problems not listed (only the first {} are)",
                        limits::DIAGNOSTICS
                    ),
                ));
            }
            return Err(diags);
        }
        match (inventory, identities, engine) {
            (Some(inventory), Some(identities), Some(engine)) => {
                tracing::debug!(dir = %dir.display(), %revision, identities = identities.len(), rules = engine.rules.len(), cluster_problems = cluster_problems.len(), "bundle loaded");
                Ok(Bundle {
                    dir: dir.to_path_buf(),
                    revision,
                    policy_hash,
                    inventory,
                    cluster_revision: cluster_revision(&identities),
                    identities,
                    engine,
                    risk_overrides: BTreeMap::new(),
                    cluster_problems,
                })
            }
            _ => Err(Diagnostic::new(dir, 1, 1, "the bundle could not be loaded").into()),
        }
    }

    /// `sha256:` and the first 16 hex digits of a hash over the sorted (file name, content)
    /// pairs of the bundle's files.
    /// Risk overrides do not change it (see [`Bundle::snapshot`]).
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// The revision, followed by `+cluster:HHHHHHHHHHHHHHHH` when cluster identities or
    /// Services are merged in ([`Bundle::cluster_revision`]), and by `+risk(N):HHHHHHHH`
    /// while N risk overrides are in force (HHHHHHHH names the set of overrides, see
    /// [`risk::overrides_suffix`]): what decides a call is this bundle *and* the cluster
    /// state *and* these scores, and an investigator must see all three.
    pub fn snapshot(&self) -> String {
        format!(
            "{}{}",
            self.base_snapshot(),
            risk::overrides_suffix(&self.risk_overrides)
        )
    }

    /// The revision and the cluster part of the snapshot: what a compiled table is of.
    pub(crate) fn base_snapshot(&self) -> String {
        match &self.cluster_revision {
            Some(c) => format!("{}+cluster:{c}", self.revision),
            None => self.revision.clone(),
        }
    }

    /// 16 hex digits of a hash over the merged cluster identities and Services (numbers,
    /// names, attributes, addresses, local pods, Service ports and backends); `None` when
    /// none are merged in.
    pub fn cluster_revision(&self) -> Option<&str> {
        self.cluster_revision.as_deref()
    }

    /// What the merge with the cluster state refused or reported, one line each, naming the
    /// objects (label sets, pods, Services, addresses, tenants): identity number and tenant
    /// number collisions, quotas, addresses the inventory claims or two claimants share,
    /// invalid objects, unknown tenants. At most `merge::PER_TENANT_PROBLEMS` lines per
    /// tenant (the rest counted in one line).
    pub fn cluster_problems(&self) -> &[String] {
        &self.cluster_problems
    }

    /// Override a workload's `risk` attribute (Cedar decimal text, at most 4 fractional
    /// digits; `1` is taken as `1.0`). Every later [`Bundle::decide`], [`Bundle::compile`] and
    /// [`Compiled::recompile_subject`] with this bundle sees the new score; the override lasts
    /// as long as this `Bundle` (a replaced bundle starts from its inventory's scores).
    /// Setting a workload back to its inventory score removes the override. On error nothing
    /// changes.
    pub fn set_risk(&mut self, workload: &str, score: &str) -> Result<(), PolicyError> {
        let i = workload_index(&self.identities, workload, PolicyError::NoRisk)?;
        let invalid = |reason: String| PolicyError::InvalidRisk {
            workload: workload.into(),
            score: score.into(),
            reason,
        };
        let value = risk::canonical_decimal(score).map_err(invalid)?;
        let mut updated = self.identities.at(i).clone();
        updated.risk = value.clone();
        self.engine.replace_entity(&updated).map_err(invalid)?;
        self.identities.set_risk(i, value.clone());
        let cluster_base = self.identities.at(i).is_cluster().then_some("0.0");
        let base = self
            .inventory
            .workloads
            .iter()
            .find(|w| w.name == workload)
            .map(|w| w.risk.as_str())
            .or(cluster_base);
        if base == Some(value.as_str()) {
            self.risk_overrides.remove(workload);
        } else {
            self.risk_overrides.insert(workload.to_string(), value);
        }
        tracing::debug!(workload, score, snapshot = %self.snapshot(), "risk override");
        Ok(())
    }

    /// The risk overrides in force: workload name -> canonical score.
    pub fn risk_overrides(&self) -> &BTreeMap<String, String> {
        &self.risk_overrides
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    pub fn identities(&self) -> &Identities {
        &self.identities
    }

    /// Every policy, numbered as `PolicyValue.rule` numbers them.
    pub fn rules(&self) -> &[PolicyRef] {
        &self.engine.rules
    }

    /// The oracle: asks Cedar directly for one cell, no grouping, no cache.
    ///
    /// A Service destination is judged as the port's ready backends (see
    /// [`Bundle::load_with_cluster`]): each backend is asked exactly as a direct call to it
    /// would be, and the decision is that of the first backend (by address and port) that
    /// denies, or of the first backend when all allow; without ready backends it is a deny
    /// without policies. [`Bundle::explain`] lists every backend's decision.
    pub fn decide(
        &self,
        from: &str,
        to: &str,
        port: u16,
        protocol: Protocol,
    ) -> Result<Decision, PolicyError> {
        let (s, d) = self.cell_parties(from, to)?;
        if self.identities.at(d).kind == IdentityKind::Service {
            return Ok(self.decide_service(s, d, port, protocol)?.decision);
        }
        self.decide_at(s, d, port, protocol)
    }

    /// The subject and destination indexes of a cell, checked.
    fn cell_parties(&self, from: &str, to: &str) -> Result<(usize, usize), PolicyError> {
        let s = workload_index(&self.identities, from, PolicyError::NotASubject)?;
        let d = self
            .identities
            .index_of(to)
            .ok_or_else(|| PolicyError::UnknownName(to.into()))?;
        if !self.identities.at(d).is_destination() {
            return Err(PolicyError::NotADestination(to.into()));
        }
        Ok((s, d))
    }

    /// The oracle on identity indexes: `d` is not a Service.
    fn decide_at(
        &self,
        s: usize,
        d: usize,
        port: u16,
        protocol: Protocol,
    ) -> Result<Decision, PolicyError> {
        let dest = self.identities.at(d);
        if dest.kind == IdentityKind::Unidentified {
            // A Service backend at an address the merge refused: denied, no policy asked.
            return Ok(Decision {
                allowed: false,
                action: DEFAULT_ACTION.into(),
                policies: vec![],
                undeclared_port: false,
                any_port: true,
            });
        }
        let Some((cedar_port, action)) = dest.cell_of(port, protocol) else {
            return Ok(Decision {
                allowed: false,
                action: DEFAULT_ACTION.into(),
                policies: vec![],
                undeclared_port: true,
                any_port: false,
            });
        };
        let action = action.to_string();
        let answer = self
            .engine
            .ask(s, &action, d, cedar_port, protocol, true)
            .map_err(|message| PolicyError::Evaluation {
                from: self.identities.at(s).name.clone(),
                to: dest.name.clone(),
                port,
                protocol,
                action: action.clone(),
                message,
            })?;
        Ok(Decision {
            allowed: answer.allowed,
            action,
            policies: answer
                .rules
                .iter()
                .map(|&r| self.engine.rules[r as usize].clone())
                .collect(),
            undeclared_port: false,
            any_port: dest.ports.is_empty(),
        })
    }

    /// The oracle for a Service destination `d`: every backend of the port asked as a direct
    /// call, in order.
    pub(crate) fn decide_service(
        &self,
        s: usize,
        d: usize,
        port: u16,
        protocol: Protocol,
    ) -> Result<ServiceDecision, PolicyError> {
        let service = self.identities.at(d);
        let denied = |undeclared_port: bool| Decision {
            allowed: false,
            action: DEFAULT_ACTION.into(),
            policies: vec![],
            undeclared_port,
            any_port: false,
        };
        let Some(service_port) = service.service_port(port, protocol) else {
            return Ok(ServiceDecision {
                decision: denied(true),
                backends: vec![],
                deciding: None,
            });
        };
        let mut backends = Vec::with_capacity(service_port.backends.len());
        for b in &service_port.backends {
            let bi = self.identities.backend_index(&b.ip);
            backends.push((*b, bi, self.decide_at(s, bi, b.port, protocol)?));
        }
        // In front of another tenant's step-up endpoint: every backend is listed, none decides.
        let refused = service.fronts_foreign_step_up.is_some();
        let deciding = (!backends.is_empty() && !refused).then(|| {
            backends
                .iter()
                .position(|(_, _, d)| !d.allowed)
                .unwrap_or(0)
        });
        let decision = match deciding {
            None => denied(false),
            Some(k) => {
                let by = &backends[k].2;
                Decision {
                    allowed: by.allowed,
                    action: by.action.clone(),
                    policies: by.policies.clone(),
                    undeclared_port: false,
                    any_port: false,
                }
            }
        };
        Ok(ServiceDecision {
            decision,
            backends,
            deciding,
        })
    }

    /// Compile every local subject x destination x declared port into kernel allows.
    ///
    /// Runs on a thread with a [`limits::LOAD_STACK_BYTES`] stack: Cedar's evaluator recurses
    /// per level of a policy's expression, and whichever thread calls this (a tokio worker
    /// has 2 MiB) must not decide how deep a policy may be.
    pub fn compile(&self) -> Result<Compiled, PolicyError> {
        on_big_stack(|| compile::compile(self, None))
    }

    /// [`Bundle::compile`], reusing what `previous` (compiled from an earlier bundle, e.g.
    /// before an inventory edit) learnt from Cedar: when this bundle's schema and policies
    /// are identical to `previous`'s (and so are the entities the policies name and read
    /// attributes of, see [`Compiled::policy_fingerprint`]), every (policy, signature) answer
    /// and every cell group answer of `previous` whose signatures still occur is kept, and
    /// Cedar is asked only about signatures not seen before. Otherwise this is
    /// [`Bundle::compile`].
    ///
    /// The result is the same as [`Bundle::compile`]'s: allows, rule numbering, attribution,
    /// and the stats but `cedar_decisions` (the evaluations this call made) and `elapsed`.
    /// `previous` may carry risk overrides and recompiles ([`Compiled::recompile_subject`]):
    /// its answers are keyed by signature, risk included, so they stay valid.
    pub fn compile_incremental(&self, previous: &Compiled) -> Result<Compiled, PolicyError> {
        on_big_stack(|| compile::compile(self, Some(previous)))
    }

    /// A hash of the schema and the policy files (names and texts): equal for two bundles
    /// whose policies decide the same signatures the same way (the inventory is not in it).
    pub fn policy_hash(&self) -> &str {
        &self.policy_hash
    }

    /// The decision for one cell, with everything an operator needs to understand it.
    pub fn explain(
        &self,
        from: &str,
        to: &str,
        port: u16,
        protocol: Protocol,
    ) -> Result<Explanation, PolicyError> {
        explain::explain(self, from, to, port, protocol)
    }

    pub(crate) fn engine(&self) -> &cedar::Engine {
        &self.engine
    }
}

/// `f` on a thread with a [`limits::LOAD_STACK_BYTES`] stack, or on this one if no thread
/// can be started (the system is out of threads: better a compile than none). A panic in
/// it is passed on.
fn on_big_stack<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let slot = std::sync::Mutex::new(Some(f));
    let take = || slot.lock().ok().and_then(|mut s| s.take());
    let ran = std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new()
            .name("bundle-eval".into())
            .stack_size(limits::LOAD_STACK_BYTES)
            .spawn_scoped(scope, || take().map(|f| f()));
        match spawned {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(e) => {
                tracing::warn!("cannot start a thread to compile on ({e}): compiling here");
                None
            }
        }
    });
    match ran {
        Some(t) => t,
        None => match take() {
            Some(f) => f(),
            None => unreachable!("`f` runs exactly once"),
        },
    }
}

/// A Service cell as the oracle decides it.
pub(crate) struct ServiceDecision {
    pub decision: Decision,
    /// Each ready backend (in address, port order), the identity index its address leads
    /// to, and the decision of a direct call to it.
    pub backends: Vec<(cluster::Backend, usize, Decision)>,
    /// The backend whose decision is the Service's; `None` without ready backends, and for a
    /// Service in front of another tenant's step-up endpoint (denied).
    pub deciding: Option<usize>,
}

/// [`Bundle::cluster_revision`] of these identities: SHA-256 over every field of every
/// cluster identity and Service, each length-prefixed.
fn cluster_revision(ids: &Identities) -> Option<String> {
    let mut h = Sha256::new();
    let mut any = false;
    fn part(h: &mut Sha256, bytes: &[u8]) {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    let opt = |o: &Option<String>| {
        o.as_deref()
            .map_or(b"\xff".to_vec(), |s| s.as_bytes().to_vec())
    };
    for x in ids.iter().filter(|x| x.is_cluster()) {
        any = true;
        part(&mut h, &x.id.to_le_bytes());
        part(&mut h, x.name.as_bytes());
        part(&mut h, x.kind.cedar_type().as_bytes());
        for field in [&x.tenant, &x.purpose, &x.ring, &x.spiffe_id] {
            part(&mut h, &opt(field));
        }
        part(&mut h, &(x.labels.len() as u64).to_le_bytes());
        for (k, v) in &x.labels {
            part(&mut h, k.as_bytes());
            part(&mut h, v.as_bytes());
        }
        part(&mut h, &(x.ips.len() as u64).to_le_bytes());
        for net in &x.ips {
            let addr = match net.addr {
                std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                std::net::IpAddr::V6(a) => a.octets(),
            };
            part(&mut h, &addr);
            part(&mut h, &[u8::from(net.is_ipv4()), net.prefix]);
        }
        part(&mut h, &(x.pod_uids.len() as u64).to_le_bytes());
        for uid in &x.pod_uids {
            part(&mut h, uid.as_bytes());
        }
        part(&mut h, &(x.service_ports.len() as u64).to_le_bytes());
        for p in &x.service_ports {
            part(&mut h, &p.port.to_le_bytes());
            part(&mut h, &[p.protocol.number()]);
            part(&mut h, &(p.backends.len() as u64).to_le_bytes());
            for b in &p.backends {
                let addr = match b.ip {
                    std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                    std::net::IpAddr::V6(a) => a.octets(),
                };
                part(&mut h, &addr);
                part(&mut h, &[u8::from(b.ip.is_ipv4())]);
                part(&mut h, &b.port.to_le_bytes());
            }
        }
    }
    any.then(|| {
        h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    })
}

/// The `*.cedar` files of the bundle directory, sorted. A bundle directory holds exactly
/// `inventory.yaml`, `schema.cedarschema` and `*.cedar` files: any other entry is an error
/// (a `policy.Cedar` or `x.cedar.bak` that is silently not read is a policy silently not in
/// force), except hidden ones (names starting with `.`: editor swap files, version control,
/// a Kubernetes ConfigMap mount's `..data`), which are ignored, as the PDP ignores them.
fn bundle_policy_files(dir: &Path, diags: &mut Diagnostics) -> Result<Vec<PathBuf>, Diagnostics> {
    let unreadable = |e: std::io::Error| {
        Diagnostics::from(Diagnostic::new(
            dir,
            1,
            1,
            format!("cannot read the bundle directory: {e}"),
        ))
    };
    let mut policy_files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        let path = entry.path();
        let raw = entry.file_name();
        if raw.as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let name = raw.to_string_lossy();
        let is_policy = name.ends_with(".cedar") && name.len() > ".cedar".len();
        if !(is_policy || name == INVENTORY_FILE || name == SCHEMA_FILE) {
            let lower = name.to_lowercase();
            let hint = if lower.ends_with(".cedar") || lower.ends_with(".cedarschema") {
                "file names are case-sensitive: policy files end in `.cedar`, the schema is `schema.cedarschema`".to_string()
            } else if lower.contains(".cedar")
                || lower.contains("inventory")
                || lower.contains("schema")
            {
                "this looks like a bundle file but is not read; move it out of the bundle directory (or hide it: names starting with `.` are ignored)".to_string()
            } else {
                format!("a bundle directory holds only {INVENTORY_FILE}, {SCHEMA_FILE} and *.cedar files; move it out (names starting with `.` are ignored)")
            };
            diags.push(
                Diagnostic::new(&path, 1, 1, format!("`{name}` is not a bundle file"))
                    .with_hint(hint),
            );
            continue;
        }
        if is_policy {
            policy_files.push(path);
        }
    }
    policy_files.sort();
    if policy_files.len() > limits::POLICY_FILES {
        return Err(Diagnostic::new(
            dir,
            1,
            1,
            format!(
                "{} policy files; the limit is {}",
                policy_files.len(),
                limits::POLICY_FILES
            ),
        )
        .into());
    }
    Ok(policy_files)
}

/// The index of the workload `name`; `not_a_workload` is the error for another identity.
fn workload_index(
    ids: &Identities,
    name: &str,
    not_a_workload: fn(String) -> PolicyError,
) -> Result<usize, PolicyError> {
    let i = ids
        .index_of(name)
        .ok_or_else(|| PolicyError::UnknownName(name.into()))?;
    if ids.at(i).kind != IdentityKind::Workload {
        return Err(not_a_workload(name.into()));
    }
    Ok(i)
}

fn revision_of(files: &[(String, String)]) -> String {
    let pairs = files.iter().map(|(n, c)| (n.as_str(), c.as_str()));
    format!("sha256:{}", hash_pairs(pairs, 8))
}

/// The first `bytes` bytes, in hex, of a SHA-256 over (key, value) pairs. Each part is
/// length-prefixed, so that moving text from one part to the next changes the hash.
pub(crate) fn hash_pairs<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    bytes: usize,
) -> String {
    let mut h = Sha256::new();
    for (key, value) in pairs {
        h.update((key.len() as u64).to_le_bytes());
        h.update(key.as_bytes());
        h.update((value.len() as u64).to_le_bytes());
        h.update(value.as_bytes());
    }
    h.finalize()[..bytes]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod attack_tests;
#[cfg(test)]
mod cluster_tests;
#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod tests;
