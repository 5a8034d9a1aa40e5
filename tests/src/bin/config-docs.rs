//! Writes `docs/configuration.md` from the binaries' `--help` (`scripts/config-docs`), or with
//! `--check` fails when the file differs from what they say.
//!
//!   config-docs [--check] PATH

use anyhow::{bail, Context};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (check, path) = match args.as_slice() {
        [flag, path] if flag == "--check" => (true, path),
        [path] => (false, path),
        _ => bail!("usage: config-docs [--check] PATH"),
    };
    let page = e2e::config_docs::render()?;
    if check {
        let now = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        if now != page {
            bail!("{path} is stale: run scripts/config-docs");
        }
    } else {
        std::fs::write(path, page).with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}
