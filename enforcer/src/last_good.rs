//! The last bundle this agent applied, kept in its state directory.
//!
//! A bundle can break after it was applied: an edit, a half-synced ConfigMap, a file that a
//! later version refuses. A running agent rejects such an edit and keeps the last good policy
//! in force; a *restarted* agent has only the directory, and without this copy it would exit
//! and restart in a loop while the pinned programs enforce the old policy unexplained and no
//! event flows. With it, a restart starts from the last good bundle, reports the directory's
//! problems as `policy.rejected`, and keeps watching the directory for a fix.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use enforcer_policy::Bundle;

use crate::pdp::files::{read_bundle_files, sibling, stage, swap_into};

/// `<state dir>/last-good-bundle`.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("last-good-bundle")
}

/// The revision of the bundle saved in [`dir`], if it holds one that loads.
pub fn revision(state_dir: &Path) -> Option<String> {
    Bundle::load(&dir(state_dir))
        .ok()
        .map(|b| b.revision().to_string())
}

/// Copies the bundle in `policies` to [`dir`] if its files still are the ones with
/// `revision` (they may have changed since they were loaded: then nothing is saved, and the
/// reload that follows the change saves the next one). Returns whether it saved.
pub fn save(policies: &Path, revision: &str, state_dir: &Path) -> Result<bool> {
    let target = dir(state_dir);
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let files = read_bundle_files(policies)?;
    let staged = stage(sibling(&target, "stage")?, &files)?;
    let same = Bundle::load(staged.path()).is_ok_and(|b| b.revision() == revision);
    if same {
        swap_into(staged, &target)?;
    }
    Ok(same)
}
