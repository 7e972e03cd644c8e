//! Elasticsearch's query DSL translated to tantivy queries over the `_kw`, `_text` and
//! `_fields` JSON fields (see `mapping`).

use std::ops::Bound;

use serde_json::{Map, Value};
use tantivy::query::{
    AllQuery, BitSetDocSet, BooleanQuery, BoostQuery, ConstScoreQuery, ConstScorer, EmptyQuery, EmptyScorer, EnableScoring,
    InvertedIndexRangeQuery, Occur, PhraseQuery, Query, RangeQuery, RegexQuery, Scorer, TermQuery, TermSetQuery, Weight,
};
use tantivy::schema::IndexRecordOption;
use tantivy::tokenizer::TokenizerManager;
use tantivy::{BitSet, DocId, DocSet as _, Score, SegmentReader, TERMINATED, Term};

use crate::error::{EsError, EsResult};
use crate::index::{Fields, KIND_CHILD, KIND_ROOT};
use crate::mapping::{Kind, Mapping, coerce, parse_date_millis};

pub(crate) struct QueryCtx<'a> {
    pub mapping: &'a Mapping,
    pub f: Fields,
    pub tokenizers: &'a TokenizerManager,
}

type Q = Box<dyn Query>;

fn one_entry<'v>(name: &str, v: &'v Value) -> EsResult<(&'v String, &'v Value)> {
    match v {
        Value::Object(o) if o.len() == 1 => Ok(o.iter().next().expect("one entry")),
        Value::Object(o) if o.is_empty() => Err(EsError::parsing(format!("[{name}] query malformed, no field specified"))),
        Value::Object(_) => Err(EsError::parsing(format!("[{name}] query doesn't support multiple fields, found more than one"))),
        _ => Err(EsError::parsing(format!("[{name}] query malformed, no start_object after query name"))),
    }
}

/// A query's field, its value, and the options object when the value was one.
type FieldValue<'v> = (&'v String, &'v Value, Option<&'v Map<String, Value>>);

/// `{"field": value}` or `{"field": {"<key>": value, ...}}`.
fn field_value<'v>(name: &str, body: &'v Value, key: &str) -> EsResult<FieldValue<'v>> {
    let (field, v) = one_entry(name, body)?;
    match v {
        Value::Object(o) => {
            let value = o.get(key).ok_or_else(|| EsError::parsing(format!("[{name}] query on [{field}] requires [{key}]")))?;
            Ok((field, value, Some(o)))
        }
        v => Ok((field, v, None)),
    }
}

fn boosted(q: Q, opts: Option<&Map<String, Value>>) -> Q {
    match opts.and_then(|o| o.get("boost")).and_then(Value::as_f64) {
        Some(b) if (b - 1.0).abs() > f64::EPSILON => Box::new(BoostQuery::new(q, b as f32)),
        _ => q,
    }
}

fn json_term(field: tantivy::schema::Field, path: &str) -> Term {
    Term::from_field_json_path(field, path, true)
}

/// The `_kw` term for an exact value of a field of `kind`.
fn kw_term(ctx: &QueryCtx<'_>, path: &str, kind: Kind, v: &Value) -> EsResult<Term> {
    let bad = || {
        EsError::bad_request(
            "query_shard_exception",
            format!("failed to create query: [{v}] is not a valid value for field [{path}] of type [{}]", kind.name()),
        )
    };
    let mut t = json_term(ctx.f.kw, path);
    match coerce(kind, v).ok_or_else(bad)? {
        Value::String(s) => t.append_type_and_str(&s),
        Value::Bool(b) => t.append_type_and_fast_value(b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => t.append_type_and_fast_value(i),
            None => {
                let f = n.as_f64().ok_or_else(bad)?;
                // The index stores integral floats as integers; so must the query.
                if f.fract() == 0.0 && f.abs() < 9.2e18 { t.append_type_and_fast_value(f as i64) } else { t.append_type_and_fast_value(f) }
            }
        },
        _ => return Err(bad()),
    }
    Ok(t)
}

fn analyze(ctx: &QueryCtx<'_>, text: &str) -> Vec<String> {
    let mut analyzer = ctx.tokenizers.get("default").expect("default tokenizer");
    let mut stream = analyzer.token_stream(text);
    let mut out = Vec::new();
    while stream.advance() {
        out.push(stream.token().text.clone());
    }
    out
}

fn text_term(ctx: &QueryCtx<'_>, path: &str, token: &str) -> Term {
    let mut t = json_term(ctx.f.text, path);
    t.append_type_and_str(token);
    t
}

fn value_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(crate) fn build(ctx: &QueryCtx<'_>, q: &Value) -> EsResult<Q> {
    let Value::Object(obj) = q else {
        return Err(EsError::parsing("query malformed, must start with start_object"));
    };
    if obj.len() != 1 {
        return Err(EsError::parsing(if obj.is_empty() {
            "query malformed, empty clause found".to_owned()
        } else {
            format!("[{}] malformed query, expected [END_OBJECT] but found [FIELD_NAME]", obj.keys().next().expect("non-empty"))
        }));
    }
    let (name, body) = obj.iter().next().expect("one entry");
    match name.as_str() {
        "match_all" => Ok(boosted(Box::new(AllQuery), body.as_object())),
        "match_none" => Ok(Box::new(EmptyQuery)),
        "term" => {
            let (field, value, opts) = field_value(name, body, "value")?;
            Ok(boosted(term_query(ctx, field, value)?, opts))
        }
        "terms" => {
            let Value::Object(o) = body else { return Err(EsError::parsing("[terms] query malformed")) };
            let mut fields = o.iter().filter(|(k, _)| k.as_str() != "boost");
            let (field, values) = fields.next().ok_or_else(|| EsError::parsing("[terms] query requires a field"))?;
            if fields.next().is_some() {
                return Err(EsError::parsing("[terms] query does not support multiple fields"));
            }
            let Value::Array(values) = values else {
                return Err(EsError::parsing(format!("[terms] query does not support [{field}] as a value: it must be an array")));
            };
            let Some(r) = ctx.mapping.resolve(field) else { return Ok(Box::new(EmptyQuery)) };
            if r.field.kind == Kind::Text {
                let terms: Vec<Q> = values
                    .iter()
                    .map(|v| Box::new(TermQuery::new(text_term(ctx, field, &value_str(v)), IndexRecordOption::Basic)) as Q)
                    .collect();
                return Ok(boosted(Box::new(BooleanQuery::union(terms)), Some(o)));
            }
            let terms = values.iter().map(|v| kw_term(ctx, field, r.field.kind, v)).collect::<EsResult<Vec<_>>>()?;
            Ok(boosted(Box::new(ConstScoreQuery::new(Box::new(TermSetQuery::new(terms)), 1.0)), Some(o)))
        }
        "ids" => {
            let values = body.get("values").and_then(Value::as_array).ok_or_else(|| EsError::parsing("[ids] query requires [values]"))?;
            let terms: Vec<Term> = values.iter().map(|v| Term::from_field_text(ctx.f.uid, &value_str(v))).collect();
            Ok(Box::new(ConstScoreQuery::new(Box::new(TermSetQuery::new(terms)), 1.0)))
        }
        "exists" => {
            let field = body.get("field").and_then(Value::as_str).ok_or_else(|| EsError::parsing("[exists] query requires [field]"))?;
            Ok(Box::new(ConstScoreQuery::new(
                Box::new(TermQuery::new(Term::from_field_text(ctx.f.names, field), IndexRecordOption::Basic)),
                1.0,
            )))
        }
        "match" => {
            let (field, value, opts) = field_value(name, body, "query")?;
            let Some(r) = ctx.mapping.resolve(field) else { return Ok(Box::new(EmptyQuery)) };
            if r.field.kind != Kind::Text {
                return Ok(boosted(Box::new(TermQuery::new(kw_term(ctx, field, r.field.kind, value)?, IndexRecordOption::Basic)), opts));
            }
            let tokens = analyze(ctx, &value_str(value));
            if tokens.is_empty() {
                return Ok(Box::new(EmptyQuery));
            }
            let and = match opts.and_then(|o| o.get("operator")) {
                None => false,
                Some(Value::String(s)) if s.eq_ignore_ascii_case("or") => false,
                Some(Value::String(s)) if s.eq_ignore_ascii_case("and") => true,
                Some(other) => return Err(EsError::parsing(format!("[match] unknown operator [{other}]"))),
            };
            let occur = if and { Occur::Must } else { Occur::Should };
            let clauses: Vec<(Occur, Q)> = tokens
                .iter()
                .map(|t| (occur, Box::new(TermQuery::new(text_term(ctx, field, t), IndexRecordOption::WithFreqs)) as Q))
                .collect();
            let mut bq = BooleanQuery::new(clauses);
            if !and && let Some(m) = opts.and_then(|o| o.get("minimum_should_match")) {
                bq.set_minimum_number_should_match(minimum_should_match(m, tokens.len())?);
            }
            Ok(boosted(Box::new(bq), opts))
        }
        "match_phrase" => {
            let (field, value, opts) = field_value(name, body, "query")?;
            let Some(r) = ctx.mapping.resolve(field) else { return Ok(Box::new(EmptyQuery)) };
            if r.field.kind != Kind::Text {
                return Ok(Box::new(TermQuery::new(kw_term(ctx, field, r.field.kind, value)?, IndexRecordOption::Basic)));
            }
            let tokens = analyze(ctx, &value_str(value));
            let q: Q = match tokens.len() {
                0 => Box::new(EmptyQuery),
                1 => Box::new(TermQuery::new(text_term(ctx, field, &tokens[0]), IndexRecordOption::WithFreqs)),
                _ => {
                    let mut pq = PhraseQuery::new(tokens.iter().map(|t| text_term(ctx, field, t)).collect());
                    if let Some(slop) = opts.and_then(|o| o.get("slop")).and_then(Value::as_u64) {
                        pq.set_slop(slop as u32);
                    }
                    Box::new(pq)
                }
            };
            Ok(boosted(q, opts))
        }
        "prefix" => {
            let (field, value, opts) = field_value(name, body, "value")?;
            let Some(r) = ctx.mapping.resolve(field) else { return Ok(Box::new(EmptyQuery)) };
            let target = if r.field.kind == Kind::Text { ctx.f.text } else { ctx.f.kw };
            let prefix = value_str(value);
            let mut lo = json_term(target, field);
            lo.append_type_and_str(&prefix);
            let mut hi = json_term(target, field);
            hi.append_type_and_str(&format!("{prefix}\u{10FFFF}"));
            Ok(boosted(
                Box::new(ConstScoreQuery::new(Box::new(InvertedIndexRangeQuery::new(Bound::Included(lo), Bound::Excluded(hi))), 1.0)),
                opts,
            ))
        }
        "wildcard" => {
            let (field, value, opts) = field_value(name, body, "value")?;
            let Some(r) = ctx.mapping.resolve(field) else { return Ok(Box::new(EmptyQuery)) };
            let target = if r.field.kind == Kind::Text { ctx.f.text } else { ctx.f.kw };
            // Terms of a JSON field are `path \0 s value`; the regex matches the whole term.
            let mut pattern = String::new();
            for (i, seg) in field.split('.').enumerate() {
                if i > 0 {
                    pattern.push_str("\\x01");
                }
                pattern.push_str(&regex_escape(seg));
            }
            pattern.push_str("\\x00s");
            for c in value_str(value).chars() {
                match c {
                    '*' => pattern.push_str(".*"),
                    '?' => pattern.push('.'),
                    c => pattern.push_str(&regex_escape(&c.to_string())),
                }
            }
            let q = RegexQuery::from_pattern(&pattern, target).map_err(|e| EsError::parsing(format!("[wildcard] invalid pattern: {e}")))?;
            Ok(boosted(Box::new(ConstScoreQuery::new(Box::new(q), 1.0)), opts))
        }
        "range" => {
            let (field, spec) = one_entry(name, body)?;
            let Value::Object(spec) = spec else { return Err(EsError::parsing(format!("[range] query on [{field}] must be an object"))) };
            let Some(r) = ctx.mapping.resolve(field) else { return Ok(Box::new(EmptyQuery)) };
            let kind = r.field.kind;
            let mut lo = Bound::Unbounded;
            let mut hi = Bound::Unbounded;
            for (k, v) in spec {
                let bound_value = |v: &Value| -> EsResult<Term> {
                    if kind == Kind::Date
                        && let Value::String(s) = v
                        && parse_date_millis(s).is_none()
                    {
                        return Err(EsError::bad_request(
                            "parse_exception",
                            format!("failed to parse date field [{s}] with format [strict_date_optional_time||epoch_millis]"),
                        ));
                    }
                    if kind == Kind::Text {
                        return Err(EsError::illegal(format!(
                            "range queries on text field [{field}] are not supported; use a keyword field"
                        )));
                    }
                    // Ranges compare numbers as numbers: a float bound on an integer field stays a float.
                    let exact = if kind.is_numeric() && v.as_f64().is_some_and(|f| f.fract() != 0.0) { Kind::Double } else { kind };
                    kw_term(ctx, field, exact, v)
                };
                match k.as_str() {
                    "gte" | "from" if !v.is_null() => lo = Bound::Included(bound_value(v)?),
                    "gt" if !v.is_null() => lo = Bound::Excluded(bound_value(v)?),
                    "lte" | "to" if !v.is_null() => hi = Bound::Included(bound_value(v)?),
                    "lt" if !v.is_null() => hi = Bound::Excluded(bound_value(v)?),
                    "gte" | "gt" | "lte" | "lt" | "from" | "to" | "boost" | "format" | "time_zone" | "include_lower" | "include_upper"
                    | "relation" => {}
                    other => return Err(EsError::parsing(format!("[range] query does not support [{other}]"))),
                }
            }
            if matches!((&lo, &hi), (Bound::Unbounded, Bound::Unbounded)) {
                return Ok(Box::new(TermQuery::new(Term::from_field_text(ctx.f.names, field), IndexRecordOption::Basic)));
            }
            Ok(boosted(Box::new(ConstScoreQuery::new(Box::new(RangeQuery::new(lo, hi)), 1.0)), Some(spec)))
        }
        "bool" => {
            let Value::Object(b) = body else { return Err(EsError::parsing("[bool] query malformed")) };
            let mut clauses: Vec<(Occur, Q)> = Vec::new();
            let mut positives = 0;
            let mut shoulds = 0;
            for (k, v) in b {
                let occur = match k.as_str() {
                    "must" => Occur::Must,
                    "filter" => Occur::Must,
                    "should" => Occur::Should,
                    "must_not" => Occur::MustNot,
                    "minimum_should_match" | "boost" | "_name" | "adjust_pure_negative" => continue,
                    other => return Err(EsError::parsing(format!("[bool] query does not support [{other}]"))),
                };
                let items: Vec<&Value> = match v {
                    Value::Array(a) => a.iter().collect(),
                    v => vec![v],
                };
                for item in items {
                    let mut sub = build(ctx, item)?;
                    if k == "filter" {
                        sub = Box::new(ConstScoreQuery::new(sub, 0.0));
                    }
                    match occur {
                        Occur::Must => positives += 1,
                        Occur::Should => shoulds += 1,
                        Occur::MustNot => {}
                    }
                    clauses.push((occur, sub));
                }
            }
            let msm = match b.get("minimum_should_match") {
                Some(m) => minimum_should_match(m, shoulds)?,
                None if positives == 0 && shoulds > 0 => 1,
                None => 0,
            };
            if positives == 0 && shoulds == 0 {
                clauses.push((Occur::Must, Box::new(AllQuery)));
            }
            if msm > 0 && positives > 0 {
                // tantivy treats should clauses as optional next to must clauses; a required
                // number of them becomes a must clause of its own.
                let (should, rest): (Vec<_>, Vec<_>) = clauses.into_iter().partition(|(o, _)| *o == Occur::Should);
                let mut clauses = rest;
                let should_q = BooleanQuery::union_with_minimum_required_clauses(should.into_iter().map(|(_, q)| q).collect(), msm);
                clauses.push((Occur::Must, Box::new(should_q)));
                return Ok(boosted(Box::new(BooleanQuery::new(clauses)), Some(b)));
            }
            let mut bq = BooleanQuery::new(clauses);
            if msm > 0 {
                bq.set_minimum_number_should_match(msm);
            }
            Ok(boosted(Box::new(bq), Some(b)))
        }
        "constant_score" => {
            let filter = body.get("filter").ok_or_else(|| EsError::parsing("[constant_score] requires a 'filter' element"))?;
            let boost = body.get("boost").and_then(Value::as_f64).unwrap_or(1.0) as f32;
            Ok(Box::new(ConstScoreQuery::new(build(ctx, filter)?, boost)))
        }
        "nested" => {
            let path = body.get("path").and_then(Value::as_str).ok_or_else(|| EsError::parsing("[nested] requires 'path' field"))?;
            let inner = body.get("query").ok_or_else(|| EsError::parsing("[nested] requires 'query' field"))?;
            match ctx.mapping.resolve(path) {
                Some(r) if r.field.kind == Kind::Nested => {}
                _ if body.get("ignore_unmapped") == Some(&Value::Bool(true)) => return Ok(Box::new(EmptyQuery)),
                _ => {
                    return Err(EsError::bad_request(
                        "query_shard_exception",
                        format!("[nested] failed to find nested object under path [{path}]"),
                    ));
                }
            }
            let inner_q = build(ctx, inner)?;
            let children: Q = Box::new(BooleanQuery::new(vec![
                (Occur::Must, inner_q),
                (Occur::Must, Box::new(TermQuery::new(Term::from_field_u64(ctx.f.kind, KIND_CHILD), IndexRecordOption::Basic))),
                (Occur::Must, Box::new(TermQuery::new(Term::from_field_text(ctx.f.nested, path), IndexRecordOption::Basic))),
            ]));
            Ok(Box::new(ParentsQuery { children, kind: ctx.f.kind }))
        }
        other => Err(EsError::parsing(format!("unknown query [{other}]"))),
    }
}

fn term_query(ctx: &QueryCtx<'_>, field: &str, value: &Value) -> EsResult<Q> {
    if field == "_id" {
        return Ok(Box::new(TermQuery::new(Term::from_field_text(ctx.f.uid, &value_str(value)), IndexRecordOption::Basic)));
    }
    let Some(r) = ctx.mapping.resolve(field) else { return Ok(Box::new(EmptyQuery)) };
    let term =
        if r.field.kind == Kind::Text { text_term(ctx, field, &value_str(value)) } else { kw_term(ctx, field, r.field.kind, value)? };
    Ok(Box::new(ConstScoreQuery::new(Box::new(TermQuery::new(term, IndexRecordOption::Basic)), 1.0)))
}

fn minimum_should_match(v: &Value, n: usize) -> EsResult<usize> {
    let bad = || EsError::parsing(format!("[minimum_should_match] cannot parse [{v}]"));
    let parsed: i64 = match v {
        Value::Number(x) => x.as_i64().ok_or_else(bad)?,
        Value::String(s) if s.ends_with('%') => {
            let p: i64 = s.trim_end_matches('%').parse().map_err(|_| bad())?;
            (n as i64 * p) / 100
        }
        Value::String(s) => s.parse().map_err(|_| bad())?,
        _ => return Err(bad()),
    };
    let k = if parsed < 0 { n as i64 + parsed } else { parsed };
    Ok(k.clamp(0, n as i64) as usize)
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~\"".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Root documents with at least one nested object matching `children` (a query that
/// already selects child documents of one path). A root and its nested objects share
/// the `_uid` and are written as one group into one segment (`IndexWriter::run`), so
/// within a segment they share the `_uid` term ordinal: no strings, no second pass.
#[derive(Debug)]
pub(crate) struct ParentsQuery {
    pub children: Box<dyn Query>,
    pub kind: tantivy::schema::Field,
}

impl Clone for ParentsQuery {
    fn clone(&self) -> Self {
        ParentsQuery { children: self.children.box_clone(), kind: self.kind }
    }
}

struct ParentsWeight {
    children: Box<dyn Weight>,
    kind: tantivy::schema::Field,
}

impl Query for ParentsQuery {
    fn weight(&self, scoring: EnableScoring<'_>) -> tantivy::Result<Box<dyn Weight>> {
        let plain = EnableScoring::disabled_from_schema(scoring.schema());
        Ok(Box::new(ParentsWeight { children: self.children.weight(plain)?, kind: self.kind }))
    }
}

impl Weight for ParentsWeight {
    fn scorer(&self, reader: &SegmentReader, boost: Score) -> tantivy::Result<Box<dyn Scorer>> {
        let Some(uid) = reader.fast_fields().str("_uid")? else { return Ok(Box::new(EmptyScorer)) };
        let alive = reader.alive_bitset();
        let is_alive = |d: DocId| alive.is_none_or(|a| a.is_alive(d));
        // Ordinals of the `_uid`s of live matching children.
        let mut owners = BitSet::with_max_value(uid.num_terms().max(1) as u32);
        let mut found = false;
        let mut children = self.children.scorer(reader, 1.0)?;
        let mut d = children.doc();
        while d != TERMINATED {
            if is_alive(d)
                && let Some(o) = uid.term_ords(d).next()
            {
                owners.insert(o as u32);
                found = true;
            }
            d = children.advance();
        }
        if !found {
            return Ok(Box::new(EmptyScorer));
        }
        let mut parents = BitSet::with_max_value(reader.max_doc().max(1));
        let roots = reader.inverted_index(self.kind)?;
        if let Some(mut postings) = roots.read_postings(&Term::from_field_u64(self.kind, KIND_ROOT), IndexRecordOption::Basic)? {
            let mut d = postings.doc();
            while d != TERMINATED {
                if is_alive(d) && uid.term_ords(d).next().is_some_and(|o| owners.contains(o as u32)) {
                    parents.insert(d);
                }
                d = postings.advance();
            }
        }
        Ok(Box::new(ConstScorer::new(BitSetDocSet::from(parents), boost)))
    }

    fn explain(&self, _: &SegmentReader, _: DocId) -> tantivy::Result<tantivy::query::Explanation> {
        Err(tantivy::TantivyError::InvalidArgument("explain is not supported for nested queries".into()))
    }
}
