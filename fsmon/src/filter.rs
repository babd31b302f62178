//! Which containers and which file records an operator wants: `--filter`/`--exclude`
//! (docker-CLI style `key=value`), `--path`/`--exclude-path` (globs on container paths) and
//! `--kind`. Pure: parsing and decisions, no IO; the daemon asks [`ContainerFilter::decide`]
//! before it freezes or watches anything, so an excluded container is never armed.
//!
//! Container keys: `id` (prefix of the 64-hex id), `name`, `image`, `label` (`k` or `k=v`),
//! `runtime`, `namespace` and `pod` (Kubernetes). Repeating a key ORs its values; different
//! keys AND. `--exclude` uses the same rules: a container matching the exclude set is
//! skipped. `id` and `runtime` are known when the cgroup appears; the others come from the
//! runtime's metadata, which may not be known yet at that instant: the decision is then
//! [`Decision::NotYet`] and the daemon decides again once it has the metadata.

use std::collections::BTreeMap;

/// What is known about a container when deciding.
#[derive(Clone, Debug, Default)]
pub struct Facts<'a> {
    /// The 64-hex id (always known).
    pub id: &'a str,
    /// `docker`, `containerd`, `podman`, `cri-o`, when known.
    pub runtime: Option<&'a str>,
    /// The runtime's metadata; `None` while not known yet.
    pub meta: Option<Meta<'a>>,
}

/// A container's metadata, once known (a field that is `None` here: it has none).
#[derive(Clone, Debug, Default)]
pub struct Meta<'a> {
    /// Name.
    pub name: Option<&'a str>,
    /// Image.
    pub image: Option<&'a str>,
    /// Labels (or annotations).
    pub labels: Option<&'a BTreeMap<String, String>>,
    /// Kubernetes namespace, for a Kubernetes container.
    pub namespace: Option<&'a str>,
    /// Kubernetes pod name, for a Kubernetes container.
    pub pod: Option<&'a str>,
}

/// The outcome of a container decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Arm and report it.
    Monitor,
    /// Do not arm it: no freeze, no gate, no watch, no records.
    Skip,
    /// A key needs metadata not known yet.
    NotYet,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Id,
    Name,
    Image,
    Label,
    Runtime,
    Namespace,
    Pod,
}

/// A `--filter`/`--exclude` argument that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    /// Not `key=value`.
    #[error("{arg:?} is not key=value (keys: id, name, image, label, runtime, namespace, pod)")]
    Syntax {
        /// The argument.
        arg: String,
    },
    /// A key fsmon does not know.
    #[error("unknown filter key {key:?} (keys: id, name, image, label, runtime, namespace, pod)")]
    UnknownKey {
        /// The key.
        key: String,
    },
    /// A value that cannot match anything.
    #[error("bad value for {key}: {why}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// Why.
        why: String,
    },
    /// A glob that cannot be used.
    #[error("bad path glob {glob:?}: {why}")]
    BadGlob {
        /// The glob.
        glob: String,
        /// Why.
        why: &'static str,
    },
    /// A `--kind` that is not a file record kind.
    #[error("unknown kind {kind:?} (kinds: create, modify, attrib, delete, rename)")]
    BadKind {
        /// The kind.
        kind: String,
    },
}

/// One set of `key=value` conditions (same key OR, different keys AND).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Conditions(BTreeMap<Key, Vec<String>>);

impl Conditions {
    fn parse(args: &[String]) -> Result<Self, FilterError> {
        let mut c = Conditions::default();
        for arg in args {
            let (k, v) = arg
                .split_once('=')
                .ok_or_else(|| FilterError::Syntax { arg: arg.clone() })?;
            let key = match k {
                "id" => Key::Id,
                "name" => Key::Name,
                "image" => Key::Image,
                "label" => Key::Label,
                "runtime" => Key::Runtime,
                "namespace" => Key::Namespace,
                "pod" => Key::Pod,
                _ => return Err(FilterError::UnknownKey { key: k.to_owned() }),
            };
            let bad = |key, why: &str| FilterError::BadValue {
                key,
                why: why.to_owned(),
            };
            match key {
                _ if v.is_empty() => return Err(bad("filter", "empty value")),
                Key::Id if !v.bytes().all(|b| b.is_ascii_hexdigit()) || v.len() > 64 => {
                    return Err(bad("id", "a container id is up to 64 hex digits"));
                }
                Key::Runtime if !["docker", "containerd", "podman", "cri-o"].contains(&v) => {
                    return Err(bad("runtime", "one of docker, containerd, podman, cri-o"));
                }
                _ => {}
            }
            c.0.entry(key).or_default().push(v.to_owned());
        }
        Ok(c)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Some(true/false)` when decidable from `f`, `None` when a needed fact is unknown.
    fn matches(&self, f: &Facts) -> Option<bool> {
        let mut unknown = false;
        for (key, values) in &self.0 {
            let one = |v: &String| -> Option<bool> {
                let meta = f.meta.as_ref();
                match key {
                    Key::Id => Some(f.id.starts_with(&v.to_ascii_lowercase())),
                    Key::Runtime => f.runtime.map(|r| r == v),
                    Key::Name => {
                        meta.map(|m| m.name.is_some_and(|n| n.trim_start_matches('/') == v))
                    }
                    Key::Image => meta.map(|m| m.image.is_some_and(|i| image_matches(i, v))),
                    Key::Label => meta.map(|m| {
                        m.labels.is_some_and(|l| match v.split_once('=') {
                            Some((k, want)) => l.get(k).is_some_and(|have| have == want),
                            None => l.contains_key(v.as_str()),
                        })
                    }),
                    Key::Namespace => meta.map(|m| m.namespace == Some(v.as_str())),
                    Key::Pod => meta.map(|m| m.pod == Some(v.as_str())),
                }
            };
            let results: Vec<Option<bool>> = values.iter().map(one).collect();
            if results.contains(&Some(true)) {
                continue;
            }
            if results.contains(&None) {
                unknown = true;
                continue;
            }
            return Some(false);
        }
        if unknown {
            None
        } else {
            Some(true)
        }
    }
}

/// `nginx` matches `nginx`, `nginx:latest` and `docker.io/library/nginx:1.27`; `nginx:1.27`
/// matches that tag only.
fn image_matches(image: &str, want: &str) -> bool {
    if image == want {
        return true;
    }
    let short = image
        .strip_prefix("docker.io/library/")
        .or_else(|| image.strip_prefix("docker.io/"))
        .unwrap_or(image);
    if short == want {
        return true;
    }
    // Without a tag or digest in `want`, any tag of that repository.
    let has_tag = want
        .rsplit('/')
        .next()
        .is_some_and(|last| last.contains(':'))
        || want.contains('@');
    !has_tag
        && [image, short].iter().any(|i| {
            i.strip_prefix(want)
                .is_some_and(|rest| rest.starts_with(':') || rest.starts_with('@'))
        })
}

/// `--filter` and `--exclude` together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerFilter {
    include: Conditions,
    exclude: Conditions,
}

impl ContainerFilter {
    /// Parses the `--filter` and `--exclude` arguments.
    pub fn parse(include: &[String], exclude: &[String]) -> Result<Self, FilterError> {
        Ok(ContainerFilter {
            include: Conditions::parse(include)?,
            exclude: Conditions::parse(exclude)?,
        })
    }

    /// Whether any container condition was given.
    pub fn is_empty(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }

    /// Whether to arm a container, from what is known about it now.
    pub fn decide(&self, f: &Facts) -> Decision {
        let included = if self.include.is_empty() {
            Some(true)
        } else {
            self.include.matches(f)
        };
        let excluded = if self.exclude.is_empty() {
            Some(false)
        } else {
            self.exclude.matches(f)
        };
        match (included, excluded) {
            (Some(false), _) | (_, Some(true)) => Decision::Skip,
            (Some(true), Some(false)) => Decision::Monitor,
            _ => Decision::NotYet,
        }
    }
}

/// A path glob: `*` matches within one path component, `**` any number of components,
/// `?` one character. Anchored at `/` (container paths are absolute).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(Vec<u8>);

impl Glob {
    /// Parses a glob.
    pub fn parse(s: &str) -> Result<Glob, FilterError> {
        let bad = |why| FilterError::BadGlob {
            glob: s.to_owned(),
            why,
        };
        if !s.starts_with('/') {
            return Err(bad("a container path glob starts with /"));
        }
        if s.contains('[') || s.contains('{') {
            return Err(bad("only *, ** and ? are supported"));
        }
        if s.split('/').any(|c| c.contains("**") && c != "**") {
            return Err(bad("** must be a whole path component"));
        }
        Ok(Glob(s.as_bytes().to_vec()))
    }

    /// Whether `path` matches.
    pub fn matches(&self, path: &[u8]) -> bool {
        glob_match(&self.0, path)
    }
}

fn glob_match(p: &[u8], s: &[u8]) -> bool {
    match p {
        [] => s.is_empty(),
        // `/**` at the end: the directory itself and everything below.
        [b'/', b'*', b'*'] => s.is_empty() || s.first() == Some(&b'/'),
        // `/**/`: zero or more components.
        [b'/', b'*', b'*', b'/', rest @ ..] => {
            let rest_with_slash = &p[3..];
            glob_match(rest_with_slash, s)
                || s.iter()
                    .enumerate()
                    .any(|(i, &c)| c == b'/' && i > 0 && glob_match(rest_with_slash, &s[i..]))
                || (s.first() == Some(&b'/') && glob_match(rest, &s[1..]))
        }
        [b'*', rest @ ..] => (0..=s.len())
            .take_while(|&i| i == 0 || s[i - 1] != b'/')
            .any(|i| glob_match(rest, &s[i..])),
        [b'?', rest @ ..] => s.first().is_some_and(|&c| c != b'/') && glob_match(rest, &s[1..]),
        [c, rest @ ..] => s.first() == Some(c) && glob_match(rest, &s[1..]),
    }
}

/// `--path`, `--exclude-path` and `--kind`: which file records are printed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordFilter {
    paths: Vec<Glob>,
    exclude_paths: Vec<Glob>,
    /// Empty: every kind.
    kinds: Vec<String>,
}

/// The file record kinds `--kind` accepts.
pub const FILE_KINDS: [&str; 5] = ["create", "modify", "attrib", "delete", "rename"];

impl RecordFilter {
    /// Parses the arguments (`kinds` may hold comma-separated lists).
    pub fn parse(
        paths: &[String],
        exclude_paths: &[String],
        kinds: &[String],
    ) -> Result<Self, FilterError> {
        let globs = |v: &[String]| {
            v.iter()
                .map(|g| Glob::parse(g))
                .collect::<Result<Vec<_>, _>>()
        };
        let mut ks = Vec::new();
        for k in kinds.iter().flat_map(|k| k.split(',')).map(str::trim) {
            if !FILE_KINDS.contains(&k) {
                return Err(FilterError::BadKind { kind: k.to_owned() });
            }
            ks.push(k.to_owned());
        }
        Ok(RecordFilter {
            paths: globs(paths)?,
            exclude_paths: globs(exclude_paths)?,
            kinds: ks,
        })
    }

    /// Whether every file record is printed.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && self.exclude_paths.is_empty() && self.kinds.is_empty()
    }

    /// Whether a file record of `kind` on `path` (and `old_path` for a rename: either path
    /// matching is enough) is printed.
    pub fn keeps(&self, kind: &str, path: &[u8], old_path: Option<&[u8]>) -> bool {
        if !self.kinds.is_empty() && !self.kinds.iter().any(|k| k == kind) {
            return false;
        }
        let one = |p: &[u8]| {
            (self.paths.is_empty() || self.paths.iter().any(|g| g.matches(p)))
                && !self.exclude_paths.iter().any(|g| g.matches(p))
        };
        one(path) || old_path.is_some_and(one)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    const ID: &str = "9c1f0c5be2a84cf1b3a1e0a4f7f2d6b1c8e9a0b1c2d3e4f5a6b7c8d9e0f1a2b3";

    #[test]
    fn container_decisions() {
        let labels: BTreeMap<String, String> = [("tier".to_owned(), "web".to_owned())]
            .into_iter()
            .collect();
        let known = Facts {
            id: ID,
            runtime: Some("docker"),
            meta: Some(Meta {
                name: Some("web-1"),
                image: Some("docker.io/library/nginx:1.27"),
                labels: Some(&labels),
                namespace: None,
                pod: None,
            }),
        };
        let early = Facts {
            id: ID,
            runtime: Some("docker"),
            ..Facts::default()
        };
        use Decision::*;
        let table: &[(&[&str], &[&str], Decision, Decision)] = &[
            // include, exclude, decision with metadata, at the cgroup's appearance
            (&[], &[], Monitor, Monitor),
            (&["id=9c1f"], &[], Monitor, Monitor),
            (&["id=9C1F"], &[], Monitor, Monitor),
            (&["id=abcd"], &[], Skip, Skip),
            (&["runtime=docker"], &[], Monitor, Monitor),
            (&["runtime=podman"], &[], Skip, Skip),
            (&["name=web-1"], &[], Monitor, NotYet),
            (&["name=db", "name=web-1"], &[], Monitor, NotYet),
            (&["name=web-1", "runtime=podman"], &[], Skip, Skip),
            (&["image=nginx"], &[], Monitor, NotYet),
            (&["image=nginx:1.27"], &[], Monitor, NotYet),
            (&["image=nginx:1.26"], &[], Skip, NotYet),
            (&["label=tier"], &[], Monitor, NotYet),
            (&["label=tier=web"], &[], Monitor, NotYet),
            (&["label=tier=db"], &[], Skip, NotYet),
            (&["namespace=shop"], &[], Skip, NotYet),
            (&[], &["name=web-1"], Skip, NotYet),
            (&[], &["id=9c1f"], Skip, Skip),
            (&[], &["runtime=podman"], Monitor, Monitor),
            (&["runtime=docker"], &["label=tier=web"], Skip, NotYet),
            (&["runtime=docker"], &["id=0000"], Monitor, Monitor),
        ];
        for (inc, exc, with_meta, at_start) in table {
            let f = ContainerFilter::parse(&args(inc), &args(exc)).expect("parses");
            assert_eq!(
                f.decide(&known),
                *with_meta,
                "{inc:?} {exc:?} with metadata"
            );
            assert_eq!(f.decide(&early), *at_start, "{inc:?} {exc:?} at start");
        }
    }

    #[test]
    fn kubernetes_decisions() {
        let known = Facts {
            id: ID,
            runtime: Some("containerd"),
            meta: Some(Meta {
                name: Some("web"),
                image: Some("registry.local/shop/web:3"),
                labels: None,
                namespace: Some("shop"),
                pod: Some("web-0"),
            }),
        };
        use Decision::*;
        let table: &[(&[&str], &[&str], Decision)] = &[
            (&["namespace=shop"], &[], Monitor),
            (&["namespace=kube-system"], &[], Skip),
            (&["pod=web-0"], &[], Monitor),
            (&["pod=web-1", "pod=web-0"], &[], Monitor),
            (&["namespace=shop", "pod=db-0"], &[], Skip),
            (&["runtime=containerd", "namespace=shop"], &[], Monitor),
            (&["runtime=cri-o", "namespace=shop"], &[], Skip),
            (&[], &["namespace=shop"], Skip),
            (&[], &["pod=db-0"], Monitor),
            (&["image=registry.local/shop/web"], &[], Monitor),
        ];
        for (inc, exc, want) in table {
            let f = ContainerFilter::parse(&args(inc), &args(exc)).expect("parses");
            assert_eq!(f.decide(&known), *want, "{inc:?} {exc:?}");
        }
        // A container outside Kubernetes has no namespace and no pod.
        let plain = Facts {
            id: ID,
            runtime: Some("podman"),
            meta: Some(Meta {
                name: Some("web"),
                ..Meta::default()
            }),
        };
        let f = ContainerFilter::parse(&args(&["namespace=shop"]), &[]).expect("parses");
        assert_eq!(f.decide(&plain), Skip);
        let f = ContainerFilter::parse(&[], &args(&["pod=web-0"])).expect("parses");
        assert_eq!(f.decide(&plain), Monitor);
    }

    #[test]
    fn bad_filters() {
        for bad in ["name", "colour=red", "id=xyz", "runtime=lxc", "name="] {
            assert!(
                ContainerFilter::parse(&args(&[bad]), &[]).is_err(),
                "{bad} is refused"
            );
        }
        let e = ContainerFilter::parse(&args(&["colour=red"]), &[]).expect_err("bad key");
        assert_eq!(e.to_string().lines().count(), 1);
    }

    #[test]
    fn globs() {
        let table: &[(&str, &str, bool)] = &[
            ("/etc/**", "/etc", true),
            ("/etc/**", "/etc/passwd", true),
            ("/etc/**", "/etc/ssl/certs/a.pem", true),
            ("/etc/**", "/etcetera", false),
            ("/tmp/*", "/tmp/x", true),
            ("/tmp/*", "/tmp/x/y", false),
            ("/**/*.log", "/a.log", true),
            ("/**/*.log", "/var/log/x/a.log", true),
            ("/**/*.log", "/var/log/a.txt", false),
            ("/var/**/cache/*", "/var/cache/x", true),
            ("/var/**/cache/*", "/var/lib/apt/cache/x", true),
            ("/f?", "/f0", true),
            ("/f?", "/f/", false),
            ("/a*b", "/ab", true),
            ("/a*b", "/a/b", false),
        ];
        for (g, p, want) in table {
            let glob = Glob::parse(g).expect("glob");
            assert_eq!(glob.matches(p.as_bytes()), *want, "{g} on {p}");
        }
        for bad in ["etc/**", "/a**", "/[ab]", "/{a,b}"] {
            assert!(Glob::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn record_filter() {
        let f = RecordFilter::parse(
            &args(&["/etc/**", "/app/**"]),
            &args(&["/app/tmp/**"]),
            &args(&["create,delete", "rename"]),
        )
        .expect("parses");
        assert!(f.keeps("create", b"/etc/passwd", None));
        assert!(
            !f.keeps("modify", b"/etc/passwd", None),
            "kind not asked for"
        );
        assert!(!f.keeps("create", b"/app/tmp/x", None), "excluded path");
        assert!(!f.keeps("create", b"/var/x", None), "outside --path");
        assert!(
            f.keeps("rename", b"/var/x", Some(b"/etc/x")),
            "moved out of /etc"
        );
        assert!(RecordFilter::parse(&[], &[], &args(&["open"])).is_err());
        assert!(RecordFilter::parse(&[], &[], &[])
            .expect("empty")
            .is_empty());
    }
}
