//! Conversations as the template sees them: HF-style `messages` values.
//!
//! transformers hands a template plain Python dicts: `{"role": "user", "content": [{"type":
//! "image"}, {"type": "text", "text": "…"}]}` (the processor form) or `{"role": …,
//! "content": "…"}` (the text-only form). [`messages_value`] builds exactly those shapes from
//! our [`Message`]s, keys in that insertion order (it matters to `tojson` and `items()`).
//! [`messages_from_json`] parses arbitrary HF messages JSON with its key order kept, for
//! conversations our `Message` type cannot express (tool calls, extra keys).

use crate::sample::{Content, Message};
use minijinja::Value;

/// How message content is presented to the template.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentStyle {
    /// Always a list of parts, as VLM processors pass it (what the Qwen2-VL template reads).
    #[default]
    Parts,
    /// A plain string for messages without images (text parts joined with no separator, the
    /// way a parts-aware template concatenates them); parts only when images are present.
    /// For text-only LLM templates that do `message['content'] + …`.
    StringIfTextOnly,
}

/// One message as an HF-style map value.
pub fn message_value(m: &Message, style: ContentStyle) -> Value {
    let text_only = m.content.iter().all(|c| matches!(c, Content::Text { .. }));
    let content = if style == ContentStyle::StringIfTextOnly && text_only {
        let mut s = String::new();
        for c in &m.content {
            if let Content::Text { text } = c {
                s.push_str(text);
            }
        }
        Value::from(s)
    } else {
        Value::from(m.content.iter().map(part_value).collect::<Vec<_>>())
    };
    Value::from_pairs([("role", Value::from(m.role.as_str())), ("content", content)])
}

fn part_value(c: &Content) -> Value {
    match c {
        Content::Image => Value::from_pairs([("type", Value::from("image"))]),
        Content::Text { text } => Value::from_pairs([
            ("type", Value::from("text")),
            ("text", Value::from(text.as_str())),
        ]),
    }
}

/// The `messages` list for a whole conversation.
pub fn messages_value(messages: &[Message], style: ContentStyle) -> Value {
    Value::from(
        messages
            .iter()
            .map(|m| message_value(m, style))
            .collect::<Vec<_>>(),
    )
}

/// Parses HF messages JSON (a list of message objects) keeping object key order.
pub fn messages_from_json(json: &str) -> Result<Value, serde_json::Error> {
    serde_json::from_str::<Value>(json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::Role;

    #[test]
    fn parts_and_string_forms() {
        let m = Message {
            role: Role::User,
            content: vec![
                Content::Image,
                Content::Text {
                    text: "What?".into(),
                },
            ],
        };
        let v = message_value(&m, ContentStyle::StringIfTextOnly);
        // Images keep the parts form even when strings are asked for.
        // Displayed like Python's str(dict), as a template printing it would show.
        assert_eq!(
            v.to_string(),
            "{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'What?'}]}"
        );
        let t = Message::text(Role::Assistant, "Fine.");
        assert_eq!(
            message_value(&t, ContentStyle::StringIfTextOnly).to_string(),
            "{'role': 'assistant', 'content': 'Fine.'}"
        );
        let parsed = messages_from_json(r#"[{"z": 1, "role": "user", "content": "hi"}]"#).unwrap();
        let first = parsed.get_item(&Value::from(0)).unwrap();
        let keys: Vec<String> = first.try_iter().unwrap().map(|k| k.to_string()).collect();
        assert_eq!(keys, ["z", "role", "content"]);
    }
}
