//! `inventory.yaml` alone: parse, validate, allocate identities. Never a panic; a rejection
//! is a list of diagnostics located inside the file.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use enforcer_fuzz::assert_located;
use enforcer_policy::{Identities, Inventory, INVENTORY_FILE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Bundle::load reads the file as UTF-8 and reports other bytes at 1:1 (the `bundle`
    // target covers that); here the parser gets text.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = Path::new("bundle");
    match Inventory::parse(&dir.join(INVENTORY_FILE), text) {
        Ok(inventory) => {
            // What Bundle::load does next with an accepted inventory.
            let _ = Identities::allocate(&inventory);
        }
        Err(diags) => {
            let files = BTreeMap::from([(INVENTORY_FILE.to_string(), data.to_vec())]);
            assert_located(&diags, dir, &files);
        }
    }
});
