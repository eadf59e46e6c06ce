//! Chat templates: the Jinja programs Hugging Face models ship to turn a conversation into a
//! prompt string, rendered with `minijinja`.
//!
//! Transformers renders these with a Jinja2 environment that has `trim_blocks` and
//! `lstrip_blocks` on, the loop-controls extension, a `raise_exception` global and a `tojson`
//! filter that writes Python's `json.dumps` spacing; templates also call Python string and dict
//! methods (`.strip()`, `.startswith()`, `.items()`, ...). [`ChatTemplate`] sets minijinja up the
//! same way so that a template renders byte-for-byte as it does in transformers.

use std::fmt;

use minijinja::value::{Kwargs, Value, ValueKind, from_args};
use minijinja::{Environment, ErrorKind, State};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Name under which the template is stored in its minijinja environment.
const TEMPLATE_NAME: &str = "chat_template";

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (templates may accept others, such as `tool`).
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template.
///
/// The template sees the variables transformers' `apply_chat_template` provides: `messages`,
/// `add_generation_prompt`, and `bos_token` / `eos_token` when they are known.
#[derive(Clone)]
pub struct ChatTemplate {
    source: String,
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_chars", &self.source.chars().count())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles a template; a syntax error gives [`Error::ChatTemplate`].
    pub fn new(source: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.set_unknown_method_callback(python_method);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(template_error)?;
        Ok(Self {
            source,
            env,
            bos_token: None,
            eos_token: None,
        })
    }

    /// Sets the text the template sees as `bos_token`.
    pub fn with_bos_token(mut self, token: Option<String>) -> Self {
        self.bos_token = token;
        self
    }

    /// Sets the text the template sees as `eos_token`.
    pub fn with_eos_token(mut self, token: Option<String>) -> Self {
        self.eos_token = token;
        self
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The `bos_token` the template sees.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The `eos_token` the template sees.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Renders a conversation into a prompt. With `add_generation_prompt` the template appends
    /// the header of an assistant turn (for ChatML, `<|im_start|>assistant\n`).
    ///
    /// Fails with [`Error::ChatTemplate`] when the template raises (`raise_exception`, say for a
    /// role order it does not accept) or evaluates something invalid.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_deref(),
            eos_token => self.eos_token.as_deref(),
        };
        let rendered = template.render(ctx).map_err(template_error)?;
        tracing::trace!(
            messages = messages.len(),
            chars = rendered.len(),
            "chat template rendered"
        );
        Ok(rendered)
    }
}

fn template_error(err: minijinja::Error) -> Error {
    // The minijinja message names the template line; the detail carries raise_exception's text.
    let mut message = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    Error::ChatTemplate(message)
}

/// The `raise_exception(message)` global of transformers' template environment.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `tojson`: `json.dumps(value, ensure_ascii=False, indent=indent)`. minijinja's
/// own filter writes compact JSON with HTML escapes, which would change the prompt.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_python_json(&mut out, value, indent, 0)?;
    Ok(Value::from(out))
}

fn write_python_json(
    out: &mut String,
    value: &Value,
    indent: Option<usize>,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    // Python's separators: ", " and ": " without indent, "," plus a newline with it.
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    let item_separator = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(int) = value.as_i64() {
                out.push_str(&int.to_string());
            } else {
                let float = f64::try_from(value.clone())?;
                out.push_str(&python_float(float));
            }
        }
        ValueKind::String => write_json_string(out, value.as_str().unwrap_or_default()),
        ValueKind::Map => {
            let keys: Vec<Value> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                match key.as_str() {
                    Some(s) => write_json_string(out, s),
                    None => write_json_string(out, &key.to_string()),
                }
                out.push_str(": ");
                write_python_json(out, &value.get_item(key)?, indent, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                write_python_json(out, item, indent, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        _ => write_json_string(out, &value.to_string()),
    }
    Ok(())
}

/// Python's `repr` of a float as `json.dumps` writes it.
fn python_float(x: f64) -> String {
    if x.is_nan() {
        "NaN".to_string()
    } else if x.is_infinite() {
        if x > 0.0 { "Infinity" } else { "-Infinity" }.to_string()
    } else if x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

fn write_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The Python `str` and `dict` methods chat templates call, which minijinja values lack.
fn python_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    match value.kind() {
        ValueKind::String => string_method(value.as_str().unwrap_or_default(), method, args),
        ValueKind::Map => map_method(state, value, method, args),
        _ => Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
    }
}

fn string_method(
    s: &str,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    let trim_set = |chars: Option<&str>| -> Box<dyn Fn(char) -> bool> {
        match chars {
            Some(set) => {
                let set: Vec<char> = set.chars().collect();
                Box::new(move |c| set.contains(&c))
            }
            None => Box::new(char::is_whitespace),
        }
    };
    let value = match method {
        "strip" => {
            let (chars,): (Option<&str>,) = from_args(args)?;
            Value::from(s.trim_matches(&*trim_set(chars)))
        }
        "lstrip" => {
            let (chars,): (Option<&str>,) = from_args(args)?;
            Value::from(s.trim_start_matches(&*trim_set(chars)))
        }
        "rstrip" => {
            let (chars,): (Option<&str>,) = from_args(args)?;
            Value::from(s.trim_end_matches(&*trim_set(chars)))
        }
        "startswith" | "endswith" => {
            let (affix,): (Value,) = from_args(args)?;
            // Python accepts one string or a tuple of them.
            let candidates: Vec<Value> = if affix.kind() == ValueKind::String {
                vec![affix]
            } else {
                affix.try_iter()?.collect()
            };
            let hit = candidates.iter().any(|c| {
                c.as_str().is_some_and(|c| {
                    if method == "startswith" {
                        s.starts_with(c)
                    } else {
                        s.ends_with(c)
                    }
                })
            });
            Value::from(hit)
        }
        "split" => {
            let (sep, maxsplit): (Option<&str>, Option<i64>) = from_args(args)?;
            let limit = maxsplit.filter(|&m| m >= 0).map(|m| m as usize);
            Value::from(python_split(s, sep, limit)?)
        }
        "splitlines" => {
            let (): () = from_args(args)?;
            Value::from(s.lines().map(str::to_string).collect::<Vec<_>>())
        }
        "upper" => Value::from(no_args(args, s.to_uppercase())?),
        "lower" => Value::from(no_args(args, s.to_lowercase())?),
        "title" => Value::from(no_args(args, python_title(s))?),
        "capitalize" => {
            let mut chars = s.chars();
            let capitalized = match chars.next() {
                Some(first) => first
                    .to_uppercase()
                    .chain(chars.flat_map(char::to_lowercase)),
                None => return Ok(Value::from("")),
            };
            Value::from(no_args(args, capitalized.collect::<String>())?)
        }
        "replace" => {
            let (old, new, count): (&str, &str, Option<i64>) = from_args(args)?;
            match count.filter(|&c| c >= 0) {
                Some(count) => Value::from(s.replacen(old, new, count as usize)),
                None => Value::from(s.replace(old, new)),
            }
        }
        "find" => {
            let (needle,): (&str,) = from_args(args)?;
            // Python counts characters, not bytes.
            let index = s.find(needle).map_or(-1, |b| s[..b].chars().count() as i64);
            Value::from(index)
        }
        "count" => {
            let (needle,): (&str,) = from_args(args)?;
            let count = if needle.is_empty() {
                s.chars().count() + 1
            } else {
                s.matches(needle).count()
            };
            Value::from(count)
        }
        "join" => {
            let (items,): (Value,) = from_args(args)?;
            let parts = items
                .try_iter()?
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string())
                })
                .collect::<Vec<_>>();
            Value::from(parts.join(s))
        }
        "isdigit" => Value::from(no_args(
            args,
            !s.is_empty() && s.chars().all(|c| c.is_numeric()),
        )?),
        "isalpha" => Value::from(no_args(
            args,
            !s.is_empty() && s.chars().all(char::is_alphabetic),
        )?),
        "isalnum" => Value::from(no_args(
            args,
            !s.is_empty() && s.chars().all(char::is_alphanumeric),
        )?),
        "isspace" => Value::from(no_args(
            args,
            !s.is_empty() && s.chars().all(char::is_whitespace),
        )?),
        "islower" => Value::from(no_args(
            args,
            s.chars().any(char::is_lowercase) && !s.chars().any(char::is_uppercase),
        )?),
        "isupper" => Value::from(no_args(
            args,
            s.chars().any(char::is_uppercase) && !s.chars().any(char::is_lowercase),
        )?),
        _ => return Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
    };
    Ok(value)
}

fn no_args<T>(args: &[Value], result: T) -> std::result::Result<T, minijinja::Error> {
    let (): () = from_args(args)?;
    Ok(result)
}

/// Python's `str.split`: on a separator, or (without one) on runs of whitespace with empty
/// pieces dropped; at most `limit` splits.
fn python_split(
    s: &str,
    sep: Option<&str>,
    limit: Option<usize>,
) -> std::result::Result<Vec<String>, minijinja::Error> {
    match sep {
        Some("") => Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            "empty separator",
        )),
        Some(sep) => Ok(match limit {
            Some(n) => s.splitn(n + 1, sep).map(str::to_string).collect(),
            None => s.split(sep).map(str::to_string).collect(),
        }),
        None => {
            let mut parts = Vec::new();
            let mut rest = s.trim_start();
            while !rest.is_empty() {
                if limit.is_some_and(|n| parts.len() == n) {
                    parts.push(rest.to_string());
                    break;
                }
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                parts.push(rest[..end].to_string());
                rest = rest[end..].trim_start();
            }
            Ok(parts)
        }
    }
}

/// Python's `str.title`: upper-case a letter that follows a non-letter, lower-case the rest.
fn python_title(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut previous_cased = false;
    for c in s.chars() {
        if previous_cased {
            out.extend(c.to_lowercase());
        } else {
            out.extend(c.to_uppercase());
        }
        previous_cased = c.is_alphabetic();
    }
    out
}

fn map_method(
    state: &State,
    map: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    match method {
        "items" => {
            let (): () = from_args(args)?;
            state.apply_filter("items", std::slice::from_ref(map))
        }
        "keys" => {
            let (): () = from_args(args)?;
            Ok(Value::from(map.try_iter()?.collect::<Vec<_>>()))
        }
        "values" => {
            let (): () = from_args(args)?;
            let values = map
                .try_iter()?
                .map(|key| map.get_item(&key))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(Value::from(values))
        }
        "get" => {
            let (key, default): (Value, Option<Value>) = from_args(args)?;
            let found = map.get_item(&key)?;
            Ok(if found.is_undefined() {
                default.unwrap_or(Value::from(()))
            } else {
                found
            })
        }
        _ => Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn render(source: &str, messages: &[ChatMessage]) -> Result<String> {
        ChatTemplate::new(source)?.render(messages, false)
    }

    #[test]
    fn chatml_adds_default_system_prompt_and_generation_prompt() {
        let template = ChatTemplate::new(CHATML).unwrap();
        let prompt = template.render(&[ChatMessage::user("Hi")], true).unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let prompt = template
            .render(
                &[ChatMessage::system("Be brief."), ChatMessage::user("Hi")],
                false,
            )
            .unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn raise_exception_becomes_chat_template_error() {
        let source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with a user turn') }}{% endif %}ok";
        let err = render(source, &[ChatMessage::assistant("x")]).unwrap_err();
        match err {
            Error::ChatTemplate(message) => {
                assert!(
                    message.contains("Conversation must start with a user turn"),
                    "{message}"
                )
            }
            other => panic!("expected ChatTemplate, got {other:?}"),
        }
        assert_eq!(render(source, &[ChatMessage::user("x")]).unwrap(), "ok");
    }

    #[test]
    fn syntax_error_is_chat_template_error() {
        assert!(matches!(
            ChatTemplate::new("{% for m in messages %}"),
            Err(Error::ChatTemplate(_))
        ));
    }

    #[test]
    fn bos_and_eos_tokens_are_variables() {
        let template = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}",
        )
        .unwrap()
        .with_bos_token(Some("<s>".into()))
        .with_eos_token(Some("</s>".into()));
        let out = template
            .render(
                &[ChatMessage::user("a"), ChatMessage::assistant("b")],
                false,
            )
            .unwrap();
        assert_eq!(out, "<s>a</s>b</s>");
    }

    #[test]
    fn trim_and_lstrip_blocks_match_transformers() {
        // With trim_blocks the newline after a block tag goes; lstrip_blocks drops the indent.
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}";
        let out = render(source, &[ChatMessage::user("a"), ChatMessage::user("b")]).unwrap();
        assert_eq!(out, "[a]\n[b]\n");
    }

    #[test]
    fn python_string_methods() {
        let source = "{{ messages[0].content.strip() }}|{{ messages[0].content.lstrip() }}|\
                      {{ messages[0].content.rstrip(' x') }}|{{ messages[1].content.startswith('<think>') }}|\
                      {{ messages[1].content.endswith(('a', 'done')) }}|\
                      {{ messages[1].content.split('</think>')[-1].strip() }}|{{ 'a  b c'.split() }}|\
                      {{ 'a,b,c'.split(',', 1) }}|{{ 'hello world'.title() }}|{{ 'ABC'.lower() }}|\
                      {{ 'abc'.upper() }}|{{ 'aXbX'.replace('X', '-') }}|{{ '-'.join(['a', 'b']) }}|\
                      {{ 'héllo'.find('l') }}|{{ '42'.isdigit() }}";
        let out = render(
            source,
            &[
                ChatMessage::user("  hi x "),
                ChatMessage::assistant("<think>hmm</think> done"),
            ],
        )
        .unwrap();
        assert_eq!(
            out,
            "hi x|hi x |  hi|True|True|done|[\"a\", \"b\", \"c\"]|[\"a\", \"b,c\"]|Hello World|abc|ABC|a-b-|a-b|2|True"
        );
    }

    #[test]
    fn python_dict_methods() {
        let source = "{% set d = {'b': 1, 'a': 'x'} %}{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}\
                      {{ d.get('a') }}{{ d.get('zz', 'default') }}{{ d.keys() | length }}";
        assert_eq!(render(source, &[]).unwrap(), "a=x;b=1;xdefault2");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let source = "{{ {'name': 'f', 'args': [1, 2.5, true, none, 'q\"é\n']} | tojson }}";
        assert_eq!(
            render(source, &[]).unwrap(),
            r#"{"args": [1, 2.5, true, null, "q\"é\n"], "name": "f"}"#
        );
        let source = "{{ {'a': [1, 2], 'b': {}} | tojson(indent=2) }}";
        assert_eq!(
            render(source, &[]).unwrap(),
            "{\n  \"a\": [\n    1,\n    2\n  ],\n  \"b\": {}\n}"
        );
    }

    #[test]
    fn loop_controls_are_enabled() {
        let source = "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }}{% endfor %}";
        let out = render(source, &[ChatMessage::system("s"), ChatMessage::user("u")]).unwrap();
        assert_eq!(out, "u");
    }

    #[test]
    fn python_split_without_separator_respects_maxsplit() {
        assert_eq!(
            python_split("  a b  c ", None, Some(1)).unwrap(),
            vec!["a", "b  c "]
        );
        assert_eq!(python_split("", None, None).unwrap(), Vec::<String>::new());
        assert_eq!(
            python_split("a,,b", Some(","), None).unwrap(),
            vec!["a", "", "b"]
        );
    }
}
