//! JSON records → [`Sample`]s, shared by the JSONL and WebDataset readers.
//!
//! Three record shapes exist: LLaVA/ShareGPT (`conversations` of `from`/`value`), `messages`
//! (`role`/`content`, content a string or typed parts) and OpenMedReason columns
//! (`question`/`reasoning`/`answer`, also what the parquet reader produces). Parsing only
//! builds the conversation and the image paths the record declares; the caller attaches image
//! bytes (from an image folder, or from tar members), so the same parser serves both readers.

use crate::mcq;
use crate::quarantine::Reason;
use crate::sample::{Content, ImageBytes, Mcq, Message, Origin, Role, Rubric, RubricUnit, Sample};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The placeholder LLaVA and `messages` string content use for an image.
pub(crate) const IMAGE_TOKEN: &str = "<image>";

pub(crate) type Record = Map<String, Value>;

/// A parsed conversation: messages whose image parts refer, in order, to `image_paths` (which
/// may be longer or shorter than the image parts: the caller checks the counts).
pub(crate) struct Conversation {
    pub messages: Vec<Message>,
    pub image_paths: Vec<String>,
}

impl Conversation {
    pub fn placeholders(&self) -> usize {
        self.messages.iter().map(Message::image_count).sum()
    }
}

/// Splits text at `<image>` placeholders into text and image parts. White space that only
/// separates a placeholder from its text (`<image>\nWhat…`) is dropped; text without any
/// placeholder is kept verbatim, since assistant turns are SFT targets.
pub(crate) fn split_placeholders(text: &str) -> Vec<Content> {
    if !text.contains(IMAGE_TOKEN) {
        return vec![Content::Text {
            text: text.to_string(),
        }];
    }
    let pieces: Vec<&str> = text.split(IMAGE_TOKEN).collect();
    let mut out = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 {
            out.push(Content::Image);
        }
        let mut p = *piece;
        if i > 0 {
            p = p.trim_start();
        }
        if i + 1 < pieces.len() {
            p = p.trim_end();
        }
        if !p.is_empty() {
            out.push(Content::Text {
                text: p.to_string(),
            });
        }
    }
    out
}

fn str_field<'a>(v: &'a Value, field: &str) -> Result<&'a str, Reason> {
    match v {
        Value::String(s) => Ok(s),
        Value::Null => Err(Reason::MissingField(field.into())),
        _ => Err(Reason::WrongType {
            field: field.into(),
            expected: "string".into(),
        }),
    }
}

/// `"a.jpg"`, `["a.jpg", "b.jpg"]` or null/absent → list of paths.
fn path_list(record: &Record, field: &str) -> Result<Vec<String>, Reason> {
    match record.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| str_field(v, field).map(str::to_string))
            .collect(),
        Some(_) => Err(Reason::WrongType {
            field: field.into(),
            expected: "string or list of strings".into(),
        }),
    }
}

fn array_field<'a>(record: &'a Record, field: &str) -> Result<&'a Vec<Value>, Reason> {
    match record.get(field) {
        None | Some(Value::Null) => Err(Reason::MissingField(field.into())),
        Some(Value::Array(a)) if a.is_empty() => {
            Err(Reason::BadConversation(format!("`{field}` is empty")))
        }
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(Reason::WrongType {
            field: field.into(),
            expected: "list".into(),
        }),
    }
}

fn check_turns(messages: &[Message]) -> Result<(), Reason> {
    if !messages.iter().any(|m| m.role == Role::Assistant) {
        return Err(Reason::BadConversation("no assistant turn".into()));
    }
    Ok(())
}

/// LLaVA / ShareGPT: `{"image": …, "conversations": [{"from": "human", "value": …}, …]}`.
pub(crate) fn parse_llava(record: &Record) -> Result<Conversation, Reason> {
    let turns = array_field(record, "conversations")?;
    let mut messages = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter().enumerate() {
        let Value::Object(turn) = turn else {
            return Err(Reason::BadConversation(format!(
                "turn {i} is not an object"
            )));
        };
        let from = str_field(
            turn.get("from").unwrap_or(&Value::Null),
            "conversations.from",
        )?;
        let role = match from {
            "human" | "user" => Role::User,
            "gpt" | "assistant" | "model" | "bot" => Role::Assistant,
            "system" => Role::System,
            other => {
                return Err(Reason::BadConversation(format!(
                    "turn {i} has unknown role `{other}`"
                )))
            }
        };
        let value = str_field(
            turn.get("value").unwrap_or(&Value::Null),
            "conversations.value",
        )?;
        messages.push(Message {
            role,
            content: split_placeholders(value),
        });
    }
    check_turns(&messages)?;
    let mut image_paths = path_list(record, "image")?;
    image_paths.extend(path_list(record, "images")?);
    Ok(Conversation {
        messages,
        image_paths,
    })
}

/// `{"messages": [{"role": …, "content": "text <image>" | [{"type": "image"}, {"type": "text",
/// "text": …}]}], "images": [...]}`. A part `{"type": "image", "image": "path"}` names its own
/// file; bare image parts and `<image>` placeholders take the next entry of `images`.
pub(crate) fn parse_messages(record: &Record) -> Result<Conversation, Reason> {
    let turns = array_field(record, "messages")?;
    let listed = path_list(record, "images")?;
    let mut next_listed = listed.iter();
    let mut image_paths = Vec::new();
    let mut messages = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter().enumerate() {
        let Value::Object(turn) = turn else {
            return Err(Reason::BadConversation(format!(
                "message {i} is not an object"
            )));
        };
        let role = match str_field(turn.get("role").unwrap_or(&Value::Null), "messages.role")? {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "system" => Role::System,
            other => {
                return Err(Reason::BadConversation(format!(
                    "message {i} has unknown role `{other}`"
                )))
            }
        };
        let content = match turn.get("content") {
            Some(Value::String(s)) => {
                let parts = split_placeholders(s);
                let n = parts.iter().filter(|c| matches!(c, Content::Image)).count();
                image_paths.extend(next_listed.by_ref().take(n).cloned());
                parts
            }
            Some(Value::Array(parts)) => {
                let mut out = Vec::with_capacity(parts.len());
                for part in parts {
                    let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                    match kind {
                        "text" => {
                            let text = str_field(part.get("text").unwrap_or(&Value::Null), "text")?;
                            out.push(Content::Text {
                                text: text.to_string(),
                            });
                        }
                        "image" => {
                            match part.get("image") {
                                Some(Value::String(p)) => image_paths.push(p.clone()),
                                _ => image_paths.extend(next_listed.next().cloned()),
                            }
                            out.push(Content::Image);
                        }
                        other => {
                            return Err(Reason::BadConversation(format!(
                                "message {i} has a content part of unknown type `{other}`"
                            )))
                        }
                    }
                }
                out
            }
            None | Some(Value::Null) => {
                return Err(Reason::MissingField("messages.content".into()))
            }
            Some(_) => {
                return Err(Reason::WrongType {
                    field: "messages.content".into(),
                    expected: "string or list of parts".into(),
                })
            }
        };
        messages.push(Message { role, content });
    }
    check_turns(&messages)?;
    // Unused `images` entries stay in the list so the count check reports them.
    image_paths.extend(next_listed.cloned());
    Ok(Conversation {
        messages,
        image_paths,
    })
}

fn message_text(m: &Message) -> String {
    let texts: Vec<&str> = m
        .content
        .iter()
        .filter_map(|c| match c {
            Content::Text { text } => Some(text.as_str()),
            Content::Image => None,
        })
        .collect();
    texts.join("\n")
}

/// Recognises a chat record that is really an MCQ: the first user turn has lettered options
/// and the last assistant turn has an `<answer>` naming one of them. Returns the item and the
/// assistant turn as reference trace when it has the full `<think>…<answer>` shape. Anything
/// short of that is plain chat data, not an error.
fn detect_mcq(messages: &[Message]) -> (Option<Mcq>, Option<String>) {
    let user = messages
        .iter()
        .find(|m| m.role == Role::User)
        .map(message_text);
    let assistant = messages
        .iter()
        .rev()
        .find(|m| m.role == Role::Assistant)
        .map(message_text);
    let (Some(question), Some(reply)) = (user, assistant) else {
        return (None, None);
    };
    let trace = mcq::parse_trace(&reply).ok().map(|_| reply.clone());
    let mcq = mcq::answer_tag(&reply)
        .and_then(|letter| mcq::validate_mcq(&question, &letter, trace.as_deref()).ok());
    (mcq, trace)
}

/// Top-level string/number/bool fields other than `skip` → tags.
pub(crate) fn scalar_meta(record: &Record, skip: &[&str]) -> BTreeMap<String, String> {
    let mut meta = BTreeMap::new();
    for (k, v) in record {
        if skip.contains(&k.as_str()) {
            continue;
        }
        let s = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => continue,
        };
        meta.insert(k.clone(), s);
    }
    meta
}

/// Fields of chat records that are not tags.
pub(crate) const CHAT_FIELDS: &[&str] = &["conversations", "messages", "image", "images"];

/// A chat record with its images attached (the caller checked the counts).
pub(crate) fn chat_sample(
    origin: Origin,
    conv: Conversation,
    images: Vec<ImageBytes>,
    record: &Record,
) -> Sample {
    let (mcq, reasoning) = detect_mcq(&conv.messages);
    Sample {
        origin,
        images,
        messages: conv.messages,
        mcq,
        reasoning,
        rubric: None,
        meta: scalar_meta(record, CHAT_FIELDS),
    }
}

/// The text columns of one OpenMedReason row, as read from parquet or JSON. `None` = null.
#[derive(Debug, Default)]
pub(crate) struct OmrText<'a> {
    pub question: Option<&'a str>,
    pub reasoning: Option<&'a str>,
    pub answer: Option<&'a str>,
}

/// Checks the text of an OpenMedReason row: question, trace and answer present, options
/// parse, answer and trace agree. Returns the item and the trace.
pub(crate) fn check_omr(t: &OmrText) -> Result<(Mcq, String), Reason> {
    let question = t
        .question
        .ok_or_else(|| Reason::MissingField("question".into()))?;
    if question.trim().is_empty() {
        return Err(Reason::EmptyField("question".into()));
    }
    let reasoning = t
        .reasoning
        .ok_or_else(|| Reason::MissingField("reasoning".into()))?;
    let answer = t
        .answer
        .ok_or_else(|| Reason::MissingField("answer".into()))?;
    let mcq = mcq::validate_mcq(question, answer, Some(reasoning))?;
    Ok((mcq, reasoning.to_string()))
}

/// An OpenMedReason sample: user `[image, question]`, assistant `[trace verbatim]`.
pub(crate) fn omr_sample(
    origin: Origin,
    image: ImageBytes,
    mcq: Mcq,
    reasoning: String,
    rubric: Option<Rubric>,
    meta: BTreeMap<String, String>,
) -> Sample {
    let user = Message {
        role: Role::User,
        content: vec![
            Content::Image,
            Content::Text {
                text: mcq.question.clone(),
            },
        ],
    };
    let assistant = Message::text(Role::Assistant, reasoning.clone());
    Sample {
        origin,
        images: vec![image],
        messages: vec![user, assistant],
        mcq: Some(mcq),
        reasoning: Some(reasoning),
        rubric,
        meta,
    }
}

/// Rubric axis columns, in `Rubric` field order.
pub(crate) const RUBRIC_AXES: [&str; 3] = ["perception", "knowledge", "rationale"];

/// Rubric lists of an OpenMedReason JSON record; `None` when every list is absent or empty
/// (the train split).
pub(crate) fn json_rubric(record: &Record) -> Result<Option<Rubric>, Reason> {
    let mut axes: [Vec<RubricUnit>; 3] = Default::default();
    for (axis, units) in RUBRIC_AXES.iter().zip(axes.iter_mut()) {
        let items = match record.get(*axis) {
            None | Some(Value::Null) => continue,
            Some(Value::Array(items)) => items,
            Some(_) => {
                return Err(Reason::WrongType {
                    field: (*axis).into(),
                    expected: "list of rubric units".into(),
                })
            }
        };
        for item in items {
            let Value::Object(o) = item else {
                return Err(Reason::WrongType {
                    field: (*axis).into(),
                    expected: "list of objects".into(),
                });
            };
            let get = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            units.push(RubricUnit {
                unit_id: get("unit_id"),
                topic: get("topic"),
                claim: get("claim"),
                source_quote: get("source_quote"),
                importance: get("importance"),
                presence_question: get("presence_question"),
                correctness_question: get("correctness_question"),
            });
        }
    }
    let [perception, knowledge, rationale] = axes;
    let rubric = Rubric {
        perception,
        knowledge,
        rationale,
    };
    Ok(rubric_if_any(rubric))
}

pub(crate) fn rubric_if_any(r: Rubric) -> Option<Rubric> {
    (!(r.perception.is_empty() && r.knowledge.is_empty() && r.rationale.is_empty())).then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(t: &str) -> Content {
        Content::Text { text: t.into() }
    }

    #[test]
    fn placeholders_split() {
        assert_eq!(
            split_placeholders("<image>\nWhat is it?"),
            vec![Content::Image, text("What is it?")]
        );
        assert_eq!(
            split_placeholders("Compare <image> and\n<image>"),
            vec![text("Compare"), Content::Image, text("and"), Content::Image]
        );
        assert_eq!(
            split_placeholders(" verbatim \n"),
            vec![text(" verbatim \n")]
        );
    }

    #[test]
    fn messages_image_order() {
        let r: Value = serde_json::json!({
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "image", "image": "own.png"},
                                             {"type": "text", "text": "q"}]},
                {"role": "assistant", "content": "a"}],
            "images": ["listed.jpg", "extra.jpg"]});
        let c = parse_messages(r.as_object().expect("object")).expect("parses");
        assert_eq!(c.image_paths, ["listed.jpg", "own.png", "extra.jpg"]);
        assert_eq!(c.placeholders(), 2);
    }
}
