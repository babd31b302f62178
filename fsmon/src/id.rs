//! Who a container is: the one container id type (64 hex digits, always lowercase) and
//! the names of the runtimes that make containers. Pure, no IO.
//!
//! Every runtime fsmon knows (Docker, containerd, podman, CRI-O) names a container by a
//! 64-hex id, and every place fsmon reads ids from (cgroup names, bundle directories, API
//! answers, `containers.json`) goes through [`ContainerId`], so that two spellings of one
//! id can never be two containers, and a hostile name (`../../etc`, a NUL, an overlong
//! string) can never become a path component.

use std::fmt;

use fsmon_common::CONTAINER_ID_HEX;

/// A 64-hex container id, lowercase. Safe to use as a single path component.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerId(String);

impl ContainerId {
    /// Parses an id given by a user or an API: 64 hex digits of either case, normalised to
    /// lowercase. Anything else (other lengths, whitespace, non-ASCII) is `None`.
    pub fn parse(s: &str) -> Option<ContainerId> {
        (s.len() == CONTAINER_ID_HEX && s.bytes().all(|c| c.is_ascii_hexdigit()))
            .then(|| ContainerId(s.to_ascii_lowercase()))
    }

    /// Parses an id as a runtime writes it into names on disk and in cgroups: lowercase
    /// only. An uppercase spelling there is not an id that runtime made (no runtime writes
    /// one), so it is refused rather than normalised into a path that does not exist.
    pub fn parse_canonical(s: &str) -> Option<ContainerId> {
        (s.len() == CONTAINER_ID_HEX
            && s.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)))
        .then(|| ContainerId(s.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ContainerId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<ContainerId> for String {
    fn from(id: ContainerId) -> String {
        id.0
    }
}

/// The container runtime that made a container (the record's `container.runtime`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuntimeName {
    /// Docker (dockerd), whichever storage it uses.
    Docker,
    /// containerd itself: ctr, nerdctl, and Kubernetes through its CRI plugin.
    Containerd,
    /// podman (rootful).
    Podman,
    /// CRI-O.
    CriO,
}

impl RuntimeName {
    /// The record's `runtime` string.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeName::Docker => "docker",
            RuntimeName::Containerd => "containerd",
            RuntimeName::Podman => "podman",
            RuntimeName::CriO => "cri-o",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c7a0d2b3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f90";

    #[test]
    fn parses_and_normalises() {
        let upper = ID.to_uppercase();
        let cases: Vec<(&str, Option<&str>, Option<&str>)> = vec![
            // (input, parse, parse_canonical)
            (ID, Some(ID), Some(ID)),
            (&upper, Some(ID), None),
            ("", None, None),
            (&ID[..63], None, None),
            (
                "../../../../../../../../../../../../../../../../../../../etc/passwd",
                None,
                None,
            ),
            (
                "g000000000000000000000000000000000000000000000000000000000000000",
                None,
                None,
            ),
            (
                " 4f1c7a0d2b3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9",
                None,
                None,
            ),
            (
                "4f1c7a0d2b3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9\0",
                None,
                None,
            ),
            // 64 bytes but not 64 ASCII characters.
            (
                "é1c7a0d2b3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9",
                None,
                None,
            ),
        ];
        for (input, want, want_canonical) in cases {
            assert_eq!(
                ContainerId::parse(input).as_ref().map(ContainerId::as_str),
                want,
                "parse {input:?}"
            );
            assert_eq!(
                ContainerId::parse_canonical(input)
                    .as_ref()
                    .map(ContainerId::as_str),
                want_canonical,
                "parse_canonical {input:?}"
            );
        }
        let long = format!("{ID}0");
        assert_eq!(ContainerId::parse(&long), None);
        assert_eq!(
            ContainerId::parse(&upper),
            ContainerId::parse_canonical(ID),
            "two spellings, one id"
        );
    }
}
