//! One PDP for many nodes: the policy bundle served over HTTP(S) and mirrored into a local
//! directory on every node.
//!
//! - [`serve`] (`enforcer pdp serve`): watches a bundle directory, publishes only bundles that
//!   pass [`Bundle::load`], and serves the last good one at `GET /v1/bundle` behind a bearer
//!   token, versioned by revision (`ETag` / `If-None-Match`, long polling with `?wait=`).
//!   HTTPS (rustls) when given a certificate; plain HTTP only on a loopback address.
//! - [`sync::spawn`] (`enforcer run --pdp URL`): long-polls the PDP, validates every bundle
//!   locally, and swaps it atomically into a directory that the agent watches like any other
//!   policy directory. That directory always holds the last good bundle and survives restarts,
//!   so a node keeps enforcing while the PDP is away. A status file next to it says where the
//!   policy came from and how stale it is.
//!
//! The wire format is JSON: `{"revision": "sha256:...", "files": {"inventory.yaml": "...",
//! "schema.cedarschema": "...", "x.cedar": "..."}}`: exactly the files [`Bundle::load`]
//! reads, so the revision a node computes is the one the PDP advertised.

mod auth;
pub(crate) mod files;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod http;
pub(crate) mod listen;
pub mod serve;
pub mod status;
pub mod sync;
#[cfg(test)]
mod tests;
pub(crate) mod tls;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use serve::{serve, serve_until, ServeOptions};
pub use status::{read_status, status_file, PdpStatus};
pub use sync::{SyncHandle, SyncOptions};

#[cfg(doc)]
use enforcer_policy::Bundle;

/// The path of the one resource the PDP serves.
pub const BUNDLE_PATH: &str = "/v1/bundle";

/// The longest a client may ask the server to hold a long poll (`?wait=`), in seconds.
pub const MAX_WAIT_SECS: u64 = 60;

/// How often the server looks at its policy directory.
pub const WATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// A bundle on the wire: its revision and its files by name. Its files are read with a
/// bound on their number and on a name's length (`files::deserialize_files`); written as
/// any map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireBundle {
    pub revision: String,
    #[serde(deserialize_with = "files::deserialize_files")]
    pub files: BTreeMap<String, String>,
}

/// Whether `name` is a file of a policy bundle: `inventory.yaml`, `schema.cedarschema` or a
/// `*.cedar` file, as a plain name (no directories, no hidden files). Anything else is neither
/// served nor written, so a bundle from the network cannot place a file outside its directory.
pub fn is_bundle_file(name: &str) -> bool {
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0');
    plain
        && (name == enforcer_policy::INVENTORY_FILE
            || name == enforcer_policy::SCHEMA_FILE
            || (name.ends_with(".cedar") && name.len() > ".cedar".len()))
}
