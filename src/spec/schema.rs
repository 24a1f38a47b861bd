//! The machine file's JSON Schema: generated from the spec types, committed as
//! `schema/machine.schema.json`, and used at run time to report every type error at once.
//!
//! The schema is draft-07 (the dialect editors' TOML language servers understand best). At run
//! time the file's value is checked with boon and each error is rewritten as a diagnostic in the
//! file's own terms (tables, keys, "did you mean").

use std::sync::OnceLock;

use schemars::generate::SchemaSettings;
use serde_json::Value;

use super::MachineSpec;
use super::source::{Document, escape_token};
use crate::contract::units::{
    BYTE_SIZE_PATTERN, ByteSize, DeviceName, MAC_PATTERN, MacAddr, NAME_PATTERN,
};
use crate::diag::{Diag, Diags};

/// Where the committed schema lives, relative to the repository root.
pub const SCHEMA_PATH: &str = "schema/machine.schema.json";
/// The URL the schema is compiled under at run time. boon checks every schema against the
/// draft-07 metaschema when compiling it (two thirds of `vmm check`'s time) unless the URL is on
/// json-schema.org; the generated schema is the same on every run and a test checks it against
/// the metaschema once (`schema_is_a_valid_draft_07_schema`), so run time skips it.
const SCHEMA_URL: &str = "https://json-schema.org/vmm/machine.schema.json";

/// The schema as a JSON value.
pub fn generate() -> Value {
    let generator = SchemaSettings::draft07().into_generator();
    let schema = generator.into_root_schema_for::<MachineSpec>();
    let mut v = serde_json::to_value(schema).expect("a generated schema is valid JSON");
    drop_null(&mut v);
    v
}

/// TOML has no null: an optional key is one that may be left out. Removes the `null`
/// alternative schemars gives `Option` fields, so editors offer only real values.
fn drop_null(v: &mut Value) {
    let Some(obj) = v.as_object_mut() else {
        if let Some(a) = v.as_array_mut() {
            a.iter_mut().for_each(drop_null);
        }
        return;
    };
    if let Some(Value::Array(types)) = obj.get_mut("type") {
        types.retain(|t| t != "null");
        if types.len() == 1 {
            let t = types[0].clone();
            obj.insert("type".into(), t);
        }
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(alts)) = obj.get_mut(key) {
            alts.retain(|a| {
                a.get("type").is_none_or(|t| t != "null")
                    || a.as_object().is_some_and(|o| o.len() > 1)
            });
            if alts.len() == 1 {
                let only = alts.remove(0);
                obj.remove(key);
                if let Value::Object(o) = only {
                    for (k, val) in o {
                        obj.entry(k).or_insert(val);
                    }
                }
            }
        }
    }
    if obj.get("default") == Some(&Value::Null) {
        obj.remove("default");
    }
    obj.values_mut().for_each(drop_null);
}

/// The schema as the committed file's text: pretty JSON with a final newline.
pub fn render() -> String {
    let mut s = serde_json::to_string_pretty(&generate()).expect("a schema serializes");
    s.push('\n');
    s
}

struct Compiled {
    schemas: boon::Schemas,
    index: boon::SchemaIndex,
    json: Value,
}

fn compile(json: Value, url: &str) -> Result<Compiled, boon::CompileError> {
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler.add_resource(url, json.clone())?;
    let index = compiler.compile(url, &mut schemas)?;
    Ok(Compiled {
        schemas,
        index,
        json,
    })
}

fn compiled() -> &'static Compiled {
    static C: OnceLock<Compiled> = OnceLock::new();
    C.get_or_init(|| compile(generate(), SCHEMA_URL).expect("the generated schema compiles"))
}

/// Checks a parsed machine file against the schema; returns one diagnostic per problem.
pub fn check(doc: &Document, text: &str) -> Diags {
    let c = compiled();
    match c.schemas.validate(&doc.value, c.index) {
        Ok(()) => Vec::new(),
        Err(e) => {
            let mut diags = Vec::new();
            let cx = Cx {
                doc,
                text,
                schema: &c.json,
            };
            cx.walk(&e, &mut diags);
            diags.sort_by_key(|d| d.primary_span().map(|s| s.start));
            diags.dedup();
            diags
        }
    }
}

/// Checks one device of kind `key` (its table, as `vmm device` assembles it from options)
/// against that kind's part of the machine schema: (message, help) per problem.
pub fn check_device(key: &str, value: &Value) -> Vec<(String, Option<String>)> {
    let c = compiled();
    let Some(def) = c.json["properties"][key]["items"]["$ref"].as_str() else {
        return vec![(format!("no schema for `{key}`"), None)];
    };
    let url = format!("{SCHEMA_URL}{def}");
    let compiled = {
        let mut compiler = boon::Compiler::new();
        let mut schemas = boon::Schemas::new();
        compiler
            .add_resource(SCHEMA_URL, c.json.clone())
            .and_then(|()| compiler.compile(&url, &mut schemas))
            .map(|index| (schemas, index))
    };
    let (schemas, index) = match compiled {
        Ok(s) => s,
        Err(e) => return vec![(format!("schema: {e}"), None)],
    };
    let Err(e) = schemas.validate(value, index) else {
        return Vec::new();
    };
    let doc = Document {
        value: value.clone(),
        spans: Default::default(),
    };
    let cx = Cx {
        doc: &doc,
        text: "",
        schema: &c.json,
    };
    let mut diags = Vec::new();
    cx.walk(&e, &mut diags);
    diags.dedup();
    diags.into_iter().map(|d| (d.message, d.help)).collect()
}

struct Cx<'a> {
    doc: &'a Document,
    text: &'a str,
    schema: &'a Value,
}

/// "/net/0/mac" as a person reads it: "net[0].mac".
pub fn display_path(ptr: &str) -> String {
    let mut out = String::new();
    for tok in ptr.split('/').skip(1) {
        let tok = tok.replace("~1", "/").replace("~0", "~");
        if tok.parse::<usize>().is_ok() {
            out.push_str(&format!("[{tok}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&tok);
        }
    }
    out
}

fn pointer(loc: &boon::InstanceLocation<'_>) -> String {
    let mut s = String::new();
    for t in &loc.tokens {
        match t {
            boon::InstanceToken::Prop(p) => s.push_str(&format!("/{}", escape_token(p))),
            boon::InstanceToken::Item(i) => s.push_str(&format!("/{i}")),
        }
    }
    s
}

fn toml_type(t: boon::Type) -> &'static str {
    match t {
        boon::Type::Null => "null",
        boon::Type::Boolean => "a boolean",
        boon::Type::Number => "a number",
        boon::Type::Integer => "an integer",
        boon::Type::String => "a string",
        boon::Type::Array => "an array",
        boon::Type::Object => "a table",
    }
}

fn value_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a float",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a table",
    }
}

/// Keys people write for ones vmm spells differently (a device kind's aliases are its own:
/// [`crate::contract::KindInfo::aliases`]).
const ALIASES: &[(&str, &str)] = &[
    ("mem", "memory"),
    ("ram", "memory"),
    ("cpus", "vcpus"),
    ("cpu", "vcpus"),
    ("bzimage", "kernel"),
    ("vmlinux", "kernel"),
    ("initramfs", "initrd"),
    ("append", "cmdline"),
    ("read_only", "readonly"),
    ("ro", "readonly"),
    ("file", "path"),
    ("image", "path"),
    ("stdout", "stdio"),
    ("terminal", "stdio"),
    ("tty", "stdio"),
    ("null", "none"),
];

/// The allowed key closest to `got`, if it is close enough to be a typo.
pub fn suggest<'k>(got: &str, allowed: &[&'k str]) -> Option<&'k str> {
    let norm = |s: &str| s.to_ascii_lowercase().replace('-', "_");
    let g = norm(got);
    if let Some(k) = allowed.iter().find(|k| norm(k) == g) {
        return Some(k);
    }
    if let Some((_, to)) = ALIASES.iter().find(|(from, _)| *from == g)
        && let Some(k) = allowed.iter().find(|k| *k == to)
    {
        return Some(k);
    }
    if let Some(kind) = crate::devices::DeviceKind::ALL
        .iter()
        .find(|k| k.info().aliases.contains(&g.as_str()))
        && let Some(k) = allowed.iter().find(|k| **k == kind.key())
    {
        return Some(k);
    }
    let limit = if g.len() >= 5 { 2 } else { 1 };
    let mut close: Vec<(usize, &'k str)> = allowed
        .iter()
        .map(|k| (strsim::damerau_levenshtein(&g, &norm(k)), *k))
        .filter(|(d, _)| *d <= limit)
        .collect();
    close.sort();
    match close.as_slice() {
        // Equally close candidates (com5: com1? com4?) are no suggestion.
        [(d, k), rest @ ..] if rest.first().is_none_or(|(d2, _)| d2 > d) => Some(k),
        _ => None,
    }
}

impl Cx<'_> {
    /// The schema node an error's keyword belongs to.
    fn node(&self, schema_url: &str) -> Option<&Value> {
        let frag = schema_url.split_once('#').map_or("", |(_, f)| f);
        let frag = frag.replace("%24", "$");
        let mut p: &str = &frag;
        loop {
            if let Some(v) = self.schema.pointer(p)
                && v.is_object()
            {
                return Some(v);
            }
            p = &p[..p.rfind('/')?];
        }
    }

    fn value_at(&self, ptr: &str) -> Option<&Value> {
        self.doc.value.pointer(ptr)
    }

    /// The first line of the value at `ptr`: a table's header rather than its whole body.
    /// A missing key at the top level points at the start of the file.
    fn head(&self, ptr: &str) -> std::ops::Range<usize> {
        if ptr.is_empty() {
            return 0..0;
        }
        let s = self.doc.spans.value(ptr);
        let body = self.text.get(s.clone()).unwrap_or("");
        s.start..body.find('\n').map_or(s.end, |i| s.start + i)
    }

    fn what(ptr: &str) -> String {
        if ptr.is_empty() {
            "the machine".into()
        } else {
            format!("`{}`", display_path(ptr))
        }
    }

    fn walk(&self, e: &boon::ValidationError<'_, '_>, out: &mut Diags) {
        use boon::ErrorKind as K;
        let ptr = pointer(&e.instance_location);
        match &e.kind {
            K::Group | K::Schema { .. } | K::Reference { .. } | K::AllOf => {
                for c in &e.causes {
                    self.walk(c, out);
                }
            }
            K::AnyOf | K::OneOf(None) => {
                // Descend into the alternative that got furthest, if it got past this value;
                // otherwise say what the alternatives are.
                let depth = |c: &boon::ValidationError<'_, '_>| deepest(c);
                let here = e.instance_location.tokens.len();
                match e.causes.iter().max_by_key(|c| depth(c)) {
                    Some(best) if depth(best) > here => self.walk(best, out),
                    _ => out.push(self.alternatives(e, &ptr)),
                }
            }
            K::OneOf(Some(_)) => out.push(
                Diag::error("vmm::type", format!("{} is ambiguous", Self::what(&ptr)))
                    .label(self.doc.spans.value(&ptr), "matches more than one form"),
            ),
            K::AdditionalProperties { got } => {
                out.extend(got.iter().map(|k| self.unknown_key(e, &ptr, k)))
            }
            K::Required { want } => out.extend(self.missing_keys(e, &ptr, want)),
            K::Type { got, want } => out.push(self.wrong_type(e, &ptr, *got, want)),
            K::Enum { want } => out.push(self.not_in_enum(&ptr, want)),
            K::Pattern { got, want } => {
                let node = self.node(e.schema_url);
                out.push(self.pattern(&ptr, got, want, node))
            }
            K::Minimum { got, want } | K::ExclusiveMinimum { got, want } => out.push(self.simple(
                &ptr,
                "vmm::range",
                format!("must be at least {want}"),
                format!("{got} is too small"),
            )),
            K::Maximum { got, want } | K::ExclusiveMaximum { got, want } => out.push(self.simple(
                &ptr,
                "vmm::range",
                format!("must be at most {want}"),
                format!("{got} is too large"),
            )),
            K::MinLength { want, .. } => out.push(self.simple(
                &ptr,
                "vmm::value",
                format!("must have at least {want} character(s)"),
                "too short".into(),
            )),
            K::MaxLength { got, want } => out.push(self.simple(
                &ptr,
                "vmm::value",
                format!("must have at most {want} characters"),
                format!("{got} characters"),
            )),
            other => out.push(
                Diag::error(
                    "vmm::type",
                    format!("{}: {other}", capital(&Self::what(&ptr))),
                )
                .label(self.doc.spans.value(&ptr), "here"),
            ),
        }
    }

    /// "`x` must …" at the value.
    fn simple(&self, ptr: &str, code: &'static str, must: String, label: String) -> Diag {
        Diag::error(code, format!("{} {must}", capital(&Self::what(ptr))))
            .label(self.doc.spans.value(ptr), label)
    }

    /// `key` is not among the table's properties (the closest one suggested).
    fn unknown_key(&self, e: &boon::ValidationError<'_, '_>, ptr: &str, key: &str) -> Diag {
        let allowed: Vec<&str> = self
            .node(e.schema_url)
            .and_then(|n| n.get("properties"))
            .and_then(Value::as_object)
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let kptr = format!("{ptr}/{}", escape_token(key));
        let d = Diag::error(
            "vmm::unknown-key",
            format!("Unknown key `{key}` in {}", Self::what(ptr)),
        )
        .label(self.doc.spans.key(&kptr), "not a known key");
        match suggest(key, &allowed) {
            Some(s) => d.help(format!("did you mean `{s}`?")),
            None => d.help(format!("known keys: {}", allowed.join(", "))),
        }
    }

    /// Required keys that are missing, except those an unknown key looks like (the unknown key's
    /// "did you mean" is the better report).
    fn missing_keys(
        &self,
        e: &boon::ValidationError<'_, '_>,
        ptr: &str,
        want: &[&str],
    ) -> Vec<Diag> {
        let present: Vec<String> = self
            .value_at(ptr)
            .and_then(Value::as_object)
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        let mut out = Vec::new();
        for &key in want {
            if present
                .iter()
                .any(|u| u != key && suggest(u, &[key]) == Some(key))
            {
                continue;
            }
            let mut d = Diag::error(
                "vmm::missing-key",
                format!(
                    "{} is missing the required key `{key}`",
                    capital(&Self::what(ptr))
                ),
            )
            .label(self.head(ptr), format!("`{key}` is required here"));
            if let Some(desc) = self
                .node(e.schema_url)
                .and_then(|n| n.pointer(&format!("/properties/{}", escape_token(key))))
                .and_then(|p| self.describe(p))
            {
                d = d.help(format!("`{key}`: {desc}"));
            }
            out.push(d);
        }
        out
    }

    fn wrong_type(
        &self,
        e: &boon::ValidationError<'_, '_>,
        ptr: &str,
        got: boon::Type,
        want: &boon::Types,
    ) -> Diag {
        let want: Vec<&str> = want.iter().map(toml_type).collect();
        let got_s = self.value_at(ptr).map(value_type).unwrap_or(toml_type(got));
        let d = Diag::error(
            "vmm::type",
            format!(
                "{} must be {}, not {got_s}",
                capital(&Self::what(ptr)),
                want.join(" or ")
            ),
        )
        .label(self.doc.spans.value(ptr), got_s.to_string());
        match self.node(e.schema_url).and_then(|n| self.example(n)) {
            Some(ex) => d.help(format!("for example: {} = {ex}", last_key(ptr))),
            None => d,
        }
    }

    fn not_in_enum(&self, ptr: &str, want: &[Value]) -> Diag {
        let names: Vec<String> = want.iter().map(|v| v.to_string()).collect();
        let d = Diag::error(
            "vmm::value",
            format!(
                "{} must be one of {}",
                capital(&Self::what(ptr)),
                names.join(", ")
            ),
        )
        .label(self.doc.spans.value(ptr), "not one of them");
        let strs: Vec<&str> = want.iter().filter_map(Value::as_str).collect();
        match self.value_at(ptr) {
            Some(Value::String(s)) => match suggest(s, &strs) {
                Some(sug) => d.help(format!("did you mean \"{sug}\"?")),
                None => d,
            },
            _ => d,
        }
    }

    /// `node` is the schema node that failed; `x-invalid` and `x-help` there word the message.
    fn pattern(&self, ptr: &str, got: &str, want: &str, node: Option<&Value>) -> Diag {
        let what = capital(&Self::what(ptr));
        let span = self.doc.spans.value(ptr);
        let why = if want == BYTE_SIZE_PATTERN {
            got.parse::<ByteSize>()
                .err()
                .unwrap_or_else(|| format!("`{got}` is not a size"))
        } else if want == MAC_PATTERN {
            got.parse::<MacAddr>().err().unwrap_or_default()
        } else if want == NAME_PATTERN {
            got.parse::<DeviceName>().err().unwrap_or_default()
        } else if let Some(why) = node
            .and_then(|n| n.get("x-invalid"))
            .and_then(Value::as_str)
        {
            format!("`{got}` {why}")
        } else {
            format!("`{got}` does not have the expected form ({want})")
        };
        let mut d =
            Diag::error("vmm::value", format!("{what} is invalid: {why}")).label(span, "here");
        if want == BYTE_SIZE_PATTERN {
            d = d.help("write a whole number with an optional unit K, M, G or T, e.g. \"512M\"");
        } else if let Some(help) = node.and_then(|n| n.get("x-help")).and_then(Value::as_str) {
            d = d.help(help.to_string());
        }
        d
    }

    /// "must be "stdio", "none", { file = "…" } or { socket = "…" }".
    fn alternatives(&self, e: &boon::ValidationError<'_, '_>, ptr: &str) -> Diag {
        let forms: Vec<String> = self
            .node(e.schema_url)
            .and_then(|n| n.get("oneOf").or_else(|| n.get("anyOf")))
            .and_then(Value::as_array)
            .map(|alts| alts.iter().flat_map(|a| self.forms(a)).collect())
            .unwrap_or_default();
        let got = self.value_at(ptr).map(value_type).unwrap_or("this");
        let list = match forms.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            Some((last, _)) => last.clone(),
            None => "something else".into(),
        };
        Diag::error(
            "vmm::value",
            format!("{} must be {list}", capital(&Self::what(ptr))),
        )
        .label(
            self.doc.spans.value(ptr),
            format!("{got} that is none of these"),
        )
    }

    /// The ways a schema alternative is written in TOML.
    fn forms(&self, s: &Value) -> Vec<String> {
        let s = self.deref(s);
        if let Some(c) = s.get("const") {
            return vec![c.to_string()];
        }
        if let Some(e) = s.get("enum").and_then(Value::as_array) {
            return e.iter().map(Value::to_string).collect();
        }
        if let Some(req) = s.get("required").and_then(Value::as_array) {
            let keys: Vec<String> = req
                .iter()
                .filter_map(Value::as_str)
                .map(|k| format!("{k} = …"))
                .collect();
            return vec![format!("{{ {} }}", keys.join(", "))];
        }
        let range = match (
            s.get("minimum").and_then(Value::as_i64),
            s.get("maximum").and_then(Value::as_i64),
        ) {
            (Some(lo), Some(hi)) => format!(" from {lo} to {hi}"),
            _ => String::new(),
        };
        vec![match s.get("type").and_then(Value::as_str) {
            Some("integer") => format!("an integer{range}"),
            Some("string") => "a string".into(),
            Some("boolean") => "true or false".into(),
            Some(t) => format!("a {t}"),
            None => "a value".into(),
        }]
    }

    fn deref<'s>(&'s self, s: &'s Value) -> &'s Value {
        match s.get("$ref").and_then(Value::as_str) {
            Some(r) => r
                .strip_prefix('#')
                .and_then(|p| self.schema.pointer(p))
                .unwrap_or(s),
            None => s,
        }
    }

    /// A short description of a property schema, for help text.
    fn describe(&self, s: &Value) -> Option<String> {
        let s2 = self.deref(s);
        let desc = s
            .get("description")
            .or_else(|| s2.get("description"))?
            .as_str()?;
        Some(desc.lines().next().unwrap_or(desc).to_string())
    }

    fn example(&self, s: &Value) -> Option<String> {
        let s = self.deref(s);
        s.get("examples")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .map(|v| v.to_string())
    }
}

fn deepest(e: &boon::ValidationError<'_, '_>) -> usize {
    e.causes
        .iter()
        .map(deepest)
        .max()
        .unwrap_or(0)
        .max(e.instance_location.tokens.len())
}

fn last_key(ptr: &str) -> String {
    ptr.rsplit('/')
        .next()
        .unwrap_or("")
        .replace("~1", "/")
        .replace("~0", "~")
}

fn capital(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some('`') => s.to_string(),
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        let keys = ["name", "memory", "vcpus", "kernel", "net", "block", "pci"];
        assert_eq!(suggest("memroy", &keys), Some("memory"));
        assert_eq!(suggest("nic", &keys), Some("net"));
        assert_eq!(suggest("Memory", &keys), Some("memory"));
        assert_eq!(suggest("vcpu", &keys), Some("vcpus"));
        assert_eq!(suggest("zzzzzz", &keys), None);
        assert_eq!(
            suggest("hotplug-slots", &["hotplug_slots"]),
            Some("hotplug_slots")
        );
    }

    #[test]
    fn paths_read_like_toml() {
        assert_eq!(display_path("/net/0/mac"), "net[0].mac");
        assert_eq!(display_path("/pci/hotplug_slots"), "pci.hotplug_slots");
        assert_eq!(display_path(""), "");
    }

    #[test]
    fn schema_is_a_valid_draft_07_schema() {
        // Under a URL off json-schema.org, boon checks the schema against the metaschema.
        compile(generate(), "https://vmm.invalid/machine.schema.json").unwrap();
    }

    #[test]
    fn schema_compiles_and_has_descriptions() {
        let s = generate();
        assert_eq!(s["$schema"], "http://json-schema.org/draft-07/schema#");
        assert!(s["properties"]["memory"].is_object());
        assert!(s["definitions"]["NetSpec"]["properties"]["tap"]["description"].is_string());
        assert_eq!(s["additionalProperties"], false);
        let _ = compiled();
    }
}
