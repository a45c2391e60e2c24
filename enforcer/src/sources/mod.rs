//! Where workloads come from besides the policy bundle's inventory: the kubelet's cgroup tree
//! ([`cgroups`]).

pub mod cgroups;
