//! Where the workspace's binaries are.

use std::path::PathBuf;

use anyhow::{Context, bail};

/// The path of the workspace binary `name` (`exchange-sim`, `api`,
/// `ws-gateway`, `sync`), built by `cargo build --workspace --bins`.
///
/// Looked up next to the running test executable (`target/<profile>/deps/…`),
/// then under `CARGO_TARGET_DIR` (or `target/`) in `debug`.
///
/// # Errors
/// A missing binary, naming the command that builds it.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let mut tried = Vec::new();
    let exe = std::env::current_exe().context("locating the test executable")?;
    // target/<profile>/deps/<test> → target/<profile>
    if let Some(profile_dir) = exe.parent().and_then(|deps| deps.parent()) {
        tried.push(profile_dir.join(name));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    tried.push(target.join("debug").join(name));
    for path in &tried {
        if path.is_file() {
            return Ok(path.clone());
        }
    }
    bail!(
        "binary `{name}` not found (looked at {}); build it first with `cargo build --workspace --bins` (./scripts/test does)",
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn a_missing_binary_names_the_command_that_builds_it() {
        let err = super::binary("no-such-binary").unwrap_err().to_string();
        assert!(err.contains("`no-such-binary` not found"), "{err}");
        assert!(err.contains("cargo build --workspace --bins"), "{err}");
    }

    #[test]
    fn a_built_binary_is_found_in_the_target_dir() {
        let path = super::binary("exchange-sim").unwrap();
        assert!(path.ends_with("exchange-sim"), "{}", path.display());
    }
}
