//! Where a daemon's export listens: an NBD socket (`unix:PATH`, `tcp:HOST:PORT`) or a
//! vhost-user-blk socket (`vhost-user:PATH[,export=NAME]`) that QEMU's `vhost-user-blk-pci`
//! attaches to. A vhost-user socket serves one disk, so with several disks it names one.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use net::addr::SocketAddr;

/// The `--listen` / `--export-listen` forms, for help texts.
pub const FORMS: &str = "unix:PATH, tcp:HOST:PORT (NBD) or vhost-user:PATH[,export=NAME]";

/// One export listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportAddr {
    /// An NBD server serving every disk by name.
    Nbd(SocketAddr),
    /// A vhost-user-blk socket serving one disk.
    VhostUser {
        /// The unix socket QEMU's chardev connects to.
        path: PathBuf,
        /// The disk (needed when the daemon has several).
        export: Option<String>,
    },
}

impl FromStr for ExportAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let Some(rest) = s.strip_prefix("vhost-user:") else {
            return s
                .parse()
                .map(ExportAddr::Nbd)
                .map_err(|_| format!("'{s}' is not an address: give {FORMS}"));
        };
        let mut parts = rest.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(format!(
                "'{s}' names no socket path: give vhost-user:PATH[,export=NAME]"
            ));
        }
        let mut export = None;
        for opt in parts {
            match opt.split_once('=') {
                Some(("export", name)) if !name.is_empty() && export.is_none() => {
                    export = Some(name.to_string())
                }
                Some(("export", "")) => {
                    return Err(format!("'{s}': export= needs a disk name"));
                }
                Some(("export", _)) => return Err(format!("'{s}': export= given twice")),
                _ => {
                    return Err(format!(
                        "'{s}': unknown option '{opt}' (vhost-user:PATH[,export=NAME]; the path \
                         cannot contain ',')"
                    ));
                }
            }
        }
        Ok(ExportAddr::VhostUser {
            path: PathBuf::from(path),
            export,
        })
    }
}

impl fmt::Display for ExportAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExportAddr::Nbd(a) => write!(f, "{a}"),
            ExportAddr::VhostUser { path, export } => {
                write!(f, "vhost-user:{}", path.display())?;
                match export {
                    Some(name) => write!(f, ",export={name}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Checks a daemon's listeners against its disks before anything is bound: every vhost-user
/// socket resolves to exactly one disk, and no socket path is used twice.
pub fn check(addrs: &[ExportAddr], disks: &[&str]) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for a in addrs {
        let path = match a {
            ExportAddr::Nbd(SocketAddr::Unix(p)) => p.clone(),
            ExportAddr::Nbd(SocketAddr::Tcp { .. }) => {
                if !seen.insert(PathBuf::from(a.to_string())) {
                    return Err(format!("{a} is given twice"));
                }
                continue;
            }
            ExportAddr::VhostUser { path, export } => {
                vhost_disk(export.as_deref(), disks).map_err(|e| format!("{a}: {e}"))?;
                path.clone()
            }
        };
        if !seen.insert(path.clone()) {
            return Err(format!("the socket {} is given twice", path.display()));
        }
    }
    Ok(())
}

/// The disk a vhost-user socket serves: the one named, or the only one.
pub fn vhost_disk<'a>(export: Option<&str>, disks: &[&'a str]) -> Result<&'a str, String> {
    match (export, disks) {
        (Some(name), _) => disks
            .iter()
            .copied()
            .find(|d| *d == name)
            .ok_or_else(|| format!("no disk named '{name}' (the disks: {})", disks.join(", "))),
        (None, [only]) => Ok(only),
        (None, _) => Err(format!(
            "a vhost-user socket serves one disk: add ,export=NAME (one of {})",
            disks.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forms() {
        assert_eq!(
            "unix:/a.sock".parse::<ExportAddr>().unwrap(),
            ExportAddr::Nbd(SocketAddr::Unix("/a.sock".into()))
        );
        assert_eq!(
            "vhost-user:/run/vm0.vhost,export=vm0"
                .parse::<ExportAddr>()
                .unwrap(),
            ExportAddr::VhostUser {
                path: "/run/vm0.vhost".into(),
                export: Some("vm0".into())
            }
        );
        let a: ExportAddr = "vhost-user:rel.sock".parse().unwrap();
        assert_eq!(a.to_string(), "vhost-user:rel.sock");
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let err = |s: &str| s.parse::<ExportAddr>().unwrap_err();
        assert!(
            err("vhost-user:").contains("names no socket path"),
            "{}",
            err("vhost-user:")
        );
        assert!(err("vhost-user:,export=a").contains("names no socket path"));
        assert!(err("vhost-user:/p,export=").contains("export= needs a disk name"));
        assert!(err("vhost-user:/p,export=a,export=b").contains("given twice"));
        assert!(err("vhost-user:/p,queues=4").contains("unknown option 'queues=4'"));
        assert!(err("vhost:/p").contains("is not an address"));
    }

    #[test]
    fn a_vhost_user_socket_resolves_to_one_disk() {
        let v = |s: &str| s.parse::<ExportAddr>().unwrap();
        assert_eq!(check(&[v("vhost-user:/a")], &["vm0"]), Ok(()));
        let e = check(&[v("vhost-user:/a")], &["a", "b"]).unwrap_err();
        assert!(e.contains("add ,export=NAME (one of a, b)"), "{e}");
        let e = check(&[v("vhost-user:/a,export=c")], &["a", "b"]).unwrap_err();
        assert!(e.contains("no disk named 'c'"), "{e}");
        let e = check(&[v("unix:/a"), v("vhost-user:/a")], &["a"]).unwrap_err();
        assert!(e.contains("given twice"), "{e}");
        assert_eq!(
            check(
                &[
                    v("unix:/n"),
                    v("vhost-user:/a,export=a"),
                    v("vhost-user:/b,export=b")
                ],
                &["a", "b"]
            ),
            Ok(())
        );
    }
}
