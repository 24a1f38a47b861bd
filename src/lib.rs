//! vmm: a declarative virtual machine launcher. The machine file is the VM.
//!
//! ```text
//! machine file ─spec::load_file─▶ Loaded ─validate::validate─▶ ValidSpec ─graph::lower─▶ DeviceGraph
//!   (TOML/JSON, spans)            (schema-checked, typed)      (semantic rules)          (buses, slots, IRQs, BARs)
//! graph::diff::plan(old, new) ── what a running VM can take (hot-apply) and what needs a restart
//! ```
//!
//! Each stage has its own types and never reaches back; every problem on the way is a
//! [`diag::Diag`] with a span into the file, and all of them are reported at once.

#[cfg(test)]
mod alloc_track;
pub mod backend;
pub mod contract;
pub mod devices;
pub mod diag;
pub mod graph;
pub mod hostfile;
pub mod hw;
pub mod image_lock;
pub mod logging;
pub mod reconcile;
pub mod sandbox;
pub mod spec;
pub mod sync;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod validate;
pub mod vhost_user;

use std::path::Path;

use diag::Report;
use graph::DeviceGraph;
use validate::ValidSpec;

/// A machine file that passed every check, lowered, with its warnings.
#[derive(Debug, Clone)]
pub struct Checked {
    pub valid: ValidSpec,
    pub graph: DeviceGraph,
    pub warnings: Report,
}

/// Loads, validates and lowers a machine file; the report holds every problem found.
pub fn check_file(path: &Path) -> Result<Checked, Report> {
    let loaded = spec::load_file(path)?;
    check_loaded(loaded)
}

/// [`check_file`] on bytes already read from `path`.
pub fn check_bytes(path: &Path, bytes: Vec<u8>) -> Result<Checked, Report> {
    check_loaded(spec::load_bytes(path, bytes)?)
}

/// [`check_bytes`] for an edit of the running machine `prev`: host files it named are taken as
/// they were (see [`validate::validate_since`]).
pub fn check_bytes_since(path: &Path, bytes: Vec<u8>, prev: &Checked) -> Result<Checked, Report> {
    check_loaded_since(spec::load_bytes(path, bytes)?, Some(&prev.valid))
}

/// Validates and lowers an already loaded machine file.
pub fn check_loaded(loaded: spec::Loaded) -> Result<Checked, Report> {
    check_loaded_since(loaded, None)
}

fn check_loaded_since(loaded: spec::Loaded, prev: Option<&ValidSpec>) -> Result<Checked, Report> {
    let (valid, warnings) = match validate::validate_since(loaded, prev) {
        Ok(v) => v,
        Err((loaded, diags)) => return Err(loaded.report(diags)),
    };
    match graph::lower(&valid) {
        Ok(graph) => {
            let warnings = valid.loaded().report(warnings);
            Ok(Checked {
                valid,
                graph,
                warnings,
            })
        }
        Err(mut diags) => {
            diags.extend(warnings);
            diags.sort_by_key(|d| d.primary_span().map(|s| s.start));
            Err(valid.loaded().report(diags))
        }
    }
}
