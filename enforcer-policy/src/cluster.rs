//! What a cluster source (Kubernetes) contributes to a bundle, in the shape the policy crate
//! consumes: pods grouped by their security-relevant labels, their addresses, and Services
//! with their ready backends. The source (`enforcer::sources::kubernetes`) builds a
//! [`ClusterState`] from its reflector stores with a pure function; the bundle turns each
//! [`ClusterIdentity`] into a Cedar `Workload` entity exactly like an inventory workload.
//!
//! Nothing here knows about the Kubernetes API types: a test, a benchmark or another
//! orchestrator can build a `ClusterState` by hand. It is serialisable because the agent
//! persists the last one it saw, so a restart without the API server still enforces it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::Protocol;

/// The label keys of the product, on Namespaces (tenant metadata) and Pods.
///
/// A tenant is a property of the Namespace, never of the Pod: a pod label cannot move a pod
/// into another tenant. The admission webhook stamps the namespace's values onto each pod
/// (so `kubectl get pods -L` shows them); the agent still reads them from the Namespace.
pub mod labels {
    /// Namespace label (or annotation): the tenant that owns every pod in the namespace.
    pub const TENANT: &str = "ai-enforcer.io/tenant";
    /// Namespace label or annotation: the tenant's region (for example `eu-west-1`).
    pub const REGION: &str = "ai-enforcer.io/region";
    /// Namespace label or annotation: where the tenant's data must stay (for example `eu`).
    pub const DATA_RESIDENCY: &str = "ai-enforcer.io/data-residency";
    /// Namespace label or annotation: the tenant's retention tier (for example `30d`).
    pub const RETENTION_TIER: &str = "ai-enforcer.io/retention-tier";
    /// Namespace label: `"true"` makes the validating webhook require tenant metadata.
    pub const ENFORCED: &str = "ai-enforcer.io/enforced";
    /// Pod label: the workload's purpose (`inference`, `retrieval`, ...).
    pub const PURPOSE: &str = "ai-enforcer.io/purpose";
    /// Pod label: the workload's ring (`prod`, `staging`, ...).
    pub const RING: &str = "ai-enforcer.io/ring";
    /// Tenant metadata keys, in the order they are stamped and reported.
    pub const TENANT_METADATA: [&str; 4] = [TENANT, REGION, DATA_RESIDENCY, RETENTION_TIER];
}

/// Everything the cluster source knows, as of one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The SPIFFE trust domain (`cluster.local`): SPIFFE IDs are
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub trust_domain: String,
    /// One entry per distinct security label set (replicas share one).
    pub identities: Vec<ClusterIdentity>,
    pub services: Vec<ClusterService>,
    /// Problems found while building this state (a pod in a namespace without a tenant, a
    /// label value that is not a valid Kubernetes label value...), one line each, naming the
    /// object. They are reported as events; the objects concerned are left out (their pods
    /// are unknown subjects: fail closed).
    pub problems: Vec<String>,
}

/// The security-relevant labels of a pod: the key of its identity, and its Cedar attributes.
///
/// `labels` holds every pair that defines the identity, canonical (sorted by key): always
/// `namespace` and `service_account`, the tenant metadata read from the Namespace under the
/// [`labels`] keys, and the pod labels the agent's configuration names (`purpose`, `ring` and
/// `--identity-label` keys). Labels outside that set (`pod-template-hash`, ...) never split an
/// identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterIdentity {
    pub labels: BTreeMap<String, String>,
    pub namespace: String,
    pub service_account: String,
    pub tenant: Option<String>,
    pub purpose: Option<String>,
    pub ring: Option<String>,
    /// Every known pod with these labels, cluster-wide, sorted by (namespace, name).
    pub pods: Vec<ClusterPod>,
}

/// One pod of an identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterPod {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid`: how the kubelet names the pod's cgroup.
    pub uid: String,
    /// `spec.nodeName`; `None` while unscheduled.
    pub node: Option<String>,
    /// `status.podIPs` (empty until the pod has a sandbox, and for host-network pods, whose
    /// addresses are the node's and identify nothing).
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    /// `metadata.creationTimestamp`, RFC 3339: older label sets win a per-tenant quota.
    pub created: String,
}

/// A Service with a ClusterIP. The connect hook sees the ClusterIP before any load-balancer
/// translation, so the ClusterIP and each port are judged as the ready backends behind them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterService {
    pub namespace: String,
    pub name: String,
    /// `spec.clusterIPs` (headless Services are not listed: clients reach their pod IPs).
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

/// One port of a Service and the ready backends behind it (from EndpointSlices or Endpoints).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    pub port: u16,
    pub protocol: Protocol,
    pub backends: Vec<Backend>,
}

/// A ready backend: the pod address and the port the Service forwards to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
}
