//! `docs/configuration.md`, generated from the binaries' `--help` (`scripts/config-docs` writes
//! it; a test in `tests/tests/compose.rs` fails when it is stale).

use std::fmt::Write as _;
use std::process::Command;

use anyhow::{bail, Context};

/// Every command a user runs, as (binary, subcommand).
pub const COMMANDS: [(&str, Option<&str>); 8] = [
    ("cdc-reader", None),
    ("cdc-reader", Some("replay")),
    ("cdc-reader", Some("snapshot")),
    ("projector", None),
    ("projector", Some("replay")),
    ("user-api", None),
    ("post-api", None),
    ("migrate", None),
];

/// One option of a command, as its `--help` describes it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Opt {
    /// `--flag <VALUE>` (or `-h, --help`).
    pub flag: String,
    pub env: Option<String>,
    pub default: Option<String>,
    pub possible: Option<String>,
    pub text: String,
}

impl Opt {
    /// The long flag (`--database-url`).
    pub fn long(&self) -> Option<&str> {
        self.flag
            .split_whitespace()
            .map(|w| w.trim_end_matches(','))
            .find(|w| w.starts_with("--"))
    }
}

/// A command's `--help`: what it does, its usage line and its options.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Help {
    pub about: String,
    pub usage: String,
    pub options: Vec<Opt>,
    /// What follows the options (clap's `after_help`), a paragraph per line.
    pub after: String,
}

impl Help {
    /// Whether the usage line requires `--flag`.
    pub fn requires(&self, flag: &str) -> bool {
        self.usage.split_whitespace().any(|w| w == flag)
    }
}

/// Parses clap's long `--help` (run with an empty environment).
pub fn parse(text: &str) -> anyhow::Result<Help> {
    let mut help = Help::default();
    let mut lines = text.lines();
    for line in lines.by_ref() {
        if line.trim().is_empty() {
            break;
        }
        if !help.about.is_empty() {
            help.about.push(' ');
        }
        help.about.push_str(line.trim());
    }
    let mut in_options = false;
    for line in lines {
        if let Some(usage) = line.strip_prefix("Usage: ") {
            help.usage = usage.trim().to_owned();
            continue;
        }
        if line == "Options:" {
            in_options = true;
            continue;
        }
        if !in_options || line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(' ') {
            // Past the options (their lines are indented).
            if !help.after.is_empty() {
                help.after.push_str("\n\n");
            }
            help.after.push_str(line.trim());
            continue;
        }
        let line = line.trim();
        if line.starts_with('-') {
            // `--flag <V>`, its description on the next lines or after two spaces.
            let (flag, rest) = line.split_once("  ").unwrap_or((line, ""));
            help.options.push(Opt {
                flag: flag.trim().to_owned(),
                ..Opt::default()
            });
            if let Some(opt) = help.options.last_mut() {
                describe(opt, rest);
            }
            continue;
        }
        let Some(opt) = help.options.last_mut() else {
            bail!("a description before any option: {line:?}");
        };
        describe(opt, line);
    }
    if help.usage.is_empty() || help.options.is_empty() {
        bail!("no usage line or no options in:\n{text}");
    }
    Ok(help)
}

/// Adds a line of an option's description; clap ends the last one with `[env: VAR=value]
/// [default: d] [possible values: a, b]`.
fn describe(opt: &mut Opt, line: &str) {
    let mut rest = line.trim().to_owned();
    for (tag, field) in [
        ("[possible values: ", &mut opt.possible),
        ("[default: ", &mut opt.default),
        ("[env: ", &mut opt.env),
    ] {
        if let Some(at) = rest.rfind(tag) {
            let value = rest[at + tag.len()..].trim_end().trim_end_matches(']');
            // The variable's current value is left out (the environment was empty).
            let value = if tag == "[env: " {
                value.split('=').next().unwrap_or(value)
            } else {
                value
            };
            *field = Some(value.to_owned());
            rest.truncate(at);
        }
    }
    let rest = rest.trim();
    if !rest.is_empty() {
        if !opt.text.is_empty() {
            opt.text.push(' ');
        }
        opt.text.push_str(rest);
    }
}

/// `bin [sub] --help` with an empty environment.
pub fn help_text(bin: &str, sub: Option<&str>) -> anyhow::Result<String> {
    let path = crate::workspace_binary(bin)?;
    let out = Command::new(&path)
        .args(sub)
        .arg("--help")
        .env_clear()
        .output()
        .with_context(|| format!("running {}", path.display()))?;
    if !out.status.success() {
        bail!("{bin} --help failed: {out:?}");
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A table cell: `|` and line breaks would end it.
fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// The whole page.
pub fn render() -> anyhow::Result<String> {
    let mut out = String::from(
        "# Configuration\n\n\
         <!-- Generated by scripts/config-docs from the binaries' --help; edit the flags' doc \
         comments, not this file. -->\n\n\
         Every flag of every command, as its `--help` says. Each flag with a variable can be set \
         through that environment variable instead (the flag wins); `RUST_LOG` (default `info`) \
         sets the log level of all of them. Where the variables go in the dev stack and in \
         Docker compose: [operations.md](operations.md#configuration) and [docker.md](docker.md).\n",
    );
    for (bin, sub) in COMMANDS {
        let name = sub.map_or(bin.to_owned(), |s| format!("{bin} {s}"));
        let help = parse(&help_text(bin, sub)?).with_context(|| format!("{name} --help"))?;
        write!(
            out,
            "\n## `{name}`\n\n{}\n\n`{} {}`\n\n| flag | variable | default | |\n|---|---|---|---|\n",
            help.about,
            name,
            help.usage
                .strip_prefix(&name)
                .unwrap_or(&help.usage)
                .trim()
        )?;
        for o in &help.options {
            let mut text = o.text.clone();
            if let Some(p) = &o.possible {
                write!(text, " (one of: {p})")?;
            }
            let required = o.long().is_some_and(|f| help.requires(f));
            writeln!(
                out,
                "| `{}` | {} | {} | {} |",
                cell(&o.flag),
                o.env.as_ref().map_or(String::new(), |e| format!("`{e}`")),
                match &o.default {
                    Some(d) => format!("`{}`", cell(d)),
                    None if required => "(required)".to_owned(),
                    None => String::new(),
                },
                cell(text.trim())
            )?;
        }
        if !help.after.is_empty() {
            write!(out, "\n{}\n", help.after)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_help_is_read_option_by_option() {
        let text = "Does things\n\nUsage: thing [OPTIONS] --url <URL>\n\nOptions:\n      \
                    --url <URL>\n          Where to go [env: THING_URL]\n      --mode <MODE>\n          \
                    How [env: THING_MODE=] [default: fast] [possible values: fast, slow]\n      \
                    --short <S>    Inline [env: THING_SHORT=]\n  \
                    -h, --help\n          Print help\n\nMore: thing other --help\n";
        let help = parse(text).unwrap();
        assert_eq!(help.about, "Does things");
        assert_eq!(help.usage, "thing [OPTIONS] --url <URL>");
        assert_eq!(help.after, "More: thing other --help");
        assert_eq!(
            help.options,
            [
                Opt {
                    flag: "--url <URL>".into(),
                    env: Some("THING_URL".into()),
                    text: "Where to go".into(),
                    ..Opt::default()
                },
                Opt {
                    flag: "--mode <MODE>".into(),
                    env: Some("THING_MODE".into()),
                    default: Some("fast".into()),
                    possible: Some("fast, slow".into()),
                    text: "How".into(),
                },
                Opt {
                    flag: "--short <S>".into(),
                    env: Some("THING_SHORT".into()),
                    text: "Inline".into(),
                    ..Opt::default()
                },
                Opt {
                    flag: "-h, --help".into(),
                    text: "Print help".into(),
                    ..Opt::default()
                },
            ]
        );
    }
}
