//! X-Ray subsegments: where an invoke's time went, in the trace Lambda already records when the
//! function's tracing is Active (template.yaml: `Tracing: Active`).
//!
//! Lambda writes the function's segment itself and hands each invoke its trace header
//! (`Root=...;Parent=...;Sampled=1`, the `Lambda-Runtime-Trace-Id` of the Runtime API). For a
//! sampled invoke this module sends subsegments under that segment to the X-Ray daemon Lambda
//! runs beside the function (`AWS_XRAY_DAEMON_ADDRESS`), one UDP datagram each, in the daemon's
//! documented format: the header line `{"format": "json", "version": 1}`, a newline, then the
//! subsegment document (AWS X-Ray Developer Guide, "Sending segment documents to the X-Ray
//! daemon" and "X-Ray segment documents": `id` 16 hex digits, `trace_id`, `parent_id`,
//! `start_time`/`end_time` in epoch seconds, `type: subsegment`, annotations of string, number
//! or boolean values with keys of letters, digits and underscores).
//!
//! What is sent: `inference` for every sampled invoke (received -> answer done, a stream's last
//! event included), annotated with route, status, source and token counts; and on the first
//! invoke of an execution environment, if it is sampled, the init breakdown (`fetch`, `verify`,
//! `engine`, or `restore` under SnapStart) at the times it happened, so that a cold start's
//! trace shows what its Initialization was made of.
//!
//! No AWS API call, no SDK, nothing on an unsampled invoke: a datagram that is lost or refused
//! costs nothing and is not retried. Must not block, must not fail an invoke, must not see engine
//! or service types.

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// The daemon's datagram header (one JSON line before each document).
const HEADER: &str = "{\"format\": \"json\", \"version\": 1}\n";

/// The daemon reads datagrams of up to 64 KiB; a document larger than this is not sent.
const MAX_DATAGRAM: usize = 64 * 1024;

/// What a trace header says about one invoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// `Root`: the trace id (`1-<8 hex time>-<24 hex>`).
    pub root: String,
    /// `Parent`: the id of Lambda's function segment for this invoke.
    pub parent: String,
    /// `Sampled=1`: X-Ray keeps this trace; anything else sends nothing.
    pub sampled: bool,
}

impl Trace {
    /// Parses a trace header (`Root=1-...;Parent=...;Sampled=1`, fields in any order, others
    /// such as `Lineage` ignored). `None` when the root or parent is missing or malformed.
    pub fn parse(header: &str) -> Option<Trace> {
        let (mut root, mut parent, mut sampled) = (None, None, false);
        for field in header.split(';') {
            match field.trim().split_once('=') {
                Some(("Root", v)) => root = Some(v.to_owned()),
                Some(("Parent", v)) => parent = Some(v.to_owned()),
                Some(("Sampled", v)) => sampled = v == "1",
                _ => {}
            }
        }
        let (root, parent) = (root?, parent?);
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        let root_ok = match root.split('-').collect::<Vec<_>>()[..] {
            ["1", time, id] => hex(time, 8) && hex(id, 24),
            _ => false,
        };
        (root_ok && hex(&parent, 16)).then_some(Trace {
            root,
            parent,
            sampled,
        })
    }

    /// The trace header of a sampled invoke, else `None`.
    pub fn sampled(header: Option<&str>) -> Option<Trace> {
        header.and_then(Trace::parse).filter(|t| t.sampled)
    }
}

/// One timed piece of an invoke, as X-Ray shows it under the function's segment.
#[derive(Debug, Clone)]
pub struct Subsegment {
    pub name: &'static str,
    pub start: SystemTime,
    pub end: SystemTime,
    /// Indexed, searchable values (`annotation.route = "/v1/embeddings"` in a filter expression).
    pub annotations: Map<String, Value>,
}

impl Subsegment {
    /// A subsegment without annotations.
    pub fn new(name: &'static str, start: SystemTime, end: SystemTime) -> Subsegment {
        Subsegment {
            name,
            start,
            end,
            annotations: Map::new(),
        }
    }

    /// The subsegment that began `ago` before `end` and lasted `length`.
    pub fn before(
        name: &'static str,
        end: SystemTime,
        ago: Duration,
        length: Duration,
    ) -> Subsegment {
        let start = end.checked_sub(ago).unwrap_or(end);
        Subsegment::new(name, start, start + length)
    }

    /// The document X-Ray reads, under `trace`'s segment, with `id`.
    pub fn document(&self, trace: &Trace, id: &str) -> Value {
        let mut doc = json!({
            "type": "subsegment",
            "name": self.name,
            "id": id,
            "trace_id": trace.root,
            "parent_id": trace.parent,
            "start_time": epoch_seconds(self.start),
            "end_time": epoch_seconds(self.end.max(self.start)),
        });
        if !self.annotations.is_empty() {
            doc["annotations"] = Value::Object(self.annotations.clone());
        }
        doc
    }
}

/// Epoch seconds with microseconds, X-Ray's time format.
fn epoch_seconds(t: SystemTime) -> f64 {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    d.as_secs() as f64 + f64::from(d.subsec_micros()) / 1e6
}

/// A subsegment id: 16 hex digits, unique per (seed, n). `seed` is the invoke's request id, so
/// environments restored from one SnapStart snapshot (same process state) still differ.
pub fn subsegment_id(seed: &str, n: u64) -> String {
    // FNV-1a over the seed, then a 64-bit mix with the counter: unique enough for ids that only
    // need to differ within one trace, with no random-number dependency.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut x = h ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    format!("{x:016x}")
}

/// The daemon's UDP endpoint and a socket to send from.
#[derive(Debug)]
pub struct Daemon {
    socket: UdpSocket,
    to: SocketAddr,
}

impl Daemon {
    /// A sender to `address` (`host:port`, or the SDKs' `udp:host:port tcp:host:port` form: the
    /// UDP part). `None` when the address does not resolve or no socket can be opened: tracing
    /// is then off, which is logged once by the caller.
    pub fn new(address: &str) -> Option<Daemon> {
        let udp = address
            .split_whitespace()
            .find_map(|p| p.strip_prefix("udp:"))
            .unwrap_or(address.trim());
        let to = udp.to_socket_addrs().ok()?.next()?;
        let bind: SocketAddr = if to.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let socket = UdpSocket::bind(bind).ok()?;
        socket.set_nonblocking(true).ok()?;
        Some(Daemon { socket, to })
    }

    /// Sends each subsegment as its own datagram; ids from `seed`. Returns how many were sent.
    pub fn send(&self, trace: &Trace, seed: &str, subsegments: &[Subsegment]) -> usize {
        subsegments
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                let doc = s.document(trace, &subsegment_id(seed, *i as u64));
                let datagram = format!("{HEADER}{doc}");
                datagram.len() <= MAX_DATAGRAM
                    && self.socket.send_to(datagram.as_bytes(), self.to).is_ok()
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER_SAMPLED: &str =
        "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";

    #[test]
    fn a_trace_header_is_read_in_any_order_and_checked() {
        let t = Trace::parse(HEADER_SAMPLED).unwrap();
        assert_eq!(t.root, "1-5759e988-bd862e3fe1be46a994272793");
        assert_eq!(t.parent, "53995c3f42cd8ad8");
        assert!(t.sampled);
        let t = Trace::parse(
            "Sampled=0;Lineage=a87bd80c:1|68fd508a:5;Parent=53995c3f42cd8ad8;Root=1-5759e988-bd862e3fe1be46a994272793",
        )
        .unwrap();
        assert!(!t.sampled);
        assert_eq!(Trace::sampled(Some(&t_header(&t, "0"))), None);
        // No parent (an upstream that did not trace), a short root, a non-hex parent.
        assert_eq!(
            Trace::parse("Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1"),
            None
        );
        assert_eq!(
            Trace::parse("Root=1-5759e988-bd86;Parent=53995c3f42cd8ad8"),
            None
        );
        assert_eq!(
            Trace::parse("Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8adZ"),
            None
        );
        assert_eq!(Trace::sampled(None), None);
    }

    fn t_header(t: &Trace, sampled: &str) -> String {
        format!("Root={};Parent={};Sampled={sampled}", t.root, t.parent)
    }

    #[test]
    fn a_document_has_the_fields_x_ray_requires() {
        let trace = Trace::parse(HEADER_SAMPLED).unwrap();
        let start = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let mut s = Subsegment::new("inference", start, start + Duration::from_millis(5));
        s.annotations
            .insert("route".into(), json!("/v1/embeddings"));
        let doc = s.document(&trace, &subsegment_id("req-1", 0));
        assert_eq!(doc["type"], "subsegment");
        assert_eq!(doc["trace_id"], trace.root);
        assert_eq!(doc["parent_id"], trace.parent);
        assert_eq!(doc["start_time"].as_f64().unwrap(), 1_700_000_000.123456);
        let end = doc["end_time"].as_f64().unwrap();
        assert!((end - 1_700_000_000.128456).abs() < 1e-6, "{end}");
        assert_eq!(doc["annotations"]["route"], "/v1/embeddings");
        let id = doc["id"].as_str().unwrap();
        assert!(id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()));
        // An end before the start (a clock step) is clamped, never sent backwards.
        let back = Subsegment::new("x", start, start - Duration::from_secs(1)).document(&trace, id);
        assert_eq!(back["end_time"], back["start_time"]);
    }

    #[test]
    fn ids_differ_per_request_and_per_subsegment() {
        let mut ids: Vec<String> = (0..4)
            .flat_map(|n| ["a", "b", "c"].map(|r| subsegment_id(r, n)))
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 12);
    }

    #[test]
    fn the_daemon_receives_one_datagram_per_subsegment_with_the_header_line() {
        let daemon_side = UdpSocket::bind("127.0.0.1:0").unwrap();
        daemon_side
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let addr = daemon_side.local_addr().unwrap();
        let daemon = Daemon::new(&format!("tcp:{addr} udp:{addr}")).unwrap();
        let trace = Trace::parse(HEADER_SAMPLED).unwrap();
        let now = SystemTime::now();
        let subs = [
            Subsegment::before(
                "fetch",
                now,
                Duration::from_millis(30),
                Duration::from_millis(20),
            ),
            Subsegment::new("inference", now, now),
        ];
        assert_eq!(daemon.send(&trace, "req", &subs), 2);
        let mut names = Vec::new();
        for _ in 0..2 {
            let mut buf = [0u8; 2048];
            let n = daemon_side.recv(&mut buf).unwrap();
            let text = std::str::from_utf8(&buf[..n]).unwrap();
            let (head, doc) = text.split_once('\n').unwrap();
            let head: Value = serde_json::from_str(head).unwrap();
            assert_eq!(head, json!({"format": "json", "version": 1}));
            let doc: Value = serde_json::from_str(doc).unwrap();
            names.push(doc["name"].as_str().unwrap().to_owned());
        }
        assert_eq!(names, ["fetch", "inference"]);
        assert!(Daemon::new("not an address").is_none());
    }
}
