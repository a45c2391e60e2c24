//! The agent's side of a PDP sync: arbitrary bytes as the PDP's answer, through hyper, the
//! status and header checks, the body limit and the JSON, and then the install into the
//! bundle directory. Never a panic; a rejected answer leaves the last good bundle in place,
//! byte for byte; an installed one is valid and is the revision the PDP claimed.
#![no_main]

use std::sync::OnceLock;

use enforcer::pdp::fuzzing::{fetch_bytes, install, read_bundle_files, validate, WireBundle};
use enforcer_fuzz::{runtime, Scratch, DEMO};
use libfuzzer_sys::fuzz_target;

struct Node {
    /// Holds the target directory (`<scratch>/bundle`, as `sync` keeps it).
    scratch: Scratch,
    good: WireBundle,
}

fn node() -> &'static Node {
    static NODE: OnceLock<Node> = OnceLock::new();
    NODE.get_or_init(|| {
        let scratch = Scratch::new("pdp-response");
        let source = scratch.path().join("source");
        std::fs::create_dir_all(&source).expect("creating the demo bundle");
        for (name, text) in DEMO {
            std::fs::write(source.join(name), text).expect("writing the demo bundle");
        }
        let revision = validate(&source).expect("the demo bundle is valid");
        let files = read_bundle_files(&source).expect("reading the demo bundle");
        let good = WireBundle { revision, files };
        let node = Node { scratch, good };
        install(node.good.clone(), &node.target()).expect("installing the demo bundle");
        node
    })
}

impl Node {
    fn target(&self) -> std::path::PathBuf {
        self.scratch.path().join("bundle")
    }
}

fuzz_target!(|data: &[u8]| {
    let node = node();
    let target = node.target();
    let fetched = runtime().block_on(fetch_bytes(data, Some(&node.good.revision)));
    let Ok(Some(wire)) = fetched else {
        return;
    };
    match install(wire.clone(), &target) {
        Ok(revision) => {
            assert_eq!(
                revision, wire.revision,
                "installed a revision other than the one claimed"
            );
            assert_eq!(
                validate(&target),
                Ok(revision),
                "installed bundle does not validate"
            );
            // Back to the last good bundle for the next input.
            install(node.good.clone(), &target).expect("reinstalling the demo bundle");
        }
        Err(error) => {
            assert!(!format!("{error:#}").is_empty());
            assert_eq!(
                read_bundle_files(&target).expect("reading the bundle directory"),
                node.good.files,
                "a rejected bundle changed the bundle directory: {error:#}"
            );
        }
    }
});
