//! Chat templates: `tokenizer.chat_template` (Jinja) rendered the way Hugging Face's
//! `apply_chat_template` does it: `trim_blocks` + `lstrip_blocks`, variables `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, a `raise_exception(msg)` function, and
//! Python string methods (`.strip()`, `.startswith()`, ...) that templates call.
//!
//! Must not know about requests: it takes role/content pairs the service has validated.

use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;

use super::EngineError;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source`; a template that does not parse is an invalid model.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| EngineError::InvalidModel(format!("tokenizer.chat_template: {e}")))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// Renders the conversation. Errors (the template's `raise_exception`, e.g. "roles must
    /// alternate") are the request's fault: [`EngineError::Template`].
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let tmpl = self
            .env
            .get_template("chat")
            .expect("the template was added in new()");
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| {
            let msg = match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or("rejected").to_owned(),
                _ => e.to_string(),
            };
            EngineError::Template(msg)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_smollm2_like_transformers() {
        let t = ChatTemplate::new(SMOL, "<|im_start|>", "<|im_end|>").unwrap();
        let out = t.render(&[msg("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(&[msg("system", "S"), msg("user", "U")], false)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        );
    }

    #[test]
    fn raise_exception_and_python_methods_work() {
        let src =
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}\
                   {% endif %}{{ bos_token }}{{ messages[0]['content'].strip() }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        assert_eq!(t.render(&[msg("user", "  x  ")], true).unwrap(), "<s>x");
        match t.render(&[msg("assistant", "x")], true) {
            Err(EngineError::Template(m)) => assert_eq!(m, "first must be user"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn blocks_are_trimmed_like_hf() {
        let src = "{% for m in messages %}\n  {{ m.content }}\n{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(
            t.render(&[msg("user", "a"), msg("user", "b")], false)
                .unwrap(),
            "  a\n  b\n"
        );
    }
}
