//! Ring buffer records as the agent reads them: decode, enrich from the compiled demo policy
//! (attribution, quarantine), serialise the JSON line. Never a panic, whatever the kernel
//! (or a corrupted record) put in the fields.
#![no_main]

use std::sync::OnceLock;

use enforcer::events::{decode, record};
use enforcer_common::DenyEvent;
use enforcer_fuzz::{Scratch, DEMO};
use enforcer_policy::{Bundle, Compiled};
use libfuzzer_sys::fuzz_target;

/// The demo bundle, compiled once, and its identity numbers.
fn demo() -> &'static (Compiled, Vec<u32>) {
    static DEMO_COMPILED: OnceLock<(Compiled, Vec<u32>)> = OnceLock::new();
    DEMO_COMPILED.get_or_init(|| {
        let scratch = Scratch::new("event");
        scratch.fill(DEMO.iter().map(|(n, t)| (*n, t.as_bytes())));
        let bundle = Bundle::load(scratch.path()).expect("the demo bundle loads");
        let compiled = bundle.compile().expect("the demo bundle compiles");
        let ids = compiled.identities().map(|i| i.id).collect();
        (compiled, ids)
    })
}

fn enrich(event: &DenyEvent, compiled: &Compiled) {
    let call = record::enrich(event, compiled);
    let _ = compiled.quarantine_on_deny(
        event.subject,
        event.destination,
        event.dport,
        event.protocol,
    );
    let line = serde_json::to_string(&call).expect("an event serialises");
    assert!(line.starts_with('{'));
}

fuzz_target!(|data: &[u8]| {
    let event = match decode::decode(data) {
        Ok(event) => event,
        Err(decode::DecodeError::Short { got, expected }) => {
            assert!(got == data.len() && got < expected && expected == DenyEvent::SIZE);
            return;
        }
    };
    let (compiled, ids) = demo();
    enrich(&event, compiled);
    // Raw identity numbers almost never name an identity; the record's own bytes pick real
    // ones too, so that attribution of real cells is reached with hostile ports, protocols,
    // reasons and verdicts.
    if !ids.is_empty() {
        let mut known = event;
        known.subject = ids[event.subject as usize % ids.len()];
        known.destination = ids[event.destination as usize % ids.len()];
        enrich(&known, compiled);
    }
});
