//! The function's CloudWatch metrics, as Embedded Metric Format (EMF) records: one JSON line on
//! stdout per record, which Lambda ships to CloudWatch Logs, which extracts the metrics. No API
//! call, no agent, nothing on the request path but building and printing one line.
//!
//! The one place for the namespace, the metric names, their units and their dimensions
//! ([`RECORDS`]): template.yaml's alarms and dashboard use these names, and
//! tests/template_ops.rs checks each alarm against this table.
//!
//! Three records:
//! - `cold_start`: once per execution environment, the init breakdown ([`crate::app`] builds it);
//! - `request`: once per invoke (an HTTP request, a direct invoke, a whole SQS batch), from the
//!   counts the service and the worker leave in a [`Meter`];
//! - `init_error`: when the model or configuration cannot be loaded, with the error type.
//!
//! Dimensions are few on purpose: every distinct combination of dimension values is a custom
//! metric, billed per month ($0.30 each for the first 10,000 in us-east-1). `FunctionName` keeps
//! stacks and the API/worker apart; `Route` is a route template (at most the 9 of
//! [`crate::service::ROUTES`], `unmatched` and `sqs`), never a raw path; the status is a class
//! (`2xx`, `4xx`, `5xx`) and only on `Requests`. The exact status, the model, the request id and
//! the event source are plain members of the record: searchable with Logs Insights, never
//! metrics. Worst case per function: 10 metrics x 11 routes + 3 status classes + 9 cold-start
//! metrics; a function that serves two or three routes has 20 to 30.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::service::meter::{CallStats, Meter};

/// The CloudWatch namespace of every metric this function emits.
pub const NAMESPACE: &str = "lambda-inference";

/// One `CloudWatchMetrics` directive: its dimension sets and its metrics as (name, unit).
#[derive(Debug)]
pub struct Directive {
    pub dimensions: &'static [&'static [&'static str]],
    pub metrics: &'static [(&'static str, &'static str)],
}

/// Every record this function writes, by its `event` member, with its directives: the
/// metrics that exist for alarms and dashboards. A record carries only the metrics it has a
/// value for (a health check has no tokens; only SQS batches have jobs).
pub const RECORDS: &[(&str, &[Directive])] = &[
    ("cold_start", COLD_START),
    ("request", REQUEST),
    ("init_error", INIT_ERROR),
];

/// The cold-start breakdown (see [`crate::app::cold_start_record`]).
pub const COLD_START: &[Directive] = &[Directive {
    dimensions: &[&["FunctionName"]],
    metrics: &[
        ("ConfigMs", "Milliseconds"),
        ("FirstByteMs", "Milliseconds"),
        ("FetchMs", "Milliseconds"),
        ("FetchMBps", "None"),
        ("FetchRetries", "Count"),
        ("VerifyMs", "Milliseconds"),
        ("EngineMs", "Milliseconds"),
        ("FirstInvokeMs", "Milliseconds"),
        ("ColdStartMs", "Milliseconds"),
    ],
}];

/// One invoke.
pub const REQUEST: &[Directive] = &[
    Directive {
        dimensions: &[&["FunctionName", "Route"]],
        metrics: &[
            // 1 per invoke: the count behind rates and throughput.
            ("Requests", "Count"),
            // Invocation received -> answer ready (a stream: -> its last event).
            ("DurationMs", "Milliseconds"),
            // Tokens read (embedded inputs, prompts) and generated.
            ("InputTokens", "Count"),
            ("OutputTokens", "Count"),
            // Generated tokens per second of engine time (embeddings: input tokens).
            ("TokensPerSecond", "Count/Second"),
            // Work the deadline stopped or kept from starting.
            ("DeadlineStops", "Count"),
            // SQS batches only: messages, failed results written, messages handed back.
            ("Jobs", "Count"),
            ("JobsFailed", "Count"),
            ("JobsRetried", "Count"),
            // SQS batches only: per message, SentTimestamp -> the batch's start.
            ("QueueToStartMs", "Milliseconds"),
        ],
    },
    Directive {
        dimensions: &[&["FunctionName", "StatusClass"]],
        metrics: &[("Requests", "Count")],
    },
];

/// The model or the configuration could not be loaded: at init, or on an invoke that found the
/// load failed (each such invoke counts).
pub const INIT_ERROR: &[Directive] = &[Directive {
    dimensions: &[&["FunctionName"], &["FunctionName", "ErrorType"]],
    metrics: &[("InitErrors", "Count")],
}];

/// The `Route` of an SQS batch, and of a request that matched no route.
pub const ROUTE_SQS: &str = "sqs";
pub const ROUTE_UNMATCHED: &str = "unmatched";

/// EMF arrays hold at most 100 values; a batch's queue waits beyond that are left out.
const MAX_VALUES: usize = 100;

/// What the entry point knows about one invoke.
#[derive(Debug, Clone)]
pub struct Invoke {
    /// AWS_LAMBDA_FUNCTION_NAME (`local` outside Lambda).
    pub function: String,
    /// The Lambda request id, so that the record and the invoke's logs can be matched.
    pub request_id: String,
    /// The event source (`http-api`, `function-url`, `rest-api`, `sqs`, `direct`).
    pub source: &'static str,
    /// The model served.
    pub model: String,
    /// When the invocation arrived.
    pub received: Instant,
}

/// A meter for one invoke whose `request` record goes to `sink` as one line when the call is
/// done (after a stream's last event). An SQS batch is named [`ROUTE_SQS`] with status 200: its
/// jobs' fates are in `Jobs`, `JobsFailed` and `JobsRetried`.
pub fn request_meter(inv: Invoke, sink: impl Fn(&str) + Send + 'static) -> Arc<Meter> {
    Meter::new(move |mut stats| {
        if inv.source == "sqs" {
            stats.route = Some(ROUTE_SQS);
            stats.status = Some(200);
        }
        let record = request_record(&stats, &inv, inv.received.elapsed(), unix_ms());
        sink(&record.to_string());
    })
}

/// The `request` record of one invoke that took `duration`.
pub fn request_record(stats: &CallStats, inv: &Invoke, duration: Duration, unix_ms: u64) -> Value {
    let status = stats.status.unwrap_or(500);
    let class = match status {
        200..=399 => "2xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    let mut values: Vec<(&str, Value)> = vec![
        ("Requests", json!(1)),
        ("DurationMs", json!(ms(duration))),
        ("DeadlineStops", json!(stats.deadline_stops)),
    ];
    if stats.input_tokens > 0 || stats.output_tokens > 0 {
        values.push(("InputTokens", json!(stats.input_tokens)));
        values.push(("OutputTokens", json!(stats.output_tokens)));
        let tokens = if stats.output_tokens > 0 {
            stats.output_tokens
        } else {
            stats.input_tokens
        };
        if !stats.engine.is_zero() {
            values.push((
                "TokensPerSecond",
                json!(tokens as f64 / stats.engine.as_secs_f64()),
            ));
        }
    }
    if stats.route == Some(ROUTE_SQS) {
        values.push(("Jobs", json!(stats.jobs)));
        values.push(("JobsFailed", json!(stats.jobs_failed)));
        values.push(("JobsRetried", json!(stats.jobs_retried)));
        if !stats.queue_wait.is_empty() {
            let waits: Vec<f64> = stats
                .queue_wait
                .iter()
                .take(MAX_VALUES)
                .map(|d| ms(*d))
                .collect();
            values.push(("QueueToStartMs", json!(waits)));
        }
    }
    let mut record = emf(REQUEST, &values, unix_ms);
    record.insert("FunctionName".into(), json!(inv.function));
    record.insert(
        "Route".into(),
        json!(stats.route.unwrap_or(ROUTE_UNMATCHED)),
    );
    record.insert("StatusClass".into(), json!(class));
    record.insert("event".into(), json!("request"));
    record.insert("Status".into(), json!(status));
    record.insert("requestId".into(), json!(inv.request_id));
    record.insert("source".into(), json!(inv.source));
    record.insert("model".into(), json!(inv.model));
    Value::Object(record)
}

/// The `init_error` record: the model or configuration failed to load with `error_type`.
pub fn init_error_record(function: &str, error_type: &str, message: &str, unix_ms: u64) -> Value {
    let mut record = emf(INIT_ERROR, &[("InitErrors", json!(1))], unix_ms);
    record.insert("FunctionName".into(), json!(function));
    record.insert("ErrorType".into(), json!(error_type));
    record.insert("event".into(), json!("init_error"));
    record.insert("errorMessage".into(), json!(message));
    Value::Object(record)
}

/// An EMF record: the `_aws` metadata for `directives`, listing only the metrics in `values`,
/// and the values as members. The caller adds the dimension members.
pub fn emf(directives: &[Directive], values: &[(&str, Value)], unix_ms: u64) -> Map<String, Value> {
    let has = |name: &str| values.iter().any(|(n, _)| *n == name);
    let metrics: Vec<Value> = directives
        .iter()
        .filter_map(|d| {
            let listed: Vec<Value> = d
                .metrics
                .iter()
                .filter(|(n, _)| has(n))
                .map(|(n, u)| json!({"Name": n, "Unit": u}))
                .collect();
            (!listed.is_empty()).then(
                || json!({"Namespace": NAMESPACE, "Dimensions": d.dimensions, "Metrics": listed}),
            )
        })
        .collect();
    let mut record = Map::new();
    record.insert(
        "_aws".into(),
        json!({"Timestamp": unix_ms, "CloudWatchMetrics": metrics}),
    );
    for (n, v) in values {
        record.insert((*n).into(), v.clone());
    }
    record
}

/// Now, in ms since the epoch (EMF's `Timestamp`).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn ms(d: Duration) -> f64 {
    // Three decimals: a record a few bytes shorter, no precision CloudWatch keeps anyway.
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_a_cloudwatch_unit_and_names_are_unique_per_directive() {
        for (_, directives) in RECORDS {
            for d in *directives {
                let mut names: Vec<_> = d.metrics.iter().map(|m| m.0).collect();
                names.sort();
                names.dedup();
                assert_eq!(names.len(), d.metrics.len());
                assert!(d.dimensions.iter().all(|set| set.len() <= 30));
                for (_, unit) in d.metrics {
                    assert!(
                        ["Milliseconds", "Count", "Count/Second", "None"].contains(unit),
                        "{unit}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_health_check_lists_no_token_metrics() {
        let inv = Invoke {
            function: "f".into(),
            request_id: "r".into(),
            source: "direct",
            model: "m".into(),
            received: Instant::now(),
        };
        let stats = CallStats {
            route: Some("/health"),
            status: Some(200),
            ..CallStats::default()
        };
        let r = request_record(&stats, &inv, Duration::from_millis(2), 1);
        let names: Vec<&str> = r["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["Requests", "DurationMs", "DeadlineStops"]);
        assert!(r.get("InputTokens").is_none());
        assert_eq!(r["Route"], "/health");
        assert_eq!(r["StatusClass"], "2xx");
        assert_eq!(r["requestId"], "r");
    }
}
