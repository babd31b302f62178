//! Encoding of output records as JSON Lines (SPEC "Records"). Pure, no IO.
//!
//! Paths are bytes on Linux. A path that is valid UTF-8 is printed as a JSON string as is
//! (JSON escapes newlines and control characters). A path that is not valid UTF-8 is
//! printed as `path` with each invalid byte replaced by U+FFFD (for humans), plus
//! `path_b64`: the exact bytes in standard base64 (for programs). `path_b64` is present
//! if and only if the name is not valid UTF-8, so the encoding is lossless and unambiguous.
//! The same holds for `old_path` / `old_path_b64`.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::{
    event::{FileEvent, FileKind},
    id::RuntimeName,
    runtimes::Pod,
};

/// Who a record is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerRef {
    /// 64-hex id.
    pub id: String,
    /// Name, when known.
    pub name: Option<String>,
    /// Image, when known.
    pub image: Option<String>,
    /// The runtime that made it.
    pub runtime: RuntimeName,
    /// The Kubernetes pod, for a Kubernetes container (`pod` is absent otherwise).
    pub pod: Option<Pod>,
}

impl ContainerRef {
    fn to_json(&self) -> Value {
        let mut v = json!({
            "id": self.id,
            "name": self.name,
            "image": self.image,
            "runtime": self.runtime.as_str(),
        });
        if let (Some(pod), Value::Object(m)) = (&self.pod, &mut v) {
            m.insert(
                "pod".into(),
                json!({ "name": pod.name, "namespace": pod.namespace, "uid": pod.uid }),
            );
        }
        v
    }
}

/// RFC 3339 UTC with nanoseconds, e.g. `2026-11-24T02:35:54.123456789Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let b = rfc3339_bytes(t);
    // The bytes are ASCII digits and separators.
    String::from_utf8_lossy(&b).into_owned()
}

/// [`rfc3339`] into a fixed buffer, digit by digit (it is on every record's path; `format!`
/// cost more than the rest of a record's encoding). Years past 9999 are not representable
/// and come out as 9999.
fn rfc3339_bytes(t: SystemTime) -> [u8; 30] {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, sod) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = (yoe + era * 400 + i64::from(month <= 2)).clamp(0, 9999);
    let mut b = *b"0000-00-00T00:00:00.000000000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year as u64);
    put(5, 2, month as u64);
    put(8, 2, day as u64);
    put(11, 2, sod / 3600);
    put(14, 2, (sod / 60) % 60);
    put(17, 2, sod % 60);
    put(20, 9, u64::from(d.subsec_nanos()));
    b
}

fn base(kind: &str, now: SystemTime) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("time".into(), Value::String(rfc3339(now)));
    m.insert("kind".into(), Value::String(kind.into()));
    m
}

fn line(m: Map<String, Value>) -> String {
    let mut s = Value::Object(m).to_string();
    s.push('\n');
    s
}

fn put_path(m: &mut Map<String, Value>, key: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            m.insert(key.into(), Value::String(s.into()));
        }
        Err(_) => {
            m.insert(
                key.into(),
                Value::String(String::from_utf8_lossy(bytes).into_owned()),
            );
            m.insert(
                format!("{key}_b64"),
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            );
        }
    }
}

/// The version of the record schema (`docs/events.md`), printed in `ready`. It changes
/// when a field changes meaning or goes away, not when one is added.
pub const SCHEMA: u32 = 1;

/// `ready`: attached, and every running container is armed.
pub fn ready(now: SystemTime, engines: &[String]) -> String {
    let mut m = base("ready", now);
    m.insert("schema".into(), json!(SCHEMA));
    m.insert(
        "version".into(),
        Value::String(env!("CARGO_PKG_VERSION").into()),
    );
    m.insert("docker_hosts".into(), json!(engines));
    line(m)
}

/// `container_start`.
pub fn container_start(
    now: SystemTime,
    c: &ContainerRef,
    upperdir: &std::path::Path,
    freeze_us: Option<u64>,
    arm_us: Option<u64>,
    gated_us: Option<u64>,
) -> String {
    let mut m = base("container_start", now);
    m.insert("container".into(), c.to_json());
    put_path(&mut m, "upperdir", upperdir.as_os_str().as_encoded_bytes());
    m.insert("freeze_us".into(), json!(freeze_us));
    m.insert("arm_us".into(), json!(arm_us));
    m.insert("gated_us".into(), json!(gated_us));
    line(m)
}

/// `container_stop`.
pub fn container_stop(now: SystemTime, c: &ContainerRef) -> String {
    let mut m = base("container_stop", now);
    m.insert("container".into(), c.to_json());
    line(m)
}

/// `overflow`: events were or may have been lost; a rescan follows.
pub fn overflow(now: SystemTime, c: Option<&ContainerRef>, reason: &str) -> String {
    let mut m = base("overflow", now);
    if let Some(c) = c {
        m.insert("container".into(), c.to_json());
    }
    m.insert("reason".into(), Value::String(reason.into()));
    line(m)
}

/// `stats`: the daemon's counters (`body`'s fields follow `time` and `kind`).
pub fn stats(now: SystemTime, body: Value) -> String {
    let mut m = base("stats", now);
    if let Value::Object(b) = body {
        m.extend(b);
    }
    line(m)
}

/// A file record (allocating; see [`FileEncoder`] for the hot path).
pub fn file(now: SystemTime, c: &ContainerRef, ev: &FileEvent) -> String {
    let mut out = Vec::new();
    FileEncoder::new(now).encode(&mut out, &c.encoded(), ev);
    String::from_utf8(out).unwrap_or_default()
}

impl ContainerRef {
    /// The `container` object, serialised once (it goes into every record of the
    /// container).
    pub fn encoded(&self) -> String {
        self.to_json().to_string()
    }
}

/// Writes file records straight into a byte buffer, without building a JSON tree: the
/// time string is formatted once per batch and the container object once per container.
/// The output is byte-for-byte what serde_json would print for the same record.
pub struct FileEncoder {
    time: [u8; 30],
}

impl FileEncoder {
    /// An encoder for records observed at `now`.
    pub fn new(now: SystemTime) -> FileEncoder {
        FileEncoder {
            time: rfc3339_bytes(now),
        }
    }

    /// Appends one record line for `ev` to `out`; `container` is [`ContainerRef::encoded`].
    pub fn encode(&self, out: &mut Vec<u8>, container: &str, ev: &FileEvent) {
        out.extend_from_slice(b"{\"time\":\"");
        out.extend_from_slice(&self.time);
        out.extend_from_slice(b"\",\"kind\":\"");
        out.extend_from_slice(ev.kind.as_str().as_bytes());
        out.extend_from_slice(b"\",\"container\":");
        out.extend_from_slice(container.as_bytes());
        put_path_raw(out, "path", &ev.path);
        if ev.kind == FileKind::Rename {
            if let Some(old) = &ev.old_path {
                put_path_raw(out, "old_path", old);
            }
        }
        out.extend_from_slice(if ev.is_dir {
            b",\"is_dir\":true,\"source\":\""
        } else {
            b",\"is_dir\":false,\"source\":\""
        });
        out.extend_from_slice(ev.source.as_str().as_bytes());
        out.extend_from_slice(b"\"}\n");
    }
}

/// `,"key":"…"` (and `,"key_b64":"…"` for a name that is not UTF-8).
fn put_path_raw(out: &mut Vec<u8>, key: &str, bytes: &[u8]) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    match std::str::from_utf8(bytes) {
        Ok(s) => json_str(out, s),
        Err(_) => {
            json_str(out, &String::from_utf8_lossy(bytes));
            out.extend_from_slice(b",\"");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"_b64\":\"");
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(bytes)
                    .as_bytes(),
            );
            out.push(b'"');
        }
    }
}

/// A JSON string literal, escaped as serde_json does (`\"`, `\\`, the short escapes for
/// `\b \f \n \r \t`, `\u00XX` for other control characters; everything else as is).
fn json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let b = s.as_bytes();
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => &[],
            _ => continue,
        };
        out.extend_from_slice(b.get(start..i).unwrap_or_default());
        if esc.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(c >> 4)]);
            out.push(HEX[usize::from(c & 0xf)]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(b.get(start..).unwrap_or_default());
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Source;
    use std::time::Duration;

    #[test]
    fn time_format() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(1_795_919_754, 123_456_789);
        assert_eq!(rfc3339(t), "2026-11-29T02:35:54.123456789Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000000000Z");
        let cases = [
            (946_684_799, 999_999_999, "1999-12-31T23:59:59.999999999Z"),
            (2_147_483_648, 1, "2038-01-19T03:14:08.000000001Z"),
            (4_107_542_400, 0, "2100-03-01T00:00:00.000000000Z"),
            (253_402_300_799, 5, "9999-12-31T23:59:59.000000005Z"),
        ];
        for (secs, nanos, want) in cases {
            assert_eq!(rfc3339(UNIX_EPOCH + Duration::new(secs, nanos)), want);
        }
    }

    fn parse(s: &str) -> Value {
        assert!(
            s.ends_with('\n') && !s[..s.len() - 1].contains('\n'),
            "one line: {s:?}"
        );
        serde_json::from_str(s).expect("valid JSON")
    }

    #[test]
    fn file_records() {
        let c = ContainerRef {
            id: "a".repeat(64),
            name: Some("web".into()),
            image: None,
            runtime: RuntimeName::Docker,
            pod: None,
        };
        let ev = FileEvent {
            container: c.id.clone(),
            kind: FileKind::Rename,
            path: b"/new\nline".to_vec(),
            old_path: Some(b"/bad\xff\xfe".to_vec()),
            is_dir: false,
            source: Source::Inotify,
        };
        let v = parse(&file(UNIX_EPOCH, &c, &ev));
        assert_eq!(v["kind"], "rename");
        assert_eq!(v["path"], "/new\nline");
        assert!(v.get("path_b64").is_none());
        assert_eq!(v["old_path"], "/bad\u{fffd}\u{fffd}");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(v["old_path_b64"].as_str().expect("str"))
            .expect("b64");
        assert_eq!(raw, b"/bad\xff\xfe");
        assert_eq!(v["container"]["name"], "web");
        assert_eq!(v["container"]["image"], Value::Null);
        assert_eq!(v["container"]["runtime"], "docker");
        assert!(
            v["container"].get("pod").is_none(),
            "no pod outside Kubernetes"
        );
        assert_eq!(v["source"], "inotify");
        assert_eq!(v["is_dir"], false);
    }

    /// The hand-written encoder prints exactly what serde_json prints.
    #[test]
    fn encoder_matches_serde() {
        let names: [&[u8]; 9] = [
            b"/plain",
            b"/sp ace/\"q\"/back\\slash",
            b"/ctl\x01\x08\x0c\n\r\t\x1f\x7f",
            "/ünïcødé/\u{2028}/😀".as_bytes(),
            b"/bad\xff\xfe/x",
            b"/\xc3",
            b"",
            b"/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p",
            b"/\\u0000",
        ];
        let c = ContainerRef {
            id: "c".repeat(64),
            name: Some("n\"ame\n".into()),
            image: Some("img:1".into()),
            runtime: RuntimeName::Podman,
            pod: None,
        };
        let now = UNIX_EPOCH + Duration::new(1_795_919_754, 5);
        let enc = FileEncoder::new(now);
        for kind in [FileKind::Create, FileKind::Rename, FileKind::Delete] {
            for (i, name) in names.iter().enumerate() {
                let ev = FileEvent {
                    container: c.id.clone(),
                    kind,
                    path: name.to_vec(),
                    old_path: Some(names[(i + 1) % names.len()].to_vec()),
                    is_dir: i % 2 == 0,
                    source: if i % 3 == 0 {
                        Source::Scan
                    } else {
                        Source::Inotify
                    },
                };
                let mut m = base(ev.kind.as_str(), now);
                m.insert("container".into(), c.to_json());
                put_path(&mut m, "path", &ev.path);
                if kind == FileKind::Rename {
                    put_path(
                        &mut m,
                        "old_path",
                        ev.old_path.as_deref().unwrap_or_default(),
                    );
                }
                m.insert("is_dir".into(), Value::Bool(ev.is_dir));
                m.insert("source".into(), Value::String(ev.source.as_str().into()));
                let mut got = Vec::new();
                enc.encode(&mut got, &c.encoded(), &ev);
                let got = String::from_utf8(got).expect("utf-8");
                let v = parse(&got);
                assert_eq!(v, Value::Object(m.clone()), "{got}");
                // Same text too, key order included.
                let mut want = Value::Object(m).to_string();
                want.push('\n');
                assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn daemon_records() {
        let c = ContainerRef {
            id: "b".repeat(64),
            name: None,
            image: Some("img:1".into()),
            runtime: RuntimeName::Containerd,
            pod: Some(Pod {
                name: Some("web-0".into()),
                namespace: Some("shop".into()),
                uid: None,
            }),
        };
        let v = parse(&container_start(
            UNIX_EPOCH,
            &c,
            std::path::Path::new("/var/lib/docker/x/diff"),
            None,
            Some(310),
            Some(1234),
        ));
        assert_eq!(v["kind"], "container_start");
        assert_eq!(v["container"]["runtime"], "containerd");
        assert_eq!(
            v["container"]["pod"],
            json!({"name": "web-0", "namespace": "shop", "uid": null})
        );
        assert_eq!(v["freeze_us"], Value::Null);
        assert_eq!(v["arm_us"], 310);
        assert_eq!(v["gated_us"], 1234);
        assert_eq!(v["upperdir"], "/var/lib/docker/x/diff");
        let v = parse(&overflow(UNIX_EPOCH, None, "queue"));
        assert_eq!(v["kind"], "overflow");
        assert!(v.get("container").is_none());
        let v = parse(&ready(UNIX_EPOCH, &["unix:///var/run/docker.sock".into()]));
        assert_eq!(v["kind"], "ready");
        assert_eq!(v["schema"], SCHEMA);
    }
}
