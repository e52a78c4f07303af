//! template.yaml as AWS's SAM transform expands it, offline: `scripts/translate-template` (Python 3
//! with samtranslator, `python3 -m pip install aws-sam-cli`, which scripts/lint-infra does before
//! CI's `cargo test`). Included by path from the template tests, without the rest of `common`.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// translate-template's region (`--resolve` also makes up account 123456789012).
pub const REGION: &str = "us-east-1";

/// `scripts/translate-template ARGS` (`--resolve`, `Name=Value` parameters) as JSON.
pub fn translate(args: &[&str]) -> Value {
    let root = env!("CARGO_MANIFEST_DIR");
    let script = Path::new(root).join("scripts/translate-template");
    let out = Command::new("python3")
        .arg(&script)
        .args(args)
        .env("AWS_DEFAULT_REGION", REGION)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `python3 {}` ({e}): this test needs Python 3 with samtranslator \
                 (`python3 -m pip install aws-sam-cli`; scripts/lint-infra installs it)",
                script.display()
            )
        });
    assert!(
        out.status.success(),
        "`scripts/translate-template {}` failed: {}\n(it needs samtranslator: \
         `python3 -m pip install aws-sam-cli`; scripts/lint-infra installs it)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("translate-template prints JSON")
}
