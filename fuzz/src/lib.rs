//! What the fuzz targets share: the bundle input format, scratch directories, the demo bundle,
//! and the checks of the property every target asserts: a rejection is a located error
//! (`file:line:column` inside the file it names), never a panic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use enforcer_policy::{Diagnostics, INVENTORY_FILE, SCHEMA_FILE};

/// The demo bundle (`policies/demo`), compiled in: the fixed part of the `policy` target and
/// the last good bundle of `pdp_response`.
pub const DEMO: [(&str, &str); 4] = [
    (
        INVENTORY_FILE,
        include_str!("../../policies/demo/inventory.yaml"),
    ),
    (
        SCHEMA_FILE,
        include_str!("../../policies/demo/schema.cedarschema"),
    ),
    (
        "baseline.cedar",
        include_str!("../../policies/demo/baseline.cedar"),
    ),
    (
        "purpose.cedar",
        include_str!("../../policies/demo/purpose.cedar"),
    ),
];

/// The line that starts a file in a `bundle` input: `==> NAME <==` (as `head` prints it), so
/// that seeds are readable and a mutation can add, drop or rename a file.
pub const HEADER_START: &[u8] = b"==> ";
pub const HEADER_END: &[u8] = b" <==";

/// The files of a `bundle` input, by name. Bytes before the first header are ignored; a name
/// that is not a bundle file (`inventory.yaml`, `schema.cedarschema`, `*.cedar`; a plain
/// name) is dropped, as the PDP and the agent drop it; a later file of the same name wins.
pub fn split_bundle(data: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut current: Option<(String, Vec<u8>)> = None;
    for line in data.split_inclusive(|&b| b == b'\n') {
        let bare = line.strip_suffix(b"\n").unwrap_or(line);
        if let Some(name) = bare
            .strip_prefix(HEADER_START)
            .and_then(|rest| rest.strip_suffix(HEADER_END))
        {
            if let Some((name, text)) = current.take() {
                files.insert(name, text);
            }
            let name = String::from_utf8_lossy(name).into_owned();
            if enforcer::pdp::is_bundle_file(&name) && name.len() <= 64 {
                current = Some((name, Vec::new()));
            }
            continue;
        }
        if let Some((_, text)) = current.as_mut() {
            text.extend_from_slice(line);
        }
    }
    if let Some((name, text)) = current {
        files.insert(name, text);
    }
    files
}

/// The inverse of [`split_bundle`]: how seeds are written.
pub fn join_bundle<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (name, text) in files {
        out.push_str(&format!("==> {name} <==\n{text}"));
        if !text.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// A directory of this process on tmpfs when there is one (the targets write a bundle per
/// input), emptied by [`Scratch::fill`]. Left behind on exit: libFuzzer exits without
/// unwinding, and the name is per process so runs do not collide.
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("enforcer-fuzz-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the scratch directory");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Replaces the directory's contents with `files`.
    pub fn fill<'a>(&self, files: impl IntoIterator<Item = (&'a str, &'a [u8])>) {
        for entry in std::fs::read_dir(&self.dir).expect("listing the scratch directory") {
            let path = entry.expect("listing the scratch directory").path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path).expect("emptying the scratch directory");
            } else {
                std::fs::remove_file(&path).expect("emptying the scratch directory");
            }
        }
        for (name, text) in files {
            std::fs::write(self.dir.join(name), text).expect("writing a bundle file");
        }
    }
}

/// Asserts that every diagnostic of a rejected bundle in `dir` is located: it names the
/// directory itself (a problem of the whole bundle) or one of its files, and its line and
/// column lie inside that file's text (the position just past the end counts: "unexpected
/// end of input"). `files` is what the directory held, by name.
pub fn assert_located(diags: &Diagnostics, dir: &Path, files: &BTreeMap<String, Vec<u8>>) {
    assert!(!diags.is_empty(), "a rejection without a diagnostic");
    for d in diags.iter() {
        let shown = d.to_string();
        assert!(
            !d.message.trim().is_empty(),
            "a diagnostic without a message: {shown}"
        );
        assert!(d.line >= 1 && d.column >= 1, "position 0 in {shown}");
        if d.file == dir {
            continue;
        }
        let name = d
            .file
            .strip_prefix(dir)
            .ok()
            .and_then(|p| p.to_str())
            .unwrap_or_else(|| panic!("a diagnostic outside the bundle: {shown}"));
        let Some(bytes) = files.get(name) else {
            // A file the bundle needs and does not have ("cannot read") is named at 1:1.
            assert!(
                (name == INVENTORY_FILE || name == SCHEMA_FILE) && (d.line, d.column) == (1, 1),
                "a diagnostic for a file that is not in the bundle: {shown}"
            );
            continue;
        };
        assert_inside(&String::from_utf8_lossy(bytes), d.line, d.column, &shown);
    }
}

/// Asserts that 1-based (`line`, `column`, in characters) is a position of `text` or the one
/// just past the end of a line.
pub fn assert_inside(text: &str, line: u32, column: u32, shown: &str) {
    let lines: Vec<&str> = text.split('\n').collect();
    let Some(at) = lines.get(line as usize - 1) else {
        panic!("line {line} of a {}-line file: {shown}", lines.len());
    };
    let width = at.chars().count() as u32;
    assert!(
        column <= width + 1,
        "column {column} of a {width}-character line {line}: {shown}"
    );
}

/// A tokio runtime on a paused clock: a timer that nothing else outruns fires at once, so a
/// long poll or a header timeout costs no real time and the outcome does not depend on speed.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a tokio runtime")
    })
}
