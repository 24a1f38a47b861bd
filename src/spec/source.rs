//! Parsing a machine file's text (TOML or JSON) into a plain JSON value plus the source span of
//! every key and value, indexed by JSON pointer ("/net/0/mac").
//!
//! Both formats go through the same value, so the schema check, the typed spec and every
//! diagnostic work the same way whatever the user wrote.

use std::collections::HashMap;
use std::ops::Range;

use serde_json::{Map, Number, Value};
use toml::de::{DeTable, DeValue};

use crate::diag::{Diag, Diags};

/// The text format of a machine file, chosen by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Toml,
    Json,
}

impl Format {
    /// `.json` files are JSON; everything else is TOML.
    pub fn of_path(path: &std::path::Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("json") => Format::Json,
            _ => Format::Toml,
        }
    }
}

/// Where a value (and the key naming it, if any) sits in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpan {
    pub key: Option<Range<usize>>,
    pub value: Range<usize>,
}

/// Spans of all nodes of a document, by JSON pointer.
#[derive(Debug, Clone, Default)]
pub struct Spans {
    nodes: HashMap<String, NodeSpan>,
    len: usize,
}

impl Spans {
    pub fn get(&self, pointer: &str) -> Option<&NodeSpan> {
        self.nodes.get(pointer)
    }

    /// The span of the value at `pointer`, or of the nearest ancestor that exists (a missing key
    /// points at the table that should hold it).
    pub fn value(&self, pointer: &str) -> Range<usize> {
        let mut p = pointer;
        loop {
            if let Some(n) = self.nodes.get(p) {
                return n.value.clone();
            }
            match p.rfind('/') {
                Some(i) => p = &p[..i],
                None => return 0..0,
            }
        }
    }

    /// The span of the key naming the value at `pointer`, else of the value.
    pub fn key(&self, pointer: &str) -> Range<usize> {
        match self.nodes.get(pointer) {
            Some(NodeSpan { key: Some(k), .. }) => k.clone(),
            _ => self.value(pointer),
        }
    }

    /// A whole `key = value` entry, for labels that mean the setting as a whole.
    pub fn entry(&self, pointer: &str) -> Range<usize> {
        match self.nodes.get(pointer) {
            Some(NodeSpan {
                key: Some(k),
                value,
            }) if k.start <= value.start => k.start..value.end,
            _ => self.value(pointer),
        }
    }

    /// Length of the document, for spans at its end.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn insert(&mut self, pointer: String, key: Option<Range<usize>>, value: Range<usize>) {
        self.nodes.insert(pointer, NodeSpan { key, value });
    }
}

/// Escapes one JSON-pointer token (RFC 6901).
pub fn escape_token(t: &str) -> String {
    t.replace('~', "~0").replace('/', "~1")
}

/// A parsed document: the value and its spans.
#[derive(Debug, Clone)]
pub struct Document {
    pub value: Value,
    pub spans: Spans,
}

/// Parses `text`; on syntax errors returns every one the parser could recover from.
pub fn parse(text: &str, format: Format) -> Result<Document, Diags> {
    match format {
        Format::Toml => parse_toml(text),
        Format::Json => parse_json(text),
    }
}

fn parse_toml(text: &str) -> Result<Document, Diags> {
    let (table, errors) = DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        let mut errors = errors;
        errors.sort_by_key(|e| e.span().map_or(0, |s| s.start));
        return Err(errors
            .iter()
            .map(|e| {
                let span = e.span().unwrap_or(0..0);
                let msg = e.message().trim().to_string();
                let msg = capitalise(msg.lines().next().unwrap_or("invalid TOML"));
                Diag::error("vmm::syntax", format!("TOML syntax: {msg}")).label(span, "here")
            })
            .collect());
    }
    let mut spans = Spans {
        len: text.len(),
        ..Spans::default()
    };
    let mut diags = Vec::new();
    let value = toml_table(table.get_ref(), String::new(), &mut spans, &mut diags);
    spans.insert(String::new(), None, table.span());
    if diags.is_empty() {
        Ok(Document { value, spans })
    } else {
        Err(diags)
    }
}

fn toml_table(t: &DeTable<'_>, at: String, spans: &mut Spans, diags: &mut Diags) -> Value {
    let mut map = Map::new();
    for (k, v) in t.iter() {
        let ptr = format!("{at}/{}", escape_token(k.get_ref()));
        let value = toml_value(v.get_ref(), v.span(), ptr.clone(), spans, diags);
        spans.insert(ptr, Some(k.span()), v.span());
        map.insert(k.get_ref().to_string(), value);
    }
    Value::Object(map)
}

fn toml_value(
    v: &DeValue<'_>,
    span: Range<usize>,
    at: String,
    spans: &mut Spans,
    diags: &mut Diags,
) -> Value {
    match v {
        DeValue::String(s) => Value::String(s.to_string()),
        DeValue::Integer(i) => {
            let digits = i.as_str();
            if let Ok(n) = i64::from_str_radix(digits, i.radix()) {
                Value::Number(n.into())
            } else if let Ok(n) = u64::from_str_radix(digits, i.radix()) {
                Value::Number(n.into())
            } else {
                diags.push(
                    Diag::error("vmm::syntax", "Integer out of range").label(span, "too large"),
                );
                Value::Null
            }
        }
        DeValue::Float(f) => match f.as_str().parse::<f64>().ok().and_then(Number::from_f64) {
            Some(n) => Value::Number(n),
            None => Value::String(f.as_str().to_string()),
        },
        DeValue::Boolean(b) => Value::Bool(*b),
        DeValue::Datetime(d) => Value::String(d.to_string()),
        DeValue::Array(a) => Value::Array(
            a.iter()
                .enumerate()
                .map(|(i, e)| {
                    let ptr = format!("{at}/{i}");
                    let value = toml_value(e.get_ref(), e.span(), ptr.clone(), spans, diags);
                    spans.insert(ptr, None, e.span());
                    value
                })
                .collect(),
        ),
        DeValue::Table(t) => toml_table(t, at, spans, diags),
    }
}

fn parse_json(text: &str) -> Result<Document, Diags> {
    use jsonc_parser::{CollectOptions, ParseOptions, parse_to_ast};
    let strict = ParseOptions {
        allow_comments: false,
        allow_loose_object_property_names: false,
        allow_trailing_commas: false,
        allow_missing_commas: false,
        allow_single_quoted_strings: false,
        allow_hexadecimal_numbers: false,
        allow_unary_plus_numbers: false,
        ..ParseOptions::default()
    };
    let parsed = parse_to_ast(text, &CollectOptions::default(), &strict).map_err(|e| {
        let r = e.range();
        let msg = capitalise(&e.kind().to_string());
        vec![
            Diag::error("vmm::syntax", format!("JSON syntax: {msg}")).label(r.start..r.end, "here"),
        ]
    })?;
    let Some(root) = parsed.value else {
        return Err(vec![
            Diag::error("vmm::syntax", "JSON syntax: the file is empty").label(0..0, ""),
        ]);
    };
    let mut spans = Spans {
        len: text.len(),
        ..Spans::default()
    };
    let mut diags = Vec::new();
    let value = json_value(&root, String::new(), &mut spans, &mut diags);
    let r = json_range(&root);
    spans.insert(String::new(), None, r);
    if diags.is_empty() {
        Ok(Document { value, spans })
    } else {
        Err(diags)
    }
}

fn json_range(v: &jsonc_parser::ast::Value<'_>) -> Range<usize> {
    use jsonc_parser::ast::Value as J;
    let r = match v {
        J::StringLit(s) => s.range,
        J::NumberLit(n) => n.range,
        J::BooleanLit(b) => b.range,
        J::Object(o) => o.range,
        J::Array(a) => a.range,
        J::NullKeyword(n) => n.range,
    };
    r.start..r.end
}

fn json_value(
    v: &jsonc_parser::ast::Value<'_>,
    at: String,
    spans: &mut Spans,
    diags: &mut Diags,
) -> Value {
    use jsonc_parser::ast::{ObjectPropName, Value as J};
    match v {
        J::StringLit(s) => Value::String(s.value.to_string()),
        J::NumberLit(n) => {
            let s = n.value;
            if let Ok(i) = s.parse::<i64>() {
                Value::Number(i.into())
            } else if let Ok(u) = s.parse::<u64>() {
                Value::Number(u.into())
            } else if let Some(f) = s.parse::<f64>().ok().and_then(Number::from_f64) {
                Value::Number(f)
            } else {
                diags.push(
                    Diag::error("vmm::syntax", "Number out of range")
                        .label(n.range.start..n.range.end, "here"),
                );
                Value::Null
            }
        }
        J::BooleanLit(b) => Value::Bool(b.value),
        J::NullKeyword(_) => Value::Null,
        J::Array(a) => Value::Array(
            a.elements
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let ptr = format!("{at}/{i}");
                    let value = json_value(e, ptr.clone(), spans, diags);
                    spans.insert(ptr, None, json_range(e));
                    value
                })
                .collect(),
        ),
        J::Object(o) => {
            let mut map = Map::new();
            let mut seen: HashMap<String, Range<usize>> = HashMap::new();
            for p in &o.properties {
                let (name, krange) = match &p.name {
                    ObjectPropName::String(s) => (s.value.to_string(), s.range),
                    ObjectPropName::Word(w) => (w.value.to_string(), w.range),
                };
                let kspan = krange.start..krange.end;
                if let Some(first) = seen.get(&name) {
                    diags.push(
                        Diag::error(
                            "vmm::syntax",
                            format!("JSON syntax: duplicate key `{name}`"),
                        )
                        .label(kspan, "duplicate key")
                        .label(first.clone(), "first defined here"),
                    );
                    continue;
                }
                seen.insert(name.clone(), kspan.clone());
                let ptr = format!("{at}/{}", escape_token(&name));
                let value = json_value(&p.value, ptr.clone(), spans, diags);
                spans.insert(ptr, Some(kspan), json_range(&p.value));
                map.insert(name, value);
            }
            Value::Object(map)
        }
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_spans_point_at_keys_and_values() {
        let text = "name = \"x\"\n[[net]]\nname = \"eth0\"\nmac = \"52:54:00:00:00:01\"\n";
        let d = parse(text, Format::Toml).unwrap();
        assert_eq!(d.value["net"][0]["name"], "eth0");
        let mac = d.spans.get("/net/0/mac").unwrap();
        assert_eq!(&text[mac.key.clone().unwrap()], "mac");
        assert_eq!(&text[mac.value.clone()], "\"52:54:00:00:00:01\"");
        // A missing key falls back to its table.
        assert_eq!(d.spans.value("/net/0/tap"), d.spans.value("/net/0"));
    }

    #[test]
    fn json_spans_and_duplicate_keys() {
        let text = "{\"name\": \"x\", \"net\": [{\"name\": \"eth0\"}]}";
        let d = parse(text, Format::Json).unwrap();
        let n = d.spans.get("/net/0/name").unwrap();
        assert_eq!(&text[n.value.clone()], "\"eth0\"");
        let errs = parse("{\"a\": 1, \"a\": 2}", Format::Json).unwrap_err();
        assert!(errs[0].message.contains("duplicate key `a`"));
        assert_eq!(errs[0].labels.len(), 2);
    }

    #[test]
    fn syntax_errors_are_all_reported() {
        let errs = parse("a = \nb = ]\nc = 1\n", Format::Toml).unwrap_err();
        assert!(errs.len() >= 2, "{errs:?}");
        assert!(errs.iter().all(|e| e.code == "vmm::syntax"));
        assert!(parse("{\"a\": 1,}", Format::Json).is_err());
        assert!(parse("{\"a\": 1} // c", Format::Json).is_err());
    }

    #[test]
    fn pointer_tokens_are_escaped() {
        let d = parse("\"a/b\" = 1\n", Format::Toml).unwrap();
        assert!(d.spans.get("/a~1b").is_some());
    }
}
