//! `cargo xtask image`: the container image of `deploy/`, built from the repository alone.
//!
//! The agent is built as a static binary (`x86_64-unknown-linux-musl`, the kernel programs
//! embedded by its build script) and copied into a `FROM scratch` image (`deploy/Containerfile`)
//! with podman. Nothing is pulled from a registry. Podman runs the way DESIGN.md records for
//! this kind of machine: the runc runtime, the cgroupfs manager, and a containers.conf
//! (`target/image/containers.conf`, also what the container test uses) without default
//! ulimits or a pids limit.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, ensure, Context, Result};

use super::{build_ebpf, ensure_debian_packages, status, Tools, Workspace, BPF_OBJECT};

/// The target of the static binary.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// The tag `cargo xtask image` gives the image unless told otherwise; `deploy/` names it.
pub const DEFAULT_TAG: &str = "localhost/ai-enforcer/enforcer:latest";
/// Where the image's build context, and podman's configuration, are written (under the
/// target directory).
const IMAGE_DIR: &str = "image";
/// podman's configuration for this machine (DESIGN.md, "Verified toolchain facts"): crun
/// refuses the hybrid cgroup layout, and the sandbox refuses the default ulimits.
const CONTAINERS_CONF: &str = "\
# Written by `cargo xtask image`: how podman runs on this machine (DESIGN.md).
[containers]
default_ulimits = []
pids_limit = 0

[engine]
runtime = \"runc\"
cgroup_manager = \"cgroupfs\"
events_logger = \"file\"
";

/// `cargo xtask image [--tag T] [--save FILE]`.
#[derive(clap::Args, Debug)]
pub struct ImageArgs {
    /// The image's name and tag.
    #[arg(long, default_value = DEFAULT_TAG)]
    pub tag: String,
    /// Also write the image to FILE (an OCI archive), e.g. to load it on nodes.
    #[arg(long)]
    pub save: Option<PathBuf>,
}

/// Builds the static agent and the image; prints the tag and where the binary is.
pub fn image(ws: &Workspace, tools: &Tools, args: &ImageArgs) -> Result<()> {
    let object = build_ebpf(ws, tools)?;
    ensure_musl_target()?;
    ensure_debian_packages(&[("musl-gcc", "musl-tools")])?;
    let conf = podman_setup(ws)?;

    eprintln!("xtask: building the static agent ({MUSL_TARGET}, release)");
    let mut cmd = ws.cargo();
    cmd.args(["build", "--release", "--target", MUSL_TARGET])
        .args(["--package", "enforcer", "--bin", "enforcer"])
        // ring's C and assembly, compiled against musl rather than glibc's headers.
        .env(format!("CC_{}", MUSL_TARGET.replace('-', "_")), "musl-gcc");
    status(&mut cmd, "building the static agent")?;
    let built = ws.target.join(MUSL_TARGET).join("release/enforcer");

    let context = ws.target.join(IMAGE_DIR).join("context");
    if context.exists() {
        fs::remove_dir_all(&context).with_context(|| format!("clearing {}", context.display()))?;
    }
    fs::create_dir_all(&context)?;
    let binary = context.join("enforcer");
    // The release profile keeps line tables (debug = 1: 175 MiB here); the image does not
    // need them. Symbols stay, so a panic's backtrace still names functions. `strip` comes
    // with binutils, which gcc (and so musl-gcc) depends on.
    let mut cmd = Command::new("strip");
    cmd.arg("--strip-debug").arg("-o").arg(&binary).arg(&built);
    status(&mut cmd, "strip --strip-debug")?;
    let bytes = fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
    check_static(&bytes).with_context(|| format!("{}", built.display()))?;
    let programs = fs::read(&object).with_context(|| format!("reading {}", object.display()))?;
    ensure!(
        contains(&bytes, &programs),
        "{} does not embed the kernel programs {} ({} bytes): the image would have no datapath",
        built.display(),
        ws.target.join(BPF_OBJECT).display(),
        programs.len()
    );
    let containerfile = ws.root.join("deploy/Containerfile");
    fs::copy(&containerfile, context.join("Containerfile"))
        .with_context(|| format!("copying {}", containerfile.display()))?;

    eprintln!(
        "xtask: building the image {} (podman, FROM scratch)",
        args.tag
    );
    let previous = image_id(&conf, &args.tag);
    let mut cmd = podman(&conf);
    cmd.args(["build", "--quiet", "--pull=never", "--tag", &args.tag])
        .arg("--file")
        .arg(context.join("Containerfile"))
        .arg(&context)
        .stdout(Stdio::null());
    status(&mut cmd, "podman build")?;
    // The image the tag named before is left without a name: remove it, unless something
    // else still uses it (then podman refuses, and it stays).
    if let Some(old) = previous.filter(|old| image_id(&conf, &args.tag).as_ref() != Some(old)) {
        let _ = podman(&conf)
            .args(["rmi", &old])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    if let Some(file) = &args.save {
        let mut cmd = podman(&conf);
        cmd.args(["save", "--quiet", "--format", "oci-archive", "--output"])
            .arg(file)
            .arg(&args.tag);
        status(&mut cmd, "podman save")?;
        eprintln!("xtask: saved {} to {}", args.tag, file.display());
    }
    println!(
        "{} (agent {}, {} MiB stripped, static, kernel programs embedded: {} bytes)",
        args.tag,
        built.display(),
        bytes.len() >> 20,
        programs.len()
    );
    Ok(())
}

/// `podman` with this machine's configuration.
pub fn podman(conf: &Path) -> Command {
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", conf)
        .args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    cmd
}

/// The ID of the image `tag` names, if any.
fn image_id(conf: &Path, tag: &str) -> Option<String> {
    let out = podman(conf)
        .args(["image", "inspect", "--format", "{{.Id}}", tag])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !id.is_empty()).then_some(id)
}

/// Installs podman, buildah and runc from Debian when podman is missing, and writes the
/// containers.conf podman needs here; its path.
pub fn podman_setup(ws: &Workspace) -> Result<PathBuf> {
    ensure_debian_packages(&[
        ("podman", "podman"),
        ("buildah", "buildah"),
        ("runc", "runc"),
    ])?;
    let dir = ws.target.join(IMAGE_DIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let conf = dir.join("containers.conf");
    if fs::read_to_string(&conf).ok().as_deref() != Some(CONTAINERS_CONF) {
        fs::write(&conf, CONTAINERS_CONF).with_context(|| format!("writing {}", conf.display()))?;
    }
    Ok(conf)
}

/// `rustup target add` the musl target when the toolchain lacks it (silent when present).
fn ensure_musl_target() -> Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running `rustup target list --installed`")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == MUSL_TARGET)
    {
        return Ok(());
    }
    eprintln!("xtask: installing the {MUSL_TARGET} target");
    status(
        Command::new("rustup").args(["target", "add", MUSL_TARGET]),
        "rustup target add",
    )
}

/// An ELF executable without a program interpreter (`PT_INTERP`): it needs no dynamic loader
/// and no libc in the image.
fn check_static(elf: &[u8]) -> Result<()> {
    const PT_INTERP: u32 = 3;
    ensure!(elf.starts_with(b"\x7fELF"), "not an ELF file");
    ensure!(elf.get(4) == Some(&2), "not a 64-bit ELF file");
    let u16_at = |at: usize| -> Result<u16> {
        Ok(u16::from_le_bytes(
            elf.get(at..at + 2)
                .context("truncated ELF header")?
                .try_into()?,
        ))
    };
    let u64_at = |at: usize| -> Result<u64> {
        Ok(u64::from_le_bytes(
            elf.get(at..at + 8)
                .context("truncated ELF header")?
                .try_into()?,
        ))
    };
    let phoff = usize::try_from(u64_at(0x20)?)?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let p_type = elf
            .get(at..at + 4)
            .context("truncated program header table")?;
        if u32::from_le_bytes(p_type.try_into()?) == PT_INTERP {
            bail!("dynamically linked (it has a program interpreter): not usable FROM scratch");
        }
    }
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_interpreter_is_found() {
        // This test binary is dynamically linked (the host's gnu target).
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        let err = check_static(&me).unwrap_err().to_string();
        assert!(err.contains("program interpreter"), "{err}");
        assert!(check_static(b"#!/bin/sh\n").is_err());
        assert!(check_static(b"\x7fELF\x02").is_err(), "truncated");
    }

    #[test]
    fn containerfile_copies_what_the_context_holds() {
        let ws = Workspace::locate().unwrap();
        let text = fs::read_to_string(ws.root.join("deploy/Containerfile")).unwrap();
        assert!(text.lines().any(|l| l.trim() == "FROM scratch"), "{text}");
        assert!(text.contains("COPY enforcer /enforcer"), "{text}");
    }
}
