//! Process limits a daemon raises at start.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tracing::info;

/// Raises the soft limit on open files (RLIMIT_NOFILE) to the hard limit and returns the soft
/// limit now in force.
///
/// The usual soft limit of 1024 is meant for programs using `select()`; a daemon that serves
/// many clients and disks needs more, and the hard limit is what the administrator allows.
/// An unlimited hard limit is left alone (the kernel refuses an unlimited descriptor count).
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let old = getrlimit(Resource::Nofile);
    let (Some(soft), Some(hard)) = (old.current, old.maximum) else {
        return Ok(old.current.unwrap_or(u64::MAX));
    };
    if soft >= hard {
        return Ok(soft);
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        },
    )?;
    info!(from = soft, to = hard, "raised the open-file limit");
    Ok(hard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_sets_the_soft_limit_to_the_hard_limit() {
        let before = getrlimit(Resource::Nofile);

        let now = raise_fd_limit().unwrap();

        let after = getrlimit(Resource::Nofile);
        assert_eq!(after.maximum, before.maximum, "the hard limit changed");
        assert_eq!(Some(now), after.current);
        if let Some(hard) = before.maximum {
            assert_eq!(now, hard);
        }
    }
}
