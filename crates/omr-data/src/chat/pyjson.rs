//! `tojson` as transformers defines it: Python's `json.dumps`, not Jinja's HTML-safe filter.
//!
//! transformers 4.57 registers `tojson(x, ensure_ascii=False, indent=None, separators=None,
//! sort_keys=False)` = `json.dumps(...)`. Byte parity needs exactly what Python writes:
//! `", "` / `": "` separators (`","` once an indent is given), floats as `repr(float)`,
//! `NaN`/`Infinity`, only `"`, `\` and control characters escaped (everything outside
//! printable ASCII when `ensure_ascii`, as UTF-16 units), lowercase `\u00xx`, keys in insertion
//! order unless `sort_keys`.

use super::python::python_float_str;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Value};
use std::fmt::Write;

/// Deepest nesting `tojson` follows; guards against self-referencing objects.
const MAX_DEPTH: usize = 128;

/// Largest integer indent honoured.
const MAX_INDENT: i64 = 1024;

/// The `tojson` filter with Python's `json.dumps` signature. Positional arguments follow
/// Python's order (`ensure_ascii, indent, separators`); keywords (`sort_keys` only as a
/// keyword: minijinja filters take at most five arguments) override them.
pub fn tojson(
    value: &Value,
    ensure_ascii: Option<Value>,
    indent: Option<Value>,
    separators: Option<Value>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let pick = |pos: Option<Value>, name: &str| -> Result<Option<Value>, Error> {
        if kwargs.has(name) {
            Ok(Some(kwargs.get::<Value>(name)?))
        } else {
            Ok(pos)
        }
    };
    let ensure_ascii = pick(ensure_ascii, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let sort_keys = pick(None, "sort_keys")?.is_some_and(|v| v.is_true());
    let indent = match pick(indent, "indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.kind() {
            // Python: `" " * indent` (negative gives ""), or the string itself. The cap keeps a
            // hostile template from allocating gigabytes; real templates indent by 2 or 4.
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            ValueKind::Number if v.is_integer() => {
                Some(" ".repeat(v.as_i64().unwrap_or(0).clamp(0, MAX_INDENT) as usize))
            }
            _ => return Err(bad_arg("indent must be an integer or a string")),
        },
    };
    let (item_sep, key_sep) = match pick(separators, "separators")? {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => (
                    a.as_str().unwrap_or_default().to_string(),
                    b.as_str().unwrap_or_default().to_string(),
                ),
                _ => return Err(bad_arg("separators must be a pair of strings")),
            }
        }
        // json.dumps: `(", ", ": ")`, or `(",", ": ")` once an indent is given.
        _ => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
    };
    kwargs.assert_all_used()?;
    let opts = JsonOptions {
        ensure_ascii,
        sort_keys,
        indent,
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    // A plain (not "safe") string, exactly as the Python filter returns it.
    Ok(Value::from(out))
}

/// `json.dumps(value, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii)` for a
/// serde value, the way transformers writes `config.json` and `model.safetensors.index.json`
/// (indent 2, sorted keys) and tokenizer files. Fails only on nesting deeper than 128 levels.
pub fn dumps(
    value: &serde_json::Value,
    indent: usize,
    sort_keys: bool,
    ensure_ascii: bool,
) -> Result<String, Error> {
    let opts = JsonOptions {
        ensure_ascii,
        sort_keys,
        indent: Some(" ".repeat(indent)),
        item_sep: ",".into(),
        key_sep: ": ".into(),
    };
    let mut out = String::new();
    write_json(
        &mut out,
        &Value::from(minijinja::value::Serde(value)),
        &opts,
        0,
    )?;
    Ok(out)
}

fn bad_arg(msg: &str) -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("tojson: {msg}"))
}

struct JsonOptions {
    ensure_ascii: bool,
    sort_keys: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
}

fn newline_indent(out: &mut String, opts: &JsonOptions, depth: usize) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(ind);
        }
    }
}

fn write_json(out: &mut String, v: &Value, opts: &JsonOptions, depth: usize) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(bad_arg("value nests too deeply"));
    }
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(out, v)?,
        ValueKind::String => write_string(out, v.as_str().unwrap_or_default(), opts.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(out, opts, depth + 1);
                write_json(out, item, opts, depth + 1)?;
            }
            newline_indent(out, opts, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in v.try_iter()? {
                let item = v.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(out, opts, depth + 1);
                write_string(out, key, opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                write_json(out, item, opts, depth + 1)?;
            }
            newline_indent(out, opts, depth);
            out.push('}');
        }
        other => {
            // Python raises `TypeError: Object of type Undefined is not JSON serializable`.
            return Err(bad_arg(&format!(
                "a value of kind {other} is not JSON serializable"
            )));
        }
    }
    Ok(())
}

/// Dict keys the way `json.dumps` coerces them: strings as they are, numbers, booleans and
/// None to their JSON spelling.
fn json_key(key: &Value) -> Result<String, Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::None => Ok("null".into()),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.into()),
        ValueKind::Number => {
            let mut s = String::new();
            write_number(&mut s, key)?;
            Ok(s)
        }
        other => Err(bad_arg(&format!(
            "keys must be str, int, float, bool or None, not {other}"
        ))),
    }
}

fn write_number(out: &mut String, v: &Value) -> Result<(), Error> {
    if v.is_integer() {
        // i128 covers every integer minijinja can hold.
        let n = i128::try_from(v.clone())?;
        let _ = write!(out, "{n}");
    } else {
        let f = f64::try_from(v.clone())?;
        out.push_str(&float_json(f));
    }
    Ok(())
}

fn float_json(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        }
    } else {
        python_float_str(f)
    }
}

/// A JSON string literal as Python's encoder writes it.
fn write_string(out: &mut String, s: &str, ensure_ascii: bool) {
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
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            // ensure_ascii escapes everything outside ' '..='~' (DEL included), as UTF-16.
            c if ensure_ascii && !(' '..='~').contains(&c) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dumps(v: serde_json::Value, kwargs: &[(&str, Value)]) -> String {
        let value = Value::from(minijinja::value::Serde(v));
        let kw = Kwargs::from_iter(kwargs.iter().map(|(k, v)| (k.to_string(), v.clone())));
        tojson(&value, None, None, None, kw).unwrap().to_string()
    }

    #[test]
    fn matches_python_json_dumps() {
        // Expected strings are Python 3.11 json.dumps with the same arguments.
        let v = serde_json::json!({"a": [1, 2.0, "é\u{7f}\u{1}"], "b": {}, "c": []});
        assert_eq!(
            dumps(v.clone(), &[]),
            "{\"a\": [1, 2.0, \"é\u{7f}\\u0001\"], \"b\": {}, \"c\": []}"
        );
        assert_eq!(
            dumps(v.clone(), &[("indent", Value::from(1))]),
            "{\n \"a\": [\n  1,\n  2.0,\n  \"é\u{7f}\\u0001\"\n ],\n \"b\": {},\n \"c\": []\n}"
        );
        assert_eq!(
            dumps(
                v,
                &[
                    ("ensure_ascii", Value::from(true)),
                    ("separators", Value::from(vec![",", ":"]))
                ]
            ),
            r#"{"a":[1,2.0,"\u00e9\u007f\u0001"],"b":{},"c":[]}"#
        );
        assert_eq!(
            dumps(
                serde_json::json!("🙂"),
                &[("ensure_ascii", Value::from(true))]
            ),
            r#""\ud83d\ude42""#
        );
    }

    #[test]
    fn dumps_matches_python_for_configs() {
        let v = serde_json::json!({"b": [1, 2.0, "é\n"], "a": {}, "c": [], "d": {"z": null, "y": true}});
        // python3 -c 'import json; print(json.dumps({"b": [1, 2.0, "é\n"], "a": {}, "c": [],
        //   "d": {"z": None, "y": True}}, indent=2, sort_keys=True))'
        let want = "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2.0,\n    \"\\u00e9\\n\"\n  ],\n  \
                    \"c\": [],\n  \"d\": {\n    \"y\": true,\n    \"z\": null\n  }\n}";
        assert_eq!(super::dumps(&v, 2, true, true).unwrap(), want);
        assert!(super::dumps(&v, 2, true, false)
            .unwrap()
            .contains("\"é\\n\""));
        assert_eq!(
            super::dumps(&serde_json::json!("😀\u{7f}"), 2, true, true).unwrap(),
            "\"\\ud83d\\ude00\\u007f\""
        );
        // Python 3.11 `repr(x)` of the floats configs hold.
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
            assert_eq!(
                super::dumps(&serde_json::json!(x), 2, true, true).unwrap(),
                want,
                "{x}"
            );
        }
    }
}
