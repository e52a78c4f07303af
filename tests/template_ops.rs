//! template.yaml's operations resources on the template as AWS's SAM transform expands it: every
//! alarm has a one-line reason and watches a metric that exists (the function's own EMF metrics
//! against `metrics::RECORDS`, namespace, name and dimensions; AWS's metrics against the few this
//! template uses, on this stack's resources); the dashboard's metrics likewise; alarm actions only
//! with an AlarmEmail; provisioned-concurrency autoscaling and its schedule only when asked for;
//! GradualDeployment makes a CodeDeploy group that rolls back on the error alarms; SnapStart only
//! on the API function's published versions when asked for, and never with provisioned
//! concurrency (the template's rule refuses the combination).
//!
//! Runs `scripts/translate-template --resolve` (Python 3 with samtranslator, as tests/template_iam.rs).

use std::collections::BTreeSet;

#[path = "common/template.rs"]
mod template;

use lambda_inference::metrics::{self, RECORDS};
use serde_json::{Map, Value};

/// The template translated and resolved with these parameters (the rest default).
fn translate(args: &[&str]) -> Value {
    template::translate(&[&["--resolve"], args].concat())
}

fn resources(t: &Value) -> &Map<String, Value> {
    t["Resources"].as_object().expect("Resources")
}

fn of_type<'t>(t: &'t Value, ty: &str) -> Vec<(&'t String, &'t Value)> {
    resources(t)
        .iter()
        .filter(|(_, r)| r["Type"] == ty)
        .collect()
}

/// One metric a template watches: namespace, name, dimensions (name -> value).
#[derive(Debug)]
struct Watched {
    namespace: String,
    name: String,
    dims: Vec<(String, String)>,
}

/// The physical names the resolved template gives this stack's resources.
struct Names {
    functions: BTreeSet<String>,
    queues: BTreeSet<String>,
    api: String,
}

fn names(t: &Value) -> Names {
    let out = &t["Outputs"];
    let s = |v: &Value| v.as_str().expect("resolved to a string").to_owned();
    Names {
        functions: [
            s(&out["ApiFunctionName"]["Value"]),
            s(&out["WorkerFunctionName"]["Value"]),
        ]
        .into(),
        queues: [
            "stack-JobsQueue".to_owned(),
            "stack-JobsDeadLetterQueue".to_owned(),
        ]
        .into(),
        // ApiUrl is https://<api id>.execute-api...
        api: s(&out["ApiUrl"]["Value"])["https://".len()..]
            .split('.')
            .next()
            .unwrap()
            .to_owned(),
    }
}

/// AWS's own metrics this template may use, with their dimension names.
const AWS_METRICS: &[(&str, &str, &[&str])] = &[
    ("AWS/Lambda", "Errors", &["FunctionName"]),
    ("AWS/Lambda", "Throttles", &["FunctionName"]),
    ("AWS/Lambda", "Duration", &["FunctionName"]),
    ("AWS/Lambda", "Invocations", &["FunctionName"]),
    (
        "AWS/Lambda",
        "ProvisionedConcurrencySpilloverInvocations",
        &["FunctionName", "Resource"],
    ),
    (
        "AWS/Lambda",
        "ProvisionedConcurrencyUtilization",
        &["FunctionName", "Resource"],
    ),
    (
        "AWS/SQS",
        "ApproximateNumberOfMessagesVisible",
        &["QueueName"],
    ),
    ("AWS/SQS", "ApproximateAgeOfOldestMessage", &["QueueName"]),
    ("AWS/SQS", "NumberOfMessagesDeleted", &["QueueName"]),
    ("AWS/ApiGateway", "Count", &["ApiId"]),
    ("AWS/ApiGateway", "4xx", &["ApiId"]),
    ("AWS/ApiGateway", "5xx", &["ApiId"]),
    ("AWS/ApiGateway", "Latency", &["ApiId"]),
];

/// Whether the function's records carry metric `name` with exactly the dimension names `dims`.
fn emitted(name: &str, dims: &BTreeSet<&str>) -> bool {
    RECORDS.iter().flat_map(|(_, ds)| ds.iter()).any(|d| {
        d.metrics.iter().any(|(n, _)| *n == name)
            && d.dimensions
                .iter()
                .any(|set| set.iter().copied().collect::<BTreeSet<_>>() == *dims)
    })
}

/// Checks that `w` exists: in the function's records, or among AWS's metrics on this stack.
fn check(w: &Watched, n: &Names, what: &str) {
    let dim_names: BTreeSet<&str> = w.dims.iter().map(|(k, _)| k.as_str()).collect();
    if w.namespace == metrics::NAMESPACE {
        assert!(
            emitted(&w.name, &dim_names),
            "{what}: {}/{} with {dim_names:?} is not in metrics::RECORDS",
            w.namespace,
            w.name
        );
    } else {
        let known = AWS_METRICS.iter().any(|(ns, m, d)| {
            *ns == w.namespace
                && *m == w.name
                && d.iter().copied().collect::<BTreeSet<_>>() == dim_names
        });
        assert!(
            known,
            "{what}: {w:?} is not a metric this test knows AWS emits"
        );
    }
    for (k, v) in &w.dims {
        let ok = match k.as_str() {
            "FunctionName" => n.functions.contains(v),
            "Resource" => n.functions.iter().any(|f| *v == format!("{f}:live")),
            "QueueName" => n.queues.contains(v),
            "ApiId" => *v == n.api,
            "StatusClass" => ["2xx", "4xx", "5xx"].contains(&v.as_str()),
            "Route" => {
                *v == metrics::ROUTE_SQS
                    || *v == metrics::ROUTE_UNMATCHED
                    || lambda_inference::service::ROUTES
                        .iter()
                        .any(|(_, r)| r == v)
            }
            // Error types the function reports (src/app.rs, src/artifacts): checked by name here.
            "ErrorType" => {
                ["DigestMismatch", "ModelNotFound", "InvalidModel"].contains(&v.as_str())
            }
            _ => false,
        };
        assert!(ok, "{what}: dimension {k}={v} names nothing in this stack");
    }
}

fn watched_by_alarm(props: &Value) -> Vec<Watched> {
    let one = |m: &Value| Watched {
        namespace: m["Namespace"].as_str().unwrap().to_owned(),
        name: m["MetricName"].as_str().unwrap().to_owned(),
        dims: m["Dimensions"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|d| {
                        (
                            d["Name"].as_str().unwrap().to_owned(),
                            d["Value"].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
    };
    match props["Metrics"].as_array() {
        None => vec![one(props)],
        Some(ms) => {
            let returned = ms.iter().filter(|m| m["ReturnData"] == true).count();
            assert_eq!(returned, 1, "a math alarm returns one series: {props}");
            ms.iter()
                .filter_map(|m| m.get("MetricStat"))
                .map(|s| one(&s["Metric"]))
                .collect()
        }
    }
}

#[test]
fn every_alarm_has_a_reason_and_watches_a_metric_that_exists() {
    let t = translate(&["ProvisionedConcurrency=2"]);
    let n = names(&t);
    let alarms = of_type(&t, "AWS::CloudWatch::Alarm");
    assert!(alarms.len() >= 14, "{} alarms", alarms.len());
    for (name, a) in &alarms {
        let p = &a["Properties"];
        let why = p["AlarmDescription"].as_str().unwrap_or("");
        assert!(
            why.len() > 40 && !why.contains('\n'),
            "{name}: AlarmDescription must say why, in one line: {why:?}"
        );
        let watched = watched_by_alarm(p);
        assert!(!watched.is_empty(), "{name}");
        for w in &watched {
            check(w, &n, name);
        }
    }
    // What the issue asks to be woken by, each present.
    let watched: Vec<(String, String)> = alarms
        .iter()
        .flat_map(|(_, a)| watched_by_alarm(&a["Properties"]))
        .map(|w| (w.namespace, w.name))
        .collect();
    for (ns, m) in [
        ("AWS/Lambda", "Errors"),
        ("AWS/Lambda", "Throttles"),
        ("AWS/Lambda", "Duration"),
        ("AWS/Lambda", "ProvisionedConcurrencySpilloverInvocations"),
        ("AWS/SQS", "ApproximateNumberOfMessagesVisible"),
        ("AWS/SQS", "ApproximateAgeOfOldestMessage"),
        ("AWS/ApiGateway", "5xx"),
        ("AWS/ApiGateway", "4xx"),
        (metrics::NAMESPACE, "InitErrors"),
        (metrics::NAMESPACE, "Requests"),
    ] {
        assert!(
            watched.contains(&(ns.to_owned(), m.to_owned())),
            "no alarm on {ns}/{m}"
        );
    }
}

/// The metrics of one dashboard widget row: `[ns, name, k, v, ..., {options}]`, or a SEARCH
/// expression `{"ns",K1,K2} MetricName="X"`.
fn watched_by_row(row: &[Value]) -> Option<Watched> {
    if let Some(ns) = row.first().and_then(Value::as_str) {
        let strs: Vec<&str> = row.iter().filter_map(Value::as_str).collect();
        let dims = strs[2..]
            .chunks(2)
            .map(|kv| (kv[0].to_owned(), kv[1].to_owned()))
            .collect();
        return Some(Watched {
            namespace: ns.to_owned(),
            name: strs[1].to_owned(),
            dims,
        });
    }
    let expr = row.first()?["expression"].as_str()?;
    let search = expr.strip_prefix("SEARCH('")?;
    let schema = &search[search.find('{')? + 1..search.find('}')?];
    let mut parts = schema.split(',').map(|s| s.trim_matches('"').to_owned());
    let namespace = parts.next()?;
    let name = search
        .split("MetricName=\"")
        .nth(1)?
        .split('"')
        .next()?
        .to_owned();
    // A search names dimension keys; their values are whatever the records carry.
    let dims = parts
        .map(|k| {
            let v = match k.as_str() {
                "FunctionName" => "stack-ApiFunction",
                "StatusClass" => "5xx",
                "Route" => "/v1/embeddings",
                _ => "DigestMismatch",
            };
            (k, v.to_owned())
        })
        .collect();
    Some(Watched {
        namespace,
        name,
        dims,
    })
}

#[test]
fn dashboard_metrics_exist_and_cover_what_the_issue_asks() {
    let t = translate(&[]);
    let n = names(&t);
    let dash = &resources(&t)["Dashboard"]["Properties"]["DashboardBody"];
    let body: Value = serde_json::from_str(dash.as_str().expect("a resolved string"))
        .expect("DashboardBody is JSON");
    let mut seen = BTreeSet::new();
    let mut titles = Vec::new();
    for w in body["widgets"].as_array().unwrap() {
        titles.push(w["properties"]["title"].as_str().unwrap().to_owned());
        let rows = w["properties"]["metrics"].as_array().unwrap();
        let ids: BTreeSet<&str> = rows
            .iter()
            .filter_map(|r| r.as_array()?.last()?.get("id")?.as_str())
            .collect();
        for row in rows {
            let row = row.as_array().unwrap();
            if let Some(expr) = row[0].get("expression").and_then(Value::as_str) {
                if !expr.starts_with("SEARCH(") {
                    // Metric math: every lowercase identifier is a row id of this widget.
                    for word in expr.split(|c: char| !c.is_ascii_alphanumeric()) {
                        if word.starts_with(|c: char| c.is_ascii_lowercase()) {
                            assert!(ids.contains(word), "{expr}: no row with id {word}");
                        }
                    }
                    continue;
                }
            }
            let watched = watched_by_row(row).unwrap_or_else(|| panic!("unread row {row:?}"));
            check(&watched, &n, "Dashboard");
            seen.insert(watched.name);
        }
    }
    for m in [
        "ColdStartMs",
        "FetchMs",
        "EngineMs",
        "DurationMs",
        "TokensPerSecond",
        "Jobs",
        "QueueToStartMs",
        "Duration",
        "Invocations",
    ] {
        assert!(seen.contains(m), "the dashboard shows no {m}");
    }
    assert!(
        titles.iter().any(|t| t.contains("Cost per 1,000")),
        "{titles:?}"
    );
}

#[test]
fn alarms_have_actions_only_with_an_alarm_email() {
    let plain = translate(&[]);
    assert!(of_type(&plain, "AWS::SNS::Topic").is_empty());
    for (name, a) in of_type(&plain, "AWS::CloudWatch::Alarm") {
        let p = &a["Properties"];
        assert!(
            p.get("AlarmActions").is_none() && p.get("OKActions").is_none(),
            "{name} has actions without AlarmEmail"
        );
    }
    let mailed = translate(&["AlarmEmail=ops@example.com"]);
    let topics = of_type(&mailed, "AWS::SNS::Topic");
    assert_eq!(topics.len(), 1);
    let topic_ref = format!("stack-{}", topics[0].0);
    let subs = of_type(&mailed, "AWS::SNS::Subscription");
    assert_eq!(subs.len(), 1);
    let sub = &subs[0].1["Properties"];
    assert_eq!(
        (&sub["Protocol"], &sub["Endpoint"], &sub["TopicArn"]),
        (
            &Value::from("email"),
            &Value::from("ops@example.com"),
            &Value::from(topic_ref.clone())
        )
    );
    for (name, a) in of_type(&mailed, "AWS::CloudWatch::Alarm") {
        assert_eq!(
            a["Properties"]["AlarmActions"],
            Value::from(vec![topic_ref.clone()]),
            "{name}"
        );
    }
}

#[test]
fn provisioned_concurrency_autoscaling_only_when_enabled() {
    let count = |t: &Value| {
        (
            of_type(t, "AWS::ApplicationAutoScaling::ScalableTarget").len(),
            of_type(t, "AWS::ApplicationAutoScaling::ScalingPolicy").len(),
        )
    };
    let spillover = |t: &Value| resources(t).contains_key("ApiSpilloverAlarm");
    let default = translate(&[]);
    assert_eq!(count(&default), (0, 0));
    assert!(
        !spillover(&default),
        "no provisioned concurrency, no spillover alarm"
    );
    let fixed = translate(&["ProvisionedConcurrency=2"]);
    assert_eq!(count(&fixed), (0, 0));
    assert!(spillover(&fixed));
    // A maximum without a minimum stays off: there is nothing to scale from.
    assert_eq!(count(&translate(&["ProvisionedConcurrencyMax=10"])), (0, 0));

    let scaled = translate(&["ProvisionedConcurrency=2", "ProvisionedConcurrencyMax=10"]);
    assert_eq!(count(&scaled), (1, 1));
    let (target_name, target) = of_type(&scaled, "AWS::ApplicationAutoScaling::ScalableTarget")[0];
    let p = &target["Properties"];
    assert_eq!(p["ResourceId"], "function:stack-ApiFunction:live");
    assert_eq!(
        p["ScalableDimension"],
        "lambda:function:ProvisionedConcurrency"
    );
    assert_eq!(
        (p["MinCapacity"].as_str(), p["MaxCapacity"].as_str()),
        (Some("2"), Some("10"))
    );
    assert!(
        p.get("ScheduledActions").is_none(),
        "no schedule unless asked"
    );
    let deps = target["DependsOn"].to_string();
    assert!(
        deps.contains("ApiFunctionAliaslive"),
        "after the alias exists: {deps}"
    );
    let policy = &of_type(&scaled, "AWS::ApplicationAutoScaling::ScalingPolicy")[0].1["Properties"];
    assert_eq!(policy["ScalingTargetId"], format!("stack-{target_name}"));
    let cfg = &policy["TargetTrackingScalingPolicyConfiguration"];
    assert_eq!(
        cfg["PredefinedMetricSpecification"]["PredefinedMetricType"],
        "LambdaProvisionedConcurrencyUtilization"
    );
    assert_eq!(cfg["TargetValue"], "0.7");

    let scheduled = translate(&[
        "ProvisionedConcurrency=2",
        "ProvisionedConcurrencyMax=10",
        "ProvisionedConcurrencySchedule=business-hours",
        "ScheduleTimezone=Europe/Paris",
    ]);
    let actions = of_type(&scheduled, "AWS::ApplicationAutoScaling::ScalableTarget")[0].1
        ["Properties"]["ScheduledActions"]
        .as_array()
        .expect("scheduled actions")
        .clone();
    assert_eq!(actions.len(), 2);
    let caps: Vec<(String, String, String)> = actions
        .iter()
        .map(|a| {
            assert_eq!(a["Timezone"], "Europe/Paris");
            let c = &a["ScalableTargetAction"];
            (
                a["Schedule"].as_str().unwrap().to_owned(),
                c["MinCapacity"].to_string(),
                c["MaxCapacity"].to_string(),
            )
        })
        .collect();
    assert_eq!(
        caps,
        [
            (
                "cron(0 8 ? * MON-FRI *)".into(),
                "\"2\"".into(),
                "\"10\"".into()
            ),
            ("cron(0 20 ? * MON-FRI *)".into(), "0".into(), "0".into()),
        ]
    );
}

#[test]
fn gradual_deployment_rolls_back_on_the_error_alarms() {
    let default = translate(&[]);
    assert!(
        resources(&default)
            .values()
            .all(|r| !r["Type"].as_str().unwrap().starts_with("AWS::CodeDeploy::")),
        "no CodeDeploy unless GradualDeployment is chosen"
    );
    for kind in [
        "Canary10Percent5Minutes",
        "Linear10PercentEvery1Minute",
        "AllAtOnce",
    ] {
        let t = translate(&[&format!("GradualDeployment={kind}")]);
        let groups = of_type(&t, "AWS::CodeDeploy::DeploymentGroup");
        assert_eq!(groups.len(), 1, "{kind}");
        let g = &groups[0].1["Properties"];
        assert_eq!(
            g["DeploymentConfigName"],
            format!("CodeDeployDefault.Lambda{kind}")
        );
        assert_eq!(g["AlarmConfiguration"]["Enabled"], true);
        let alarms: BTreeSet<&str> = g["AlarmConfiguration"]["Alarms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["Name"].as_str().unwrap())
            .collect();
        assert_eq!(
            alarms,
            ["stack-ApiErrorsAlarm", "stack-ApiServerErrorsAlarm"].into(),
            "{kind}"
        );
        for a in &alarms {
            assert!(
                resources(&t).contains_key(&a["stack-".len()..]),
                "{a} exists"
            );
        }
        let alias = &resources(&t)["ApiFunctionAliaslive"];
        assert!(
            alias["UpdatePolicy"]["CodeDeployLambdaAliasUpdate"].is_object(),
            "{kind}: `live` moves through CodeDeploy"
        );
    }
}

/// A rule's intrinsic (Fn::Equals, Fn::Not, Fn::And, Fn::Or, Ref to a parameter) with these
/// parameter values, as CloudFormation evaluates `Rules` before it creates anything.
fn rule_value(v: &Value, params: &[(&str, &str)]) -> Value {
    let o = v.as_object();
    let Some((k, arg)) = o.and_then(|o| o.iter().next()) else {
        return v.clone();
    };
    let args = || {
        arg.as_array()
            .unwrap()
            .iter()
            .map(|a| rule_value(a, params))
    };
    match k.as_str() {
        "Ref" => {
            let name = arg.as_str().unwrap();
            let (_, value) = params
                .iter()
                .find(|(p, _)| *p == name)
                .unwrap_or_else(|| panic!("rule refers to parameter {name}, not set here"));
            Value::String((*value).into())
        }
        "Fn::Equals" => {
            let a: Vec<Value> = args().collect();
            Value::Bool(a[0] == a[1])
        }
        "Fn::Not" => Value::Bool(!args().next().unwrap().as_bool().unwrap()),
        "Fn::And" => Value::Bool(args().all(|a| a.as_bool().unwrap())),
        "Fn::Or" => Value::Bool(args().any(|a| a.as_bool().unwrap())),
        other => panic!("rule function {other} not evaluated here"),
    }
}

/// Whether the template's rules accept these parameter values.
fn rules_accept(t: &Value, params: &[(&str, &str)]) -> bool {
    t["Rules"].as_object().unwrap().values().all(|rule| {
        let applies = rule
            .get("RuleCondition")
            .is_none_or(|c| rule_value(c, params) == Value::Bool(true));
        !applies
            || rule["Assertions"]
                .as_array()
                .unwrap()
                .iter()
                .all(|a| rule_value(&a["Assert"], params) == Value::Bool(true))
    })
}

#[test]
fn snap_start_on_published_api_versions_only_and_never_with_provisioned_concurrency() {
    let apply_on =
        |t: &Value, function: &str| resources(t)[function]["Properties"]["SnapStart"].clone();
    let default = translate(&[]);
    assert_eq!(apply_on(&default, "ApiFunction")["ApplyOn"], "None");
    let t = translate(&["SnapStart=true"]);
    assert_eq!(apply_on(&t, "ApiFunction")["ApplyOn"], "PublishedVersions");
    // SQS polls the worker: its cold starts do not keep a caller waiting.
    assert!(apply_on(&t, "WorkerFunction").is_null());
    // Published versions only: `live` points at a version, and a new one (a new snapshot) is
    // published when SnapStart changes.
    let api = &resources(&t)["ApiFunction"];
    assert!(api["Properties"]
        .get("EphemeralStorage")
        .is_none_or(|e| e["Size"].as_u64().is_some_and(|mb| mb <= 512)));
    let versions: Vec<_> = of_type(&t, "AWS::Lambda::Version");
    assert!(!versions.is_empty(), "AutoPublishAlias publishes versions");
    let description = |t: &Value| {
        of_type(t, "AWS::Lambda::Version")
            .iter()
            .find(|(_, v)| v["Properties"]["FunctionName"] == "stack-ApiFunction")
            .map(|(_, v)| v["Properties"]["Description"].clone())
            .unwrap()
    };
    assert_ne!(description(&t), description(&default));

    for (snap, pc, accepted) in [
        ("false", "0", true),
        ("false", "2", true),
        ("true", "0", true),
        ("true", "1", false),
        ("true", "5", false),
    ] {
        let params = [("SnapStart", snap), ("ProvisionedConcurrency", pc)];
        assert_eq!(
            rules_accept(&t, &params),
            accepted,
            "SnapStart={snap} ProvisionedConcurrency={pc}"
        );
    }
}
