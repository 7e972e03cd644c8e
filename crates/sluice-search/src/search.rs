//! `_search` and `_count`: query, sort, pagination (`from`/`size`, `search_after`),
//! `_source` filtering, total hits and aggregations (tantivy's, which follow
//! Elasticsearch's request and response shapes).

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tantivy::aggregation::agg_req::{Aggregation, AggregationVariants, Aggregations};
use tantivy::aggregation::bucket::{FilterAggregation, QueryBuilder};
use tantivy::aggregation::{AggContextParams, AggregationCollector, AggregationLimitsGuard};
use tantivy::collector::{Collector, Count, SegmentCollector, TopDocs};
use tantivy::columnar::{DynamicColumn, StrColumn};
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{IndexRecordOption, Schema, Value as _};
use tantivy::tokenizer::TokenizerManager;
use tantivy::{DocAddress, DocId, Score, SegmentOrdinal, SegmentReader, TantivyDocument, Term};

use crate::error::{EsError, EsResult};
use crate::index::{KIND_ROOT, SearchIndex, fields};
use crate::mapping::{Kind, Mapping};
use crate::query::{QueryCtx, build};

const MAX_RESULT_WINDOW: usize = 10_000;

#[derive(Clone, Debug)]
enum SortBy {
    Score,
    Doc,
    Num { column: String, integer: bool },
    Str { column: String },
}

#[derive(Clone, Debug)]
struct SortSpec {
    by: SortBy,
    desc: bool,
}

/// Total hits, the page's hits with their sort values, and the aggregations.
type Found = (usize, Vec<(Vec<SortVal>, DocAddress)>, Option<tantivy::aggregation::agg_result::AggregationResults>);

#[derive(Clone, Debug, PartialEq, PartialOrd)]
enum SortVal {
    Missing,
    Num(f64),
    Str(String),
    /// A string as a term ordinal of one segment (see `ord_bound`), while collecting.
    Ord(u64),
}

impl SortVal {
    fn to_json(&self, by: &SortBy) -> Value {
        match (self, by) {
            (SortVal::Missing, _) => Value::Null,
            (SortVal::Num(n), SortBy::Num { integer: true, .. } | SortBy::Doc) => json!(*n as i64),
            (SortVal::Num(n), _) => json!(n),
            (SortVal::Str(s), _) => json!(s),
            (SortVal::Ord(o), _) => json!(o),
        }
    }
}

fn cmp_key(specs: &[SortSpec], a: &[SortVal], b: &[SortVal]) -> Ordering {
    for (i, spec) in specs.iter().enumerate() {
        let ord = match (&a[i], &b[i]) {
            // Missing values sort last in either direction, as in Elasticsearch.
            (SortVal::Missing, SortVal::Missing) => Ordering::Equal,
            (SortVal::Missing, _) => return Ordering::Greater,
            (_, SortVal::Missing) => return Ordering::Less,
            (x, y) => {
                let o = x.partial_cmp(y).unwrap_or(Ordering::Equal);
                if spec.desc { o.reverse() } else { o }
            }
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    Ordering::Equal
}

fn parse_sort(mapping: &Mapping, v: &Value) -> EsResult<Vec<SortSpec>> {
    let items: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        v => vec![v],
    };
    let mut out = Vec::new();
    for item in items {
        let (field, order) = match item {
            Value::String(s) => (s.clone(), None),
            Value::Object(o) if o.len() == 1 => {
                let (k, v) = o.iter().next().expect("one entry");
                let order = match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Object(spec) => spec.get("order").and_then(Value::as_str).map(str::to_owned),
                    _ => return Err(EsError::parsing(format!("[sort] malformed for field [{k}]"))),
                };
                (k.clone(), order)
            }
            other => return Err(EsError::parsing(format!("[sort] malformed: {other}"))),
        };
        let by = match field.as_str() {
            "_score" => SortBy::Score,
            "_doc" => SortBy::Doc,
            f => match mapping.resolve(f) {
                Some(r) if r.field.kind == Kind::Keyword => SortBy::Str { column: format!("_kw.{f}") },
                Some(r) if r.field.kind.is_numeric() => {
                    SortBy::Num { column: format!("_kw.{f}"), integer: r.field.kind.is_integer() || r.field.kind == Kind::Date }
                }
                Some(r) if r.field.kind == Kind::Boolean => SortBy::Num { column: format!("_kw.{f}"), integer: true },
                Some(r) if r.field.kind == Kind::Text => {
                    return Err(EsError::illegal(format!(
                        "Text fields are not optimised for operations that require per-document field data like aggregations and sorting, so these operations are disabled by default. Please use a keyword field instead. Alternatively, set fielddata=true on [{f}] in order to load field data by uninverting the inverted index. Note that this can use significant memory."
                    )));
                }
                _ => return Err(EsError::bad_request("query_shard_exception", format!("No mapping found for [{f}] in order to sort on"))),
            },
        };
        let desc = match order.as_deref() {
            None => matches!(by, SortBy::Score),
            Some("asc") => false,
            Some("desc") => true,
            Some(o) => return Err(EsError::illegal(format!("Unknown SortOrder [{o}]"))),
        };
        out.push(SortSpec { by, desc });
    }
    Ok(out)
}

struct SortCollector {
    specs: Vec<SortSpec>,
    after: Option<Vec<SortVal>>,
    keep: usize,
}

enum Col {
    None,
    Num(Vec<DynamicColumn>),
    Str(Option<StrColumn>),
}

struct SortSegment {
    specs: Vec<SortSpec>,
    /// `search_after`, with strings turned into this segment's ordinals.
    after: Option<Vec<SortVal>>,
    keep: usize,
    cols: Vec<Col>,
    segment: SegmentOrdinal,
    hits: Vec<(Vec<SortVal>, DocAddress)>,
    /// The `keep`-th best key so far: a document not better than it cannot make the page.
    worst: Option<Vec<SortVal>>,
}

type Hit = (Vec<SortVal>, DocAddress);

fn top(specs: &[SortSpec], hits: &mut Vec<Hit>, keep: usize) {
    hits.sort_by(|a, b| cmp_key(specs, &a.0, &b.0).then(a.1.cmp(&b.1)));
    hits.truncate(keep);
}

/// Where `s` falls among a segment's terms, in the doubled ordinal space of
/// [`SortVal::Ord`]: `2 * ord + 1` when it is term `ord`, `2 * ord` when it falls just
/// before term `ord`. Terms are stored sorted, so ordinals compare as the strings do.
fn ord_bound(c: &StrColumn, s: &str) -> u64 {
    let n = c.num_terms() as u64;
    let (mut lo, mut hi) = (0u64, n);
    let mut buf = String::new();
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        buf.clear();
        let _ = c.ord_to_str(mid, &mut buf);
        if buf.as_str() < s { lo = mid + 1 } else { hi = mid }
    }
    buf.clear();
    let exact = lo < n && c.ord_to_str(lo, &mut buf).unwrap_or(false) && buf == s;
    if exact { 2 * lo + 1 } else { 2 * lo }
}

fn fold_best(best: &mut Option<f64>, v: f64, desc: bool) {
    *best = Some(match *best {
        None => v,
        Some(b) if desc => b.max(v),
        Some(b) => b.min(v),
    });
}

impl Collector for SortCollector {
    type Fruit = Vec<Hit>;
    type Child = SortSegment;
    fn for_segment(&self, segment: SegmentOrdinal, reader: &SegmentReader) -> tantivy::Result<SortSegment> {
        let ff = reader.fast_fields();
        let mut cols = Vec::new();
        for s in &self.specs {
            cols.push(match &s.by {
                SortBy::Score | SortBy::Doc => Col::None,
                SortBy::Num { column, .. } => {
                    let mut v = Vec::new();
                    for h in ff.dynamic_column_handles(column)? {
                        v.push(h.open()?);
                    }
                    Col::Num(v)
                }
                SortBy::Str { column } => Col::Str(ff.str(column)?),
            });
        }
        let after = self.after.as_ref().map(|after| {
            after
                .iter()
                .zip(&cols)
                .map(|(v, c)| match (v, c) {
                    (SortVal::Str(s), Col::Str(Some(c))) => SortVal::Ord(ord_bound(c, s)),
                    (v, _) => v.clone(),
                })
                .collect()
        });
        Ok(SortSegment { specs: self.specs.clone(), after, keep: self.keep, cols, segment, hits: Vec::new(), worst: None })
    }
    fn requires_scoring(&self) -> bool {
        self.specs.iter().any(|s| matches!(s.by, SortBy::Score))
    }
    fn merge_fruits(&self, fruits: Vec<Vec<Hit>>) -> tantivy::Result<Vec<Hit>> {
        let mut all: Vec<Hit> = fruits.into_iter().flatten().collect();
        top(&self.specs, &mut all, self.keep);
        Ok(all)
    }
}

impl SortSegment {
    fn key(&self, doc: DocId, score: Score) -> Vec<SortVal> {
        let mut key = Vec::with_capacity(self.specs.len());
        for i in 0..self.specs.len() {
            key.push(self.value(i, doc, score));
        }
        key
    }

    /// The first sort value (numbers and ordinals are cheap to read).
    fn first_value(&self, doc: DocId, score: Score) -> Option<SortVal> {
        (!self.specs.is_empty()).then(|| self.value(0, doc, score))
    }

    fn value(&self, i: usize, doc: DocId, score: Score) -> SortVal {
        let (spec, col) = (&self.specs[i], &self.cols[i]);
        match (&spec.by, col) {
            (SortBy::Score, _) => SortVal::Num(score as f64),
            (SortBy::Doc, _) => SortVal::Num(((self.segment as u64) << 32 | doc as u64) as f64),
            (_, Col::Num(cols)) => {
                // Multi-valued fields sort by their smallest value ascending, largest descending.
                let mut best: Option<f64> = None;
                for c in cols {
                    match c {
                        DynamicColumn::I64(c) => c.values_for_doc(doc).for_each(|v| fold_best(&mut best, v as f64, spec.desc)),
                        DynamicColumn::U64(c) => c.values_for_doc(doc).for_each(|v| fold_best(&mut best, v as f64, spec.desc)),
                        DynamicColumn::F64(c) => c.values_for_doc(doc).for_each(|v| fold_best(&mut best, v, spec.desc)),
                        DynamicColumn::Bool(c) => {
                            c.values_for_doc(doc).for_each(|v| fold_best(&mut best, if v { 1.0 } else { 0.0 }, spec.desc))
                        }
                        _ => {}
                    }
                }
                best.map_or(SortVal::Missing, SortVal::Num)
            }
            // Ordinals while collecting; strings only for the documents kept (harvest).
            (_, Col::Str(Some(c))) => {
                let mut ords = c.term_ords(doc);
                let ord = if spec.desc { ords.max() } else { ords.next() };
                ord.map_or(SortVal::Missing, |o| SortVal::Ord(2 * o + 1))
            }
            _ => SortVal::Missing,
        }
    }
}

impl SegmentCollector for SortSegment {
    type Fruit = Vec<Hit>;
    fn collect(&mut self, doc: DocId, score: Score) {
        if self.keep == 0 {
            return;
        }
        // Most documents lose on the first sort value alone: check it before building
        // the whole key.
        if let Some(w) = &self.worst
            && let Some(first) = self.first_value(doc, score)
            && matches!(cmp_key(&self.specs[..1], std::slice::from_ref(&first), &w[..1]), Ordering::Greater)
        {
            return;
        }
        let key = self.key(doc, score);
        if let Some(after) = &self.after
            && cmp_key(&self.specs, &key, after) != Ordering::Greater
        {
            return;
        }
        // Documents arrive in id order, so one equal to the worst kept loses the tie.
        if let Some(w) = &self.worst
            && cmp_key(&self.specs, &key, w) != Ordering::Less
        {
            return;
        }
        self.hits.push((key, DocAddress::new(self.segment, doc)));
        if self.hits.len() >= self.keep.max(64) * 2 {
            top(&self.specs, &mut self.hits, self.keep);
            self.worst = self.hits.get(self.keep - 1).map(|h| h.0.clone());
        }
    }
    fn harvest(mut self) -> Vec<Hit> {
        top(&self.specs, &mut self.hits, self.keep);
        // Across segments, strings compare (ordinals are per segment). The kept ordinals
        // are decoded in one sorted pass: each dictionary block is decompressed once.
        for (i, col) in self.cols.iter().enumerate() {
            let Col::Str(Some(c)) = col else { continue };
            let mut ords: Vec<u64> =
                self.hits.iter().filter_map(|(k, _)| if let SortVal::Ord(o) = k[i] { Some((o - 1) / 2) } else { None }).collect();
            ords.sort_unstable();
            ords.dedup();
            let mut terms: Vec<String> = Vec::with_capacity(ords.len());
            let _ = c.dictionary().sorted_ords_to_term_cb(&ords, |t| terms.push(String::from_utf8_lossy(t).into_owned()));
            for (key, _) in &mut self.hits {
                if let SortVal::Ord(o) = key[i]
                    && let Ok(at) = ords.binary_search(&((o - 1) / 2))
                {
                    key[i] = terms.get(at).map_or(SortVal::Missing, |t| SortVal::Str(t.clone()));
                }
            }
        }
        self.hits
    }
}

/// The query of a filter aggregation, built per segment by tantivy.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EsFilter {
    query: Value,
    mapping: Value,
}

#[typetag::serde]
impl QueryBuilder for EsFilter {
    fn build_query(&self, schema: &Schema, tokenizers: &TokenizerManager) -> tantivy::Result<Box<dyn Query>> {
        let mapping = Mapping::parse(&self.mapping).map_err(|e| tantivy::TantivyError::InvalidArgument(e.reason))?;
        let ctx = QueryCtx { mapping: &mapping, f: fields(schema), tokenizers };
        build(&ctx, &self.query).map_err(|e| tantivy::TantivyError::InvalidArgument(e.reason))
    }
    fn box_clone(&self) -> Box<dyn QueryBuilder> {
        Box::new(self.clone())
    }
}

const FIELD_AGGS: &[&str] =
    &["terms", "min", "max", "avg", "sum", "value_count", "cardinality", "stats", "extended_stats", "percentiles", "range", "histogram"];

fn translate_aggs(mapping: &Mapping, aggs: &Value) -> EsResult<Aggregations> {
    let Value::Object(aggs) = aggs else { return Err(EsError::parsing("[aggs] must be an object")) };
    let mut out = Aggregations::default();
    for (name, def) in aggs {
        let Value::Object(def) = def else { return Err(EsError::parsing(format!("Expected [START_OBJECT] under [{name}]"))) };
        let mut kind: Option<(&String, &Value)> = None;
        let mut subs = Aggregations::default();
        for (k, v) in def {
            match k.as_str() {
                "aggs" | "aggregations" => subs = translate_aggs(mapping, v)?,
                "meta" => {}
                _ if kind.is_some() => {
                    return Err(EsError::parsing(format!(
                        "Found two aggregation type definitions in [{name}]: [{}] and [{k}]",
                        kind.expect("set").0
                    )));
                }
                _ => kind = Some((k, v)),
            }
        }
        let (kind, body) = kind.ok_or_else(|| EsError::parsing(format!("Missing definition for aggregation [{name}]")))?;
        let agg = match kind.as_str() {
            "filter" => AggregationVariants::Filter(FilterAggregation::new_with_builder(Box::new(EsFilter {
                query: body.clone(),
                mapping: mapping.to_json(),
            }))),
            k if FIELD_AGGS.contains(&k) => {
                let mut body = body.clone();
                let field = body
                    .get("field")
                    .and_then(Value::as_str)
                    .ok_or_else(|| EsError::parsing(format!("[{name}] aggregation [{k}] requires [field]")))?
                    .to_owned();
                match mapping.resolve(&field) {
                    Some(r) if r.field.kind == Kind::Text => {
                        return Err(EsError::illegal(format!(
                            "Text fields are not optimised for operations that require per-document field data like aggregations and sorting, so these operations are disabled by default. Please use a keyword field instead. Alternatively, set fielddata=true on [{field}] in order to load field data by uninverting the inverted index. Note that this can use significant memory."
                        )));
                    }
                    Some(r) if r.nested.is_some() => {
                        return Err(EsError::illegal(format!(
                            "[{name}] field [{field}] is inside a nested field; nested aggregations are not supported"
                        )));
                    }
                    _ => {}
                }
                body["field"] = json!(format!("_kw.{field}"));
                serde_json::from_value(json!({ k: body })).map_err(|e| EsError::parsing(format!("[{name}] {e}")))?
            }
            other => return Err(EsError::parsing(format!("Unknown aggregation type [{other}] in [{name}]"))),
        };
        out.insert(name.clone(), Aggregation { agg, sub_aggregation: subs });
    }
    Ok(out)
}

/// `_source` filtering: `false`, a pattern, a list, or `{includes, excludes}`.
fn source_filter(v: Option<&Value>) -> EsResult<Option<(Vec<String>, Vec<String>)>> {
    let strs = |v: &Value| -> EsResult<Vec<String>> {
        match v {
            Value::String(s) => Ok(vec![s.clone()]),
            Value::Array(a) => a
                .iter()
                .map(|x| x.as_str().map(str::to_owned).ok_or_else(|| EsError::parsing("[_source] patterns must be strings")))
                .collect(),
            _ => Err(EsError::parsing("[_source] patterns must be strings")),
        }
    };
    Ok(match v {
        None | Some(Value::Bool(true)) => Some((vec![], vec![])),
        Some(Value::Bool(false)) => None,
        Some(Value::Object(o)) => Some((
            o.get("includes").or(o.get("include")).map(strs).transpose()?.unwrap_or_default(),
            o.get("excludes").or(o.get("exclude")).map(strs).transpose()?.unwrap_or_default(),
        )),
        Some(other) => Some((strs(other)?, vec![])),
    })
}

/// `*` matches any run of characters. Greedy, going back only to the last star: at
/// most pattern × text steps, where trying every split at every star is exponential
/// (`*a*a*a*a*b` against a long run of `a`s would hold a search thread for good).
/// Bytes compare exactly, so UTF-8 text matches as text.
fn glob(pattern: &str, s: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), s.as_bytes());
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < t.len() {
        if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && p[i] == t[j] {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            // The last star takes one more byte; the rest of the pattern tries again.
            star = Some((si, sj + 1));
            i = si + 1;
            j = sj + 1;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == b'*')
}

fn filter_source(src: &Map<String, Value>, at: &str, inc: &[String], exc: &[String], included: bool) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in src {
        let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
        if exc.iter().any(|p| glob(p, &path)) {
            continue;
        }
        let inc_here = included || inc.is_empty() || inc.iter().any(|p| glob(p, &path));
        match v {
            Value::Object(o) => {
                let deeper = inc_here || inc.iter().any(|p| p.starts_with(&format!("{path}.")) || p.starts_with('*'));
                if deeper {
                    let sub = filter_source(o, &path, inc, exc, inc_here);
                    if inc_here || !sub.is_empty() {
                        out.insert(k.clone(), Value::Object(sub));
                    }
                }
            }
            Value::Array(items)
                if items.iter().any(Value::is_object) && !exc.is_empty() || !inc_here && items.iter().any(Value::is_object) =>
            {
                let kept: Vec<Value> = items
                    .iter()
                    .filter_map(|i| match i {
                        Value::Object(o) => {
                            let sub = filter_source(o, &path, inc, exc, inc_here);
                            (!sub.is_empty()).then_some(Value::Object(sub))
                        }
                        other => inc_here.then(|| other.clone()),
                    })
                    .collect();
                if inc_here || !kept.is_empty() {
                    out.insert(k.clone(), Value::Array(kept));
                }
            }
            v if inc_here => {
                out.insert(k.clone(), v.clone());
            }
            _ => {}
        }
    }
    out
}

fn root_only(q: Box<dyn Query>, f: crate::index::Fields) -> Box<dyn Query> {
    Box::new(BooleanQuery::new(vec![
        (Occur::Must, q),
        (
            Occur::Must,
            Box::new(tantivy::query::ConstScoreQuery::new(
                Box::new(TermQuery::new(Term::from_field_u64(f.kind, KIND_ROOT), IndexRecordOption::Basic)),
                0.0,
            )),
        ),
    ]))
}

const SEARCH_KEYS: &[&str] = &[
    "query",
    "size",
    "from",
    "sort",
    "search_after",
    "_source",
    "track_total_hits",
    "aggs",
    "aggregations",
    "version",
    "seq_no_primary_term",
    "timeout",
    "track_scores",
    "stored_fields",
    "explain",
    "min_score",
];

/// Runs a `_search` request body (with `size`/`from` query parameters already merged in).
pub fn search(ix: &SearchIndex, body: &Value) -> EsResult<Value> {
    let started = std::time::Instant::now();
    let empty = Map::new();
    let body = match body {
        Value::Object(o) => o,
        Value::Null => &empty,
        _ => return Err(EsError::parsing("request body must be an object")),
    };
    for k in body.keys() {
        if !SEARCH_KEYS.contains(&k.as_str()) {
            return Err(EsError::parsing(format!("Unknown key for a START_OBJECT in [{k}].")));
        }
    }
    let mapping = ix.mapping.read().expect("poisoned").clone();
    let searcher = ix.searcher();
    let tokenizers = ix.tokenizers();
    let ctx = QueryCtx { mapping: &mapping, f: ix.fields, tokenizers: &tokenizers };
    let query = match body.get("query") {
        Some(q) => build(&ctx, q)?,
        None => Box::new(tantivy::query::AllQuery),
    };
    let query = root_only(query, ix.fields);
    let num = |k: &str, d: usize| -> EsResult<usize> {
        match body.get(k) {
            None | Some(Value::Null) => Ok(d),
            Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| EsError::parsing(format!("[{k}] must be a non-negative integer"))),
        }
    };
    let size = num("size", 10)?;
    let from = num("from", 0)?;
    // Saturating: a huge `from` must not wrap around the window check.
    let window = from.saturating_add(size);
    if window > MAX_RESULT_WINDOW {
        return Err(EsError::illegal(format!(
            "Result window is too large, from + size must be less than or equal to: [{MAX_RESULT_WINDOW}] but was [{window}]. Use search_after to page through large result sets."
        )));
    }
    let specs = match body.get("sort") {
        Some(s) => parse_sort(&mapping, s)?,
        None => vec![SortSpec { by: SortBy::Score, desc: true }],
    };
    let after = match body.get("search_after") {
        None => None,
        Some(Value::Array(vals)) if vals.len() == specs.len() => Some(
            vals.iter()
                .zip(&specs)
                .map(|(v, s)| match (v, &s.by) {
                    (Value::Null, _) => Ok(SortVal::Missing),
                    (Value::String(x), SortBy::Str { .. }) => Ok(SortVal::Str(x.clone())),
                    (v, SortBy::Num { .. } | SortBy::Score | SortBy::Doc) => v
                        .as_f64()
                        .or_else(|| v.as_str().and_then(crate::mapping::parse_date_millis).map(|m| m as f64))
                        .map(SortVal::Num)
                        .ok_or_else(|| EsError::illegal(format!("search_after value [{v}] does not match the sort"))),
                    (v, _) => Err(EsError::illegal(format!("search_after value [{v}] does not match the sort"))),
                })
                .collect::<EsResult<Vec<_>>>()?,
        ),
        Some(_) => return Err(EsError::illegal("search_after has a different number of sort values than the sort")),
    };
    let aggs = match body.get("aggs").or(body.get("aggregations")) {
        Some(a) => Some(translate_aggs(&mapping, a)?),
        None => None,
    };
    let sorted_by_score_only = specs.len() == 1 && matches!(specs[0].by, SortBy::Score) && after.is_none();
    let agg_collector =
        aggs.map(|a| AggregationCollector::from_aggs(a, AggContextParams::new(AggregationLimitsGuard::default(), tokenizers.clone())));
    let count = Count;
    let (total, hits, agg_res): Found = if sorted_by_score_only {
        let td = TopDocs::with_limit(size.max(1)).and_offset(from).order_by_score();
        let (total, top, aggs) = searcher.search(&*query, &(count, td, agg_collector))?;
        (total, top.into_iter().map(|(s, a)| (vec![SortVal::Num(s as f64)], a)).collect(), aggs)
    } else {
        let sc = SortCollector { specs: specs.clone(), after, keep: from + size };
        let (total, mut top, aggs) = searcher.search(&*query, &(count, sc, agg_collector))?;
        let skip = from.min(top.len());
        top.drain(..skip);
        (total, top, aggs)
    };
    let hits = if size == 0 { Vec::new() } else { hits };
    let (inc, exc) = source_filter(body.get("_source"))?.map_or((None, vec![]), |(i, e)| (Some(i), e));
    let with_version = body.get("version") == Some(&Value::Bool(true));
    let mut out_hits = Vec::with_capacity(hits.len());
    let mut max_score: Option<f64> = None;
    for (key, addr) in &hits {
        let doc: TantivyDocument = searcher.doc(*addr)?;
        let id = doc.get_first(ix.fields.uid).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        let mut hit = json!({"_index": ix.name, "_id": id});
        if sorted_by_score_only {
            let s = match key[0] {
                SortVal::Num(n) => n,
                _ => 0.0,
            };
            max_score = Some(max_score.map_or(s, |m: f64| m.max(s)));
            hit["_score"] = json!(s);
        } else {
            hit["_score"] = Value::Null;
            hit["sort"] = Value::Array(key.iter().zip(&specs).map(|(v, s)| v.to_json(&s.by)).collect());
        }
        if with_version {
            hit["_version"] = json!(doc.get_first(ix.fields.version).and_then(|v| v.as_u64()));
        }
        if let Some(inc) = &inc {
            let bytes = doc.get_first(ix.fields.source).and_then(|v| v.as_bytes()).unwrap_or(b"{}");
            let src: Value = serde_json::from_slice(bytes).map_err(EsError::internal)?;
            hit["_source"] = match src {
                Value::Object(o) if !inc.is_empty() || !exc.is_empty() => Value::Object(filter_source(&o, "", inc, &exc, false)),
                other => other,
            };
        }
        out_hits.push(hit);
    }
    let mut hits_obj = json!({"max_score": max_score, "hits": out_hits});
    match body.get("track_total_hits") {
        Some(Value::Bool(false)) => {}
        Some(Value::Number(n)) => {
            let cap = n.as_u64().unwrap_or(10_000) as usize;
            hits_obj["total"] =
                if total > cap { json!({"value": cap, "relation": "gte"}) } else { json!({"value": total, "relation": "eq"}) };
        }
        _ => hits_obj["total"] = json!({"value": total, "relation": "eq"}),
    }
    let mut resp = json!({
        "took": started.elapsed().as_millis() as u64,
        "timed_out": false,
        "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
        "hits": hits_obj,
    });
    if let Some(a) = agg_res {
        resp["aggregations"] = serde_json::to_value(a).map_err(EsError::internal)?;
    }
    Ok(resp)
}

/// `_count`: the number of root documents matching `query`.
pub fn count(ix: &SearchIndex, body: &Value) -> EsResult<Value> {
    if let Value::Object(o) = body {
        for k in o.keys() {
            if k != "query" {
                return Err(EsError::parsing(format!("request does not support [{k}]")));
            }
        }
    }
    let mapping = ix.mapping.read().expect("poisoned").clone();
    let searcher = ix.searcher();
    let tokenizers = ix.tokenizers();
    let ctx = QueryCtx { mapping: &mapping, f: ix.fields, tokenizers: &tokenizers };
    let q = match body.get("query") {
        Some(q) => build(&ctx, q)?,
        None => Box::new(tantivy::query::AllQuery),
    };
    let n = searcher.search(&*root_only(q, ix.fields), &Count)?;
    Ok(json!({"count": n, "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0}}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_and_source_filtering() {
        assert!(glob("a.*", "a.b"));
        assert!(glob("*name", "first_name"));
        assert!(!glob("a.*", "b.a"));
        assert!(glob("*", "") && glob("a*b*c", "aXbYc") && glob("a**", "a") && !glob("a*b", "ab.c"));
        assert!(glob("é*", "été") && !glob("x", ""));
        // Many stars and a text that almost matches: finishes (pattern × text steps).
        let pattern = format!("{}b", "*a".repeat(40));
        assert!(!glob(&pattern, &"a".repeat(20_000)));
        assert!(glob(&pattern, &format!("{}b", "a".repeat(20_000))));
        let src = json!({"a": {"b": 1, "c": 2}, "d": 3, "e": [{"f": 1, "g": 2}]});
        let o = src.as_object().unwrap();
        assert_eq!(Value::Object(filter_source(o, "", &["a.b".into()], &[], false)), json!({"a": {"b": 1}}));
        assert_eq!(Value::Object(filter_source(o, "", &[], &["a".into(), "e.g".into()], false)), json!({"d": 3, "e": [{"f": 1}]}));
        assert_eq!(Value::Object(filter_source(o, "", &["e.f".into()], &[], false)), json!({"e": [{"f": 1}]}));
    }
}
