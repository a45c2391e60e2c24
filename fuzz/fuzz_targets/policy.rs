//! One Cedar policy file against the demo inventory and schema: parse, validate against the
//! schema and the inventory's entities, and on success compile the kernel table and explain
//! a cell. Never a panic; a rejection is located inside the file it names.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use enforcer_fuzz::{assert_located, Scratch, DEMO};
use enforcer_policy::{Bundle, Protocol, INVENTORY_FILE, SCHEMA_FILE};
use libfuzzer_sys::fuzz_target;

const POLICY_FILE: &str = "fuzz.cedar";

fuzz_target!(|data: &[u8]| {
    static SCRATCH: OnceLock<Scratch> = OnceLock::new();
    let scratch = SCRATCH.get_or_init(|| Scratch::new("policy"));
    let mut files: BTreeMap<String, Vec<u8>> = DEMO
        .iter()
        .filter(|(name, _)| *name == INVENTORY_FILE || *name == SCHEMA_FILE)
        .map(|(name, text)| (name.to_string(), text.as_bytes().to_vec()))
        .collect();
    files.insert(POLICY_FILE.to_string(), data.to_vec());
    scratch.fill(files.iter().map(|(n, t)| (n.as_str(), t.as_slice())));
    match Bundle::load(scratch.path()) {
        Ok(bundle) => {
            // What the agent does with an accepted bundle. Errors are answers; panics are not.
            let _ = bundle.compile();
            let _ = bundle.explain("acme-retriever", "acme-vectors", 6333, Protocol::Tcp);
        }
        Err(diags) => assert_located(&diags, scratch.path(), &files),
    }
});
