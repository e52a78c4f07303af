//! The functions' IAM roles in template.yaml against what the code does (`AWS_CALLS` in
//! src/aws.rs) and what Lambda does with the roles on the functions' behalf, on the template as
//! AWS's SAM transform expands it: every call granted on the resource the code is configured with,
//! nothing granted beyond that, no `Resource: "*"` except where AWS allows nothing else. Plus the
//! deploy defaults that keep a first deploy safe: auth not NONE, concurrency and stage throttling
//! capped, the HTTP API's 30 s deadline, a new `live` version for every deploy-relevant change.
//!
//! Runs `scripts/translate-template --resolve` (Python 3 with samtranslator: `python3 -m pip
//! install aws-sam-cli`, which scripts/lint-infra does before CI's `cargo test`). Offline.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::OnceLock;

#[path = "common/template.rs"]
mod template;
use template::{translate, REGION};

use lambda_inference::aws::{AwsResource, Caller, AWS_CALLS};
use serde_json::Value;

/// translate-template's made-up account and region (`--resolve`).
const ACCOUNT: &str = "123456789012";
const MODEL_URI: &str = "s3://models-bucket/path/model.gguf";
const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// The deployed shape: defaults, a model from S3.
fn main_template() -> &'static Value {
    static T: OnceLock<Value> = OnceLock::new();
    T.get_or_init(|| translate(&["--resolve", &format!("ModelUri={MODEL_URI}")]))
}

/// Everything optional off: the baked-in model, no auth, no reserved concurrency.
fn bare_template() -> &'static Value {
    static T: OnceLock<Value> = OnceLock::new();
    T.get_or_init(|| {
        translate(&[
            "--resolve",
            "ApiAuth=NONE",
            "ApiReservedConcurrency=unreserved",
            &format!("FunctionUrlInvokerArn=arn:aws:iam::{ACCOUNT}:role/caller"),
        ])
    })
}

fn resources(t: &Value) -> &serde_json::Map<String, Value> {
    t["Resources"].as_object().expect("Resources")
}

fn strs(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().flat_map(strs).collect(),
        Value::Null => vec![],
        other => panic!("expected a string or a list of strings, got {other}"),
    }
}

/// IAM's wildcard match: `*` any run of characters, `?` one.
fn glob(pattern: &str, s: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len()).any(|i| go(rest, &s[i..])),
            Some((b'?', rest)) => !s.is_empty() && go(rest, &s[1..]),
            Some((c, rest)) => s.first() == Some(c) && go(rest, &s[1..]),
        }
    }
    go(pattern.as_bytes(), s.as_bytes())
}

#[derive(Debug)]
struct Statement {
    role: String,
    sid: String,
    effect: String,
    actions: Vec<String>,
    resources: Vec<String>,
    condition: Value,
}

/// A function of the template, with what its role allows.
struct Function<'t> {
    name: &'static str,
    role: Caller,
    props: &'t Value,
    statements: Vec<Statement>,
}

impl Function<'_> {
    fn env(&self, var: &str) -> Option<&str> {
        self.props["Environment"]["Variables"][var].as_str()
    }

    fn grants<'s>(&'s self, action: &'s str) -> impl Iterator<Item = &'s Statement> + 's {
        self.statements
            .iter()
            .filter(move |s| s.effect == "Allow" && s.actions.iter().any(|a| glob(a, action)))
    }

    fn allows(&self, action: &str, resource: &str) -> bool {
        self.grants(action)
            .any(|s| s.resources.iter().any(|r| glob(r, resource)))
    }
}

fn function<'t>(t: &'t Value, name: &'static str, role: Caller) -> Function<'t> {
    let res = resources(t);
    let props = &res[name]["Properties"];
    let role_arn = props["Role"].as_str().unwrap_or_else(|| {
        panic!(
            "{name} has no explicit Role: SAM's generated role attaches managed policies on \"*\""
        )
    });
    let role_id = role_arn
        .strip_prefix(&format!("arn:aws:iam::{ACCOUNT}:role/stack-"))
        .unwrap_or_else(|| panic!("{name}'s Role is not a role of this template: {role_arn}"));
    let role_res = &res[role_id];
    assert_eq!(role_res["Type"], "AWS::IAM::Role", "{role_id}");
    let rp = &role_res["Properties"];
    assert!(
        strs(&rp["ManagedPolicyArns"]).is_empty(),
        "{role_id} attaches managed policies {}: their statements are not checked here and \
         AWS's grant on \"*\"; write the statements out instead",
        rp["ManagedPolicyArns"]
    );
    assert!(rp["PermissionsBoundary"].is_null());
    let mut statements = vec![];
    for policy in rp["Policies"].as_array().into_iter().flatten() {
        let doc = &policy["PolicyDocument"];
        let list = match &doc["Statement"] {
            Value::Array(a) => a.clone(),
            one => vec![one.clone()],
        };
        for s in list {
            assert!(
                s["NotAction"].is_null() && s["NotResource"].is_null(),
                "{role_id}: NotAction/NotResource grant everything else: {s}"
            );
            statements.push(Statement {
                role: role_id.to_owned(),
                sid: s["Sid"].as_str().unwrap_or("?").to_owned(),
                effect: s["Effect"].as_str().unwrap_or("").to_owned(),
                actions: strs(&s["Action"]),
                resources: strs(&s["Resource"]),
                condition: s["Condition"].clone(),
            });
        }
    }
    Function {
        name,
        role,
        props,
        statements,
    }
}

fn functions(t: &Value) -> [Function<'_>; 2] {
    [
        function(t, "ApiFunction", Caller::Api),
        function(t, "WorkerFunction", Caller::Worker),
    ]
}

/// One thing a role must be allowed to do: on `sample`, a resource it will touch, and on none of
/// `outside`, neighbours it has no business with.
#[derive(Debug)]
struct Need {
    action: &'static str,
    sample: String,
    outside: Vec<String>,
    why: String,
}

fn s3_object(uri_bucket: &str, key: &str) -> String {
    format!("arn:aws:s3:::{uri_bucket}/{key}")
}

/// `s3://bucket/key` -> (bucket, key).
fn split_s3(uri: &str) -> (&str, &str) {
    uri.strip_prefix("s3://")
        .and_then(|r| r.split_once('/'))
        .unwrap_or_else(|| panic!("not s3://bucket/key: {uri}"))
}

/// An SQS queue URL -> its ARN.
fn queue_arn(url: &str) -> String {
    let path = url
        .strip_prefix(&format!("https://sqs.{REGION}.amazonaws.com/"))
        .unwrap_or_else(|| panic!("not an SQS queue URL: {url}"));
    let (account, name) = path.split_once('/').expect("account/name");
    format!("arn:aws:sqs:{REGION}:{account}:{name}")
}

/// What `f`'s role needs, from `AWS_CALLS` and from what Lambda does with it, each on the resource
/// the function is configured with (its environment, the template's wiring). `strict`: every call
/// of the table must apply (the main template has a model URI and KEY auth).
fn needs(t: &Value, f: &Function, strict: bool) -> Vec<Need> {
    let mut out = vec![];
    for call in AWS_CALLS.iter().filter(|c| c.caller.includes(f.role)) {
        let why = format!("AWS_CALLS: {} ({})", call.action, call.why);
        let (var, need) = match call.resource {
            AwsResource::ModelObject => ("MODEL_URI", {
                f.env("MODEL_URI").map(|uri| {
                    let (bucket, key) = split_s3(uri);
                    (
                        s3_object(bucket, key),
                        vec![
                            s3_object(bucket, &format!("{key}.other")),
                            s3_object(bucket, "other.gguf"),
                        ],
                    )
                })
            }),
            AwsResource::ResultsPrefix => ("RESULTS_URI", {
                f.env("RESULTS_URI").map(|uri| {
                    let (bucket, prefix) = split_s3(uri);
                    assert!(prefix.ends_with('/'), "RESULTS_URI {uri} is a prefix");
                    (
                        s3_object(bucket, &format!("{prefix}job-1.json")),
                        vec![s3_object(bucket, "other/job-1.json")],
                    )
                })
            }),
            AwsResource::JobsQueue => ("JOBS_QUEUE_URL", {
                f.env("JOBS_QUEUE_URL").map(|url| {
                    (
                        queue_arn(url),
                        vec![format!("arn:aws:sqs:{REGION}:{ACCOUNT}:other")],
                    )
                })
            }),
            AwsResource::ApiKeysSecret => ("API_KEYS_SECRET_ARN", {
                f.env("API_KEYS_SECRET_ARN").map(|arn| {
                    (
                        arn.to_owned(),
                        vec![format!(
                            "arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:other-AbCdEf"
                        )],
                    )
                })
            }),
        };
        match need {
            Some((sample, outside)) => out.push(Need {
                action: call.action,
                sample,
                outside,
                why,
            }),
            None => assert!(
                !strict,
                "{}: {} has no {var}, so the code cannot make this call: {why}",
                f.name, f.name
            ),
        }
    }

    // Lambda on the function's behalf.
    let group = f.props["LoggingConfig"]["LogGroup"]
        .as_str()
        .unwrap_or_else(|| panic!("{}: LoggingConfig.LogGroup (its own log group)", f.name));
    for action in ["logs:CreateLogStream", "logs:PutLogEvents"] {
        out.push(Need {
            action,
            sample: format!("arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{group}:log-stream:x"),
            outside: vec![format!(
                "arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/aws/lambda/other:log-stream:x"
            )],
            why: format!("Lambda writes the function's logs to {group}"),
        });
    }
    for action in ["xray:PutTraceSegments", "xray:PutTelemetryRecords"] {
        out.push(Need {
            action,
            sample: "*".into(),
            outside: vec![],
            why: "Tracing: Active (X-Ray has no resource-level permissions)".into(),
        });
    }
    if let Some(uri) = f.env("RESULTS_URI") {
        let (bucket, _) = split_s3(uri);
        out.push(Need {
            action: "s3:ListBucket",
            sample: format!("arn:aws:s3:::{bucket}"),
            outside: vec!["arn:aws:s3:::other-bucket".into()],
            why: "S3 answers a GET of a missing key 403 instead of 404 without it".into(),
        });
    }
    let fn_name = format!("stack-{}", f.name);
    for (id, r) in resources(t) {
        if r["Type"] == "AWS::Lambda::EventSourceMapping"
            && r["Properties"]["FunctionName"] == fn_name.as_str()
        {
            let queue = r["Properties"]["EventSourceArn"]
                .as_str()
                .expect("queue ARN");
            for action in [
                "sqs:ReceiveMessage",
                "sqs:DeleteMessage",
                "sqs:GetQueueAttributes",
            ] {
                out.push(Need {
                    action,
                    sample: queue.to_owned(),
                    outside: vec![format!("arn:aws:sqs:{REGION}:{ACCOUNT}:other")],
                    why: format!(
                        "event source mapping {id} polls {queue} with the function's role"
                    ),
                });
            }
        }
    }
    out
}

/// Actions AWS offers no resource-level permission for: the only statements allowed `"*"`.
const STAR_ONLY: &[(&str, &str)] = &[
    (
        "xray:PutTraceSegments",
        "X-Ray has no resource-level permissions",
    ),
    (
        "xray:PutTelemetryRecords",
        "X-Ray has no resource-level permissions",
    ),
];

fn check_roles(t: &Value, strict: bool) {
    let mut failures = vec![];
    for f in functions(t) {
        let needs = needs(t, &f, strict);
        // Every need granted on its sample, and on none of its neighbours.
        for n in &needs {
            if !f.allows(n.action, &n.sample) {
                failures.push(format!(
                    "{}: not allowed {} on {} ({})",
                    f.name, n.action, n.sample, n.why
                ));
            }
        }
        // Every statement answers a need, with nothing beyond it.
        for s in &f.statements {
            if s.effect != "Allow" {
                continue;
            }
            for a in &s.actions {
                if a.contains('*') || a.contains('?') {
                    failures.push(format!("{} {}: wildcard action {a}", s.role, s.sid));
                    continue;
                }
                let mine: Vec<&Need> = needs.iter().filter(|n| n.action == a).collect();
                if mine.is_empty() {
                    failures.push(format!(
                        "{} {}: allows {a}, which neither AWS_CALLS (src/aws.rs) nor the Lambda \
                         runtime needs for {}",
                        s.role, s.sid, f.name
                    ));
                }
                for r in &s.resources {
                    if r == "*" && !STAR_ONLY.iter().any(|(x, _)| x == a) {
                        failures.push(format!(
                            "{} {}: {a} on \"*\" (only {STAR_ONLY:?} may be)",
                            s.role, s.sid
                        ));
                    }
                    if !mine.iter().any(|n| glob(r, &n.sample)) {
                        failures.push(format!(
                            "{} {}: {a} on {r}, which is none of the resources {} uses it on",
                            s.role, s.sid, f.name
                        ));
                    }
                    for n in &mine {
                        for o in n.outside.iter().filter(|o| glob(r, o)) {
                            failures.push(format!(
                                "{} {}: {a} on {r} reaches {o} too (needed only for {})",
                                s.role, s.sid, n.sample
                            ));
                        }
                    }
                }
                if a == "s3:ListBucket" {
                    let prefix = split_s3(f.env("RESULTS_URI").unwrap_or("s3://x/?")).1;
                    let allowed = strs(&s.condition["StringLike"]["s3:prefix"]);
                    let other_keys = s.condition.as_object().map_or(0, |c| c.len());
                    if allowed.is_empty()
                        || other_keys != 1
                        || allowed.iter().any(|p| !p.starts_with(prefix))
                    {
                        failures.push(format!(
                            "{} {}: s3:ListBucket must be limited to the results prefix {prefix} \
                             (Condition StringLike s3:prefix [\"{prefix}*\"]), has {}",
                            s.role, s.sid, s.condition
                        ));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "IAM in template.yaml does not match the code:\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn roles_grant_exactly_the_calls_the_code_makes() {
    check_roles(main_template(), true);
}

#[test]
fn roles_without_model_uri_or_keys_grant_no_more() {
    check_roles(bare_template(), false);
    let [api, worker] = functions(bare_template());
    for f in [&api, &worker] {
        assert!(f.env("MODEL_URI").is_none() && f.grants("s3:GetObject").count() == 1);
        assert!(f.grants("secretsmanager:GetSecretValue").next().is_none());
    }
}

#[test]
fn no_other_iam_and_no_sam_sqs_policy() {
    for t in [main_template(), bare_template()] {
        for (id, r) in resources(t) {
            let ty = r["Type"].as_str().unwrap_or("");
            assert!(
                !matches!(
                    ty,
                    "AWS::IAM::Policy" | "AWS::IAM::ManagedPolicy" | "AWS::IAM::RolePolicy"
                ),
                "{id}: {ty} adds to a role outside the checked statements"
            );
        }
        // The worker is fed by exactly one mapping, from the jobs queue, with partial batch failures.
        let mappings: Vec<&Value> = resources(t)
            .values()
            .filter(|r| r["Type"] == "AWS::Lambda::EventSourceMapping")
            .collect();
        assert_eq!(mappings.len(), 1);
        let p = &mappings[0]["Properties"];
        assert_eq!(p["FunctionName"], "stack-WorkerFunction");
        assert_eq!(
            p["EventSourceArn"].as_str().unwrap(),
            queue_arn(&format!(
                "https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/stack-JobsQueue"
            ))
        );
        assert_eq!(
            p["FunctionResponseTypes"],
            serde_json::json!(["ReportBatchItemFailures"])
        );
        assert!(p["ScalingConfig"]["MaximumConcurrency"].is_string());
    }
}

#[test]
fn deployed_code_makes_no_aws_call_missing_from_the_table() {
    // The SDK's fluent method of each operation -> the IAM action it needs.
    const OPS: &[(&str, &str)] = &[
        ("get_object", "s3:GetObject"),
        ("head_object", "s3:GetObject"),
        ("put_object", "s3:PutObject"),
        ("copy_object", "s3:PutObject"),
        ("create_multipart_upload", "s3:PutObject"),
        ("delete_object", "s3:DeleteObject"),
        ("delete_objects", "s3:DeleteObject"),
        ("list_objects", "s3:ListBucket"),
        ("list_objects_v2", "s3:ListBucket"),
        ("send_message", "sqs:SendMessage"),
        ("send_message_batch", "sqs:SendMessage"),
        ("receive_message", "sqs:ReceiveMessage"),
        ("delete_message", "sqs:DeleteMessage"),
        ("delete_message_batch", "sqs:DeleteMessage"),
        ("change_message_visibility", "sqs:ChangeMessageVisibility"),
        ("get_queue_attributes", "sqs:GetQueueAttributes"),
        ("get_secret_value", "secretsmanager:GetSecretValue"),
        (
            "batch_get_secret_value",
            "secretsmanager:BatchGetSecretValue",
        ),
        ("get_parameter", "ssm:GetParameter"),
        ("get_parameters", "ssm:GetParameters"),
    ];
    const KNOWN_SDKS: &[&str] = &["aws_sdk_s3", "aws_sdk_sqs", "aws_sdk_secretsmanager"];
    let table: BTreeSet<&str> = AWS_CALLS.iter().map(|c| c.action).collect();
    let mut failures = vec![];
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![src.clone()];
    let mut files = 0;
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            // src/bin/: the lambda-inference tool (benchmarks, local server), not in the image.
            if p.is_dir() && p != src.join("bin") {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files += 1;
                let text = std::fs::read_to_string(&p).unwrap();
                let compact: String = text.split_whitespace().collect();
                for (op, action) in OPS {
                    if compact.contains(&format!(".{op}()")) && !table.contains(action) {
                        failures.push(format!(
                            "{}: calls {op} ({action}), missing from AWS_CALLS in src/aws.rs",
                            p.display()
                        ));
                    }
                }
                for word in compact.split(|c: char| !c.is_alphanumeric() && c != '_') {
                    if word.starts_with("aws_sdk_") && !KNOWN_SDKS.contains(&word) {
                        failures.push(format!(
                            "{}: uses {word}: list its calls in AWS_CALLS (src/aws.rs) and its \
                             operations in this test",
                            p.display()
                        ));
                    }
                }
            }
        }
    }
    assert!(files > 10, "scanned {files} files under {}", src.display());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn auth_is_on_by_default_and_none_warns() {
    let t = main_template();
    let default = t["Parameters"]["ApiAuth"]["Default"].as_str().unwrap();
    assert_ne!(default, "NONE", "ApiAuth must not default to NONE");
    assert_eq!(default, "KEY");
    let api = function(t, "ApiFunction", Caller::Api);
    let secret = api
        .env("API_KEYS_SECRET_ARN")
        .expect("KEY: API_KEYS_SECRET_ARN set");
    let (sid, secret_res) = resources(t)
        .iter()
        .find(|(_, r)| r["Type"] == "AWS::SecretsManager::Secret")
        .expect("KEY: a generated secret");
    assert!(secret.contains(&format!(":secret:{sid}-")), "{secret}");
    let gen = &secret_res["Properties"]["GenerateSecretString"];
    assert_eq!(
        gen["GenerateStringKey"], "key",
        "the JSON shape the function reads: {{\"key\": ...}}"
    );
    for (id, r) in resources(t) {
        if r["Type"] == "AWS::ApiGatewayV2::Route" {
            // KEY: the gateway lets requests through, the function checks the Bearer key.
            assert_eq!(r["Properties"]["AuthorizationType"], "NONE", "{id}");
        }
    }
    let outputs = t["Outputs"].as_object().unwrap();
    assert!(outputs.contains_key("ApiKeyCommand") && !outputs.contains_key("Warning"));
    let cmd = outputs["ApiKeyCommand"]["Value"].as_str().unwrap();
    assert!(
        cmd.contains("get-secret-value") && cmd.contains(secret),
        "{cmd}"
    );
    for o in [
        "ApiUrl",
        "StreamingFunctionUrl",
        "JobsQueueName",
        "ResultsBucketName",
    ] {
        assert!(outputs.contains_key(o), "output {o}");
    }

    let bare = bare_template().as_object().unwrap();
    let outputs = bare["Outputs"].as_object().unwrap();
    assert!(outputs["Warning"]["Value"]
        .as_str()
        .unwrap()
        .contains("ApiAuth=NONE"));
    assert!(!outputs.contains_key("ApiKeyCommand"));
    let iam = translate(&["--resolve", "ApiAuth=IAM"]);
    for (id, r) in resources(&iam) {
        if r["Type"] == "AWS::ApiGatewayV2::Route" {
            assert_eq!(r["Properties"]["AuthorizationType"], "AWS_IAM", "{id}");
        }
    }
}

#[test]
fn spend_is_capped_and_the_http_deadline_agrees() {
    let t = main_template();
    let res = resources(t);
    let api = &res["ApiFunction"]["Properties"];
    assert_eq!(api["ReservedConcurrentExecutions"], "10");
    let stage = &res["HttpApiStage"]["Properties"]["DefaultRouteSettings"];
    assert!(stage["ThrottlingRateLimit"].is_string() && stage["ThrottlingBurstLimit"].is_string());
    let integration_ms: u64 = res["HttpApiIntegration"]["Properties"]["TimeoutInMillis"]
        .as_u64()
        .unwrap();
    let timeout_s: u64 = api["Timeout"].as_str().unwrap().parse().unwrap();
    assert!(
        timeout_s * 1000 <= integration_ms,
        "ApiTimeout's default ({timeout_s} s) outlives the HTTP API integration ({integration_ms} ms)"
    );
    // "unreserved" omits the setting (0 would throttle every request).
    let bare = resources(bare_template());
    assert!(bare["ApiFunction"]["Properties"]["ReservedConcurrentExecutions"].is_null());
}

#[test]
fn function_url_invoker_gets_both_permissions() {
    let res = resources(bare_template());
    let mut actions = BTreeSet::new();
    for r in res.values() {
        let p = &r["Properties"];
        if r["Type"] == "AWS::Lambda::Permission"
            && p["Principal"].as_str().unwrap().contains(":role/caller")
        {
            assert!(
                p["FunctionName"].as_str().unwrap().ends_with(":live"),
                "{p}"
            );
            match p["Action"].as_str().unwrap() {
                "lambda:InvokeFunctionUrl" => assert_eq!(p["FunctionUrlAuthType"], "AWS_IAM"),
                "lambda:InvokeFunction" => assert_eq!(p["InvokedViaFunctionUrl"], true),
                other => panic!("unexpected {other}"),
            }
            actions.insert(p["Action"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(actions.len(), 2, "{actions:?}");
    // Empty (the default): no resource policy but API Gateway's.
    for (id, r) in resources(main_template()) {
        if r["Type"] == "AWS::Lambda::Permission" {
            assert_eq!(
                r["Properties"]["Principal"], "apigateway.amazonaws.com",
                "{id}"
            );
        }
    }
}

/// `live` must move to a new version for every change that reaches the API function: SAM's
/// version logical id covers the image and literal properties; parameter values reach the
/// version's Description, which CloudFormation cannot update in place (it publishes a new version).
#[test]
fn every_deploy_relevant_change_publishes_a_new_live_version() {
    fn version(args: &[&str]) -> (String, String) {
        let mut all = vec!["--resolve"];
        all.extend_from_slice(args);
        let t = translate(&all);
        let res = resources(&t);
        let alias = &res["ApiFunctionAliaslive"]["Properties"]["FunctionVersion"];
        let versions: Vec<(&String, &Value)> = res
            .iter()
            .filter(|(_, r)| r["Type"] == "AWS::Lambda::Version")
            .collect();
        assert_eq!(versions.len(), 1);
        let (id, v) = versions[0];
        assert_eq!(
            alias.as_str().unwrap(),
            format!("{id}.Version"),
            "live follows the version"
        );
        (
            id.clone(),
            v["Properties"]["Description"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        )
    }
    let base = version(&[]);
    let model = format!("ModelUri={MODEL_URI}");
    let sha = format!("ModelSha256={SHA}");
    let image = format!("--image-uri={ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/other:2");
    let changes: [&[&str]; 6] = [
        &[&model],
        &[&sha],
        &["MemorySize=4096"],
        &["ApiTimeout=20"],
        &["ApiAuth=IAM"],
        &[&image],
    ];
    for change in changes {
        let v = version(change);
        assert_ne!(v, base, "{change:?} leaves the live version as it was");
        assert!(
            v.1.len() <= 256,
            "a version description stops at 256: {}",
            v.1
        );
    }
    // The longest values the parameters allow (ModelUri's MaxLength is 160).
    let long = format!("ModelUri=s3://b/{}", "k".repeat(153));
    let v = version(&[
        &long,
        &sha,
        "MemorySize=10240",
        "ApiTimeout=900",
        "ApiAuth=NONE",
    ]);
    assert!(v.1.len() <= 256, "{} characters: {}", v.1.len(), v.1);
}
