//! `compute`: a column computed from the row by an expression, in evalexpr's language
//! (arithmetic, comparisons, `+` on strings, `if(cond, a, b)`, `str::to_uppercase`,
//! `min`, `max`, `floor`, ...) plus Sluice's own functions: `sha256(text)` and the date
//! parts `year`, `month`, `day`, `hour` of a timestamp or date column.
//!
//! Columns are variables by name: integers as ints, numerics and floats as floats,
//! booleans as booleans, timestamps and dates as microseconds since the epoch, NULL as
//! the empty value `()`, anything else as its text. An expression that fails on a NULL
//! input (`year(NULL) * 100`) is NULL, as in SQL; any other failure stops the pipeline
//! with the column named.

use evalexpr::{Context, DefaultNumericTypes, EvalexprError, EvalexprResult, Node, Value as E};
use sha2::{Digest, Sha256};

use crate::{Datum, PgType, Value};

type EResult = Result<E, EvalexprError<DefaultNumericTypes>>;

pub(crate) struct Expr {
    pub(crate) node: Node<DefaultNumericTypes>,
}

/// The variables an expression reads: name, column index, column type.
pub(crate) type Vars = Vec<(String, usize, PgType)>;

const FUNCTIONS: [&str; 5] = ["sha256", "year", "month", "day", "hour"];

impl Expr {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let node = evalexpr::build_operator_tree::<DefaultNumericTypes>(text).map_err(|e| format!("expr {text:?}: {e}"))?;
        Ok(Self { node })
    }

    pub(crate) fn variables(&self) -> Vec<String> {
        let mut v: Vec<String> = self.node.iter_variable_identifiers().map(str::to_string).collect();
        v.sort();
        v.dedup();
        v
    }

    pub(crate) fn eval(&self, vars: &Vars, row: &[Datum]) -> Result<Option<String>, String> {
        let values = vars.iter().map(|(_, i, ty)| to_value(row.get(*i).unwrap_or(&Datum::Null), ty)).collect::<Result<Vec<_>, _>>()?;
        let ctx = RowContext { vars, values };
        let out = match self.node.eval_with_context(&ctx) {
            Ok(v) => v,
            // As in SQL, an expression over a NULL that cannot use it is NULL.
            Err(_) if ctx.values.iter().any(|v| matches!(v, E::Empty)) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        Ok(match out {
            E::Empty => None,
            E::String(s) => Some(s),
            E::Int(i) => Some(i.to_string()),
            E::Float(f) => Some(f.to_string()),
            E::Boolean(b) => Some(if b { "t" } else { "f" }.to_string()),
            other => return Err(format!("the expression gave {other:?}, not a single value")),
        })
    }
}

fn to_value(d: &Datum, ty: &PgType) -> Result<E, String> {
    let Datum::Text(t) = d else { return Ok(E::Empty) };
    let s = std::str::from_utf8(t).map_err(|_| "not UTF-8".to_string())?;
    Ok(match ty {
        PgType::Int2 | PgType::Int4 | PgType::Int8 => E::Int(s.parse().map_err(|_| format!("bad integer {s:?}"))?),
        PgType::Float4 | PgType::Float8 | PgType::Numeric => E::Float(s.parse().map_err(|_| format!("bad number {s:?}"))?),
        PgType::Bool => E::Boolean(s == "t"),
        PgType::Timestamp | PgType::TimestampTz | PgType::Date => match Value::parse(ty, s).map_err(|e| e.to_string())? {
            Value::Timestamp(us) | Value::TimestampTz(us) => E::Int(us),
            Value::Date(d) => E::Int(i64::from(d) * 86_400_000_000),
            _ => E::Empty,
        },
        _ => E::String(s.to_string()),
    })
}

struct RowContext<'a> {
    vars: &'a Vars,
    values: Vec<E>,
}

fn date_part(arg: &E, part: &str) -> EResult {
    let E::Int(us) = arg else { return Err(EvalexprError::CustomMessage(format!("{part}() takes a timestamp or date column"))) };
    let (y, m, d) = crate::value::civil_from_days(us.div_euclid(86_400_000_000));
    Ok(E::Int(match part {
        "year" => y,
        "month" => m,
        "day" => d,
        _ => us.div_euclid(3_600_000_000).rem_euclid(24),
    }))
}

impl Context for RowContext<'_> {
    type NumericTypes = DefaultNumericTypes;

    fn get_value(&self, identifier: &str) -> Option<&E> {
        self.vars.iter().position(|(n, ..)| n == identifier).map(|i| &self.values[i])
    }

    fn call_function(&self, identifier: &str, argument: &E) -> EResult {
        match identifier {
            "sha256" => match argument {
                E::String(s) => Ok(E::String(Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect())),
                E::Empty => Ok(E::Empty),
                other => Ok(E::String(Sha256::digest(other.to_string().as_bytes()).iter().map(|b| format!("{b:02x}")).collect())),
            },
            "year" | "month" | "day" | "hour" => match argument {
                E::Empty => Ok(E::Empty),
                a => date_part(a, identifier),
            },
            _ => Err(EvalexprError::FunctionIdentifierNotFound(identifier.to_string())),
        }
    }

    fn are_builtin_functions_disabled(&self) -> bool {
        false
    }

    fn set_builtin_functions_disabled(&mut self, _: bool) -> EvalexprResult<(), DefaultNumericTypes> {
        Err(EvalexprError::ContextNotMutable)
    }
}

/// Whether `name` is one of Sluice's functions (evalexpr's built-ins are checked by
/// evaluation).
pub(crate) fn is_sluice_function(name: &str) -> bool {
    FUNCTIONS.contains(&name)
}
