//! `--config FILE`: every command-line option of a subcommand can also come from a TOML file.
//!
//! Keys are the long option names (`export-listen = "unix:/run/p.sock"`); arrays repeat an
//! option (`disk = ["a=/a.raw,replica=nbd://h/a", ...]`); `true` sets a flag. The file's
//! options come first, so the command line overrides single values and adds to lists.

use std::ffi::OsString;

use anyhow::Context;

/// Expands `--config FILE` (or `--config=FILE`) in `args` into the options the file holds.
pub fn expand(args: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter().peekable();
    let mut subcommand_at = None;
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().to_string();
        let path = if s == "--config" {
            Some(
                it.next()
                    .context("--config needs a FILE")?
                    .to_string_lossy()
                    .to_string(),
            )
        } else {
            s.strip_prefix("--config=").map(str::to_string)
        };
        match path {
            Some(p) => {
                let at = subcommand_at.unwrap_or(out.len());
                let from_file = file_args(&p)?;
                let n = from_file.len();
                out.splice(at..at, from_file);
                subcommand_at = Some(at + n);
            }
            None => {
                out.push(a);
                if subcommand_at.is_none() && out.len() == 2 {
                    subcommand_at = Some(2);
                }
            }
        }
    }
    Ok(out)
}

fn file_args(path: &str) -> anyhow::Result<Vec<OsString>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read config file {path}"))?;
    toml_args(&text, path)
}

/// The options a config file's `text` stands for (`path` names the file in errors).
pub fn toml_args(text: &str, path: &str) -> anyhow::Result<Vec<OsString>> {
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("config file {path} is not valid TOML"))?;
    let mut args = Vec::new();
    for (key, value) in table {
        let flag = format!("--{key}");
        let mut push = |v: &toml::Value| -> anyhow::Result<()> {
            match v {
                toml::Value::Boolean(true) => args.push(flag.clone().into()),
                toml::Value::Boolean(false) => {}
                toml::Value::String(s) => args.extend([flag.clone().into(), s.into()]),
                toml::Value::Integer(i) => args.extend([flag.clone().into(), i.to_string().into()]),
                toml::Value::Float(f) => args.extend([flag.clone().into(), f.to_string().into()]),
                other => {
                    anyhow::bail!("config file {path}: '{key}' has an unsupported value {other}")
                }
            }
            Ok(())
        };
        match &value {
            toml::Value::Array(items) => items.iter().try_for_each(&mut push)?,
            v => push(v)?,
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_options_come_before_the_command_line_ones() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.toml");
        std::fs::write(
            &f,
            "disk = [\"a=/a\", \"b=/b\"]\nstart = true\nqueue-mib = 8\ncontrol = \"unix:/c\"\n",
        )
        .unwrap();
        let args: Vec<OsString> = [
            "coloblk",
            "primary",
            "--config",
            f.to_str().unwrap(),
            "--control",
            "unix:/d",
        ]
        .map(Into::into)
        .to_vec();
        let got: Vec<String> = expand(args)
            .unwrap()
            .iter()
            .map(|a| a.to_string_lossy().to_string())
            .collect();
        assert_eq!(
            got,
            [
                "coloblk",
                "primary",
                "--control",
                "unix:/c",
                "--disk",
                "a=/a",
                "--disk",
                "b=/b",
                "--queue-mib",
                "8",
                "--start",
                "--control",
                "unix:/d"
            ]
        );
    }

    #[test]
    fn bad_files_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bad.toml");
        std::fs::write(&f, "disk = [").unwrap();
        let e = expand(
            ["coloblk", "primary", "--config", f.to_str().unwrap()]
                .map(Into::into)
                .to_vec(),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("is not valid TOML"), "{e:#}");
        let e = expand(
            ["coloblk", "primary", "--config", "/nonexistent.toml"]
                .map(Into::into)
                .to_vec(),
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("cannot read config file /nonexistent.toml"),
            "{e:#}"
        );
    }
}
