//! JSON written byte for byte as Python's `json.dumps(obj, indent=2, sort_keys=True)` writes it,
//! which is how transformers writes `config.json` and `model.safetensors.index.json`.
//!
//! serde_json's pretty printer differs in three places that show up in real configs: floats
//! (`1e-06` in Python, `1e-6` in Rust), non-ASCII text (Python escapes it as `\uXXXX`), and key
//! order (serde_json keeps insertion order when its `preserve_order` feature is on anywhere in
//! the build). Identical files keep `diff` between a transformers save and ours quiet.

use serde_json::Value;

/// `json.dumps(value, indent=2, sort_keys=True, ensure_ascii=...)`, without the trailing newline
/// transformers adds. Configs and indexes are written with `ensure_ascii=True` (the default),
/// tokenizer files with `ensure_ascii=False`.
pub fn dumps(value: &Value, ensure_ascii: bool) -> String {
    let mut out = String::new();
    Writer { ensure_ascii }.write(value, 0, &mut out);
    out
}

struct Writer {
    ensure_ascii: bool,
}

impl Writer {
    fn write(&self, value: &Value, depth: usize, out: &mut String) {
        match value {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => out.push_str(&i.to_string()),
                (None, Some(u), _) => out.push_str(&u.to_string()),
                (None, None, Some(f)) => out.push_str(&float(f)),
                _ => out.push_str(&n.to_string()),
            },
            Value::String(s) => self.string(s, out),
            Value::Array(items) if items.is_empty() => out.push_str("[]"),
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline(depth + 1, out);
                    self.write(item, depth + 1, out);
                }
                newline(depth, out);
                out.push(']');
            }
            Value::Object(map) if map.is_empty() => out.push_str("{}"),
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline(depth + 1, out);
                    self.string(k, out);
                    out.push_str(": ");
                    self.write(&map[k], depth + 1, out);
                }
                newline(depth, out);
                out.push('}');
            }
        }
    }

    /// A JSON string; with `ensure_ascii` every character outside ` `..=`~` is `\uXXXX`-escaped.
    fn string(&self, s: &str, out: &mut String) {
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
                c if (c as u32) < 0x20 || self.ensure_ascii && (c as u32) > 0x7e => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

fn newline(depth: usize, out: &mut String) {
    out.push('\n');
    for _ in 0..depth {
        out.push_str("  ");
    }
}

/// Python's `repr(float)`: the shortest round-trip digits, in exponent form below 1e-4 and from
/// 1e16 up (`1e-06`, `1.5e+16`), else positional with at least one decimal (`1000000.0`).
fn float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` gives the same shortest digits Python uses: `d[.ddd]e<exp>`.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if f < 0.0 { "-" } else { "" };
    if !(-4..16).contains(&exp) {
        let (head, tail) = digits.split_at(1);
        let frac = if tail.is_empty() {
            String::new()
        } else {
            format!(".{tail}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{head}{frac}e{esign}{:02}", exp.abs());
    }
    let point = exp + 1; // digits before the decimal point
    if point <= 0 {
        let zeros = "0".repeat((-point) as usize);
        format!("{sign}0.{zeros}{digits}")
    } else if (point as usize) >= digits.len() {
        let zeros = "0".repeat(point as usize - digits.len());
        format!("{sign}{digits}{zeros}.0")
    } else {
        let (int, frac) = digits.split_at(point as usize);
        format!("{sign}{int}.{frac}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn floats_read_like_python_repr() {
        // Expected strings are Python 3.11 `repr(x)`.
        let cases = [
            (1e-6, "1e-06"),
            (1e-5, "1e-05"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (0.02, "0.02"),
            (1000000.0, "1000000.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.25e17, "1.25e+17"),
            (-2.5, "-2.5"),
            (0.1 + 0.2, "0.30000000000000004"),
            (123.456, "123.456"),
            (0.0, "0.0"),
        ];
        for (x, want) in cases {
            assert_eq!(float(x), want, "{x}");
        }
    }

    #[test]
    fn layout_matches_json_dumps() {
        let v = json!({"b": [1, 2.0, "é\n"], "a": {}, "c": [], "d": {"z": null, "y": true}});
        // python3 -c 'import json; print(json.dumps({"b": [1, 2.0, "é\n"], "a": {}, "c": [],
        //   "d": {"z": None, "y": True}}, indent=2, sort_keys=True))'
        let want = "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2.0,\n    \"\\u00e9\\n\"\n  ],\n  \
                    \"c\": [],\n  \"d\": {\n    \"y\": true,\n    \"z\": null\n  }\n}";
        assert_eq!(dumps(&v, true), want);
        assert!(dumps(&v, false).contains("\"é\\n\""));
        assert_eq!(dumps(&json!("😀\u{7f}"), true), "\"\\ud83d\\ude00\\u007f\"");
    }
}
