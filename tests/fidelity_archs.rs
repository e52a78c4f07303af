//! Fidelity of the decoder architectures without a packaged model (qwen2, qwen3, Llama 3.x, phi3,
//! and Phi-3.5's LongRoPE with each of its two factor sets) against llama.cpp, on tiny random-weight Q8_0 GGUFs written by llama.cpp's own converter
//! (tests/fixtures/archs/: the GGUFs, llama.cpp's answers as JSON, and make.py, which regenerates
//! both; CI runs none of that, the fixtures are data).
//!
//! Per architecture and prompt: the GGUF's chat template renders llama.cpp's prompt text; the
//! token ids are identical; llama.cpp's 16 greedy tokens are fed one by one (teacher forcing) and
//! the full logits of every step are within [`TOLERANCE`] of llama.cpp's; our greedy choice is
//! llama.cpp's at every step that is not a near-tie (llama.cpp's top two closer than twice the
//! tolerance; with teacher forcing every step is judged on its own). The same ids through
//! transformers in f32 show how far both engines are from the unquantized model: ours must not be
//! further than llama.cpp is, plus the tolerance.

mod common;

use std::sync::Arc;

use lambda_inference::engine::generate::argmax;
use lambda_inference::engine::llama::LlamaGenerator;
use lambda_inference::engine::{
    self, ChatMessage, Engine, EngineError, Generator, ModelKind, SharedBytes,
};
use lambda_inference::service::{Limits, ModelMeta, Service};
use serde_json::Value;

/// Largest |our logit - llama.cpp's| allowed, over every vocabulary entry of every step. Both
/// engines run the same Q8_0 weights with activations quantized to 8 bits per 32 values and an
/// f16 KV cache; what differs is summation order and the f32 values each quantizes from, so a
/// value can land on the other side of a rounding step (1/127 of its block's largest magnitude)
/// and the two engines' activation-rounding errors are independent draws of the same size. That
/// size is what each engine's distance from transformers f32 shows (docs/testing.md has the
/// figures): the tolerance sits below it, so an engine error of the size of quantization noise
/// would fail, while a wrong RoPE pairing, bias or norm moves logits by whole units (these models'
/// logits have a standard deviation near 3).
const TOLERANCE: f32 = 0.35;

/// [`TOLERANCE`] for the LongRoPE fixture. Its attention factor (sqrt(1.5), on both cos and sin)
/// multiplies every attention score by 1.5, and the score differences the two engines' rounding
/// leaves grow with it: here each engine's distance from transformers f32 is 0.6-0.9 (docs/
/// testing.md), against 0.5 on phi3. 0.5 stays below that; the wrong factor set moves logits by
/// whole units (checked below), so does a missing attention factor.
const LONG_ROPE_TOLERANCE: f32 = 0.5;

fn fixture(arch: &str) -> (SharedBytes, Value) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/archs/");
    let bytes: SharedBytes = Arc::new(std::fs::read(format!("{dir}{arch}.gguf")).unwrap());
    let fx = serde_json::from_slice(&std::fs::read(format!("{dir}{arch}.json")).unwrap()).unwrap();
    (bytes, fx)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn messages(item: &Value) -> Vec<ChatMessage> {
    item["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vocabulary sizes");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// top1 - top2 of `logits`.
fn margin(logits: &[f32]) -> f32 {
    let mut s = logits.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    s[0] - s[1]
}

/// `fixture`: the file name under tests/fixtures/archs/; `arch`: its `general.architecture`.
fn check(fixture_name: &str, arch: &str) {
    check_items(fixture_name, arch, "items", false, TOLERANCE);
}

/// [`check`] on the fixture's `items` (llama.cpp's answers), run with LongRoPE's long factors
/// when `long` (the fixture's `items_long`, llama.cpp run with a context past the original one),
/// within `tol` of llama.cpp's logits.
fn check_items(fixture_name: &str, arch: &str, items: &str, long: bool, tol: f32) {
    let (bytes, fx) = fixture(fixture_name);
    let content = candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(
        (*bytes).as_ref(),
    ))
    .unwrap();
    let gen = LlamaGenerator::load(&content, &bytes).unwrap();
    assert_eq!(gen.info().architecture, arch);
    assert_eq!(gen.info().kind, ModelKind::Generator);
    let (mut worst, mut worst_f32_ours, mut worst_f32_ref) = (0f32, 0f32, 0f32);
    for (n, item) in fx[items].as_array().unwrap().iter().enumerate() {
        let text = gen.render_chat(&messages(item)).unwrap();
        assert_eq!(
            text,
            item["prompt_text"].as_str().unwrap(),
            "{arch} prompt {n}: template"
        );
        let prompt = gen.tokenize(&text).unwrap();
        assert_eq!(
            prompt,
            common::json_ids(&item["prompt_ids"]),
            "{arch} prompt {n}: token ids"
        );

        let want = common::json_ids(&item["generated_ids"]);
        let refs: Vec<Vec<f32>> = item["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect();
        let f32s: Vec<Vec<f32>> = item["hf_f32_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect();
        let ours: Vec<Vec<f32>> = gen.with_state(|model, state| {
            state.reset();
            state.long_context = long;
            let mut out = vec![model.forward(state, &prompt).unwrap()];
            for &id in &want[..want.len() - 1] {
                out.push(model.forward(state, &[id]).unwrap());
            }
            out
        });
        let mut judged = 0;
        for (s, ((o, r), h)) in ours.iter().zip(&refs).zip(&f32s).enumerate() {
            let d = max_abs_diff(o, r);
            worst = worst.max(d);
            worst_f32_ours = worst_f32_ours.max(max_abs_diff(o, h));
            worst_f32_ref = worst_f32_ref.max(max_abs_diff(r, h));
            if std::env::var("FID_DEBUG").is_ok() {
                eprintln!(
                    "{arch} p{n} s{s}: |ours - llama.cpp| {d:.4}, |ours - f32| {:.4}, \
                     |llama.cpp - f32| {:.4}, margin {:.3}",
                    max_abs_diff(o, h),
                    max_abs_diff(r, h),
                    margin(r)
                );
            }
            assert!(
                d <= tol,
                "{arch} prompt {n} step {s}: logits differ from llama.cpp's by {d}"
            );
            if margin(r) >= 2.0 * tol {
                judged += 1;
                assert_eq!(
                    argmax(o),
                    want[s],
                    "{arch} prompt {n} step {s}: greedy token"
                );
            }
        }
        eprintln!(
            "{arch} prompt {n}: {} prompt ids equal; greedy token equal at the {judged} of {} \
             steps that are not near-ties",
            prompt.len(),
            want.len()
        );
    }
    eprintln!(
        "{arch} {items}: largest |logit - llama.cpp| {worst:.4} (tolerance {tol}); \
         against transformers f32: ours {worst_f32_ours:.3}, llama.cpp {worst_f32_ref:.3}"
    );
    assert!(
        worst_f32_ours <= worst_f32_ref + tol,
        "{arch}: further from the f32 model than llama.cpp is"
    );
}

#[test]
fn qwen2_matches_llama_cpp() {
    check("qwen2", "qwen2");
}

#[test]
fn qwen3_matches_llama_cpp() {
    check("qwen3", "qwen3");
}

#[test]
fn llama3_matches_llama_cpp() {
    check("llama3", "llama");
}

#[test]
fn phi3_matches_llama_cpp() {
    check("phi3", "phi3");
}

#[test]
fn phi3_long_rope_matches_llama_cpp_with_either_factor_set() {
    // Phi-3.5-mini's LongRoPE: llama.cpp with a context within the original one (short factors)
    // and past it (long factors), each with the attention factor on cos and sin.
    check_items("phi3_longrope", "phi3", "items", false, LONG_ROPE_TOLERANCE);
    check_items(
        "phi3_longrope",
        "phi3",
        "items_long",
        true,
        LONG_ROPE_TOLERANCE,
    );
}

#[test]
fn the_tolerance_tells_the_long_rope_factor_set_and_attention_factor_apart() {
    // The other factor set, and the file with its attention factor set to 1 (what a decoder that
    // ignores `rope.scaling.attn_factor` runs): each must miss llama.cpp by far more than the
    // tolerance, or the comparison above could not tell them from right.
    let (bytes, fx) = fixture("phi3_longrope");
    let load = |b: &SharedBytes| {
        let content =
            candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(b.as_ref()))
                .unwrap();
        LlamaGenerator::load(&content, b).unwrap()
    };
    let gen = load(&bytes);
    for (items, long) in [("items", true), ("items_long", false)] {
        let worst = worst_against_llama_cpp_with(&gen, &fx[items][0], long);
        eprintln!("{items} run with long = {long}: largest |logit - llama.cpp| {worst:.3}");
        assert!(worst > 3.0 * LONG_ROPE_TOLERANCE, "{worst}");
    }
    // GGUF metadata: key, then its type (u32, 6 = f32), then the value.
    let key = b"phi3.rope.scaling.attn_factor";
    let mut b = (*bytes).as_ref().to_vec();
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    assert_eq!(b[at..at + 4], 6u32.to_le_bytes());
    assert!(
        (f32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap()) - 1.5f32.sqrt()).abs() < 1e-6
    );
    b[at + 4..at + 8].copy_from_slice(&1f32.to_le_bytes());
    let b: SharedBytes = Arc::new(b);
    let no_factor = load(&b);
    for (items, long) in [("items", false), ("items_long", true)] {
        let worst = worst_against_llama_cpp_with(&no_factor, &fx[items][0], long);
        eprintln!("{items} without the attention factor: largest |logit - llama.cpp| {worst:.3}");
        assert!(worst > 3.0 * LONG_ROPE_TOLERANCE, "{worst}");
    }
}

#[test]
fn long_rope_factors_are_picked_by_what_the_request_may_fill() {
    // Through `Generator::generate`: a request whose prompt plus max_tokens fits the original
    // context (256) runs the short factors, one that may run past it the long ones, from its
    // first token (the keys cached are rotated with one set); each against llama.cpp run with a
    // context on that side. The two sets' greedy tokens differ at the first step.
    let (bytes, fx) = fixture("phi3_longrope");
    let Engine::Generator(gen) = engine::load_shared(bytes.clone()).unwrap() else {
        panic!("phi3_longrope loaded as an encoder")
    };
    let (short, long) = (&fx["items"][0], &fx["items_long"][0]);
    assert_ne!(short["generated_ids"][0], long["generated_ids"][0]);
    let prompt = common::json_ids(&short["prompt_ids"]).len();
    greedy_through_the_trait(&*gen, short, 256 - prompt);
    greedy_through_the_trait(&*gen, long, 256 - prompt + 1);

    let content = candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(
        (*bytes).as_ref(),
    ))
    .unwrap();
    let model = LlamaGenerator::load(&content, &bytes).unwrap();
    assert_eq!(model.model().cfg.rope_original_context, 256);
    assert!(!model.model().long_context(256) && model.model().long_context(257));
    // A file without LongRoPE never picks long factors.
    let (bytes, _) = fixture("phi3");
    let content = candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(
        (*bytes).as_ref(),
    ))
    .unwrap();
    let plain = LlamaGenerator::load(&content, &bytes).unwrap();
    assert!(!plain.model().long_context(usize::MAX));
}

#[test]
fn sentencepiece_prompts_tokenize_as_llama_cpp_does() {
    // phi3's SentencePiece vocabulary on strings chosen to break a tokenizer that is almost right:
    // accents, digits, runs of spaces, tabs and newlines (byte tokens), characters outside the
    // vocabulary (byte fallback), text against special tokens (the leading ▁ after one, and
    // Phi-3's rule that drops the whitespace after most of them), literal `<s>`, `<unk>`, `▁`.
    let (bytes, fx) = fixture("phi3");
    let engine = engine::load_shared(bytes).unwrap();
    let Engine::Generator(gen) = engine else {
        panic!("phi3 loaded as an encoder")
    };
    let cases = fx["tokenize"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let mut bytes_seen = false;
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = common::json_ids(&case["ids"]);
        assert_eq!(gen.tokenize(text).unwrap(), want, "{text:?}");
        // <0x00>..<0xFF> are ids 3..=258 in a SentencePiece vocabulary with byte fallback.
        bytes_seen |= want.iter().any(|&i| (3..=258).contains(&i));
    }
    assert!(bytes_seen, "no case exercises byte fallback");
}

#[test]
fn sentencepiece_generation_streams_spaces_and_bytes() {
    // The phi3 conversation whose content the vocabulary lacks (東京, 🙂): llama.cpp's greedy
    // tokens through the service's path, the text streamed piece by piece equal to the whole.
    let (bytes, fx) = fixture("phi3");
    let Engine::Generator(gen) = engine::load_shared(bytes).unwrap() else {
        panic!("phi3 loaded as an encoder")
    };
    for item in fx["items"].as_array().unwrap() {
        greedy_through_the_trait(&*gen, item, 16);
    }
}

#[test]
fn generation_through_the_trait_stops_and_streams() {
    // The same greedy tokens through `Generator::generate` (the path the service uses), for the
    // architecture whose vocabulary adds BOS and whose template writes it too.
    let (bytes, fx) = fixture("llama3");
    let gen = match engine::load_shared(bytes).unwrap() {
        Engine::Generator(g) => g,
        Engine::Embedder(_) | Engine::Reranker(_) => panic!("llama3 loaded as an encoder"),
    };
    greedy_through_the_trait(&*gen, &fx["items"][0], 16);
}

/// `item`'s prompt through `Generator::generate` (the service's path) with `max_tokens`: the
/// prompt ids and the greedy tokens up to llama.cpp's first near-tie are llama.cpp's, and the
/// text streamed piece by piece is the whole text.
fn greedy_through_the_trait(gen: &dyn Generator, item: &Value, max_tokens: usize) {
    let prompt = gen
        .tokenize(&gen.render_chat(&messages(item)).unwrap())
        .unwrap();
    assert_eq!(prompt, common::json_ids(&item["prompt_ids"]));
    let want = common::json_ids(&item["generated_ids"]);
    let first_tie = item["logits"]
        .as_array()
        .unwrap()
        .iter()
        .position(|l| margin(&floats(l)) < 2.0 * TOLERANCE)
        .unwrap_or(want.len());
    let params = lambda_inference::engine::GenerateParams {
        max_tokens,
        ..Default::default()
    };
    let mut streamed = String::new();
    let out = gen
        .generate(&prompt, &params, &mut |s| streamed.push_str(s))
        .unwrap();
    // A stop token ends the output without being part of it.
    let n = first_tie.min(out.token_ids.len());
    assert!(
        n + 1 >= first_tie,
        "stopped after {n} tokens, llama.cpp agreed on {first_tie}"
    );
    assert_eq!(&out.token_ids[..n], &want[..n]);
    assert_eq!(streamed, out.text);
}

#[test]
fn info_and_service_report_architecture_and_context_length() {
    for (name, arch, ctx) in [
        ("qwen2", "qwen2", 4096),
        ("qwen3", "qwen3", 4096),
        ("llama3", "llama", 8192),
        ("phi3", "phi3", 4096),
        ("phi3_longrope", "phi3", 4096),
    ] {
        let (bytes, _) = fixture(name);
        let engine = engine::load_shared(bytes).unwrap();
        assert_eq!(engine.info().architecture, arch);
        assert_eq!(
            engine.info().max_seq_len,
            ctx,
            "{arch}: {arch}.context_length"
        );
        let svc = Service::new(engine, Limits::default(), ModelMeta::default());
        let models = svc.models();
        assert_eq!(models["data"][0]["architecture"], arch);
        assert_eq!(models["data"][0]["context_length"], ctx);
        let health = svc.health();
        assert_eq!(health["architecture"], arch);
        assert_eq!(health["context_length"], ctx);
    }
}

#[test]
fn unsupported_architecture_fails_at_load_naming_what_is_supported() {
    // The qwen2 fixture relabelled: every "qwen2" in the header (the architecture and its
    // `qwen2.*` keys) becomes "gpt99", same length, so the file stays a valid GGUF.
    let (bytes, _) = fixture("qwen2");
    let mut b = (*bytes).as_ref().to_vec();
    let (from, to) = (b"qwen2", b"gpt99");
    let mut i = 0;
    while i + from.len() <= b.len() {
        if &b[i..i + from.len()] == from {
            b[i..i + from.len()].copy_from_slice(to);
        }
        i += 1;
    }
    let err = match engine::load(&b) {
        Err(e) => e,
        Ok(_) => panic!("an unknown architecture loaded"),
    };
    let EngineError::InvalidModel(msg) = &err else {
        panic!("not InvalidModel: {err}")
    };
    assert!(msg.contains("\"gpt99\""), "{msg}");
    for arch in ["bert", "llama", "qwen2", "qwen3", "phi3"] {
        assert!(msg.contains(arch), "{msg} does not name {arch}");
    }
    // The generator's own entry point refuses it the same way.
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&b)).unwrap();
    let shared: SharedBytes = Arc::new(b.clone());
    assert!(matches!(
        LlamaGenerator::load(&content, &shared),
        Err(EngineError::InvalidModel(_))
    ));
}

#[test]
fn half_a_long_rope_pair_is_refused_naming_what_is_missing() {
    // LongRoPE's short and long factors come as a pair: the phi3_longrope fixture with its short
    // factors renamed (the same length, so the GGUF stays valid) is refused at load.
    let (bytes, _) = fixture("phi3_longrope");
    let mut b = (*bytes).as_ref().to_vec();
    let (from, to) = (b"rope_factors_short.weight", b"rope_factors_other.weight");
    let at = b
        .windows(from.len())
        .position(|w| w == from)
        .expect("tensor name in the header");
    b[at..at + to.len()].copy_from_slice(to);
    let err = match engine::load(&b) {
        Err(e) => e,
        Ok(_) => panic!("a file with half a LongRoPE pair loaded"),
    };
    let EngineError::InvalidModel(msg) = &err else {
        panic!("not InvalidModel: {err}")
    };
    assert!(
        msg.contains("rope_factors_short") && msg.contains("LongRoPE"),
        "{msg}"
    );
}

#[test]
fn the_tolerance_tells_a_wrong_rope_pairing_apart() {
    // qwen2 run as if it were llama (adjacent-pair RoPE instead of halves): the one thing that
    // differs must move the logits past the tolerance, or the comparison above proves nothing.
    let (bytes, fx) = fixture("qwen2");
    let content = candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(
        (*bytes).as_ref(),
    ))
    .unwrap();
    let wrong = LlamaGenerator::load_as(&content, &bytes, engine::llama::VARIANT).unwrap();
    let worst = worst_against_llama_cpp(&wrong, &fx["items"][0]);
    eprintln!("qwen2 with adjacent-pair RoPE: largest |logit - llama.cpp| {worst:.3}");
    assert!(worst > 3.0 * TOLERANCE, "{worst}");
}

/// Largest |logit - llama.cpp's| of `gen` over the steps of one fixture item (teacher forcing).
fn worst_against_llama_cpp(gen: &LlamaGenerator, item: &Value) -> f32 {
    worst_against_llama_cpp_with(gen, item, false)
}

/// [`worst_against_llama_cpp`] with LongRoPE's long factors when `long`.
fn worst_against_llama_cpp_with(gen: &LlamaGenerator, item: &Value, long: bool) -> f32 {
    let want = common::json_ids(&item["generated_ids"]);
    gen.with_state(|model, state| {
        state.reset();
        state.long_context = long;
        let mut logits = model
            .forward(state, &common::json_ids(&item["prompt_ids"]))
            .unwrap();
        let mut worst = 0f32;
        for (s, r) in item["logits"].as_array().unwrap().iter().enumerate() {
            worst = worst.max(max_abs_diff(&logits, &floats(r)));
            logits = model.forward(state, &[want[s]]).unwrap();
        }
        worst
    })
}

#[test]
fn the_tolerance_tells_phi3s_rope_pairing_and_gate_half_apart() {
    // What phi3 changes must each move the logits past the tolerance: adjacent-pair RoPE instead
    // of halves, and the fused ffn_up read as up-then-gate (its two halves swapped in the file).
    let (bytes, fx) = fixture("phi3");
    let read = |b: &[u8]| {
        candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(b)).unwrap()
    };
    let content = read((*bytes).as_ref());
    let adjacent = engine::llama::Variant {
        rope: engine::llama::RopeStyle::Adjacent,
        ..engine::phi3::VARIANT
    };
    let wrong = LlamaGenerator::load_as(&content, &bytes, adjacent).unwrap();
    let worst = worst_against_llama_cpp(&wrong, &fx["items"][0]);
    eprintln!("phi3 with adjacent-pair RoPE: largest |logit - llama.cpp| {worst:.3}");
    assert!(worst > 3.0 * TOLERANCE, "{worst}");

    let mut b = (*bytes).as_ref().to_vec();
    let mut swapped = 0;
    for (name, info) in &content.tensor_infos {
        if !name.ends_with(".ffn_up.weight") {
            continue;
        }
        let [rows, k] = info.shape.dims() else {
            panic!("{name}: not a matrix")
        };
        let d = info.ggml_dtype;
        let half = rows / 2 * (k / d.block_size() * d.type_size());
        let start = content.tensor_data_offset as usize + info.offset as usize;
        let (gate, up) = b[start..start + 2 * half].split_at_mut(half);
        gate.swap_with_slice(up);
        swapped += 1;
    }
    assert_eq!(swapped, 2, "one fused ffn_up per layer");
    let shared: SharedBytes = Arc::new(b);
    let wrong = LlamaGenerator::load(&read((*shared).as_ref()), &shared).unwrap();
    let worst = worst_against_llama_cpp(&wrong, &fx["items"][0]);
    eprintln!("phi3 with gate and up swapped: largest |logit - llama.cpp| {worst:.3}");
    assert!(worst > 3.0 * TOLERANCE, "{worst}");
}

#[test]
fn real_chat_templates_render_as_transformers_does() {
    // Qwen2.5, Qwen3 and Llama 3.2's published templates (tests/fixtures/archs/templates/, from
    // llama.cpp's models/templates) against transformers' renderer (templates.py wrote
    // templates.json). Llama 3.2 writes today's date: that line is compared by its shape.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/archs/");
    let cases: Value =
        serde_json::from_slice(&std::fs::read(format!("{dir}templates.json")).unwrap()).unwrap();
    let today = |s: &str| -> String {
        s.lines()
            .map(|l| match l.strip_prefix("Today Date: ") {
                Some(d) => {
                    let parts: Vec<&str> = d.split(' ').collect();
                    assert!(
                        parts.len() == 3 && parts[0].len() == 2 && parts[1].len() == 3,
                        "date {d:?} is not %d %b %Y"
                    );
                    "Today Date: <date>".to_owned()
                }
                None => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    for case in cases.as_array().unwrap() {
        let name = case["template"].as_str().unwrap();
        let src = std::fs::read_to_string(format!("{dir}templates/{name}")).unwrap();
        let t = lambda_inference::engine::chat::ChatTemplate::new(
            &src,
            case["bos_token"].as_str().unwrap(),
            case["eos_token"].as_str().unwrap(),
        )
        .unwrap();
        let got = t.render(&messages(case), true).unwrap();
        assert_eq!(
            today(&got),
            today(case["rendered"].as_str().unwrap()),
            "{name}"
        );
    }
}
