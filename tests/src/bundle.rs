//! Policy bundles (`inventory.yaml`, `schema.cedarschema`, `*.cedar`) written from strings
//! into a temp dir that is removed on drop.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::util::TempDir;

#[derive(Debug)]
pub struct PolicyBundle {
    dir: TempDir,
}

impl PolicyBundle {
    /// Writes `files` (name, content) into a fresh directory.
    pub fn new(files: &[(&str, &str)]) -> Result<Self> {
        let bundle = Self {
            dir: TempDir::new("enforcer-bundle")?,
        };
        for (name, content) in files {
            bundle.write_file(name, content)?;
        }
        Ok(bundle)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Adds or replaces one file (a plain name, no directories).
    pub fn write_file(&self, name: &str, content: &str) -> Result<()> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            bail!("bundle file name {name:?} must be a plain file name");
        }
        let path = self.path().join(name);
        std::fs::write(&path, content).with_context(|| format!("write {}", path.display()))
    }
}
