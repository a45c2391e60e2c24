//! Attaching the cgroup programs exactly once. Links are pinned as
//! `link-<program>-cg<cgroup id>` so that a restarted agent finds and adopts them instead of
//! attaching a second copy, and so that links left on a different cgroup root are recognised.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use anyhow::{bail, Context, Result};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, Program};
use aya::Ebpf;
use enforcer_common::programs;

#[derive(Debug, Clone, serde::Serialize)]
pub struct HookAttachment {
    pub program: &'static str,
    /// True when the link was pinned by an earlier agent and adopted (it runs this agent's
    /// program from now on, swapped in).
    pub adopted: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AttachReport {
    pub cgroup_id: u64,
    pub hooks: Vec<HookAttachment>,
    /// Links found for another cgroup root and detached.
    pub stale_removed: usize,
    /// Other releases' pin directories removed (their links detached): see
    /// `Datapath::attach`.
    pub other_releases_removed: Vec<std::path::PathBuf>,
}

fn link_pin_name(program: &str, cgroup_id: u64) -> String {
    format!("link-{program}-cg{cgroup_id}")
}

pub fn attach_or_adopt(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    cgroup_root: &Path,
) -> Result<AttachReport> {
    let cgroup_id = crate::fs::cgroup_id(cgroup_root)
        .with_context(|| format!("cgroup root {}", cgroup_root.display()))?;
    let stale_removed = remove_stale_links(pin_dir, cgroup_id)?;
    let cgroup = File::open(cgroup_root)
        .with_context(|| format!("opening cgroup {}", cgroup_root.display()))?;

    // Every program verified and loaded before any hook changes: a program the kernel
    // refuses stops the agent with the hooks as they were, never half of them swapped.
    for program in programs::ALL {
        let prog = ebpf
            .program_mut(program)
            .with_context(|| format!("the BPF object has no program {program}"))?;
        load(prog, program)?;
    }
    let mut hooks = Vec::new();
    for program in programs::ALL {
        let pin = pin_dir.join(link_pin_name(program, cgroup_id));
        if pin.exists() {
            match PinnedLink::from_pin(&pin) {
                Ok(_) => {
                    let prog = ebpf
                        .program_mut(program)
                        .with_context(|| format!("the BPF object has no program {program}"))?;
                    run_this_release(&pin, prog, program)?;
                    hooks.push(HookAttachment {
                        program,
                        adopted: true,
                    });
                    continue;
                }
                Err(error) => {
                    tracing::warn!(pin = %pin.display(), %error, "unusable link pin; attaching afresh");
                    std::fs::remove_file(&pin)
                        .with_context(|| format!("removing {}", pin.display()))?;
                }
            }
        }
        let prog = ebpf
            .program_mut(program)
            .with_context(|| format!("the BPF object has no program {program}"))?;
        let link = attach_to_cgroup(prog, program, &cgroup)
            .with_context(|| format!("attaching {program} to {}", cgroup_root.display()))?;
        link.pin(&pin)
            .with_context(|| format!("pinning the {program} link at {}", pin.display()))?;
        hooks.push(HookAttachment {
            program,
            adopted: false,
        });
    }
    Ok(AttachReport {
        cgroup_id,
        hooks,
        stale_removed,
        other_releases_removed: Vec::new(),
    })
}

/// Makes an adopted link run this agent's program. A pinned link keeps the program of the
/// agent that attached it: after an upgrade within one ABI (same maps, new code: another
/// check, another option version) the hook would go on running the old release's code for
/// as long as the pins live, and after a partial cleanup (map pins removed, link pins left)
/// code bound to maps no agent writes any more. So the agent always swaps the program it
/// just loaded into the links it adopts (`BPF_LINK_UPDATE`: one step, the hook is never
/// empty, the pin and the link stay). Comparing the kernel's program tags first would not
/// do: a tag leaves map references out, so the same code on orphaned maps looks the same.
fn run_this_release(pin: &Path, prog: &mut Program, name: &str) -> Result<()> {
    load(prog, name)?;
    let fd = prog.fd().with_context(|| format!("{name} has no fd"))?;
    link_update(pin, fd.as_fd()).with_context(|| {
        format!(
            "running this agent's {name} in the link at {}",
            pin.display()
        )
    })
}

/// Verifies and loads a cgroup program unless it is loaded already.
fn load(prog: &mut Program, name: &str) -> Result<()> {
    if prog.fd().is_ok() {
        return Ok(());
    }
    match prog {
        Program::CgroupSockAddr(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::CgroupSkb(p) => p.load(),
        _ => bail!("{name} is not a cgroup program"),
    }
    .with_context(|| format!("verifying and loading {name}"))
}

/// `BPF_LINK_UPDATE` of the link pinned at `pin` to `prog` (aya 0.14 keeps its own
/// `bpf_link_update` crate-private): the link is opened from its pin (`BPF_OBJ_GET`).
/// Errors: no link pinned there, or a program the link cannot take (another type or attach
/// type).
pub fn link_update(pin: &Path, prog: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    /// The `BPF_OBJ_GET` part of `union bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    /// The `link_update` part of `union bpf_attr`: flags 0 (no expected old program).
    #[repr(C)]
    #[derive(Default)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())?;
    let mut get = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: attr is a valid bpf_attr prefix for BPF_OBJ_GET; pathname outlives the call.
    let fd = match unsafe { super::bpf_syscall(BPF_OBJ_GET, &mut get) } {
        Ok(fd) => fd,
        Err(error) => bail!("BPF_OBJ_GET: {error}"),
    };
    // SAFETY: a new fd the kernel returned, owned by nobody else.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut update = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: attr is a valid bpf_attr prefix for BPF_LINK_UPDATE; both fds are open.
    if let Err(error) = unsafe { super::bpf_syscall(BPF_LINK_UPDATE, &mut update) } {
        bail!("BPF_LINK_UPDATE: {error}");
    }
    Ok(())
}

/// Loads (once) and attaches one of the object's cgroup programs: the four sock_addr hooks,
/// sock_create, sock_ops or the cgroup_skb ingress and egress checks. A bpf_link on a cgroup
/// always coexists with other programs, and the kernel
/// rejects any attach flag on link creation: `Single` is what passes no flag. The pins are what
/// keeps this agent from attaching itself twice.
fn attach_to_cgroup(prog: &mut Program, name: &str, cgroup: &File) -> Result<FdLink> {
    let no_link = || format!("{name}: the kernel gave no bpf_link (needs Linux 5.7 or newer)");
    load(prog, name)?;
    match prog {
        Program::CgroupSockAddr(prog) => {
            let id = prog.attach(cgroup, CgroupAttachMode::Single)?;
            prog.take_link(id)?.try_into().with_context(no_link)
        }
        Program::CgroupSock(prog) => {
            let id = prog.attach(cgroup, CgroupAttachMode::Single)?;
            prog.take_link(id)?.try_into().with_context(no_link)
        }
        // sock_ops likewise: `Single` (no flag) is the only mode a cgroup bpf_link takes
        // (AllowMultiple fails with EINVAL, DESIGN.md "Flows").
        Program::SockOps(prog) => {
            let id = prog.attach(cgroup, CgroupAttachMode::Single)?;
            prog.take_link(id)?.try_into().with_context(no_link)
        }
        Program::CgroupSkb(prog) => {
            let direction = if name == programs::SKB_EGRESS {
                aya::programs::CgroupSkbAttachType::Egress
            } else {
                aya::programs::CgroupSkbAttachType::Ingress
            };
            let id = prog.attach(cgroup, direction, CgroupAttachMode::Single)?;
            prog.take_link(id)?.try_into().with_context(no_link)
        }
        _ => bail!("{name} is not a cgroup program"),
    }
}

/// How many link pins `dir` holds (0 when it cannot be listed): for the log.
pub(super) fn count_links(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("link-"))
                .count()
        })
        .unwrap_or(0)
}

fn remove_stale_links(pin_dir: &Path, cgroup_id: u64) -> Result<usize> {
    let suffix = format!("-cg{cgroup_id}");
    let mut removed = 0;
    for entry in
        std::fs::read_dir(pin_dir).with_context(|| format!("listing {}", pin_dir.display()))?
    {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with("link-") && !name.ends_with(&suffix) {
            tracing::warn!(pin = %name, "detaching a link left on another cgroup root");
            std::fs::remove_file(pin_dir.join(&name))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// IDs of the programs attached to `cgroup` for one attach type (BPF_PROG_QUERY), used to
/// show and test that each hook holds exactly one enforcer program.
pub fn attached_programs(cgroup: &Path, attach_type: u32) -> Result<Vec<u32>> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    #[repr(C)]
    #[derive(Default)]
    struct QueryAttr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    let file = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
    let mut ids = vec![0u32; 64];
    let mut attr = QueryAttr {
        target_fd: file.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    // SAFETY: attr is a valid bpf_attr prefix for BPF_PROG_QUERY and prog_ids points to
    // prog_cnt writable u32s that outlive the call.
    if let Err(error) = unsafe { super::bpf_syscall(BPF_PROG_QUERY, &mut attr) } {
        bail!("BPF_PROG_QUERY on {}: {error}", cgroup.display());
    }
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}
