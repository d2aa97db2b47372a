//! `NAME=PATH[,key=value|flag...]` specifications of exports and disks on the command line.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context;
use blockdev::{BlockDev, IoPool, Qcow2, Qcow2Options, RawFile, RawOptions};

/// Image formats we open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

/// One `NAME=PATH,...` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub name: String,
    pub path: PathBuf,
    pub format: Format,
    pub read_only: bool,
    pub direct: bool,
    /// Keys this parser does not know, left for the caller (e.g. `replica=` on the primary).
    pub extra: Vec<(String, String)>,
}

impl FromStr for DiskSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}' is not NAME=PATH[,format=raw|qcow2][,readonly]"))?;
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
            format: Format::Raw,
            read_only: false,
            direct: false,
            extra: Vec::new(),
        };
        for part in parts {
            match part.split_once('=') {
                Some(("format", "raw")) => spec.format = Format::Raw,
                Some(("format", "qcow2")) => spec.format = Format::Qcow2,
                Some(("format", f)) => {
                    return Err(format!("'{s}': unknown format '{f}' (raw or qcow2)"));
                }
                None if part == "readonly" => spec.read_only = true,
                None if part == "direct" => spec.direct = true,
                Some((k, v)) if !k.is_empty() => spec.extra.push((k.to_string(), v.to_string())),
                _ => return Err(format!("'{s}': unknown option '{part}'")),
            }
        }
        Ok(spec)
    }
}

impl DiskSpec {
    /// Refuses keys no caller consumed.
    pub fn no_extra(&self) -> anyhow::Result<()> {
        if let Some((k, _)) = self.extra.first() {
            anyhow::bail!("disk '{}': unknown option '{k}'", self.name);
        }
        Ok(())
    }

    /// Opens the image.
    pub fn open(&self, pool: &IoPool) -> anyhow::Result<Arc<dyn BlockDev>> {
        let what = || format!("disk '{}': cannot open {}", self.name, self.path.display());
        Ok(match self.format {
            Format::Raw => {
                let opts = RawOptions {
                    read_only: self.read_only,
                    direct: self.direct,
                };
                Arc::new(RawFile::open(&self.path, opts, pool.clone()).with_context(what)?)
            }
            Format::Qcow2 => {
                let opts = Qcow2Options {
                    read_only: self.read_only,
                    direct: self.direct,
                    ..Default::default()
                };
                Arc::new(Qcow2::open(&self.path, opts, pool.clone()).with_context(what)?)
            }
        })
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
        assert_eq!(s.format, Format::Qcow2);
        assert!(s.read_only);
        assert_eq!(
            s.extra,
            vec![("replica".to_string(), "nbd://h/x".to_string())]
        );
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
