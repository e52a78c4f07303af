//! An init failure reaches the operator as `<errorType>: <message>` with the type said once, from
//! both entry points: the bootstrap (its log and its exit) and the CLI (`invoke`). The bug was
//! "ModelNotFound: ModelNotFound: ...": the message already carried the type.

use std::process::Command;

fn run(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MODEL_URI", "/nonexistent/model.gguf")
        .output()
        .expect("the binary runs");
    assert!(!out.status.success(), "{bin} succeeded without a model");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    text
}

fn says_the_type_once(text: &str) {
    assert!(text.contains("ModelNotFound"), "no error type in:\n{text}");
    assert!(
        !text.contains("ModelNotFound: ModelNotFound"),
        "the type is said twice:\n{text}"
    );
    for line in text.lines() {
        assert!(
            line.matches("ModelNotFound: ").count() <= 1,
            "the type is said twice: {line}"
        );
    }
}

#[test]
fn the_bootstrap_says_the_error_type_once() {
    let text = run(env!("CARGO_BIN_EXE_bootstrap"), &[]);
    // The process's own error (what Lambda shows as the init failure) is `<type>: <message>`.
    assert!(
        text.contains("ModelNotFound: /nonexistent/model.gguf"),
        "no `ModelNotFound: <message>` in:\n{text}"
    );
    says_the_type_once(&text);
}

#[test]
fn the_cli_says_the_error_type_once() {
    let text = run(
        env!("CARGO_BIN_EXE_lambda-inference"),
        &["invoke", "events/apigw-v2-health.json"],
    );
    assert!(
        text.contains("ModelNotFound: /nonexistent/model.gguf"),
        "no `ModelNotFound: <message>` in:\n{text}"
    );
    says_the_type_once(&text);
}
