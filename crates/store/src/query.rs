//! List queries as plain data, and their translation into SQL.
//!
//! The server parses OData into a [`Query`]; this module turns it into a
//! `WHERE … ORDER BY … LIMIT` clause whose every value is a bound parameter.
//! Field names never come from the client: they are enum variants mapped to
//! fixed column expressions here.

use rusqlite::types::Value as SqlValue;

/// A literal in a filter or a cursor.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Int(i64),
    /// Nanoseconds since the Unix epoch.
    Time(i64),
    Null,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

/// A boolean filter expression over the fields `F` of one entity.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter<F> {
    And(Box<Filter<F>>, Box<Filter<F>>),
    Or(Box<Filter<F>>, Box<Filter<F>>),
    Not(Box<Filter<F>>),
    Compare(F, CmpOp, Value),
    In(F, Vec<Value>),
    StartsWith(F, String),
    /// Some element of the set field `F` (machine tags) satisfies the inner
    /// filter, whose conditions on `F` are about that one element (OData
    /// `machineTags/any(t: …)`). A condition on a set field outside `Any`
    /// means the same as `Any` around it.
    Any(F, Box<Filter<F>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Asc,
    Desc,
}

/// The type of a field, which decides how literals are parsed and compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Int,
    Time,
    /// A set of strings (machine tags): `eq` means "contains".
    TextSet,
}

/// Where a page continues: the sort-key values and the `seq` of the last row
/// of the previous page.
#[derive(Debug, Clone, PartialEq)]
pub struct Cursor {
    pub keys: Vec<Value>,
    pub seq: i64,
}

impl Cursor {
    /// An opaque, URL-safe text form (`[0-9a-z_.-]` only).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        for key in &self.keys {
            match key {
                Value::Text(t) => {
                    out.push('s');
                    for b in t.as_bytes() {
                        out.push_str(&format!("{b:02x}"));
                    }
                }
                Value::Int(i) => out.push_str(&format!("i{i}")),
                Value::Time(t) => out.push_str(&format!("t{t}")),
                Value::Null => out.push('n'),
            }
            out.push('.');
        }
        out.push_str(&self.seq.to_string());
        out
    }

    pub fn decode(text: &str) -> Option<Cursor> {
        let mut parts: Vec<&str> = text.split('.').collect();
        let seq = parts.pop()?.parse().ok()?;
        let mut keys = Vec::new();
        for part in parts {
            let (tag, rest) = part.split_at_checked(1)?;
            keys.push(match tag {
                "s" => {
                    if rest.len() % 2 != 0 {
                        return None;
                    }
                    let bytes: Option<Vec<u8>> = (0..rest.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(rest.get(i..i + 2)?, 16).ok())
                        .collect();
                    Value::Text(String::from_utf8(bytes?).ok()?)
                }
                "i" => Value::Int(rest.parse().ok()?),
                "t" => Value::Time(rest.parse().ok()?),
                "n" if rest.is_empty() => Value::Null,
                _ => return None,
            });
        }
        Some(Cursor { keys, seq })
    }
}

/// A list query over the fields `F` of one entity.
#[derive(Debug, Clone)]
pub struct Query<F> {
    pub filter: Option<Filter<F>>,
    pub order_by: Vec<(F, Direction)>,
    /// Rows to skip (first page only).
    pub skip: u64,
    /// Rows to return at most.
    pub take: u64,
    pub after: Option<Cursor>,
    /// Also count every row the filter selects.
    pub count: bool,
    /// Only rows of machines in these machine groups (`None`: all).
    pub groups: Option<Vec<i64>>,
}

impl<F> Default for Query<F> {
    fn default() -> Self {
        Query {
            filter: None,
            order_by: Vec::new(),
            skip: 0,
            take: 10_000,
            after: None,
            count: false,
            groups: None,
        }
    }
}

/// One page of results.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Set when more rows follow the last one returned.
    pub next: Option<Cursor>,
    pub count: Option<u64>,
}

/// How a field maps to SQL.
pub trait FieldSql: Copy {
    /// The column expression, over the entity's table aliased `t`.
    fn expr(&self, ctx: &SqlContext) -> String;
    fn kind(&self) -> Kind;
}

/// Values the column expressions may need (fixed integers, not client input).
#[derive(Debug, Clone, Copy, Default)]
pub struct SqlContext {
    /// Machines seen at or after this time are `Active`.
    pub active_since: i64,
    /// Machines seen before this time are `Inactive`.
    pub inactive_before: i64,
}

fn to_sql(value: &Value) -> SqlValue {
    match value {
        Value::Text(t) => SqlValue::Text(t.clone()),
        Value::Int(i) | Value::Time(i) => SqlValue::Integer(*i),
        Value::Null => SqlValue::Null,
    }
}

fn op_sql(op: CmpOp) -> &'static str {
    match op {
        CmpOp::Eq => "=",
        CmpOp::Ne => "<>",
        CmpOp::Gt => ">",
        CmpOp::Ge => ">=",
        CmpOp::Lt => "<",
        CmpOp::Le => "<=",
    }
}

/// Sort-key expression: nulls sort as the empty string / zero so that cursor
/// comparisons stay total.
fn sort_expr<F: FieldSql>(field: F, ctx: &SqlContext) -> String {
    match field.kind() {
        Kind::Text | Kind::TextSet => format!("COALESCE({}, '')", field.expr(ctx)),
        Kind::Int | Kind::Time => format!("COALESCE({}, 0)", field.expr(ctx)),
    }
}

fn filter_sql<F: FieldSql>(
    filter: &Filter<F>,
    ctx: &SqlContext,
    tags: &str,
    params: &mut Vec<SqlValue>,
) -> String {
    match filter {
        Filter::And(a, b) => format!(
            "({} AND {})",
            filter_sql(a, ctx, tags, params),
            filter_sql(b, ctx, tags, params)
        ),
        Filter::Or(a, b) => format!(
            "({} OR {})",
            filter_sql(a, ctx, tags, params),
            filter_sql(b, ctx, tags, params)
        ),
        Filter::Not(a) => format!("(NOT {})", filter_sql(a, ctx, tags, params)),
        Filter::Any(_, inner) => any_sql(inner, tags, params),
        Filter::Compare(field, _, _) | Filter::In(field, _) | Filter::StartsWith(field, _)
            if field.kind() == Kind::TextSet =>
        {
            any_sql(filter, tags, params)
        }
        Filter::Compare(field, op, value) => compare_sql(&field.expr(ctx), *op, value, params),
        Filter::In(field, values) => in_sql(&field.expr(ctx), values, params),
        Filter::StartsWith(field, prefix) => starts_with_sql(&field.expr(ctx), prefix, params),
    }
}

/// "Some tag of the row satisfies `inner`": one uncorrelated subquery over
/// the tags table, which SQLite evaluates once per statement (one pass over
/// the tags, each checked against `inner`, whose `in` lists are set lookups),
/// rather than once per row.
fn any_sql<F: FieldSql>(inner: &Filter<F>, tags: &str, params: &mut Vec<SqlValue>) -> String {
    let condition = element_sql(inner, params);
    format!("(t.id IN (SELECT g.machine_id FROM {tags} g WHERE {condition}))")
}

/// `filter` with its conditions on the set field read as conditions on one
/// element, `g.tag`.
fn element_sql<F: FieldSql>(filter: &Filter<F>, params: &mut Vec<SqlValue>) -> String {
    const ELEMENT: &str = "g.tag";
    match filter {
        Filter::And(a, b) => format!(
            "({} AND {})",
            element_sql(a, params),
            element_sql(b, params)
        ),
        Filter::Or(a, b) => format!("({} OR {})", element_sql(a, params), element_sql(b, params)),
        Filter::Not(a) => format!("(NOT {})", element_sql(a, params)),
        // Nested `any` has no meaning on an element: the parser never makes it.
        Filter::Any(_, inner) => element_sql(inner, params),
        Filter::Compare(_, op, value) => compare_sql(ELEMENT, *op, value, params),
        Filter::In(_, values) => in_sql(ELEMENT, values, params),
        Filter::StartsWith(_, prefix) => starts_with_sql(ELEMENT, prefix, params),
    }
}

fn compare_sql(expr: &str, op: CmpOp, value: &Value, params: &mut Vec<SqlValue>) -> String {
    if *value == Value::Null {
        return match op {
            CmpOp::Eq => format!("({expr} IS NULL)"),
            CmpOp::Ne => format!("({expr} IS NOT NULL)"),
            _ => "(0)".to_owned(),
        };
    }
    params.push(to_sql(value));
    match op {
        // OData `ne` is true for null values too.
        CmpOp::Ne => format!("({expr} IS NOT ?)"),
        _ => format!("({expr} {} ?)", op_sql(op)),
    }
}

fn in_sql(expr: &str, values: &[Value], params: &mut Vec<SqlValue>) -> String {
    if values.is_empty() {
        return "(0)".to_owned();
    }
    let marks = vec!["?"; values.len()].join(", ");
    params.extend(values.iter().map(to_sql));
    format!("({expr} IN ({marks}))")
}

fn starts_with_sql(expr: &str, prefix: &str, params: &mut Vec<SqlValue>) -> String {
    // substr comparison instead of LIKE: no wildcard characters to escape.
    params.push(SqlValue::Integer(prefix.chars().count() as i64));
    params.push(SqlValue::Text(prefix.to_owned()));
    format!("(substr({expr}, 1, ?) = ?)")
}

/// A SELECT over `table` aliased `t`: the WHERE clause (filter and cursor),
/// ORDER BY, LIMIT/OFFSET, and the parameters to bind in order.
pub(crate) struct Built {
    /// `, <key0>, <key1> …`: the sort keys, selected after the entity's
    /// columns so that a cursor can be made from the last row.
    pub sort_columns: String,
    pub where_clause: String,
    pub where_params: Vec<SqlValue>,
    pub order_limit: String,
    pub page_params: Vec<SqlValue>,
}

pub(crate) fn build<F: FieldSql>(query: &Query<F>, ctx: &SqlContext, tags: &str) -> Built {
    let mut where_params = Vec::new();
    let mut conditions = Vec::new();
    if let Some(filter) = &query.filter {
        conditions.push(filter_sql(filter, ctx, tags, &mut where_params));
    }

    let mut page_params = Vec::new();
    let mut cursor_condition = None;
    if let Some(cursor) = &query.after {
        // Lexicographic "after" over (key1, key2, …, seq), honouring each
        // key's direction: (k1 > v1) OR (k1 = v1 AND k2 > v2) OR …
        let mut ors = Vec::new();
        let mut equal_prefix: Vec<String> = Vec::new();
        let mut prefix_params: Vec<SqlValue> = Vec::new();
        for ((field, dir), value) in query.order_by.iter().zip(&cursor.keys) {
            let expr = sort_expr(*field, ctx);
            let cmp = if *dir == Direction::Asc { ">" } else { "<" };
            let mut clause = equal_prefix.clone();
            clause.push(format!("{expr} {cmp} ?"));
            page_params.extend(prefix_params.iter().cloned());
            page_params.push(to_sql(value));
            ors.push(format!("({})", clause.join(" AND ")));
            equal_prefix.push(format!("{expr} = ?"));
            prefix_params.push(to_sql(value));
        }
        let mut clause = equal_prefix;
        clause.push("t.seq > ?".to_owned());
        page_params.extend(prefix_params);
        page_params.push(SqlValue::Integer(cursor.seq));
        ors.push(format!("({})", clause.join(" AND ")));
        cursor_condition = Some(format!("({})", ors.join(" OR ")));
    }

    let where_clause = if conditions.is_empty() {
        "1".to_owned()
    } else {
        conditions.join(" AND ")
    };
    let mut order: Vec<String> = query
        .order_by
        .iter()
        .map(|(field, dir)| {
            let dir = if *dir == Direction::Asc {
                "ASC"
            } else {
                "DESC"
            };
            format!("{} {dir}", sort_expr(*field, ctx))
        })
        .collect();
    order.push("t.seq ASC".to_owned());
    let mut order_limit = String::new();
    if let Some(cursor_condition) = cursor_condition {
        order_limit.push_str(" AND ");
        order_limit.push_str(&cursor_condition);
    }
    order_limit.push_str(&format!(" ORDER BY {} LIMIT ? OFFSET ?", order.join(", ")));
    page_params.push(SqlValue::Integer(
        query.take.saturating_add(1).min(i64::MAX as u64) as i64,
    ));
    let offset = if query.after.is_some() { 0 } else { query.skip };
    page_params.push(SqlValue::Integer(offset.min(i64::MAX as u64) as i64));
    let sort_columns: String = query
        .order_by
        .iter()
        .map(|(field, _)| format!(", {}", sort_expr(*field, ctx)))
        .collect();
    Built {
        sort_columns,
        where_clause,
        where_params,
        order_limit,
        page_params,
    }
}

/// Reads the sort keys selected by [`Built::sort_columns`], starting at
/// column `first`, into a cursor.
pub(crate) fn cursor_of<F: FieldSql>(
    query: &Query<F>,
    row: &rusqlite::Row<'_>,
    first: usize,
    seq: i64,
) -> rusqlite::Result<Cursor> {
    let mut keys = Vec::with_capacity(query.order_by.len());
    for (index, (field, _)) in query.order_by.iter().enumerate() {
        keys.push(match field.kind() {
            Kind::Text | Kind::TextSet => Value::Text(row.get(first + index)?),
            Kind::Int => Value::Int(row.get(first + index)?),
            Kind::Time => Value::Time(row.get(first + index)?),
        });
    }
    Ok(Cursor { keys, seq })
}
