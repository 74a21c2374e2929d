//! A tiny ordered JSON tree printed the way QEMU prints JSON: keys in
//! insertion order, four-space indentation, empty containers split over two
//! lines.

/// A JSON value whose objects keep their keys in insertion order.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// An object, keys in output order.
    Object(Vec<(&'static str, Json)>),
    /// An array.
    Array(Vec<Json>),
    /// A string.
    String(String),
    /// A non-negative integer.
    Number(u64),
    /// A boolean.
    Bool(bool),
}

impl Json {
    /// The value pretty-printed as `qemu-img --output json` does, without a
    /// trailing newline.
    pub fn to_pretty(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out
    }

    fn write(&self, out: &mut String, depth: usize) {
        let indent = |out: &mut String, depth: usize| out.push_str(&"    ".repeat(depth));
        match self {
            Json::Object(members) => {
                out.push_str("{\n");
                for (i, (key, value)) in members.iter().enumerate() {
                    indent(out, depth + 1);
                    out.push_str(&quote(key));
                    out.push_str(": ");
                    value.write(out, depth + 1);
                    out.push_str(if i + 1 < members.len() { ",\n" } else { "\n" });
                }
                indent(out, depth);
                out.push('}');
            }
            Json::Array(items) => {
                out.push_str("[\n");
                for (i, item) in items.iter().enumerate() {
                    indent(out, depth + 1);
                    item.write(out, depth + 1);
                    out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
                }
                indent(out, depth);
                out.push(']');
            }
            Json::String(s) => out.push_str(&quote(s)),
            Json::Number(n) => out.push_str(&n.to_string()),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        }
    }
}

/// `s` as a JSON string literal.
fn quote(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_like_qemu() {
        let v = Json::Object(vec![
            ("children", Json::Array(vec![])),
            ("name", Json::String("a\"b".into())),
            (
                "data",
                Json::Object(vec![("n", Json::Number(7)), ("t", Json::Bool(true))]),
            ),
        ]);
        let text = v.to_pretty();
        assert_eq!(
            text,
            "{\n    \"children\": [\n    ],\n    \"name\": \"a\\\"b\",\n    \"data\": {\n        \"n\": 7,\n        \"t\": true\n    }\n}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["data"]["n"], 7);
    }
}
