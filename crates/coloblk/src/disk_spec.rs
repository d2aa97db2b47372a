//! `NAME=PATH[,key=value|flag...]` specifications of exports and disks on the command line.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context;
use blockdev::{BlockDev, ImageFormat, IoPool, OpenOptions};

/// Who reads a specification: each role has its own options, and its errors show its syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Any keys, kept in `extra` for the caller.
    Any,
    /// `coloblk serve --export`.
    Serve,
    /// `coloblk primary --disk`.
    Primary,
    /// `coloblk secondary --disk`.
    Secondary,
}

impl Role {
    /// The syntax shown in errors.
    pub fn syntax(self) -> &'static str {
        match self {
            Role::Any => "NAME=PATH[,OPTION...]",
            Role::Serve => "NAME=PATH[,format=raw|qcow2][,readonly][,direct]",
            Role::Primary => {
                "NAME=PATH[,format=raw|qcow2][,direct],replica=NBD-URI[,sync=checksum|full|none]"
            }
            Role::Secondary => "NAME=PATH[,format=raw|qcow2][,direct][,active=PATH,hidden=PATH]",
        }
    }

    /// The `key=value` options of the role beyond format.
    fn keys(self) -> &'static [&'static str] {
        match self {
            Role::Any | Role::Serve => &[],
            Role::Primary => &["replica", "sync"],
            Role::Secondary => &["active", "hidden"],
        }
    }
}

/// Refuses two disks of one name (before anything is opened).
pub fn unique_names(specs: &[DiskSpec]) -> Result<(), crate::UsageError> {
    for (i, spec) in specs.iter().enumerate() {
        if specs[..i].iter().any(|s| s.name == spec.name) {
            return Err(crate::UsageError(format!(
                "disk '{}' is given twice",
                spec.name
            )));
        }
    }
    Ok(())
}

/// Parses a forwarding mode: `async` or `sync`.
pub fn forward_mode(s: &str) -> Result<replication::primary::ForwardMode, String> {
    replication::primary::ForwardMode::from_name(s)
        .ok_or_else(|| format!("unknown mode '{s}' (async or sync)"))
}

/// Parses a number of seconds that must be positive and finite (a timeout).
pub fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("'{s}' is not a positive number of seconds")),
    }
}

/// Parses a `coloblk serve --export` specification.
pub fn export(s: &str) -> Result<DiskSpec, String> {
    DiskSpec::parse_as(s, Role::Serve)
}

/// Parses a `coloblk primary --disk` specification (`replica=` required).
pub fn primary_disk(s: &str) -> Result<DiskSpec, String> {
    let spec = DiskSpec::parse_as(s, Role::Primary)?;
    if spec.option("replica").is_none() {
        return Err(format!(
            "'{s}': missing replica=NBD-URI (the secondary's replica export); a primary disk is {}",
            Role::Primary.syntax()
        ));
    }
    match spec.option("sync") {
        None | Some("checksum") | Some("full") | Some("none") => {}
        Some(other) => {
            return Err(format!(
                "'{s}': unknown sync mode '{other}' (checksum, full or none)"
            ));
        }
    }
    Ok(spec)
}

/// Parses a `coloblk secondary --disk` specification.
pub fn secondary_disk(s: &str) -> Result<DiskSpec, String> {
    let spec = DiskSpec::parse_as(s, Role::Secondary)?;
    if spec.option("active").is_some() != spec.option("hidden").is_some() {
        return Err(format!("'{s}': give both active= and hidden=, or neither"));
    }
    Ok(spec)
}

/// One `NAME=PATH,...` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub name: String,
    pub path: PathBuf,
    pub format: ImageFormat,
    pub read_only: bool,
    pub direct: bool,
    /// Keys this parser does not know, left for the caller (e.g. `replica=` on the primary).
    pub extra: Vec<(String, String)>,
}

impl FromStr for DiskSpec {
    type Err = String;

    /// Any keys accepted (kept in `extra`); the daemons use the role parsers instead.
    fn from_str(s: &str) -> Result<Self, String> {
        DiskSpec::parse_as(s, Role::Any)
    }
}

impl DiskSpec {
    /// Parses `s` as `role` reads it: its options only, its syntax in every error.
    pub fn parse_as(s: &str, role: Role) -> Result<Self, String> {
        let syntax = role.syntax();
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}' is not {syntax}"))?;
        if name.is_empty() || name.len() > 4096 {
            return Err(format!("'{s}': the name must be 1 to 4096 bytes"));
        }
        let mut parts = rest.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(format!("'{s}': missing the image path after '{name}='"));
        }
        let mut spec = DiskSpec {
            name: name.to_string(),
            path: PathBuf::from(path),
            format: ImageFormat::Raw,
            read_only: false,
            direct: false,
            extra: Vec::new(),
        };
        let known = |k: &str| role == Role::Any || k == "format" || role.keys().contains(&k);
        for part in parts {
            match part.split_once('=') {
                Some(("format", f)) => {
                    spec.format = ImageFormat::from_name(f)
                        .ok_or_else(|| format!("'{s}': unknown format '{f}' (raw or qcow2)"))?;
                }
                None if part == "readonly" && matches!(role, Role::Any | Role::Serve) => {
                    spec.read_only = true
                }
                None if part == "direct" => spec.direct = true,
                None if known(part) && !part.is_empty() => {
                    return Err(format!(
                        "'{s}': option '{part}' needs a value ({part}=...); the syntax is {syntax}"
                    ));
                }
                Some((k, v)) if !k.is_empty() && known(k) => {
                    if v.is_empty() && role != Role::Any {
                        return Err(format!("'{s}': option '{k}' needs a value after '='"));
                    }
                    spec.extra.push((k.to_string(), v.to_string()))
                }
                _ => {
                    return Err(format!(
                        "'{s}': unknown option '{part}'; the syntax is {syntax}"
                    ));
                }
            }
        }
        Ok(spec)
    }

    /// The value of a role option (`replica`, `sync`, `active`, `hidden`).
    pub fn option(&self, key: &str) -> Option<&str> {
        self.extra
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Refuses keys no caller consumed.
    pub fn no_extra(&self) -> anyhow::Result<()> {
        if let Some((k, _)) = self.extra.first() {
            anyhow::bail!("disk '{}': unknown option '{k}'", self.name);
        }
        Ok(())
    }

    /// Opens the image.
    pub fn open(&self, pool: &IoPool) -> anyhow::Result<Arc<dyn BlockDev>> {
        let options = OpenOptions::new(self.format, pool.clone())
            .read_only(self.read_only)
            .direct(self.direct);
        blockdev::open(&self.path, options)
            .with_context(|| format!("disk '{}': cannot open {}", self.name, self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_name_path_and_options() {
        let s: DiskSpec = "d0=/img/a.qcow2,format=qcow2,readonly,replica=nbd://h/x"
            .parse()
            .unwrap();
        assert_eq!(s.name, "d0");
        assert_eq!(s.path, PathBuf::from("/img/a.qcow2"));
        assert_eq!(s.format, ImageFormat::Qcow2);
        assert!(s.read_only);
        assert_eq!(
            s.extra,
            vec![("replica".to_string(), "nbd://h/x".to_string())]
        );
    }

    #[test]
    fn each_role_shows_its_own_syntax_and_options() {
        let e = primary_disk("vm0").unwrap_err();
        assert_eq!(
            e,
            "'vm0' is not NAME=PATH[,format=raw|qcow2][,direct],replica=NBD-URI[,sync=checksum|full|none]"
        );
        assert_eq!(
            primary_disk("vm0=/a,replica").unwrap_err(),
            "'vm0=/a,replica': option 'replica' needs a value (replica=...); the syntax is \
             NAME=PATH[,format=raw|qcow2][,direct],replica=NBD-URI[,sync=checksum|full|none]"
        );
        assert_eq!(
            primary_disk("vm0=/a").unwrap_err(),
            "'vm0=/a': missing replica=NBD-URI (the secondary's replica export); a primary disk \
             is NAME=PATH[,format=raw|qcow2][,direct],replica=NBD-URI[,sync=checksum|full|none]"
        );
        assert_eq!(
            primary_disk("vm0=/a,replica=nbd://h/x,sync=fast").unwrap_err(),
            "'vm0=/a,replica=nbd://h/x,sync=fast': unknown sync mode 'fast' (checksum, full or none)"
        );
        assert!(primary_disk("vm0=/a,replica=nbd://h/x,sync=none").is_ok());
        assert_eq!(
            secondary_disk("vm0=/a,replica=x").unwrap_err(),
            "'vm0=/a,replica=x': unknown option 'replica=x'; the syntax is \
             NAME=PATH[,format=raw|qcow2][,direct][,active=PATH,hidden=PATH]"
        );
        assert_eq!(
            secondary_disk("vm0=/a,active=/b").unwrap_err(),
            "'vm0=/a,active=/b': give both active= and hidden=, or neither"
        );
        assert_eq!(
            export("d=/a,sync=none").unwrap_err(),
            "'d=/a,sync=none': unknown option 'sync=none'; the syntax is \
             NAME=PATH[,format=raw|qcow2][,readonly][,direct]"
        );
        assert!(export("d=/a,readonly,direct").unwrap().read_only);
    }

    #[test]
    fn refuses_malformed_specs() {
        for bad in [
            "noequals",
            "=p",
            "n=",
            "n=p,format=vmdk",
            "n=p,bogus",
            "n=p,=x",
        ] {
            assert!(bad.parse::<DiskSpec>().is_err(), "{bad}");
        }
    }
}
