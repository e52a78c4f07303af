//! Text generation around any next-token model: sampling (greedy, temperature, top-k, top-p,
//! seeded), repetition / frequency / presence penalties, stop strings (never emitted), stop
//! tokens, `max_tokens`, a deadline, and UTF-8-safe streaming of the text as it grows.
//!
//! The loop is generic over [`TokenModel`] so that the same code runs the real llama model and
//! the fakes the service tests use: what those tests check (stop strings, limits, seeds,
//! deadlines) is this code, not a fake's imitation of it. Must not know about requests or JSON.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::EngineError;

/// A next-token model with its own state (the KV cache): `forward` appends tokens and returns
/// the logits after the last one.
pub trait TokenModel {
    /// Forgets the sequence; the next one may fill up to `reach` positions (prompt and answer:
    /// LongRoPE picks its factors by it).
    fn reset(&mut self, reach: usize);
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError>;
}

/// How to pick each token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Nucleus sampling: smallest set of tokens with this much probability (1 = off).
    pub top_p: f32,
    /// Only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Same seed, same prompt, same parameters -> same tokens.
    pub seed: u64,
    /// HF-style: logits of tokens already in the prompt or output are divided (positive) or
    /// multiplied (negative) by it. 1 = off.
    pub repetition_penalty: f32,
    /// OpenAI-style, over generated tokens: `logit -= count * frequency + (count > 0) * presence`.
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
        }
    }
}

/// One generation request, as the engine sees it.
#[derive(Debug, Clone, Default)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Strings that end generation; the text is cut before the first one and it is not emitted.
    pub stop: Vec<String>,
    /// Stop (finish_reason length) rather than start a step that would end after this instant.
    pub deadline: Option<Instant>,
    /// Set by the caller to stop at the next token (a streaming client went away).
    pub cancel: Option<Arc<AtomicBool>>,
    /// The caller's estimate of one prompt token's prefill time (measured on earlier requests),
    /// so that no prefill starts when the whole prompt at that rate would end past the deadline,
    /// nor a chunk that would. `None`: no estimate yet; the first chunk always starts.
    pub prefill_per_token: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens`, the context length, or the deadline.
    Length,
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
    /// Whether the deadline (not max_tokens) ended it.
    pub hit_deadline: bool,
    /// Prompt forward pass (time to the first token's logits).
    pub prefill: Duration,
    /// Every later forward pass.
    pub decode: Duration,
}

/// What a generator needs of a vocabulary: each token's bytes and the ids that end generation.
pub struct Detokenizer<'a> {
    pub pieces: &'a [Vec<u8>],
    pub stop_ids: &'a [u32],
}

/// Prompt tokens per prefill pass.
pub const PREFILL_CHUNK: usize = 512;

/// Runs the loop: prefill `prompt` in batches of [`PREFILL_CHUNK`], then one token per step. `on_text` receives
/// every piece of text as soon as it is final (valid UTF-8, and not possibly the start of a stop
/// string); the pieces concatenate to `GenerateOutput::text`.
pub fn generate(
    model: &mut dyn TokenModel,
    vocab: &Detokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    on_text: &mut (dyn FnMut(&str) + Send),
) -> Result<GenerateOutput, EngineError> {
    let mut out = GenerateOutput {
        text: String::new(),
        token_ids: Vec::new(),
        prompt_tokens: prompt.len(),
        finish_reason: FinishReason::Length,
        hit_deadline: false,
        prefill: Duration::ZERO,
        decode: Duration::ZERO,
    };
    if prompt.is_empty() {
        return Err(EngineError::Tokenizer("the prompt has no tokens".into()));
    }
    model.reset(prompt.len().saturating_add(params.max_tokens));
    let mut sampler = Sampler::new(&params.sampling, prompt);
    let mut text = TextStream::new(&params.stop);
    let past_deadline =
        |step: Duration| params.deadline.is_some_and(|d| Instant::now() + step >= d);
    // Not one token of an answer can come before the deadline: the whole prompt, at the
    // measured rate per token (a lower bound: attention grows with the context), would pass it.
    let hopeless = params
        .prefill_per_token
        .is_some_and(|p| past_deadline(p * prompt.len() as u32));
    if params.max_tokens == 0 || past_deadline(Duration::ZERO) || hopeless {
        out.hit_deadline = params.max_tokens > 0;
        return Ok(out);
    }
    // Prefill in batches of PREFILL_CHUNK: each is one pass through the layers (the kernels'
    // batch path), the activations stay bounded, and the deadline is checked between batches,
    // so a long prompt cannot carry a request past it.
    let t = Instant::now();
    let mut logits = Vec::new();
    let mut per_token = params.prefill_per_token.unwrap_or(Duration::ZERO);
    for chunk in prompt.chunks(PREFILL_CHUNK) {
        if past_deadline(per_token * chunk.len() as u32) {
            out.hit_deadline = true;
            out.prefill = t.elapsed();
            return Ok(out);
        }
        let tc = Instant::now();
        logits = model.forward(chunk)?;
        per_token = tc.elapsed() / chunk.len() as u32;
    }
    out.prefill = t.elapsed();
    let mut last_step = Duration::ZERO;
    // Whether a stop string ended generation: then the text after it is dropped; any other end
    // (stop token, max_tokens, deadline) makes the held-back text final.
    let mut stopped_by_string = false;
    loop {
        let id = sampler.sample(&mut logits);
        if vocab.stop_ids.contains(&id) {
            out.finish_reason = FinishReason::Stop;
            break;
        }
        out.token_ids.push(id);
        let piece = vocab.pieces.get(id as usize).map_or(&[][..], Vec::as_slice);
        if text.push(piece, on_text) {
            out.finish_reason = FinishReason::Stop;
            stopped_by_string = true;
            break;
        }
        if out.token_ids.len() >= params.max_tokens {
            break;
        }
        if params
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            break;
        }
        // The next step would likely end past the deadline: stop now with what we have.
        if past_deadline(last_step) {
            out.hit_deadline = true;
            break;
        }
        let t = Instant::now();
        logits = model.forward(&[id])?;
        last_step = t.elapsed();
        out.decode += last_step;
    }
    if !stopped_by_string {
        text.finish(on_text);
    }
    out.text = text.emitted;
    Ok(out)
}

/// Bytes -> text, held back while incomplete UTF-8 or a possible stop-string prefix.
struct TextStream<'a> {
    stop: &'a [String],
    bytes: Vec<u8>,
    /// Decoded text not yet emitted (it may end with the start of a stop string).
    pending: String,
    emitted: String,
}

impl<'a> TextStream<'a> {
    fn new(stop: &'a [String]) -> Self {
        Self {
            stop,
            bytes: Vec::new(),
            pending: String::new(),
            emitted: String::new(),
        }
    }

    /// Adds a token's bytes; emits what is final. Returns true when a stop string appeared
    /// (the text before it is emitted, the rest dropped).
    fn push(&mut self, piece: &[u8], on_text: &mut (dyn FnMut(&str) + Send)) -> bool {
        self.bytes.extend_from_slice(piece);
        // Move the longest valid UTF-8 prefix into `pending`; a byte sequence that can never be
        // valid becomes U+FFFD (as a lossy decode would), an incomplete tail waits for more.
        loop {
            match std::str::from_utf8(&self.bytes) {
                Ok(s) => {
                    self.pending.push_str(s);
                    self.bytes.clear();
                    break;
                }
                Err(e) => {
                    let ok = e.valid_up_to();
                    self.pending
                        .push_str(std::str::from_utf8(&self.bytes[..ok]).expect("valid prefix"));
                    match e.error_len() {
                        Some(bad) => {
                            self.pending.push('\u{FFFD}');
                            self.bytes.drain(..ok + bad);
                        }
                        None => {
                            self.bytes.drain(..ok);
                            break;
                        }
                    }
                }
            }
        }
        // A stop string may straddle emitted and pending text only if we emitted its start,
        // which the hold-back below prevents; so searching `pending` is enough.
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let head = self.pending[..at].to_owned();
            self.emit(&head, on_text);
            self.pending.clear();
            return true;
        }
        let hold = self
            .stop
            .iter()
            .map(|s| longest_suffix_prefix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        if cut > 0 {
            let head: String = self.pending.drain(..cut).collect();
            self.emit(&head, on_text);
        }
        false
    }

    /// End of generation without a stop string: whatever is held back is final.
    fn finish(&mut self, on_text: &mut (dyn FnMut(&str) + Send)) {
        let mut rest = std::mem::take(&mut self.pending);
        rest.push_str(&String::from_utf8_lossy(&self.bytes));
        self.bytes.clear();
        self.emit(&rest, on_text);
    }

    fn emit(&mut self, s: &str, on_text: &mut (dyn FnMut(&str) + Send)) {
        if !s.is_empty() {
            self.emitted.push_str(s);
            on_text(s);
        }
    }
}

/// Length of the longest proper prefix of `stop` that `text` ends with (on a char boundary).
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop.is_char_boundary(n)
                && stop.as_bytes()[..n] == text.as_bytes()[text.len() - n..]
        })
        .unwrap_or(0)
}

/// Token choice with penalties; deterministic for a seed.
struct Sampler {
    p: SamplingParams,
    rng: SplitMix64,
    /// Tokens seen (prompt + output), for the repetition penalty.
    seen: Vec<u32>,
    /// Output token counts, for frequency/presence penalties.
    counts: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    fn new(p: &SamplingParams, prompt: &[u32]) -> Self {
        let mut seen = prompt.to_vec();
        seen.sort_unstable();
        seen.dedup();
        Self {
            p: p.clone(),
            rng: SplitMix64(p.seed),
            seen,
            counts: Default::default(),
        }
    }

    fn sample(&mut self, logits: &mut [f32]) -> u32 {
        if self.p.repetition_penalty != 1.0 {
            for &id in &self.seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / self.p.repetition_penalty
                    } else {
                        *l * self.p.repetition_penalty
                    };
                }
            }
        }
        if self.p.frequency_penalty != 0.0 || self.p.presence_penalty != 0.0 {
            for (&id, &c) in &self.counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= c as f32 * self.p.frequency_penalty + self.p.presence_penalty;
                }
            }
        }
        let id = if self.p.temperature <= 0.0 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        if let Err(i) = self.seen.binary_search(&id) {
            self.seen.insert(i, id);
        }
        *self.counts.entry(id).or_default() += 1;
        id
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        // Shifted by the largest logit before dividing: (l - max) / t is <= 0 for any t > 0, so a
        // tiny temperature gives -inf (probability 0) or 0 (the argmax), never inf - inf = NaN.
        let top = logits
            .iter()
            .copied()
            .filter(|l| l.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
        if top == f32::NEG_INFINITY {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, (l - top) / self.p.temperature))
            .collect();
        // Sorted by logit, ties by id: the order (and so the draw) does not depend on anything
        // but the logits.
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.p.top_k > 0 {
            cand.truncate(self.p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    acc += p;
                    acc >= self.p.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
        let r = self.rng.next_f32();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// Index of the largest logit; the lowest index wins ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// A small, seedable PRNG (SplitMix64): enough for sampling, and reproducible everywhere.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake model (unit test of the loop): logits favour `script[step]`, cycling; counts calls.
    struct FakeScript {
        script: Vec<u32>,
        step: usize,
        vocab: usize,
        forwards: Vec<usize>,
        delay: Duration,
    }

    impl TokenModel for FakeScript {
        fn reset(&mut self, _reach: usize) {
            self.step = 0;
        }
        fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
            std::thread::sleep(self.delay);
            self.forwards.push(tokens.len());
            let mut l = vec![0f32; self.vocab];
            for (i, v) in l.iter_mut().enumerate() {
                *v = (i as f32 * 0.37).sin();
            }
            l[self.script[self.step % self.script.len()] as usize] = 10.0;
            self.step += 1;
            Ok(l)
        }
    }

    fn fake(script: &[u32]) -> FakeScript {
        FakeScript {
            script: script.to_vec(),
            step: 0,
            vocab: 8,
            forwards: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    /// Pieces: 0 "a", 1 "b", 2 " stop", 3 first byte of "é", 4 second byte, 5 "<eos>" (stop id),
    /// 6 "S", 7 "TOP".
    fn pieces() -> Vec<Vec<u8>> {
        vec![
            b"a".to_vec(),
            b"b".to_vec(),
            b" stop".to_vec(),
            vec![0xC3],
            vec![0xA9],
            Vec::new(),
            b"S".to_vec(),
            b"TOP".to_vec(),
        ]
    }

    fn run(m: &mut FakeScript, params: &GenerateParams) -> (GenerateOutput, Vec<String>) {
        let p = pieces();
        let v = Detokenizer {
            pieces: &p,
            stop_ids: &[5],
        };
        let mut chunks = Vec::new();
        let out = generate(m, &v, &[1, 2, 3], params, &mut |s| {
            chunks.push(s.to_owned())
        })
        .unwrap();
        assert_eq!(
            chunks.concat(),
            out.text,
            "streamed pieces concatenate to the text"
        );
        (out, chunks)
    }

    fn params(max_tokens: usize) -> GenerateParams {
        GenerateParams {
            max_tokens,
            ..Default::default()
        }
    }

    #[test]
    fn prefill_is_one_batch_then_one_token_per_step() {
        let mut m = fake(&[0, 1]);
        let (out, _) = run(&mut m, &params(4));
        assert_eq!(out.text, "abab");
        assert_eq!(out.finish_reason, FinishReason::Length);
        assert_eq!(m.forwards, vec![3, 1, 1, 1]);
    }

    #[test]
    fn stop_token_ends_with_stop_and_is_not_emitted() {
        let mut m = fake(&[0, 5, 1]);
        let (out, _) = run(&mut m, &params(10));
        assert_eq!(
            (out.text.as_str(), out.finish_reason),
            ("a", FinishReason::Stop)
        );
    }

    #[test]
    fn stop_strings_are_cut_even_across_tokens() {
        let mut p = params(10);
        p.stop = vec!["STOP".into()];
        let mut m = fake(&[0, 6, 7, 1]);
        let (out, chunks) = run(&mut m, &p);
        assert_eq!(
            (out.text.as_str(), out.finish_reason),
            ("a", FinishReason::Stop)
        );
        assert!(chunks.iter().all(|c| !c.contains('S')), "{chunks:?}");
        // A held-back prefix that does not complete is emitted later.
        let mut m = fake(&[6, 0, 1]);
        let (out, _) = run(&mut m, &p);
        assert_eq!(out.text, "SabSabSabS");
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let mut m = fake(&[3, 4, 0]);
        let (out, chunks) = run(&mut m, &params(6));
        assert_eq!(out.text, "éaéa");
        assert!(chunks.contains(&"é".to_owned()), "{chunks:?}");
        // An incomplete character at the end is replaced, not dropped silently.
        let mut m = fake(&[0, 3]);
        let (out, _) = run(&mut m, &params(2));
        assert_eq!(out.text, "a\u{FFFD}");
    }

    #[test]
    fn seeds_make_sampling_reproducible() {
        let mut p = params(12);
        p.sampling = SamplingParams {
            temperature: 5.0,
            seed: 42,
            ..Default::default()
        };
        let ids = |p: &GenerateParams| run(&mut fake(&[0]), p).0.token_ids;
        assert_eq!(ids(&p), ids(&p));
        let mut q = p.clone();
        q.sampling.seed = 43;
        assert_ne!(ids(&p), ids(&q));
        // top_k 1 is greedy whatever the temperature.
        q.sampling.top_k = 1;
        assert!(ids(&q).iter().all(|&i| i == 0));
    }

    #[test]
    fn penalties_change_the_choice() {
        let mut p = params(3);
        p.sampling.frequency_penalty = 2.0;
        p.sampling.presence_penalty = 2.0;
        // Scripted token 0 gets 10.0; after one use the 4.0 penalty ... twice 8.0: still first.
        let (out, _) = run(&mut fake(&[0]), &p);
        assert_eq!(out.token_ids, vec![0, 0, 0]);
        p.sampling.frequency_penalty = 12.0;
        let (out, _) = run(&mut fake(&[0]), &p);
        assert_eq!(out.token_ids[0], 0);
        assert_ne!(out.token_ids[1], 0);
        let mut p = params(2);
        p.sampling.repetition_penalty = 100.0;
        // Token 1 is in the prompt: its 10.0 logit is divided by 100.
        let (out, _) = run(&mut fake(&[1]), &p);
        assert_ne!(out.token_ids[0], 1);
    }

    #[test]
    fn long_prompts_prefill_in_chunks_and_respect_the_deadline() {
        let mut m = fake(&[0]);
        let prompt: Vec<u32> = (0..PREFILL_CHUNK as u32 * 2 + 3).map(|i| i % 8).collect();
        let p = pieces();
        let v = Detokenizer {
            pieces: &p,
            stop_ids: &[5],
        };
        let out = generate(&mut m, &v, &prompt, &params(2), &mut |_| {}).unwrap();
        assert_eq!(m.forwards, vec![PREFILL_CHUNK, PREFILL_CHUNK, 3, 1]);
        assert_eq!(out.prompt_tokens, prompt.len());
        // A chunk that would end past the deadline is not started: no answer, finish length.
        let mut m = fake(&[0]);
        m.delay = Duration::from_millis(30);
        let mut p2 = params(2);
        p2.deadline = Some(Instant::now() + Duration::from_millis(45));
        let out = generate(&mut m, &v, &prompt, &p2, &mut |_| {}).unwrap();
        assert_eq!(m.forwards.len(), 1, "{:?}", m.forwards);
        assert!(out.hit_deadline && out.token_ids.is_empty());
        assert_eq!(out.finish_reason, FinishReason::Length);
    }

    #[test]
    fn held_back_text_is_kept_when_a_stop_token_ends_generation() {
        // "a", "S" (a possible start of "STOP", held back), then the stop token: "aS" is final.
        let mut p = params(10);
        p.stop = vec!["STOP".into()];
        let (out, _) = run(&mut fake(&[0, 6, 5]), &p);
        assert_eq!(
            (out.text.as_str(), out.finish_reason),
            ("aS", FinishReason::Stop)
        );
        // Same with max_tokens ending it.
        let (out, _) = run(&mut fake(&[0, 6]), &params_stop(2, "STOP"));
        assert_eq!(out.text, "aS");
    }

    fn params_stop(max_tokens: usize, stop: &str) -> GenerateParams {
        GenerateParams {
            max_tokens,
            stop: vec![stop.into()],
            ..Default::default()
        }
    }

    #[test]
    fn tiny_temperatures_pick_the_most_likely_token_not_nan() {
        for t in [1e-38f32, 1e-30, 1e-20, 1e-6] {
            let mut p = params(4);
            p.sampling = SamplingParams {
                temperature: t,
                seed: 7,
                ..Default::default()
            };
            let (out, _) = run(&mut fake(&[1]), &p);
            assert_eq!(out.token_ids, vec![1, 1, 1, 1], "temperature {t}");
        }
    }

    #[test]
    fn prefill_waits_for_an_estimate_that_fits() {
        let mut m = fake(&[0]);
        let prompt: Vec<u32> = (0..100).map(|i| i % 8).collect();
        let p = pieces();
        let v = Detokenizer {
            pieces: &p,
            stop_ids: &[5],
        };
        // 100 tokens at 10 ms each = 1 s, with 200 ms left: not started at all.
        let mut q = params(2);
        q.deadline = Some(Instant::now() + Duration::from_millis(200));
        q.prefill_per_token = Some(Duration::from_millis(10));
        let out = generate(&mut m, &v, &prompt, &q, &mut |_| {}).unwrap();
        assert!(m.forwards.is_empty(), "{:?}", m.forwards);
        assert!(out.hit_deadline && out.token_ids.is_empty());
        // A cheap estimate lets it run.
        q.prefill_per_token = Some(Duration::from_micros(10));
        let out = generate(&mut m, &v, &prompt, &q, &mut |_| {}).unwrap();
        assert_eq!(out.token_ids.len(), 2);
        // A first chunk that fits (512 ms of 800) in a prompt that does not (1,027 ms): nothing
        // starts either, rather than paying to the deadline for no token.
        let mut m = fake(&[0]);
        let long: Vec<u32> = (0..PREFILL_CHUNK as u32 * 2 + 3).map(|i| i % 8).collect();
        q.deadline = Some(Instant::now() + Duration::from_millis(800));
        q.prefill_per_token = Some(Duration::from_millis(1));
        let out = generate(&mut m, &v, &long, &q, &mut |_| {}).unwrap();
        assert!(m.forwards.is_empty(), "{:?}", m.forwards);
        assert!(out.hit_deadline && out.token_ids.is_empty());
    }

    #[test]
    fn deadline_stops_with_length_before_running_out() {
        let mut m = fake(&[0]);
        m.delay = Duration::from_millis(20);
        let mut p = params(1000);
        p.deadline = Some(Instant::now() + Duration::from_millis(150));
        let t = Instant::now();
        let (out, _) = run(&mut m, &p);
        // The last step was predicted to end before the deadline (sleep jitter aside).
        assert!(
            t.elapsed() < Duration::from_millis(175),
            "{:?}",
            t.elapsed()
        );
        assert!(out.hit_deadline);
        assert_eq!(out.finish_reason, FinishReason::Length);
        assert!(
            (2..8).contains(&out.token_ids.len()),
            "{}",
            out.token_ids.len()
        );
    }
}
