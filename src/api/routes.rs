//! The API's paths, spelled once: the service routes on them, the event adapters pick them
//! (a direct invoke's route is told by its fields), `serve` lists them, jobs take them as
//! endpoints (`jobs::JOB_ENDPOINTS`), tests/template_rest.rs checks the REST API's paths. Paths
//! only: which method each takes and what it answers is the service's table (`service::ROUTES`).

/// `POST`: embeddings of one input or a batch.
pub const EMBEDDINGS: &str = "/v1/embeddings";
/// `POST`: rerank documents against a query with a cross-encoder (Cohere/Jina-style answer).
pub const RERANK: &str = "/v1/rerank";
/// `POST`: the same as text-embeddings-inference's `/rerank` (its request fields and answer).
pub const TEI_RERANK: &str = "/rerank";
/// `POST`: a chat completion, streamed as server-sent events when asked and the door can.
pub const CHAT_COMPLETIONS: &str = "/v1/chat/completions";
/// `POST`: a text completion (same generation loop as chat, no template).
pub const COMPLETIONS: &str = "/v1/completions";
/// `GET`: the served model as a list; `MODELS/{model}` the one model.
pub const MODELS: &str = "/v1/models";
/// `GET`: model, digest, state and init time.
pub const HEALTH: &str = "/health";
/// `GET`: the OpenAPI document of this API.
pub const OPENAPI: &str = "/openapi.json";
/// `POST`: submit an asynchronous job; `JOBS/{id}` (`GET`) its status and result.
pub const JOBS: &str = "/v1/jobs";
