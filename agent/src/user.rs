//! Guest users: who a `Run` with `user` runs as, read from the guest's
//! `/etc/passwd` and `/etc/group` (the paths are in [`crate::ExecConfig`], so
//! tests can give their own).

use std::fmt;
use std::io;
use std::path::Path;

/// A user to run a command as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Account {
    /// The login name.
    pub(crate) name: String,
    pub(crate) uid: u32,
    /// The primary group.
    pub(crate) gid: u32,
    /// The primary group first, then every group that lists the user as a
    /// member, each once.
    pub(crate) groups: Vec<u32>,
    /// The home directory (`HOME`).
    pub(crate) home: String,
}

/// Why a user could not be looked up.
#[derive(Debug)]
pub(crate) enum LookupError {
    /// No entry of that name in the passwd file.
    Unknown(String),
    /// The passwd or group file could not be read.
    Read(String, io::Error),
}

impl fmt::Display for LookupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LookupError::Unknown(name) => write!(f, "no user {name:?} in the guest"),
            LookupError::Read(path, e) => write!(f, "reading {path}: {e}"),
        }
    }
}

/// Looks `name` up in the passwd file `passwd` and collects its groups from
/// the group file `group` (a missing group file means no supplementary
/// groups).
pub(crate) fn lookup(name: &str, passwd: &Path, group: &Path) -> Result<Account, LookupError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| LookupError::Read(path.display().to_string(), e))
    };
    let passwd_text = read(passwd)?;
    let (uid, gid, home) =
        find_passwd(&passwd_text, name).ok_or_else(|| LookupError::Unknown(name.to_string()))?;
    let group_text = match read(group) {
        Ok(text) => text,
        Err(LookupError::Read(_, e)) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    Ok(Account {
        name: name.to_string(),
        uid,
        gid,
        groups: member_groups(&group_text, name, gid),
        home,
    })
}

/// `(uid, gid, home)` of `name` in passwd(5) text
/// (`name:password:uid:gid:gecos:home:shell`); malformed lines are skipped.
fn find_passwd(text: &str, name: &str) -> Option<(u32, u32, String)> {
    if name.is_empty() {
        return None;
    }
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || fields[0] != name {
            return None;
        }
        let uid = fields[2].parse().ok()?;
        let gid = fields[3].parse().ok()?;
        Some((uid, gid, fields[5].to_string()))
    })
}

/// `primary`, then the gid of every group(5) line
/// (`name:password:gid:member,member`) listing `user` as a member, each once.
fn member_groups(text: &str, user: &str, primary: u32) -> Vec<u32> {
    let mut groups = vec![primary];
    for line in text.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 {
            continue;
        }
        let Ok(gid) = fields[2].parse::<u32>() else {
            continue;
        };
        if fields[3].split(',').any(|m| m.trim() == user) && !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          broken line\n\
                          alice:x:1000:1000:Alice,,,:/home/alice:/bin/sh\n\
                          bob:x:1001:100::/home/bob:/bin/false\n";
    const GROUP: &str = "root:x:0:\n\
                         users:x:100:alice, bob\n\
                         alice:x:1000:\n\
                         wheel:x:10:root,alice\n\
                         bad:x:notanumber:alice\n";

    #[test]
    fn passwd_entries_are_found_by_name() {
        assert_eq!(
            find_passwd(PASSWD, "alice"),
            Some((1000, 1000, "/home/alice".into()))
        );
        assert_eq!(find_passwd(PASSWD, "root"), Some((0, 0, "/root".into())));
        assert_eq!(find_passwd(PASSWD, "carol"), None);
        assert_eq!(find_passwd(PASSWD, ""), None);
        assert_eq!(find_passwd(PASSWD, "broken line"), None);
    }

    #[test]
    fn groups_are_the_primary_then_memberships() {
        assert_eq!(member_groups(GROUP, "alice", 1000), vec![1000, 100, 10]);
        assert_eq!(member_groups(GROUP, "bob", 100), vec![100]);
        assert_eq!(member_groups(GROUP, "nobody", 65534), vec![65534]);
        assert_eq!(member_groups("", "alice", 5), vec![5]);
    }

    #[test]
    fn lookup_reads_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let (p, g) = (dir.path().join("passwd"), dir.path().join("group"));
        std::fs::write(&p, PASSWD).unwrap();
        std::fs::write(&g, GROUP).unwrap();
        let a = lookup("alice", &p, &g).unwrap();
        assert_eq!((a.uid, a.gid, a.home.as_str()), (1000, 1000, "/home/alice"));
        assert_eq!(a.groups, vec![1000, 100, 10]);
        assert!(matches!(
            lookup("carol", &p, &g),
            Err(LookupError::Unknown(n)) if n == "carol"
        ));
        // No group file: the primary group only.
        let a = lookup("alice", &p, &dir.path().join("none")).unwrap();
        assert_eq!(a.groups, vec![1000]);
        // No passwd file: an error that names it.
        let e = lookup("alice", &dir.path().join("none"), &g).unwrap_err();
        assert!(e.to_string().contains("none"), "{e}");
    }
}
