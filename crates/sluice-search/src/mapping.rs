//! Index mappings (Elasticsearch's field types) and the translation of a JSON document
//! into what tantivy indexes.
//!
//! Every document is indexed into two JSON fields: `_kw` (exact values: keywords, numbers,
//! booleans, dates as epoch milliseconds; fast, so it sorts and aggregates) and `_text`
//! (analyzed `text` fields, with positions for phrases). `_fields` lists the paths a
//! document has, like Elasticsearch's `_field_names`, for `exists`. Objects of a `nested`
//! field become child documents of their own, so a `nested` query matches one object.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::error::{EsError, EsResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Keyword,
    Text,
    Long,
    Integer,
    Short,
    Byte,
    Double,
    Float,
    Boolean,
    Date,
    Object,
    Nested,
}

impl Kind {
    fn parse(name: &str) -> Option<Kind> {
        Some(match name {
            "keyword" => Kind::Keyword,
            "text" => Kind::Text,
            "long" => Kind::Long,
            "integer" => Kind::Integer,
            "short" => Kind::Short,
            "byte" => Kind::Byte,
            "double" => Kind::Double,
            "float" | "half_float" | "scaled_float" => Kind::Float,
            "boolean" => Kind::Boolean,
            "date" => Kind::Date,
            "object" => Kind::Object,
            "nested" => Kind::Nested,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Kind::Keyword => "keyword",
            Kind::Text => "text",
            Kind::Long => "long",
            Kind::Integer => "integer",
            Kind::Short => "short",
            Kind::Byte => "byte",
            Kind::Double => "double",
            Kind::Float => "float",
            Kind::Boolean => "boolean",
            Kind::Date => "date",
            Kind::Object => "object",
            Kind::Nested => "nested",
        }
    }
    pub fn is_integer(self) -> bool {
        matches!(self, Kind::Long | Kind::Integer | Kind::Short | Kind::Byte)
    }
    pub fn is_numeric(self) -> bool {
        self.is_integer() || matches!(self, Kind::Double | Kind::Float | Kind::Date)
    }
    fn has_properties(self) -> bool {
        matches!(self, Kind::Object | Kind::Nested)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Field {
    pub kind: Kind,
    /// Sub-fields of an object or nested field.
    pub properties: BTreeMap<String, Field>,
    /// Multi-fields (`"fields": {"keyword": {"type": "keyword"}}`).
    pub fields: BTreeMap<String, Field>,
}

impl Field {
    fn leaf(kind: Kind) -> Field {
        Field { kind, properties: BTreeMap::new(), fields: BTreeMap::new() }
    }
    fn object(kind: Kind) -> Field {
        Field::leaf(kind)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dynamic {
    True,
    False,
    Strict,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Mapping {
    pub properties: BTreeMap<String, Field>,
    pub dynamic: Dynamic,
}

impl Default for Mapping {
    fn default() -> Self {
        Mapping { properties: BTreeMap::new(), dynamic: Dynamic::True }
    }
}

/// Parameters accepted on a field and ignored (they change nothing observable here).
const IGNORED_PARAMS: &[&str] = &[
    "index",
    "doc_values",
    "store",
    "format",
    "analyzer",
    "search_analyzer",
    "ignore_above",
    "norms",
    "coerce",
    "scaling_factor",
    "similarity",
    "null_value",
    "enabled",
    "include_in_parent",
    "include_in_root",
];

fn parse_dynamic(v: &Value) -> EsResult<Dynamic> {
    match v {
        Value::Bool(true) => Ok(Dynamic::True),
        Value::Bool(false) => Ok(Dynamic::False),
        Value::String(s) if s == "true" => Ok(Dynamic::True),
        Value::String(s) if s == "false" => Ok(Dynamic::False),
        Value::String(s) if s == "strict" => Ok(Dynamic::Strict),
        other => Err(EsError::mapper(format!("Could not convert [dynamic] to boolean or [strict]: [{other}]"))),
    }
}

fn parse_properties(props: &Value, at: &str) -> EsResult<BTreeMap<String, Field>> {
    let Value::Object(props) = props else {
        return Err(EsError::mapper(format!("[properties] of [{at}] must be an object")));
    };
    let mut out = BTreeMap::new();
    for (name, def) in props {
        if name.is_empty() {
            return Err(EsError::mapper("field name cannot be empty"));
        }
        let path = if at.is_empty() { name.clone() } else { format!("{at}.{name}") };
        out.insert(name.clone(), parse_field(def, &path)?);
    }
    Ok(out)
}

fn parse_field(def: &Value, path: &str) -> EsResult<Field> {
    let Value::Object(def) = def else {
        return Err(EsError::mapper(format!("Expected map for property [fields] on field [{path}] but got a {def}")));
    };
    let kind = match def.get("type") {
        Some(Value::String(t)) => {
            Kind::parse(t).ok_or_else(|| EsError::mapper(format!("No handler for type [{t}] declared on field [{path}]")))?
        }
        Some(other) => return Err(EsError::mapper(format!("type of field [{path}] must be a string, got {other}"))),
        None if def.contains_key("properties") => Kind::Object,
        None => return Err(EsError::mapper(format!("No type specified for field [{path}]"))),
    };
    let mut field = Field::leaf(kind);
    for (key, value) in def {
        match key.as_str() {
            "type" => {}
            "properties" if kind.has_properties() => field.properties = parse_properties(value, path)?,
            "dynamic" if kind.has_properties() => {
                parse_dynamic(value)?;
            }
            "fields" if !kind.has_properties() => {
                let Value::Object(subs) = value else {
                    return Err(EsError::mapper(format!("[fields] of [{path}] must be an object")));
                };
                for (sub, sub_def) in subs {
                    let f = parse_field(sub_def, &format!("{path}.{sub}"))?;
                    if f.kind.has_properties() {
                        return Err(EsError::mapper(format!("Type [{}] cannot be used in multi field [{path}.{sub}]", f.kind.name())));
                    }
                    field.fields.insert(sub.clone(), f);
                }
            }
            k if IGNORED_PARAMS.contains(&k) => {}
            k => {
                return Err(EsError::mapper(format!("unknown parameter [{k}] on mapper [{path}] of type [{}]", kind.name())));
            }
        }
    }
    Ok(field)
}

impl Mapping {
    /// Parses the `mappings` object of an index creation or `_mapping` request.
    pub fn parse(v: &Value) -> EsResult<Mapping> {
        let Value::Object(obj) = v else {
            return Err(EsError::mapper("[mappings] must be an object"));
        };
        let mut m = Mapping::default();
        for (key, value) in obj {
            match key.as_str() {
                "properties" => m.properties = parse_properties(value, "")?,
                "dynamic" => m.dynamic = parse_dynamic(value)?,
                "_source" | "_meta" | "date_detection" | "numeric_detection" | "dynamic_templates" => {}
                "_doc" => return Err(EsError::illegal("mapping types are removed: put the mapping under [mappings] without [_doc]")),
                k => return Err(EsError::mapper(format!("Root mapping definition has unsupported parameters: [{k}]"))),
            }
        }
        Ok(m)
    }

    pub fn to_json(&self) -> Value {
        fn field_json(f: &Field) -> Value {
            let mut o = Map::new();
            if f.kind != Kind::Object {
                o.insert("type".into(), json!(f.kind.name()));
            }
            if !f.properties.is_empty() {
                o.insert("properties".into(), props_json(&f.properties));
            }
            if !f.fields.is_empty() {
                o.insert("fields".into(), props_json(&f.fields));
            }
            Value::Object(o)
        }
        fn props_json(p: &BTreeMap<String, Field>) -> Value {
            Value::Object(p.iter().map(|(k, f)| (k.clone(), field_json(f))).collect())
        }
        let mut o = Map::new();
        if self.dynamic != Dynamic::True {
            o.insert("dynamic".into(), json!(if self.dynamic == Dynamic::Strict { "strict" } else { "false" }));
        }
        if !self.properties.is_empty() {
            o.insert("properties".into(), props_json(&self.properties));
        }
        Value::Object(o)
    }

    /// Adds the fields of `other`; changing a field's type is refused, as Elasticsearch does.
    pub fn merge(&mut self, other: &Mapping) -> EsResult<()> {
        fn merge_props(into: &mut BTreeMap<String, Field>, from: &BTreeMap<String, Field>, at: &str) -> EsResult<()> {
            for (name, f) in from {
                let path = if at.is_empty() { name.clone() } else { format!("{at}.{name}") };
                match into.get_mut(name) {
                    None => {
                        into.insert(name.clone(), f.clone());
                    }
                    Some(existing) if existing.kind != f.kind => {
                        return Err(EsError::illegal(format!(
                            "mapper [{path}] cannot be changed from type [{}] to [{}]",
                            existing.kind.name(),
                            f.kind.name()
                        )));
                    }
                    Some(existing) => {
                        merge_props(&mut existing.properties, &f.properties, &path)?;
                        merge_props(&mut existing.fields, &f.fields, &path)?;
                    }
                }
            }
            Ok(())
        }
        merge_props(&mut self.properties, &other.properties, "")?;
        self.dynamic = other.dynamic;
        Ok(())
    }

    /// The field at a dotted path (multi-fields included), and the nested field it sits in.
    pub fn resolve(&self, path: &str) -> Option<Resolved<'_>> {
        let mut props = &self.properties;
        let mut nested: Option<String> = None;
        let mut at = String::new();
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let field = props.get(part)?;
            if !at.is_empty() {
                at.push('.');
            }
            at.push_str(part);
            if parts.peek().is_none() {
                return Some(Resolved { field, nested });
            }
            if field.kind.has_properties() {
                if field.kind == Kind::Nested {
                    nested = Some(at.clone());
                }
                props = &field.properties;
            } else {
                // A multi-field: `name.keyword`.
                let sub = parts.next()?;
                if parts.peek().is_some() {
                    return None;
                }
                return field.fields.get(sub).map(|field| Resolved { field, nested });
            }
        }
        None
    }

    /// Translates a document for indexing, adding unmapped fields when `dynamic` is true.
    /// Returns whether the mapping changed.
    /// What `source` becomes in the index, and whether it added fields to the mapping. A
    /// refused document leaves the mapping as it was: one that needs a new field is
    /// indexed on a copy, which becomes the mapping only if the document is accepted;
    /// the others (most, in a steady index) need no copy.
    pub fn index_doc(&mut self, id: &str, source: &Value) -> EsResult<(Indexed, bool)> {
        if let Some(out) = self.index_fixed(id, source)? {
            return Ok((out, false));
        }
        let mut grown = self.clone();
        let mut changed = false;
        let out = grown.index_with(id, source, true, &mut changed)?;
        *self = grown;
        Ok((out, changed))
    }

    /// What `source` becomes under the mapping as it is, which this leaves unchanged;
    /// `None` when the document needs a field the mapping does not have yet.
    fn index_fixed(&mut self, id: &str, source: &Value) -> EsResult<Option<Indexed>> {
        let mut needs_field = false;
        match self.index_with(id, source, false, &mut needs_field) {
            Ok(out) => Ok(Some(out)),
            Err(_) if needs_field => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn index_with(&mut self, id: &str, source: &Value, grow: bool, changed: &mut bool) -> EsResult<Indexed> {
        let Value::Object(obj) = source else {
            return Err(EsError::mapper(format!("failed to parse document [{id}]: the source must be a JSON object")));
        };
        let mut out = Indexed::default();
        let mut ctx = Ctx { id, dynamic: self.dynamic, grow, changed, nested_children: &mut out.children };
        let mut fields = Vec::new();
        index_object(&mut ctx, &mut self.properties, obj, "", &mut out.kw, &mut out.text, &mut fields)?;
        out.fields = fields;
        Ok(out)
    }
}

pub struct Resolved<'a> {
    pub field: &'a Field,
    /// The path of the `nested` field this field is inside, if any.
    pub nested: Option<String>,
}

/// What one document becomes in tantivy.
#[derive(Default, Debug)]
pub struct Indexed {
    pub kw: Map<String, Value>,
    pub text: Map<String, Value>,
    pub fields: Vec<String>,
    pub children: Vec<Child>,
}

/// One object of a nested field, indexed as a document of its own.
#[derive(Debug)]
pub struct Child {
    pub path: String,
    pub kw: Map<String, Value>,
    pub text: Map<String, Value>,
    pub fields: Vec<String>,
}

struct Ctx<'a> {
    id: &'a str,
    dynamic: Dynamic,
    /// Whether new fields may be added; when not, meeting one sets `changed` and stops.
    grow: bool,
    changed: &'a mut bool,
    nested_children: &'a mut Vec<Child>,
}

fn infer(value: &Value) -> Option<Field> {
    Some(match value {
        Value::Null => return None,
        Value::Bool(_) => Field::leaf(Kind::Boolean),
        Value::Number(n) if n.is_f64() => Field::leaf(Kind::Float),
        Value::Number(_) => Field::leaf(Kind::Long),
        Value::String(_) => {
            let mut f = Field::leaf(Kind::Text);
            f.fields.insert("keyword".into(), Field::leaf(Kind::Keyword));
            f
        }
        Value::Object(_) => Field::object(Kind::Object),
        Value::Array(items) => return items.iter().find_map(infer),
    })
}

fn join(at: &str, name: &str) -> String {
    if at.is_empty() { name.to_owned() } else { format!("{at}.{name}") }
}

#[allow(clippy::too_many_arguments)]
fn index_object(
    ctx: &mut Ctx<'_>,
    props: &mut BTreeMap<String, Field>,
    obj: &Map<String, Value>,
    at: &str,
    kw: &mut Map<String, Value>,
    text: &mut Map<String, Value>,
    fields: &mut Vec<String>,
) -> EsResult<()> {
    for (name, value) in obj {
        if value.is_null() {
            continue;
        }
        let path = join(at, name);
        if !props.contains_key(name) {
            match ctx.dynamic {
                Dynamic::Strict => {
                    return Err(EsError::new(
                        axum::http::StatusCode::BAD_REQUEST,
                        "strict_dynamic_mapping_exception",
                        format!(
                            "mapping set to strict, dynamic introduction of [{name}] within [{}] is not allowed",
                            if at.is_empty() { "_doc" } else { at }
                        ),
                    ));
                }
                Dynamic::False => continue,
                Dynamic::True => match infer(value) {
                    Some(_) if !ctx.grow => {
                        *ctx.changed = true;
                        return Err(EsError::mapper(format!("[{path}] is not mapped yet")));
                    }
                    Some(f) => {
                        props.insert(name.clone(), f);
                        *ctx.changed = true;
                    }
                    None => continue,
                },
            }
        }
        let field = props.get_mut(name).expect("inserted above");
        index_value(ctx, field, value, &path, name, kw, text, fields)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn index_value(
    ctx: &mut Ctx<'_>,
    field: &mut Field,
    value: &Value,
    path: &str,
    name: &str,
    kw: &mut Map<String, Value>,
    text: &mut Map<String, Value>,
    fields: &mut Vec<String>,
) -> EsResult<()> {
    match field.kind {
        Kind::Object => {
            let items: Vec<&Value> = match value {
                Value::Array(items) => items.iter().collect(),
                v => vec![v],
            };
            let sub_kw = kw.entry(name.to_owned()).or_insert_with(|| Value::Object(Map::new()));
            let sub_text = text.entry(name.to_owned()).or_insert_with(|| Value::Object(Map::new()));
            let (Value::Object(sub_kw), Value::Object(sub_text)) = (sub_kw, sub_text) else { unreachable!() };
            for item in items {
                match item {
                    Value::Null => {}
                    Value::Object(o) => {
                        // Arrays of objects are flattened into multi-valued leaves (object semantics).
                        let mut k = Map::new();
                        let mut t = Map::new();
                        index_object(ctx, &mut field.properties, o, path, &mut k, &mut t, fields)?;
                        merge_multi(sub_kw, k);
                        merge_multi(sub_text, t);
                    }
                    _ => {
                        return Err(EsError::mapper(format!(
                            "object mapping for [{path}] tried to parse field [{path}] as object, but found a concrete value"
                        )));
                    }
                }
            }
            if !fields.iter().any(|f| f == path) {
                fields.push(path.to_owned());
            }
        }
        Kind::Nested => {
            let items: Vec<&Value> = match value {
                Value::Array(items) => items.iter().collect(),
                v => vec![v],
            };
            for item in items {
                match item {
                    Value::Null => {}
                    Value::Object(o) => {
                        let mut k = Map::new();
                        let mut t = Map::new();
                        let mut f = Vec::new();
                        index_object(ctx, &mut field.properties, o, path, &mut k, &mut t, &mut f)?;
                        f.push(path.to_owned());
                        ctx.nested_children.push(Child { path: path.to_owned(), kw: nest(path, k), text: nest(path, t), fields: f });
                    }
                    _ => {
                        return Err(EsError::mapper(format!(
                            "object mapping for [{path}] tried to parse field [{path}] as object, but found a concrete value"
                        )));
                    }
                }
            }
            fields.push(path.to_owned());
        }
        kind => {
            let mut kw_vals = Vec::new();
            let mut text_vals = Vec::new();
            let items: Vec<&Value> = match value {
                Value::Array(items) => items.iter().collect(),
                v => vec![v],
            };
            for item in items {
                if item.is_null() {
                    continue;
                }
                if kind == Kind::Text {
                    text_vals.push(Value::String(as_text(item).ok_or_else(|| parse_failure(ctx.id, path, kind, item))?));
                } else {
                    kw_vals.push(coerce(kind, item).ok_or_else(|| parse_failure(ctx.id, path, kind, item))?);
                }
                for (sub_name, sub) in &field.fields {
                    let v = if sub.kind == Kind::Text {
                        Value::String(as_text(item).ok_or_else(|| parse_failure(ctx.id, path, sub.kind, item))?)
                    } else {
                        coerce(sub.kind, item).ok_or_else(|| parse_failure(ctx.id, path, sub.kind, item))?
                    };
                    let (target, key) = if sub.kind == Kind::Text { (&mut *text, sub_name) } else { (&mut *kw, sub_name) };
                    // A dotted key: the JSON fields expand dots, so `name` may stay a leaf.
                    push_multi(target, &format!("{name}.{key}"), v);
                    let sub_path = format!("{path}.{sub_name}");
                    if !fields.contains(&sub_path) {
                        fields.push(sub_path);
                    }
                }
            }
            if !kw_vals.is_empty() || !text_vals.is_empty() {
                for v in kw_vals {
                    push_multi(kw, name, v);
                }
                for v in text_vals {
                    push_multi(text, name, v);
                }
                if !fields.iter().any(|f| f == path) {
                    fields.push(path.to_owned());
                }
            }
        }
    }
    Ok(())
}

fn nest(path: &str, leaf: Map<String, Value>) -> Map<String, Value> {
    let mut v = Value::Object(leaf);
    for part in path.rsplit('.') {
        let mut m = Map::new();
        m.insert(part.to_owned(), v);
        v = Value::Object(m);
    }
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

fn push_multi(into: &mut Map<String, Value>, key: &str, v: Value) {
    match into.get_mut(key) {
        None => {
            into.insert(key.to_owned(), v);
        }
        Some(Value::Array(a)) => a.push(v),
        Some(existing) => {
            let prev = existing.take();
            *existing = Value::Array(vec![prev, v]);
        }
    }
}

fn merge_multi(into: &mut Map<String, Value>, from: Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Object(a)), Value::Object(b)) => merge_multi(a, b),
            (_, Value::Array(items)) => {
                for item in items {
                    push_multi(into, &k, item);
                }
            }
            (_, v) => push_multi(into, &k, v),
        }
    }
}

fn parse_failure(id: &str, path: &str, kind: Kind, value: &Value) -> EsError {
    let mut preview = value.to_string();
    if preview.len() > 40 {
        let mut cut = 40;
        while !preview.is_char_boundary(cut) {
            cut -= 1;
        }
        preview.truncate(cut);
    }
    EsError::new(
        axum::http::StatusCode::BAD_REQUEST,
        "document_parsing_exception",
        format!(
            "failed to parse field [{path}] of type [{}] in document with id '{id}'. Preview of field's value: '{preview}'",
            kind.name()
        ),
    )
}

fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A value as `_kw` holds it for a field kind (`None`: not a value of that kind).
pub fn coerce(kind: Kind, v: &Value) -> Option<Value> {
    match kind {
        Kind::Keyword => as_text(v).map(Value::String),
        Kind::Text => as_text(v).map(|s| Value::String(s.to_lowercase())),
        Kind::Long | Kind::Integer | Kind::Short | Kind::Byte => {
            let n: i64 = match v {
                Value::Number(n) => match n.as_i64() {
                    Some(i) => i,
                    None => {
                        let f = n.as_f64()?;
                        if !f.is_finite() || f.abs() >= 9.2e18 {
                            return None;
                        }
                        f.trunc() as i64
                    }
                },
                Value::String(s) => {
                    let s = s.trim();
                    s.parse::<i64>()
                        .ok()
                        .or_else(|| s.parse::<f64>().ok().filter(|f| f.is_finite() && f.abs() < 9.2e18).map(|f| f.trunc() as i64))?
                }
                _ => return None,
            };
            let ok = match kind {
                Kind::Integer => i32::try_from(n).is_ok(),
                Kind::Short => i16::try_from(n).is_ok(),
                Kind::Byte => i8::try_from(n).is_ok(),
                _ => true,
            };
            ok.then(|| json!(n))
        }
        Kind::Double | Kind::Float => {
            let f = match v {
                Value::Number(n) => n.as_f64()?,
                Value::String(s) => s.trim().parse::<f64>().ok()?,
                _ => return None,
            };
            f.is_finite().then(|| json!(f))
        }
        Kind::Boolean => match v {
            Value::Bool(b) => Some(json!(b)),
            Value::String(s) if s == "true" => Some(json!(true)),
            Value::String(s) if s == "false" || s.is_empty() => Some(json!(false)),
            _ => None,
        },
        Kind::Date => match v {
            Value::Number(n) => n.as_i64().map(|i| json!(i)),
            Value::String(s) => parse_date_millis(s).map(|i| json!(i)),
            _ => None,
        },
        Kind::Object | Kind::Nested => None,
    }
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `strict_date_optional_time||epoch_millis`: `2024-05-01`, `2024-05-01T10:00:00Z`,
/// fractions, offsets (`+02:00`, `+0200`, `+02`), a space instead of `T`, or epoch millis.
pub fn parse_date_millis(s: &str) -> Option<i64> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'-') && !s[1..].contains('-') {
        return s.parse().ok();
    }
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes().all(|c| c.is_ascii_digit()).then(|| part.parse().ok())?
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let mut millis = days_from_civil(y, mo, d) * 86_400_000;
    let mut i = 10;
    if i < b.len() && (b[i] == b'T' || b[i] == b' ') {
        let (h, mi) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
        if b.get(i + 3) != Some(&b':') {
            return None;
        }
        let mut sec = 0;
        i += 6;
        if b.get(i) == Some(&b':') {
            sec = num(i + 1..i + 3)?;
            i += 3;
        }
        if h > 23 || mi > 59 || sec > 60 {
            return None;
        }
        millis += ((h * 60 + mi) * 60 + sec) * 1000;
        if b.get(i) == Some(&b'.') || b.get(i) == Some(&b',') {
            i += 1;
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            let frac = &s[start..i];
            if frac.is_empty() {
                return None;
            }
            let ms: String = frac.chars().chain("000".chars()).take(3).collect();
            millis += ms.parse::<i64>().ok()?;
        }
        match b.get(i) {
            None => {}
            Some(b'Z' | b'z') if i + 1 == b.len() => {}
            Some(&sign @ (b'+' | b'-')) => {
                let rest = &s[i + 1..];
                let digits: String = rest.chars().filter(|c| *c != ':').collect();
                if digits.len() != 2 && digits.len() != 4 || !digits.bytes().all(|c| c.is_ascii_digit()) {
                    return None;
                }
                let oh: i64 = digits[0..2].parse().ok()?;
                let om: i64 = if digits.len() == 4 { digits[2..4].parse().ok()? } else { 0 };
                let off = (oh * 60 + om) * 60_000;
                millis += if sign == b'+' { -off } else { off };
            }
            _ => return None,
        }
    } else if i != b.len() {
        return None;
    }
    Some(millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(parse_date_millis("1970-01-01"), Some(0));
        assert_eq!(parse_date_millis("1970-01-02T00:00:01Z"), Some(86_401_000));
        assert_eq!(parse_date_millis("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_date_millis("1970-01-01 00:00:00.25+00"), Some(250));
        assert_eq!(parse_date_millis("2024-02-29T12:00:00"), Some(1_709_208_000_000));
        assert_eq!(parse_date_millis("1709208000000"), Some(1_709_208_000_000));
        assert_eq!(parse_date_millis("yesterday"), None);
        assert_eq!(parse_date_millis("2024-13-01"), None);
    }

    #[test]
    fn mapping_round_trip_and_errors() {
        let m = Mapping::parse(&json!({"properties": {
            "name": {"type": "text", "fields": {"keyword": {"type": "keyword"}}},
            "n": {"type": "long"},
            "org": {"properties": {"id": {"type": "keyword"}}},
            "configs": {"type": "nested", "properties": {"agg": {"type": "keyword"}}}
        }}))
        .unwrap();
        assert_eq!(Mapping::parse(&m.to_json()).unwrap(), m);
        assert!(m.resolve("name.keyword").is_some_and(|r| r.field.kind == Kind::Keyword));
        assert!(m.resolve("configs.agg").is_some_and(|r| r.nested.as_deref() == Some("configs")));
        assert!(m.resolve("org.id").is_some_and(|r| r.field.kind == Kind::Keyword && r.nested.is_none()));
        let e = Mapping::parse(&json!({"properties": {"x": {"type": "strng"}}})).unwrap_err();
        assert_eq!(e.kind, "mapper_parsing_exception");
        assert!(e.reason.contains("No handler for type [strng] declared on field [x]"), "{}", e.reason);
        let e = Mapping::parse(&json!({"properties": {"x": {"type": "long", "bogus": 1}}})).unwrap_err();
        assert!(e.reason.contains("unknown parameter [bogus]"), "{}", e.reason);
        let mut m2 = m.clone();
        let e = m2.merge(&Mapping::parse(&json!({"properties": {"n": {"type": "keyword"}}})).unwrap()).unwrap_err();
        assert!(e.reason.contains("cannot be changed from type [long] to [keyword]"));
    }

    #[test]
    fn documents() {
        let mut m = Mapping::parse(&json!({"properties": {
            "n": {"type": "integer"},
            "configs": {"type": "nested", "properties": {"agg": {"type": "keyword"}}}
        }}))
        .unwrap();
        let (ix, changed) = m.index_doc("1", &json!({"n": "7", "title": "Hello", "configs": [{"agg": "sum"}, {"agg": "avg"}]})).unwrap();
        assert!(changed);
        assert_eq!(ix.kw["n"], json!(7));
        assert_eq!(ix.text["title"], json!("Hello"));
        assert_eq!(ix.children.len(), 2);
        assert_eq!(ix.children[1].kw, json!({"configs": {"agg": "avg"}}).as_object().unwrap().clone());
        assert!(m.resolve("title.keyword").is_some());
        let e = m.index_doc("2", &json!({"n": "abc"})).unwrap_err();
        assert!(e.reason.contains("failed to parse field [n] of type [integer] in document with id '2'"), "{}", e.reason);
        assert!(m.index_doc("3", &json!({"n": 1u64 << 40})).is_err());
    }

    /// `index_fixed` gives what `index_doc` gives when no field is new, and otherwise
    /// `None` with the mapping untouched, also for a new field inside a nested object.
    #[test]
    fn indexing_under_a_fixed_mapping() {
        let mut m = Mapping::parse(&json!({"properties": {
            "n": {"type": "integer"},
            "title": {"type": "text"},
            "configs": {"type": "nested", "properties": {"agg": {"type": "keyword"}}}
        }}))
        .unwrap();
        let doc = json!({"n": 7, "title": "Hello", "configs": [{"agg": "sum"}]});
        let fixed = m.index_fixed("1", &doc).unwrap().expect("no new field");
        let (grown, changed) = m.clone().index_doc("1", &doc).unwrap();
        assert!(!changed);
        assert_eq!((fixed.kw, fixed.text, fixed.fields), (grown.kw, grown.text, grown.fields));
        let before = m.clone();
        for doc in [json!({"n": 1, "extra": "x"}), json!({"configs": [{"agg": "a", "window": 5}]})] {
            assert!(m.index_fixed("2", &doc).unwrap().is_none(), "{doc}");
            assert_eq!(m, before);
        }
        assert!(m.index_fixed("3", &json!({"n": "abc"})).is_err(), "a bad value is still an error");
        // A document needing a new field but refused for a bad value leaves no field behind.
        assert!(m.index_doc("4", &json!({"brand_new": 1, "n": "abc"})).is_err());
        assert_eq!(m, before);
    }
}
