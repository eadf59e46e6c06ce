//! Reading prompt files: a JSON array of objects or JSON Lines, with a configurable choice of the
//! fields that make the prompt (and, for the reference-answer ablation, the response).
//!
//! ```text
//! alpaca_5000.json     [{"instruction": "...", "input": "...", "output": "..."}, ...]
//! gsm8k_train.jsonl    {"question": "...", "answer": "..."}   one object per line
//! ```
//!
//! A [`FieldSpec`] such as `instruction+input?` joins the listed fields with a blank line; a
//! field marked `?` is optional and left out when it is absent, `null` or empty.

use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Text placed between the fields that make one prompt (Alpaca's instruction and input).
pub const FIELD_SEPARATOR: &str = "\n\n";

/// One field of a [`FieldSpec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptField {
    /// JSON key.
    pub name: String,
    /// Absent, `null` or empty values are skipped instead of rejected.
    pub optional: bool,
}

/// Which fields of a record make the prompt, in order.
///
/// Parsed from `name[?]+name[?]+...` (`instruction+input?`), or from a preset name:
/// `alpaca` (`instruction+input?`) and `gsm8k` (`question`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldSpec {
    pub fields: Vec<PromptField>,
}

impl FieldSpec {
    /// Alpaca: the instruction, then the optional input after a blank line.
    pub fn alpaca() -> Self {
        "instruction+input?".parse().expect("valid preset")
    }

    /// GSM8K: the question.
    pub fn gsm8k() -> Self {
        "question".parse().expect("valid preset")
    }

    /// The reference-answer field of the presets (`output` for Alpaca, `answer` for GSM8K).
    pub fn preset_reference_field(preset: &str) -> Option<&'static str> {
        match preset {
            "alpaca" => Some("output"),
            "gsm8k" => Some("answer"),
            _ => None,
        }
    }

    /// Builds the prompt text of one record.
    ///
    /// `what` names the record in error messages ("record 3 (line 4)").
    fn prompt(
        &self,
        object: &serde_json::Map<String, Value>,
        what: &dyn Fn() -> String,
    ) -> Result<String> {
        let mut parts = Vec::with_capacity(self.fields.len());
        for field in &self.fields {
            match string_field(object, &field.name, what)? {
                Some(text) if !text.trim().is_empty() => parts.push(text),
                _ if field.optional => {}
                Some(_) => {
                    return Err(Error::Data(format!(
                        "{} has an empty field `{}`",
                        what(),
                        field.name
                    )));
                }
                None => {
                    return Err(Error::Data(format!(
                        "{} has no field `{}`",
                        what(),
                        field.name
                    )));
                }
            }
        }
        Ok(parts.join(FIELD_SEPARATOR))
    }
}

impl FromStr for FieldSpec {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self> {
        let spec = match spec {
            "alpaca" => "instruction+input?",
            "gsm8k" => "question",
            other => other,
        };
        let fields = spec
            .split('+')
            .map(|part| {
                let part = part.trim();
                let (name, optional) = match part.strip_suffix('?') {
                    Some(name) => (name, true),
                    None => (part, false),
                };
                if name.is_empty() {
                    return Err(Error::InvalidSettings(format!(
                        "field spec `{spec}` has an empty field name (expected e.g. `instruction+input?`)"
                    )));
                }
                Ok(PromptField {
                    name: name.to_string(),
                    optional,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if fields.iter().all(|f| f.optional) {
            return Err(Error::InvalidSettings(format!(
                "field spec `{spec}` needs at least one required field"
            )));
        }
        Ok(Self { fields })
    }
}

impl std::fmt::Display for FieldSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .fields
            .iter()
            .map(|field| format!("{}{}", field.name, if field.optional { "?" } else { "" }))
            .collect();
        f.write_str(&parts.join("+"))
    }
}

/// One prompt read from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptRecord {
    /// Position of the record in the file (0-based); the key that makes data generation
    /// resumable.
    pub index: usize,
    /// The prompt text (the user message).
    pub text: String,
    /// The dataset's own answer, when a reference field was asked for.
    pub reference: Option<String>,
}

/// Reads every record of a prompt file.
///
/// The format is detected from the first non-blank character: `[` is a JSON array of objects,
/// anything else JSON Lines (one object per non-blank line).
///
/// # Errors
/// - [`Error::Io`] if the file cannot be read;
/// - [`Error::Data`] if it holds no records, a record is not an object, or a required field
///   is missing, empty or not a string, or the reference field is missing or not a string — the message names the field
///   and the record (and its line for JSON Lines);
/// - [`Error::Json`] for malformed JSON, with the line.
pub fn read_prompts(
    path: impl AsRef<Path>,
    spec: &FieldSpec,
    reference_field: Option<&str>,
) -> Result<Vec<PromptRecord>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json_error = |message: String| Error::Json {
        path: path.to_path_buf(),
        message,
    };
    // (record, line number if known)
    let objects: Vec<(Value, Option<usize>)> = if text.trim_start().starts_with('[') {
        let values: Vec<Value> =
            serde_json::from_str(&text).map_err(|e| json_error(e.to_string()))?;
        values.into_iter().map(|v| (v, None)).collect()
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str::<Value>(line)
                    .map(|v| (v, Some(i + 1)))
                    .map_err(|e| json_error(format!("line {}: {e}", i + 1)))
            })
            .collect::<Result<_>>()?
    };
    if objects.is_empty() {
        return Err(Error::Data(format!("{} holds no records", path.display())));
    }
    let mut records = Vec::with_capacity(objects.len());
    for (index, (value, line)) in objects.into_iter().enumerate() {
        let what = || match line {
            Some(line) => format!("{}: record {index} (line {line})", path.display()),
            None => format!("{}: record {index}", path.display()),
        };
        let Value::Object(object) = value else {
            return Err(Error::Data(format!("{} is not a JSON object", what())));
        };
        let text = spec.prompt(&object, &what)?;
        let reference = match reference_field {
            None => None,
            // An empty answer is still an answer (the response is then just the stop token).
            Some(name) => match string_field(&object, name, &what)? {
                Some(answer) => Some(answer),
                None => return Err(Error::Data(format!("{} has no field `{name}`", what()))),
            },
        };
        records.push(PromptRecord {
            index,
            text,
            reference,
        });
    }
    tracing::info!(path = %path.display(), records = records.len(), fields = %spec, "read prompts");
    Ok(records)
}

/// A string field: `None` when absent or `null`, an error when of another type.
fn string_field(
    object: &serde_json::Map<String, Value>,
    name: &str,
    what: &dyn Fn() -> String,
) -> Result<Option<String>> {
    match object.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(Error::Data(format!(
            "{} has a field `{name}` that is not a string: {other}",
            what()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempFile(std::path::PathBuf);
    impl TempFile {
        fn new(name: &str, contents: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("redrafter-prompts-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(name);
            std::fs::write(&path, contents).unwrap();
            Self(path)
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn parses_field_specs_and_presets() {
        let spec: FieldSpec = "instruction+input?".parse().unwrap();
        assert_eq!(spec, FieldSpec::alpaca());
        assert_eq!(spec.to_string(), "instruction+input?");
        assert_eq!("gsm8k".parse::<FieldSpec>().unwrap(), FieldSpec::gsm8k());
        assert!("a+".parse::<FieldSpec>().is_err());
        assert!("a?".parse::<FieldSpec>().is_err());
    }

    #[test]
    fn reads_json_array_joining_optional_fields() {
        let file = TempFile::new(
            "alpaca.json",
            r#"[{"instruction": "Add.", "input": "1 and 2", "output": "3"},
                {"instruction": "Greet.", "input": "", "output": "Hi"},
                {"instruction": "Wave.", "output": "*waves*"}]"#,
        );
        let records = read_prompts(&file.0, &FieldSpec::alpaca(), Some("output")).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[0].text, "Add.\n\n1 and 2");
        assert_eq!(records[1].text, "Greet.");
        assert_eq!(records[2].text, "Wave.");
        assert_eq!(records[2].reference.as_deref(), Some("*waves*"));
        assert_eq!(records[2].index, 2);
    }

    #[test]
    fn reads_jsonl_skipping_blank_lines() {
        let file = TempFile::new(
            "gsm.jsonl",
            "{\"question\": \"1+1?\", \"answer\": \"2\"}\n\n{\"question\": \"2+2?\"}\n",
        );
        let records = read_prompts(&file.0, &FieldSpec::gsm8k(), None).unwrap();
        assert_eq!(
            records.iter().map(|r| r.text.as_str()).collect::<Vec<_>>(),
            ["1+1?", "2+2?"]
        );
        assert_eq!(records[1].index, 1);
        assert_eq!(records[1].reference, None);
    }

    #[test]
    fn missing_field_names_the_field_and_the_line() {
        let file = TempFile::new(
            "missing.jsonl",
            "{\"question\": \"a\"}\n\n{\"prompt\": \"b\"}\n",
        );
        let err = read_prompts(&file.0, &FieldSpec::gsm8k(), None).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, Error::Data(_)), "{err:?}");
        assert!(message.contains("`question`"), "{message}");
        assert!(message.contains("record 1 (line 3)"), "{message}");

        // A missing reference field is reported the same way.
        let file = TempFile::new("noref.json", r#"[{"instruction": "x"}]"#);
        let err = read_prompts(&file.0, &FieldSpec::alpaca(), Some("output")).unwrap_err();
        assert!(err.to_string().contains("no field `output`"), "{err}");
    }

    #[test]
    fn empty_files_are_data_errors() {
        for (name, contents) in [
            ("empty.jsonl", ""),
            ("blank.jsonl", "\n  \n"),
            ("empty.json", " [ ] "),
        ] {
            let file = TempFile::new(name, contents);
            let err = read_prompts(&file.0, &FieldSpec::gsm8k(), None).unwrap_err();
            assert!(
                matches!(&err, Error::Data(m) if m.contains("holds no records")),
                "{name}: {err:?}"
            );
        }
    }

    #[test]
    fn malformed_json_and_wrong_types_are_rejected() {
        let file = TempFile::new("bad.jsonl", "{\"question\": \"a\"}\n{\"question\": \n");
        let err = read_prompts(&file.0, &FieldSpec::gsm8k(), None).unwrap_err();
        assert!(
            matches!(&err, Error::Json { message, .. } if message.starts_with("line 2")),
            "{err:?}"
        );

        let file = TempFile::new("bad.json", "[{\"question\": \"a\"},");
        assert!(matches!(
            read_prompts(&file.0, &FieldSpec::gsm8k(), None),
            Err(Error::Json { .. })
        ));

        let file = TempFile::new("number.jsonl", "{\"question\": 3}\n");
        let err = read_prompts(&file.0, &FieldSpec::gsm8k(), None).unwrap_err();
        assert!(err.to_string().contains("not a string"), "{err}");

        let file = TempFile::new("array.jsonl", "[1, 2]\n");
        // A JSON array of non-objects.
        let err = read_prompts(&file.0, &FieldSpec::gsm8k(), None).unwrap_err();
        assert!(err.to_string().contains("not a JSON object"), "{err}");

        let missing = std::env::temp_dir().join("redrafter-no-such-prompts.jsonl");
        assert!(matches!(
            read_prompts(&missing, &FieldSpec::gsm8k(), None),
            Err(Error::Io { .. })
        ));
    }
}
