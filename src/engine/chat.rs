//! Chat templates: `tokenizer.chat_template` (Jinja) rendered the way Hugging Face's
//! `apply_chat_template` does it: `trim_blocks` + `lstrip_blocks`, variables `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, a `raise_exception(msg)` function,
//! `strftime_now(fmt)` (today's date, UTC: Llama 3.x's system header writes it, and transformers
//! and llama.cpp both define it), and Python string methods (`.strip()`, `.startswith()`, ...)
//! that templates call.
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
        env.add_function("strftime_now", |fmt: String| -> String {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            strftime(secs, &fmt)
        });
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

/// The date part of C's `strftime` for `secs` since the epoch (UTC): `%d %e %m %y %Y %b %B %a
/// %A %j %%`; any other `%x` is written as is (templates ask for dates, not times).
fn strftime(secs: i64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = secs.div_euclid(86_400);
    // Howard Hinnant's days_from_civil, inverted.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let before = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334][(month - 1) as usize];
    let yday = before + day + i64::from(leap && month > 2);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('Y') => out.push_str(&year.to_string()),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
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
    fn strftime_formats_dates_like_c() {
        // 2024-07-26 (a Friday) 13:00 UTC; 2000-02-29 (leap day); the epoch.
        assert_eq!(strftime(1_722_000_000, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(
            strftime(1_722_000_000, "%A %B %e, %y (%j) 100%%"),
            "Friday July 26, 24 (208) 100%"
        );
        assert_eq!(
            strftime(951_782_400, "%Y-%m-%d %a %j"),
            "2000-02-29 Tue 060"
        );
        assert_eq!(strftime(0, "%d %b %Y %H"), "01 Jan 1970 %H");
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
