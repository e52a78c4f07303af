//! `lambda-inference bench embeddings|generate --workload FILE`, as the anchors kit drives it: the
//! kit passes the flag only when `bench <sub> --help` shows it, and a bad file must stop the bench
//! before any model is loaded or process spawned, with the field named. No model needed.

use std::path::PathBuf;
use std::process::Command;

fn bench(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lambda-inference"))
        .arg("bench")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the binary runs");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The kit's workload (tests/fixtures/anchors-workload.json) with one change, in a temporary file.
fn workload_with(name: &str, change: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/anchors-workload.json"
    );
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).expect("the fixture")).unwrap();
    change(&mut doc);
    let path = std::env::temp_dir().join(format!(
        "li-bench-workload-{name}-{}.json",
        std::process::id()
    ));
    std::fs::write(&path, doc.to_string()).unwrap();
    path
}

#[test]
fn both_benches_offer_the_workload_flag_in_their_help() {
    for sub in ["embeddings", "generate"] {
        let (ok, help) = bench(&[sub, "--help"]);
        assert!(ok, "{help}");
        // What the kit's harness looks for: `(^|\s)--workload[\s=<]`.
        assert!(help.contains(" --workload <FILE>"), "bench {sub}:\n{help}");
    }
}

/// `bench <sub>` on the kit's workload with `change` made fails, naming `field`, before the model.
fn refused_before_the_model(sub: &str, field: &str, change: impl FnOnce(&mut serde_json::Value)) {
    let file = workload_with(sub, change);
    let (ok, text) = bench(&[
        sub,
        "--model",
        "/nonexistent/model.gguf",
        "--workload",
        file.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&file);
    assert!(!ok, "bench {sub} accepted a bad workload:\n{text}");
    assert!(
        text.contains(&format!("workload {}: {field}: ", file.display())),
        "bench {sub}: the error does not name {field}:\n{text}"
    );
    // The workload is read first: the missing model was never reached.
    assert!(!text.contains("/nonexistent/model.gguf"), "{text}");
}

#[test]
fn a_bad_workload_stops_the_bench_before_the_model_with_the_field_named() {
    refused_before_the_model("embeddings", "embeddings.throughput.batch_size", |d| {
        d["embeddings"]["throughput"]["batch_size"] = "32".into()
    });
    refused_before_the_model("generate", "generation.decode_steps", |d| {
        d["generation"]
            .as_object_mut()
            .unwrap()
            .remove("decode_steps");
    });
}
