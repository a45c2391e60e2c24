//! Finds the kernel object built by `cargo xtask build-ebpf` and hands its path to the
//! compiler; without it the agent cannot be built, and this says so.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=ENFORCER_BPF_OBJECT");
    let object = std::env::var_os("ENFORCER_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap())
                .join("../target/bpf/enforcer.bpf.o")
        });
    if !object.exists() {
        panic!(
            "the kernel programs are not built: {} is missing. Run `cargo xtask build-ebpf` \
             (or any `cargo xtask` command, which builds them first).",
            object.display()
        );
    }
    println!("cargo:rerun-if-changed={}", object.display());
    println!(
        "cargo:rustc-env=ENFORCER_BPF_OBJECT={}",
        object.canonicalize().unwrap().display()
    );
}
