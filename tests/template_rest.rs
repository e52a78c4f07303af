//! template.yaml's streaming REST API (RestApiStreaming), on the template as AWS's SAM transform
//! expands it: nothing of it by default; when on, the generation routes (the paths of
//! `api::routes`) stream from the `live` alias through InvokeWithResponseStream
//! (`responseTransferMode: STREAM`, the `response-streaming-invocations` URI), every method needs
//! an API key that a usage plan holds, only this API may invoke the alias, and the function is
//! told (REST_API_TRANSFER_MODE=STREAM) so that it answers in the streaming format.
//!
//! Runs `scripts/translate-template --resolve` (Python 3 with samtranslator, as tests/template_iam.rs).

#[path = "common/template.rs"]
mod template;

use lambda_inference::api::routes;
use serde_json::{Map, Value};

fn translate(args: &[&str]) -> Value {
    template::translate(&[&["--resolve"], args].concat())
}

fn resources(t: &Value) -> &Map<String, Value> {
    t["Resources"].as_object().expect("Resources")
}

fn of_type<'t>(t: &'t Value, ty: &str) -> Vec<&'t Value> {
    resources(t).values().filter(|r| r["Type"] == ty).collect()
}

fn api_function_env(t: &Value) -> &Map<String, Value> {
    resources(t)["ApiFunction"]["Properties"]["Environment"]["Variables"]
        .as_object()
        .expect("ApiFunction's environment")
}

#[test]
fn no_rest_api_by_default() {
    let t = translate(&[]);
    for ty in [
        "AWS::ApiGateway::RestApi",
        "AWS::ApiGateway::Stage",
        "AWS::ApiGateway::ApiKey",
        "AWS::ApiGateway::UsagePlan",
    ] {
        assert!(of_type(&t, ty).is_empty(), "{ty} without RestApiStreaming");
    }
    assert!(!api_function_env(&t).contains_key("REST_API_TRANSFER_MODE"));
    assert!(t["Outputs"].get("RestApiUrl").is_none());
}

#[test]
fn the_rest_api_streams_generation_from_the_live_alias_behind_a_key() {
    let t = translate(&["RestApiStreaming=true"]);
    let r = resources(&t);
    // The `live` alias's ARN, as the HTTP API's grant names it.
    let alias = r["HttpApiInvokePermission"]["Properties"]["FunctionName"]
        .as_str()
        .expect("the live alias")
        .to_owned();
    assert!(alias.ends_with(":live"), "{alias}");
    let apis = of_type(&t, "AWS::ApiGateway::RestApi");
    assert_eq!(apis.len(), 1);
    let paths = apis[0]["Properties"]["Body"]["paths"]
        .as_object()
        .expect("an OpenAPI body");
    let mut names: Vec<&str> = paths.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, [routes::CHAT_COMPLETIONS, routes::COMPLETIONS]);
    for (path, item) in paths {
        let methods = item.as_object().unwrap();
        assert_eq!(methods.keys().collect::<Vec<_>>(), ["post"], "{path}");
        let post = &item["post"];
        let i = &post["x-amazon-apigateway-integration"];
        assert_eq!(i["type"], "aws_proxy", "{path}");
        assert_eq!(i["responseTransferMode"], "STREAM", "{path}");
        // InvokeWithResponseStream's path, on the alias (provisioned concurrency serves it).
        let uri = i["uri"].as_str().unwrap();
        let expected = format!(
            "arn:aws:apigateway:{}:lambda:path/2021-11-15/functions/{alias}/response-streaming-invocations",
            template::REGION
        );
        assert_eq!(uri, expected, "{path}");
        // A streamed integration may run 15 minutes (a buffered one 29 s).
        assert_eq!(i["timeoutInMillis"], 900_000, "{path}");
        assert_eq!(
            post["security"],
            serde_json::json!([{"api_key": []}]),
            "{path}"
        );
    }
    let scheme = &apis[0]["Properties"]["Body"]["components"]["securitySchemes"]["api_key"];
    assert_eq!(scheme["in"], "header");
    assert_eq!(scheme["name"], "x-api-key");

    // The key is in a usage plan on this API's stage, throttled.
    let plans = of_type(&t, "AWS::ApiGateway::UsagePlan");
    assert_eq!(plans.len(), 1);
    let plan = &plans[0]["Properties"];
    let stages: Vec<&String> = r
        .iter()
        .filter(|(_, v)| v["Type"] == "AWS::ApiGateway::Stage")
        .map(|(k, _)| k)
        .collect();
    assert_eq!(stages.len(), 1);
    // --resolve names every resource `stack-<logical id>`.
    assert_eq!(
        plan["ApiStages"][0]["Stage"],
        format!("stack-{}", stages[0]).as_str()
    );
    assert!(!plan["Throttle"]["RateLimit"].is_null(), "{plan}");
    assert!(!plan["Throttle"]["BurstLimit"].is_null(), "{plan}");
    let links = of_type(&t, "AWS::ApiGateway::UsagePlanKey");
    assert_eq!(links.len(), 1);
    assert_eq!(links[0]["Properties"]["KeyType"], "API_KEY");

    // Only this API invokes the alias through API Gateway (the HTTP API has its own grant).
    let rest_id = plan["ApiStages"][0]["ApiId"].as_str().unwrap();
    let grants: Vec<&Value> = of_type(&t, "AWS::Lambda::Permission")
        .into_iter()
        .filter(|p| {
            p["Properties"]["SourceArn"]
                .as_str()
                .is_some_and(|a| a.contains(&format!(":{rest_id}/")))
        })
        .collect();
    assert_eq!(grants.len(), 1, "one grant for the REST API");
    let g = &grants[0]["Properties"];
    assert_eq!(g["Action"], "lambda:InvokeFunction");
    assert_eq!(g["Principal"], "apigateway.amazonaws.com");
    assert_eq!(g["FunctionName"], alias.as_str());
    assert!(
        g["SourceArn"].as_str().unwrap().ends_with("/*/POST/*"),
        "{g}"
    );

    // The function answers REST events in the streaming format, and a new version says so.
    assert_eq!(api_function_env(&t)["REST_API_TRANSFER_MODE"], "STREAM");
    assert!(t["Outputs"]["RestApiUrl"]["Value"]
        .as_str()
        .is_some_and(|u| u.contains(rest_id)));
    assert!(t["Outputs"]["RestApiKeyCommand"]["Value"]
        .as_str()
        .is_some_and(|c| c.contains("--include-value")));
}

/// Under ApiAuth=KEY a client holds one key: the REST API's key is the function's (the secret's).
#[test]
fn under_key_auth_the_api_key_is_the_functions_key() {
    let t = translate(&["RestApiStreaming=true"]);
    let secret = api_function_env(&t)["API_KEYS_SECRET_ARN"]
        .as_str()
        .expect("ApiAuth=KEY by default");
    let keys = of_type(&t, "AWS::ApiGateway::ApiKey");
    assert_eq!(keys.len(), 1);
    assert_eq!(
        keys[0]["Properties"]["Value"],
        format!("{{{{resolve:secretsmanager:{secret}:SecretString:key}}}}").as_str()
    );
    let iam = translate(&["RestApiStreaming=true", "ApiAuth=IAM"]);
    let keys = of_type(&iam, "AWS::ApiGateway::ApiKey");
    assert_eq!(keys.len(), 1);
    assert!(
        keys[0]["Properties"].get("Value").is_none(),
        "without the key secret API Gateway generates the key"
    );
}
