//! Where JSON lines go: standard output or a file (appended, flushed per line so that a tail
//! or a log shipper sees each event at once).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

pub enum Sink {
    Stdout(io::Stdout),
    File(File),
}

impl Sink {
    /// `-` means standard output.
    pub fn open(target: &str) -> Result<Self> {
        if target == "-" {
            return Ok(Sink::Stdout(io::stdout()));
        }
        let path = Path::new(target);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening the events file {}", path.display()))?;
        Ok(Sink::File(file))
    }

    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let mut line = serde_json::to_vec(record).context("serialising an event")?;
        line.push(b'\n');
        match self {
            Sink::Stdout(out) => {
                let mut out = out.lock();
                out.write_all(&line)?;
                out.flush()?;
            }
            Sink::File(file) => file.write_all(&line)?,
        }
        Ok(())
    }
}
