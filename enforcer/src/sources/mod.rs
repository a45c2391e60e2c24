//! Where workloads come from besides the inventory file: the cluster's API server.

pub mod kubernetes;
