//! Where workloads come from besides the policy bundle's inventory: the cluster's API server
//! ([`kubernetes`]) and the kubelet's cgroup tree on this node ([`cgroups`]).

pub mod cgroups;
pub mod kubernetes;
