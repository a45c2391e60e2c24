//! A whole bundle (inventory, schema, policy files: see `split_bundle` for the format) loaded
//! as `policy check`, the PDP and a reloading agent load it; on success compiled into the
//! kernel table. Never a panic; every diagnostic is located inside the file it names.
#![no_main]

use std::sync::OnceLock;

use enforcer_fuzz::{assert_located, split_bundle, Scratch};
use enforcer_policy::Bundle;
use libfuzzer_sys::fuzz_target;

/// Above this many identities the compile (subjects x destinations x ports, each a Cedar
/// question) takes longer than a fuzz input should; loading is still fuzzed.
const MAX_COMPILED_IDENTITIES: usize = 64;

fuzz_target!(|data: &[u8]| {
    static SCRATCH: OnceLock<Scratch> = OnceLock::new();
    let scratch = SCRATCH.get_or_init(|| Scratch::new("bundle"));
    let files = split_bundle(data);
    scratch.fill(files.iter().map(|(n, t)| (n.as_str(), t.as_slice())));
    match Bundle::load(scratch.path()) {
        Ok(bundle) => {
            assert!(bundle.revision().starts_with("sha256:"));
            if bundle.identities().len() <= MAX_COMPILED_IDENTITIES {
                let _ = bundle.compile();
            }
        }
        Err(diags) => assert_located(&diags, scratch.path(), &files),
    }
});
