//! OData system query options of list requests (`GET /api/machines`,
//! `GET /api/machineactions`), parsed into the store's query AST.
//!
//! The contract is the "Query options (lists)" section of `docs/api.md`. Field
//! names never reach SQL: they are looked up in a fixed table of
//! [`FieldName`]s and become enum variants, and every literal becomes a
//! [`Value`] that the store binds as a parameter.
//!
//! The `$filter` parser is a recursive descent over a small tokenizer. It is
//! built for hostile input: the text is bounded ([`MAX_FILTER_LEN`]), the
//! nesting is bounded ([`MAX_DEPTH`]), chains of `and`/`or` become balanced
//! trees, and nothing slices a string other than on a character boundary, so
//! no input can overflow the stack or panic.

use proto::time::parse_utc;
use store::{
    ActionField, AuditField, CmpOp, Cursor, Direction, FieldSql, Filter, Kind, MachineField, Query,
    Value,
};

/// One filterable/sortable field of an entity: its OData (camelCase) name and store field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldName<F> {
    pub name: &'static str,
    pub field: F,
}

const fn field<F>(name: &'static str, field: F) -> FieldName<F> {
    FieldName { name, field }
}

/// Fields of a MachineAction usable in `$filter` and `$orderby`.
pub const ACTION_FIELDS: &[FieldName<ActionField>] = &[
    field("id", ActionField::Id),
    field("status", ActionField::Status),
    field("machineId", ActionField::MachineId),
    field("type", ActionField::Type),
    field("requestor", ActionField::Requestor),
    field("creationDateTimeUtc", ActionField::CreationDateTimeUtc),
    field("lastUpdateDateTimeUtc", ActionField::LastUpdateDateTimeUtc),
    field("computerDnsName", ActionField::ComputerDnsName),
];

/// Fields of a Machine usable in `$filter` and `$orderby` (`machineTags` in
/// `$filter` only).
pub const MACHINE_FIELDS: &[FieldName<MachineField>] = &[
    field("id", MachineField::Id),
    field("computerDnsName", MachineField::ComputerDnsName),
    field("healthStatus", MachineField::HealthStatus),
    field("osPlatform", MachineField::OsPlatform),
    field("lastSeen", MachineField::LastSeen),
    field("firstSeen", MachineField::FirstSeen),
    field("lastIpAddress", MachineField::LastIpAddress),
    field("rbacGroupId", MachineField::RbacGroupId),
    field("machineTags", MachineField::MachineTags),
    field("onboardingStatus", MachineField::OnboardingStatus),
    field("isolationState", MachineField::IsolationState),
    field("isolationScope", MachineField::IsolationScope),
];

/// Every key of the MachineAction entity, in the order of `docs/api.md`.
pub const ACTION_PROPERTIES: &[&str] = &[
    "id",
    "type",
    "title",
    "requestor",
    "requestorComment",
    "status",
    "machineId",
    "computerDnsName",
    "creationDateTimeUtc",
    "lastUpdateDateTimeUtc",
    "cancellationRequestor",
    "cancellationComment",
    "cancellationDateTimeUtc",
    "errorHResult",
    "scope",
    "externalId",
    "requestSource",
    "relatedFileInfo",
    "commands",
    "troubleshootInfo",
];

/// Every key of the Machine entity, in the order of `docs/api.md`.
pub const MACHINE_PROPERTIES: &[&str] = &[
    "id",
    "computerDnsName",
    "firstSeen",
    "lastSeen",
    "osPlatform",
    "osVersion",
    "version",
    "osProcessor",
    "osArchitecture",
    "osBuild",
    "agentVersion",
    "lastIpAddress",
    "lastExternalIpAddress",
    "healthStatus",
    "onboardingStatus",
    "rbacGroupId",
    "rbacGroupName",
    "riskScore",
    "exposureLevel",
    "deviceValue",
    "aadDeviceId",
    "isAadJoined",
    "machineTags",
    "ipAddresses",
    "isolationState",
    "isolationScope",
    "tamperCount",
    "lastTamperDateTimeUtc",
    "exclusionRulesVersion",
];

/// Fields of an AuditEvent usable in `$filter` and `$orderby`.
pub const AUDIT_FIELDS: &[FieldName<AuditField>] = &[
    field("id", AuditField::Id),
    field("dateTimeUtc", AuditField::At),
    field("principal", AuditField::Principal),
    field("action", AuditField::Action),
    field("outcome", AuditField::Outcome),
    field("status", AuditField::Status),
    field("requestId", AuditField::RequestId),
];

/// Every key of the AuditEvent entity, in its order.
pub const AUDIT_PROPERTIES: &[&str] = &[
    "id",
    "dateTimeUtc",
    "principal",
    "sourceAddress",
    "requestId",
    "method",
    "target",
    "action",
    "outcome",
    "status",
    "detail",
    "count",
    "hash",
    "previousHash",
];

/// The largest `$top`.
pub const MAX_TOP: u64 = 10_000;
/// The default and largest `pageSize`.
pub const MAX_PAGE_SIZE: u64 = 10_000;
/// The longest `$filter`, in bytes after percent-decoding.
pub const MAX_FILTER_LEN: usize = 8 * 1024;
/// The deepest nesting of parentheses, `not` and `any()` in a `$filter`.
pub const MAX_DEPTH: usize = 64;
/// The most conditions (comparisons, `in`, `startswith()`) a `$filter` may
/// hold once `or`-ed equalities on one field are combined into one `in`:
/// the cost of a query grows with rows × conditions, so this bounds it.
pub const MAX_CONDITIONS: usize = 100;

/// How many characters of client input an error message echoes at most.
const MAX_ECHO: usize = 40;

/// The parsed query options of one list request.
#[derive(Debug, Clone)]
pub struct ListOptions<F> {
    /// take = min(page_size, remaining top); skip; after = decoded $skiptoken; count; filter; order_by.
    pub query: Query<F>,
    /// `$top` as given (the remaining total to return across pages), if any.
    pub top: Option<u64>,
    pub page_size: u64,
    /// `$select` properties in the order given, canonical (entity) spelling; None when absent.
    pub select: Option<Vec<&'static str>>,
}

/// The options this module knows, as indexes into the table of values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opt {
    Top,
    Skip,
    Count,
    SkipToken,
    Select,
    OrderBy,
    Filter,
    PageSize,
}

const OPT_COUNT: usize = 8;

fn system_option(name: &str) -> Option<Opt> {
    Some(match name.to_ascii_lowercase().as_str() {
        "$top" => Opt::Top,
        "$skip" => Opt::Skip,
        "$count" => Opt::Count,
        "$skiptoken" => Opt::SkipToken,
        "$select" => Opt::Select,
        "$orderby" => Opt::OrderBy,
        "$filter" => Opt::Filter,
        _ => return None,
    })
}

/// Parses the query options of a list request.
///
/// `raw_query` is the URL's query string without `?` (percent-encoded, `+` means space), or None.
/// On error returns a human-readable message naming the problem (the server wraps it into a 400 ODataError).
pub fn parse<F: FieldSql + PartialEq + 'static>(
    raw_query: Option<&str>,
    fields: &'static [FieldName<F>],
    properties: &'static [&'static str],
) -> Result<ListOptions<F>, String> {
    let mut values: [Option<String>; OPT_COUNT] = Default::default();
    for (raw_name, raw_value) in segments(raw_query.unwrap_or("")) {
        let name = decode_utf8(raw_name)?;
        let value = decode_utf8(raw_value.unwrap_or(""))?;
        let opt = if name.starts_with('$') {
            system_option(&name).ok_or_else(|| format!("unknown query option {}", echo(&name)))?
        } else if name.eq_ignore_ascii_case("pageSize") {
            Opt::PageSize
        } else {
            continue;
        };
        let slot = &mut values[opt as usize];
        if slot.is_some() {
            return Err(format!("duplicate query option {}", echo(&name)));
        }
        *slot = Some(value);
    }
    let mut take = |opt: Opt| values[opt as usize].take();

    let top = match take(Opt::Top) {
        None => None,
        Some(text) => Some(
            parse_uint(&text)
                .filter(|&n| n <= MAX_TOP)
                .ok_or_else(|| format!("$top must be an integer from 0 to {MAX_TOP}"))?,
        ),
    };
    let skip = match take(Opt::Skip) {
        None => 0,
        Some(text) => {
            parse_uint(&text).ok_or_else(|| "$skip must be a non-negative integer".to_owned())?
        }
    };
    let count = match take(Opt::Count) {
        None => false,
        Some(text) if text.trim().eq_ignore_ascii_case("true") => true,
        Some(text) if text.trim().eq_ignore_ascii_case("false") => false,
        Some(_) => return Err("$count must be true or false".to_owned()),
    };
    let page_size = match take(Opt::PageSize) {
        None => MAX_PAGE_SIZE,
        Some(text) => parse_page_size(&text)?,
    };
    let select = match take(Opt::Select) {
        None => None,
        Some(text) => parse_select(&text, properties)?,
    };
    let order_by = match take(Opt::OrderBy) {
        None => Vec::new(),
        Some(text) => parse_order_by(&text, fields)?,
    };
    let filter = match take(Opt::Filter) {
        None => None,
        Some(text) => Some(parse_filter(&text, fields)?),
    };
    let after = match take(Opt::SkipToken) {
        None => None,
        Some(text) => Some(parse_skip_token(&text, &order_by)?),
    };

    let query = Query {
        filter,
        order_by,
        skip,
        take: top.map_or(page_size, |top| top.min(page_size)),
        after,
        count,
        groups: None,
    };
    Ok(ListOptions {
        query,
        top,
        page_size,
        select,
    })
}

/// The query string (without `?`) of the next page's link: every parameter of
/// `raw_query` kept as it was (same order), except `$skip` and `$skiptoken`
/// which are dropped and `$top` which is replaced by `remaining_top` if Some;
/// then `$skiptoken=<cursor.encode()>` appended. Values are re-encoded so the
/// result is a valid URL query.
pub fn next_page_query(
    raw_query: Option<&str>,
    cursor: &Cursor,
    remaining_top: Option<u64>,
) -> String {
    let mut parts = Vec::new();
    let mut top_written = false;
    for (raw_name, raw_value) in segments(raw_query.unwrap_or("")) {
        let name = percent_decode(raw_name);
        match name.to_ascii_lowercase().as_slice() {
            b"$skip" | b"$skiptoken" => continue,
            b"$top" => {
                if let Some(top) = remaining_top {
                    if !top_written {
                        parts.push(format!("$top={top}"));
                        top_written = true;
                    }
                    continue;
                }
            }
            _ => {}
        }
        let mut part = percent_encode(&name);
        if let Some(value) = raw_value {
            part.push('=');
            part.push_str(&percent_encode(&percent_decode(value)));
        }
        parts.push(part);
    }
    if let (Some(top), false) = (remaining_top, top_written) {
        parts.push(format!("$top={top}"));
    }
    parts.push(format!(
        "$skiptoken={}",
        percent_encode(cursor.encode().as_bytes())
    ));
    parts.join("&")
}

// ---------------------------------------------------------------------------
// Query string encoding

/// The `name[=value]` segments of a raw query string, still encoded.
fn segments(raw: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    raw.split('&')
        .filter(|segment| !segment.is_empty())
        .map(|segment| match segment.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (segment, None),
        })
}

/// Form-urlencoded decoding: `+` is a space, `%XX` a byte; a `%` not followed
/// by two hex digits stays as it is.
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let hex = |index: usize| -> Option<u8> {
        let digit = (*bytes.get(index)? as char).to_digit(16)?;
        u8::try_from(digit).ok()
    };
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => {
                out.push(b' ');
                index += 1;
            }
            b'%' => match (hex(index + 1), hex(index + 2)) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    index += 3;
                }
                _ => {
                    out.push(b'%');
                    index += 1;
                }
            },
            byte => {
                out.push(byte);
                index += 1;
            }
        }
    }
    out
}

fn decode_utf8(text: &str) -> Result<String, String> {
    String::from_utf8(percent_decode(text))
        .map_err(|_| "the query string is not valid UTF-8 after percent-decoding".to_owned())
}

/// Percent-encodes every byte but the unreserved characters and a few that
/// are safe inside a query value and keep OData readable.
fn percent_encode(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(bytes.len());
    for &byte in bytes {
        if byte.is_ascii_alphanumeric() || b"-._~$'()*,:/@!".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
    }
    out
}

/// `'text'`, cut to [`MAX_ECHO`] characters, for error messages.
fn echo(text: &str) -> String {
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(MAX_ECHO).collect();
    if chars.next().is_some() {
        format!("'{head}…'")
    } else {
        format!("'{head}'")
    }
}

// ---------------------------------------------------------------------------
// Simple options

/// ASCII digits only (surrounding whitespace allowed); None on overflow.
fn parse_uint(text: &str) -> Option<u64> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn parse_page_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let error = || format!("pageSize must be an integer from 1 to {MAX_PAGE_SIZE}");
    if trimmed.is_empty() || !trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return Err(error());
    }
    // Only digits: a parse failure is an overflow, which clamps like any
    // other value above the maximum.
    let size = trimmed.parse::<u64>().unwrap_or(u64::MAX);
    if size == 0 {
        return Err(error());
    }
    Ok(size.min(MAX_PAGE_SIZE))
}

fn parse_select(
    text: &str,
    properties: &'static [&'static str],
) -> Result<Option<Vec<&'static str>>, String> {
    let mut selected = Vec::new();
    let mut all = false;
    for item in text.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err("empty property name in $select".to_owned());
        }
        if item == "*" {
            all = true;
            continue;
        }
        let property = properties
            .iter()
            .copied()
            .find(|p| p.eq_ignore_ascii_case(item))
            .ok_or_else(|| format!("unknown property {} in $select", echo(item)))?;
        if !selected.contains(&property) {
            selected.push(property);
        }
    }
    Ok(if all { None } else { Some(selected) })
}

fn find_field<F>(fields: &'static [FieldName<F>], name: &str) -> Option<&'static FieldName<F>> {
    fields.iter().find(|f| f.name.eq_ignore_ascii_case(name))
}

fn parse_order_by<F: FieldSql>(
    text: &str,
    fields: &'static [FieldName<F>],
) -> Result<Vec<(F, Direction)>, String> {
    let mut order_by = Vec::new();
    let mut names: Vec<&'static str> = Vec::new();
    for term in text.split(',') {
        let mut words = term.split_whitespace();
        let Some(name) = words.next() else {
            return Err("empty term in $orderby".to_owned());
        };
        let found = find_field(fields, name)
            .ok_or_else(|| format!("unknown field {} in $orderby", echo(name)))?;
        let direction = match words.next() {
            None => Direction::Asc,
            Some(word) if word.eq_ignore_ascii_case("asc") => Direction::Asc,
            Some(word) if word.eq_ignore_ascii_case("desc") => Direction::Desc,
            Some(word) => {
                return Err(format!(
                    "invalid sort direction {} in $orderby, expected asc or desc",
                    echo(word)
                ));
            }
        };
        if let Some(extra) = words.next() {
            return Err(format!("unexpected {} in $orderby", echo(extra)));
        }
        if found.field.kind() == Kind::TextSet {
            return Err(format!("{} can't be used in $orderby", found.name));
        }
        if names.contains(&found.name) {
            return Err(format!("duplicate field '{}' in $orderby", found.name));
        }
        names.push(found.name);
        order_by.push((found.field, direction));
    }
    Ok(order_by)
}

/// A cursor made by this server for the same `$orderby`: one key per sort
/// term, each of the term's kind.
fn parse_skip_token<F: FieldSql>(
    text: &str,
    order_by: &[(F, Direction)],
) -> Result<Cursor, String> {
    let invalid = || "invalid $skiptoken".to_owned();
    let cursor = Cursor::decode(text).ok_or_else(invalid)?;
    if cursor.keys.len() != order_by.len() {
        return Err(invalid());
    }
    let fits = cursor.keys.iter().zip(order_by).all(|(key, (field, _))| {
        matches!(
            (field.kind(), key),
            (_, Value::Null)
                | (Kind::Text | Kind::TextSet, Value::Text(_))
                | (Kind::Int, Value::Int(_))
                | (Kind::Time, Value::Time(_))
        )
    });
    if fits { Ok(cursor) } else { Err(invalid()) }
}

// ---------------------------------------------------------------------------
// $filter: tokens

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Open,
    Close,
    Comma,
    Colon,
    Slash,
    /// A single-quoted string, unescaped.
    Str(String),
    /// An identifier or keyword: `[A-Za-z_][A-Za-z0-9_]*`.
    Word(String),
    /// An unquoted number, date or date-time.
    Lit(String),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    /// Position in characters from the start of the `$filter` text.
    pos: usize,
}

fn describe(tok: &Tok) -> String {
    match tok {
        Tok::Open => "'('".to_owned(),
        Tok::Close => "')'".to_owned(),
        Tok::Comma => "','".to_owned(),
        Tok::Colon => "':'".to_owned(),
        Tok::Slash => "'/'".to_owned(),
        Tok::Str(text) | Tok::Word(text) | Tok::Lit(text) => echo(text),
    }
}

fn is_lit_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ':' | '.' | '-' | '+')
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let pos = i;
        let tok = match c {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '(' | ')' | ',' | ':' | '/' => {
                i += 1;
                match c {
                    '(' => Tok::Open,
                    ')' => Tok::Close,
                    ',' => Tok::Comma,
                    ':' => Tok::Colon,
                    _ => Tok::Slash,
                }
            }
            '\'' => {
                let mut value = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => {
                            return Err(format!(
                                "unterminated string literal at position {pos} in $filter"
                            ));
                        }
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                            value.push('\'');
                            i += 2;
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(&other) => {
                            value.push(other);
                            i += 1;
                        }
                    }
                }
                Tok::Str(value)
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                Tok::Word(chars[pos..i].iter().collect())
            }
            c if c.is_ascii_digit()
                || (c == '-' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                i += 1;
                while i < chars.len() && is_lit_char(chars[i]) {
                    i += 1;
                }
                let mut literal: String = chars[pos..i].iter().collect();
                if let Some(joined) = rejoin_offset(&literal, &chars, i) {
                    literal = joined;
                    i += 6;
                }
                Tok::Lit(literal)
            }
            other => {
                return Err(format!(
                    "unexpected character {} at position {pos} in $filter",
                    echo(&other.to_string())
                ));
            }
        };
        tokens.push(Token { tok, pos });
    }
    Ok(tokens)
}

/// A `+HH:MM` offset written unencoded in a URL arrives as ` HH:MM`. When a
/// date-time literal without a zone is followed by exactly that, and the two
/// together make a valid date-time, they are one literal.
fn rejoin_offset(literal: &str, chars: &[char], end: usize) -> Option<String> {
    if chars.get(end) != Some(&' ') || parse_utc(literal).is_some() {
        return None;
    }
    let zone = chars.get(end + 1..end + 6)?;
    let digit = |index: usize| zone[index].is_ascii_digit();
    if !(digit(0) && digit(1) && zone[2] == ':' && digit(3) && digit(4)) {
        return None;
    }
    if chars.get(end + 6).is_some_and(|&c| is_lit_char(c)) {
        return None;
    }
    let zone: String = zone.iter().collect();
    let joined = format!("{literal}+{zone}");
    parse_utc(&joined).map(|_| joined)
}

// ---------------------------------------------------------------------------
// $filter: grammar

/// Words that can't be field names or lambda variables.
const KEYWORDS: &[&str] = &[
    "and", "or", "not", "eq", "ne", "gt", "ge", "lt", "le", "in", "null", "true", "false",
];

fn is_keyword(word: &str) -> bool {
    KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(word))
}

fn comparison(word: &str) -> Option<CmpOp> {
    Some(match word.to_ascii_lowercase().as_str() {
        "eq" => CmpOp::Eq,
        "ne" => CmpOp::Ne,
        "gt" => CmpOp::Gt,
        "ge" => CmpOp::Ge,
        "lt" => CmpOp::Lt,
        "le" => CmpOp::Le,
        _ => return None,
    })
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Text | Kind::TextSet => "a string",
        Kind::Int => "an integer",
        Kind::Time => "a date-time",
    }
}

/// `Filter::And` or `Filter::Or`.
type Join<F> = fn(Box<Filter<F>>, Box<Filter<F>>) -> Filter<F>;

/// Joins `first` and `rest` into a balanced tree, so that a long chain of
/// `and`/`or` stays shallow for everything that walks it recursively.
fn balanced<F>(first: Filter<F>, mut rest: Vec<Filter<F>>, join: Join<F>) -> Filter<F> {
    if rest.is_empty() {
        return first;
    }
    let left_len = (rest.len() + 1).div_ceil(2);
    let mut right = rest.split_off(left_len - 1).into_iter();
    match right.next() {
        Some(right_first) => join(
            Box::new(balanced(first, rest, join)),
            Box::new(balanced(right_first, right.collect(), join)),
        ),
        None => balanced(first, rest, join),
    }
}

/// Parses a `$filter` expression over `fields`.
pub fn parse_filter<F: FieldSql + PartialEq + 'static>(
    text: &str,
    fields: &'static [FieldName<F>],
) -> Result<Filter<F>, String> {
    if text.len() > MAX_FILTER_LEN {
        return Err(format!(
            "$filter is too long (at most {MAX_FILTER_LEN} bytes)"
        ));
    }
    let tokens = tokenize(text)?;
    if tokens.is_empty() {
        return Err("empty $filter".to_owned());
    }
    let mut parser = Parser {
        tokens,
        next: 0,
        depth: 0,
        fields,
    };
    let filter = parser.or()?;
    if parser.next < parser.tokens.len() {
        return Err(parser.unexpected(None));
    }
    let conditions = conditions(&filter);
    if conditions > MAX_CONDITIONS {
        return Err(format!(
            "$filter is too complex: it has {conditions} conditions, at most {MAX_CONDITIONS} are \
             allowed (eq conditions on one field joined by or count as one, as would one in (…))"
        ));
    }
    Ok(filter)
}

/// The conditions of `filter`: its comparisons, `in` lists and
/// `startswith()` calls, inside `any()` too.
fn conditions<F>(filter: &Filter<F>) -> usize {
    match filter {
        Filter::And(a, b) | Filter::Or(a, b) => conditions(a) + conditions(b),
        Filter::Not(a) => conditions(a),
        Filter::Any(_, body) => conditions(body).max(1),
        Filter::Compare(..) | Filter::In(..) | Filter::StartsWith(..) => 1,
    }
}

/// A condition on a set field (machine tags) outside `any()` means "some
/// element satisfies it": written as the `any()` it is, so that `or`-ed
/// conditions on the set combine like those inside one `any()`.
fn on_set<F: FieldSql>(filter: Filter<F>, field: F) -> Filter<F> {
    if field.kind() == Kind::TextSet {
        Filter::Any(field, Box::new(filter))
    } else {
        filter
    }
}

/// The terms of an `or` tree, left to right.
fn or_terms<F>(filter: Filter<F>, out: &mut Vec<Filter<F>>) {
    match filter {
        Filter::Or(a, b) => {
            or_terms(*a, out);
            or_terms(*b, out);
        }
        other => out.push(other),
    }
}

/// Joins `terms` with `or`, combining first what makes the query cheaper
/// without changing its meaning: equalities (and `in` lists) on one field
/// become one `in` list, a set lookup; `any()` conditions on one collection
/// become one `any()` (some element satisfies a or some satisfies b = some
/// element satisfies a or b), so the collection is read once.
fn join_or<F: FieldSql + PartialEq>(terms: Vec<Filter<F>>) -> Filter<F> {
    enum Slot<F> {
        Plain(Filter<F>),
        /// Equalities and `in` lists on one field.
        Values(F, Vec<Filter<F>>),
        /// The bodies of `any()` on one field.
        Any(F, Vec<Filter<F>>),
    }
    let mut flat = Vec::with_capacity(terms.len());
    for term in terms {
        or_terms(term, &mut flat);
    }
    let mut slots: Vec<Slot<F>> = Vec::new();
    for term in flat {
        match term {
            Filter::Compare(field, CmpOp::Eq, ref value) if *value != Value::Null => {
                match slots
                    .iter_mut()
                    .find(|s| matches!(s, Slot::Values(f, _) if *f == field))
                {
                    Some(Slot::Values(_, group)) => group.push(term),
                    _ => slots.push(Slot::Values(field, vec![term])),
                }
            }
            Filter::In(field, _) => match slots
                .iter_mut()
                .find(|s| matches!(s, Slot::Values(f, _) if *f == field))
            {
                Some(Slot::Values(_, group)) => group.push(term),
                _ => slots.push(Slot::Values(field, vec![term])),
            },
            Filter::Any(field, body) => match slots
                .iter_mut()
                .find(|s| matches!(s, Slot::Any(f, _) if *f == field))
            {
                Some(Slot::Any(_, bodies)) => bodies.push(*body),
                _ => slots.push(Slot::Any(field, vec![*body])),
            },
            other => slots.push(Slot::Plain(other)),
        }
    }
    let mut joined: Vec<Filter<F>> = slots
        .into_iter()
        .map(|slot| match slot {
            Slot::Plain(filter) => filter,
            Slot::Values(_, mut group) if group.len() == 1 => group.remove(0),
            Slot::Values(field, group) => {
                let mut values = Vec::new();
                for term in group {
                    match term {
                        Filter::Compare(_, _, value) => values.push(value),
                        Filter::In(_, list) => values.extend(list),
                        _ => {}
                    }
                }
                Filter::In(field, values)
            }
            Slot::Any(field, mut bodies) if bodies.len() == 1 => {
                Filter::Any(field, Box::new(bodies.remove(0)))
            }
            Slot::Any(field, bodies) => Filter::Any(field, Box::new(join_or(bodies))),
        })
        .collect();
    let first = joined.remove(0);
    balanced(first, joined, Filter::Or)
}

struct Parser<F: 'static> {
    tokens: Vec<Token>,
    /// Index of the next token.
    next: usize,
    /// Current nesting of parentheses, `not` and `any()`.
    depth: usize,
    fields: &'static [FieldName<F>],
}

impl<F: FieldSql + PartialEq + 'static> Parser<F> {
    fn peek(&self) -> Option<&Tok> {
        self.peek_at(0)
    }

    fn peek_at(&self, ahead: usize) -> Option<&Tok> {
        self.tokens.get(self.next + ahead).map(|token| &token.tok)
    }

    fn is_word(&self, keyword: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(word)) if word.eq_ignore_ascii_case(keyword))
    }

    fn eat_word(&mut self, keyword: &str) -> bool {
        let found = self.is_word(keyword);
        if found {
            self.next += 1;
        }
        found
    }

    /// The error for the token at the cursor, or for the end of the text.
    fn unexpected(&self, expected: Option<&str>) -> String {
        let mut message = match self.tokens.get(self.next) {
            None => "unexpected end of $filter".to_owned(),
            Some(token) => format!(
                "unexpected token {} at position {} in $filter",
                describe(&token.tok),
                token.pos
            ),
        };
        if let Some(expected) = expected {
            message.push_str(", expected ");
            message.push_str(expected);
        }
        message
    }

    fn expect(&mut self, tok: Tok, expected: &str) -> Result<(), String> {
        if self.peek() == Some(&tok) {
            self.next += 1;
            Ok(())
        } else {
            Err(self.unexpected(Some(expected)))
        }
    }

    fn enter(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!(
                "$filter is nested too deeply (at most {MAX_DEPTH} levels)"
            ));
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }

    /// `or := and ('or' and)*`
    fn or(&mut self) -> Result<Filter<F>, String> {
        let mut terms = vec![self.and()?];
        while self.eat_word("or") {
            terms.push(self.and()?);
        }
        Ok(join_or(terms))
    }

    /// `and := unary ('and' unary)*`
    fn and(&mut self) -> Result<Filter<F>, String> {
        let first = self.unary()?;
        let mut rest = Vec::new();
        while self.eat_word("and") {
            rest.push(self.unary()?);
        }
        Ok(balanced(first, rest, Filter::And))
    }

    /// `unary := 'not' unary | primary`
    fn unary(&mut self) -> Result<Filter<F>, String> {
        if self.eat_word("not") {
            self.enter()?;
            let inner = self.unary()?;
            self.leave();
            return Ok(Filter::Not(Box::new(inner)));
        }
        self.primary()
    }

    /// `primary := '(' or ')' | startswith(field, 'text') | field predicate`
    fn primary(&mut self) -> Result<Filter<F>, String> {
        match self.peek() {
            Some(Tok::Open) => {
                self.enter()?;
                self.next += 1;
                let inner = self.or()?;
                self.expect(Tok::Close, "')'")?;
                self.leave();
                Ok(inner)
            }
            Some(Tok::Word(word)) if !is_keyword(word) => {
                let word = word.clone();
                if self.peek_at(1) == Some(&Tok::Open) {
                    if word.eq_ignore_ascii_case("startswith") {
                        return self.starts_with(None);
                    }
                    return Err(format!("unsupported function {} in $filter", echo(&word)));
                }
                let field = find_field(self.fields, &word)
                    .ok_or_else(|| format!("unknown field {} in $filter", echo(&word)))?;
                self.next += 1;
                self.predicate(field)
            }
            _ => Err(self.unexpected(Some("a condition"))),
        }
    }

    /// What follows a field: `op literal`, `in (literal, …)` or `/any(…)`.
    fn predicate(&mut self, field: &'static FieldName<F>) -> Result<Filter<F>, String> {
        let op = match self.peek() {
            Some(Tok::Slash) => {
                self.next += 1;
                return self.any(field);
            }
            Some(Tok::Word(word)) if word.eq_ignore_ascii_case("in") => {
                self.next += 1;
                let list = Filter::In(field.field, self.list(field)?);
                return Ok(on_set(list, field.field));
            }
            Some(Tok::Word(word)) => comparison(word),
            _ => None,
        };
        let Some(op) = op else {
            return Err(self.unexpected(Some(&format!(
                "eq, ne, gt, ge, lt, le or in after '{}'",
                field.name
            ))));
        };
        self.next += 1;
        if field.field.kind() == Kind::TextSet && op != CmpOp::Eq {
            return Err(format!(
                "{} supports only eq, in, startswith() and any() in $filter",
                field.name
            ));
        }
        let value = self.value(field)?;
        Ok(on_set(Filter::Compare(field.field, op, value), field.field))
    }

    /// A literal of the field's kind (`null` too, unless it is a set).
    fn value(&mut self, field: &FieldName<F>) -> Result<Value, String> {
        let kind = field.field.kind();
        let Some(token) = self.tokens.get(self.next) else {
            return Err(format!(
                "unexpected end of $filter, expected a value for {}",
                field.name
            ));
        };
        let value = match (&token.tok, kind) {
            (Tok::Word(word), Kind::Text | Kind::Int | Kind::Time)
                if word.eq_ignore_ascii_case("null") =>
            {
                Some(Value::Null)
            }
            (Tok::Str(text), Kind::Text | Kind::TextSet) => Some(Value::Text(text.clone())),
            (Tok::Lit(text), Kind::Int) => text.parse().ok().map(Value::Int),
            (Tok::Lit(text) | Tok::Str(text), Kind::Time) => parse_utc(text).map(Value::Time),
            _ => None,
        };
        let value = value.ok_or_else(|| {
            format!(
                "{} expects {}, got {}",
                field.name,
                kind_name(kind),
                describe(&token.tok)
            )
        })?;
        self.next += 1;
        Ok(value)
    }

    /// `'(' literal (',' literal)* ')'`
    fn list(&mut self, field: &FieldName<F>) -> Result<Vec<Value>, String> {
        self.expect(Tok::Open, "'(' after 'in'")?;
        if self.peek() == Some(&Tok::Close) {
            return Err("empty list after 'in' in $filter".to_owned());
        }
        let mut values = Vec::new();
        loop {
            values.push(self.value(field)?);
            match self.peek() {
                Some(Tok::Comma) => self.next += 1,
                Some(Tok::Close) => {
                    self.next += 1;
                    return Ok(values);
                }
                _ => return Err(self.unexpected(Some("',' or ')'"))),
            }
        }
    }

    /// `startswith(subject, 'prefix')`, the cursor on `startswith`. Inside
    /// `any()`, `lambda` holds the variable (the only subject allowed) and
    /// the collection field.
    fn starts_with(
        &mut self,
        lambda: Option<(&str, &'static FieldName<F>)>,
    ) -> Result<Filter<F>, String> {
        self.next += 1;
        self.expect(Tok::Open, "'(' after startswith")?;
        let subject = match self.peek() {
            Some(Tok::Word(word)) => word.clone(),
            _ => return Err(self.unexpected(Some("a field in startswith()"))),
        };
        let field = match lambda {
            Some((var, field)) if subject == var => field,
            Some((var, _)) => {
                return Err(self.unexpected(Some(&format!("the lambda variable '{var}'"))));
            }
            None => {
                let field = find_field(self.fields, &subject)
                    .ok_or_else(|| format!("unknown field {} in $filter", echo(&subject)))?;
                if !matches!(field.field.kind(), Kind::Text | Kind::TextSet) {
                    return Err(format!(
                        "startswith() needs a text field, and {} is not one",
                        field.name
                    ));
                }
                field
            }
        };
        self.next += 1;
        self.expect(Tok::Comma, "','")?;
        let prefix = match self.peek() {
            Some(Tok::Str(text)) => text.clone(),
            _ => return Err(self.unexpected(Some("a string in startswith()"))),
        };
        self.next += 1;
        self.expect(Tok::Close, "')'")?;
        let call = Filter::StartsWith(field.field, prefix);
        // Outside any(), a set's startswith() is "some element starts
        // with", and `eq false` negates all of that.
        let call = match lambda {
            Some(_) => call,
            None => on_set(call, field.field),
        };
        Ok(self.bool_suffix(call))
    }

    /// Applies an optional `eq true`, `eq false`, `ne true` or `ne false`
    /// after a boolean function call.
    fn bool_suffix(&mut self, filter: Filter<F>) -> Filter<F> {
        let (Some(Tok::Word(op)), Some(Tok::Word(value))) = (self.peek(), self.peek_at(1)) else {
            return filter;
        };
        let negated_op = if op.eq_ignore_ascii_case("eq") {
            false
        } else if op.eq_ignore_ascii_case("ne") {
            true
        } else {
            return filter;
        };
        let truth = if value.eq_ignore_ascii_case("true") {
            true
        } else if value.eq_ignore_ascii_case("false") {
            false
        } else {
            return filter;
        };
        self.next += 2;
        if negated_op == truth {
            Filter::Not(Box::new(filter))
        } else {
            filter
        }
    }

    /// `any(var: condition)`, the cursor after the `/`.
    fn any(&mut self, field: &'static FieldName<F>) -> Result<Filter<F>, String> {
        if field.field.kind() != Kind::TextSet {
            return Err(format!(
                "{} is not a collection, so any() can't be used on it",
                field.name
            ));
        }
        match self.peek() {
            Some(Tok::Word(word)) if word.eq_ignore_ascii_case("any") => self.next += 1,
            Some(Tok::Word(word)) if word.eq_ignore_ascii_case("all") => {
                return Err("all() is not supported in $filter, only any()".to_owned());
            }
            _ => return Err(self.unexpected(Some("any"))),
        }
        self.enter()?;
        self.expect(Tok::Open, "'(' after any")?;
        let var = match self.peek() {
            Some(Tok::Word(word)) if !is_keyword(word) => word.clone(),
            Some(Tok::Close) => {
                return Err(format!(
                    "any() needs a condition in $filter, such as {}/any(t: t eq 'x')",
                    field.name
                ));
            }
            _ => return Err(self.unexpected(Some("a lambda variable"))),
        };
        self.next += 1;
        self.expect(Tok::Colon, "':' after the lambda variable")?;
        let body = self.lambda_or(&var, field)?;
        self.expect(Tok::Close, "')'")?;
        self.leave();
        Ok(Filter::Any(field.field, Box::new(body)))
    }

    /// `lambda_or := lambda_term ('or' lambda_term)*`. `and` and `not` are
    /// refused: "some element is a and b" is not "some is a and some is b".
    fn lambda_or(&mut self, var: &str, field: &'static FieldName<F>) -> Result<Filter<F>, String> {
        let mut terms = vec![self.lambda_term(var, field)?];
        loop {
            if self.is_word("and") {
                return Err(
                    "'and' is not supported inside any(); combine two any() conditions instead"
                        .to_owned(),
                );
            }
            if !self.eat_word("or") {
                break;
            }
            terms.push(self.lambda_term(var, field)?);
        }
        Ok(join_or(terms))
    }

    /// `'(' lambda_or ')' | startswith(var, 'text') | var op 'text' | var in (…)`
    fn lambda_term(
        &mut self,
        var: &str,
        field: &'static FieldName<F>,
    ) -> Result<Filter<F>, String> {
        match self.peek() {
            Some(Tok::Open) => {
                self.enter()?;
                self.next += 1;
                let inner = self.lambda_or(var, field)?;
                self.expect(Tok::Close, "')'")?;
                self.leave();
                Ok(inner)
            }
            Some(Tok::Word(word)) if word.eq_ignore_ascii_case("not") => {
                Err("'not' is not supported inside any()".to_owned())
            }
            Some(Tok::Word(word))
                if word.eq_ignore_ascii_case("startswith")
                    && self.peek_at(1) == Some(&Tok::Open) =>
            {
                self.starts_with(Some((var, field)))
            }
            Some(Tok::Word(word)) if word.as_str() == var => {
                self.next += 1;
                let op = match self.peek() {
                    Some(Tok::Word(word)) if word.eq_ignore_ascii_case("in") => {
                        self.next += 1;
                        return Ok(Filter::In(field.field, self.list(field)?));
                    }
                    Some(Tok::Word(word)) => comparison(word),
                    _ => None,
                };
                let Some(op) = op else {
                    return Err(self
                        .unexpected(Some(&format!("eq, ne, gt, ge, lt, le or in after '{var}'"))));
                };
                self.next += 1;
                let value = self.value(field)?;
                Ok(Filter::Compare(field.field, op, value))
            }
            _ => Err(self.unexpected(Some(&format!("a condition on '{var}'")))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ActionField as A;
    use MachineField as M;

    // -- helpers -----------------------------------------------------------

    fn actions(query: &str) -> Result<ListOptions<ActionField>, String> {
        parse(Some(query), ACTION_FIELDS, ACTION_PROPERTIES)
    }

    fn machines(query: &str) -> Result<ListOptions<MachineField>, String> {
        parse(Some(query), MACHINE_FIELDS, MACHINE_PROPERTIES)
    }

    /// `$filter=<filter>`, percent-encoded the way a client would.
    fn filter_query(filter: &str) -> String {
        format!("$filter={}", percent_encode(filter.as_bytes()))
    }

    fn action_filter(filter: &str) -> Result<Filter<ActionField>, String> {
        actions(&filter_query(filter)).map(|o| o.query.filter.expect("a filter"))
    }

    fn machine_filter(filter: &str) -> Result<Filter<MachineField>, String> {
        machines(&filter_query(filter)).map(|o| o.query.filter.expect("a filter"))
    }

    fn text(value: &str) -> Value {
        Value::Text(value.to_owned())
    }

    fn time(value: &str) -> Value {
        Value::Time(parse_utc(value).expect("a valid time"))
    }

    fn cmp<F>(field: F, op: CmpOp, value: Value) -> Filter<F> {
        Filter::Compare(field, op, value)
    }

    fn eq<F>(field: F, value: Value) -> Filter<F> {
        cmp(field, CmpOp::Eq, value)
    }

    fn and<F>(a: Filter<F>, b: Filter<F>) -> Filter<F> {
        Filter::And(Box::new(a), Box::new(b))
    }

    fn or<F>(a: Filter<F>, b: Filter<F>) -> Filter<F> {
        Filter::Or(Box::new(a), Box::new(b))
    }

    fn not<F>(a: Filter<F>) -> Filter<F> {
        Filter::Not(Box::new(a))
    }

    fn any(inner: Filter<M>) -> Filter<M> {
        Filter::Any(M::MachineTags, Box::new(inner))
    }

    fn starts<F>(field: F, prefix: &str) -> Filter<F> {
        Filter::StartsWith(field, prefix.to_owned())
    }

    fn depth<F>(filter: &Filter<F>) -> usize {
        match filter {
            Filter::And(a, b) | Filter::Or(a, b) => 1 + depth(a).max(depth(b)),
            Filter::Not(a) => 1 + depth(a),
            _ => 1,
        }
    }

    /// Every case's error message contains the expected text.
    fn check_errors<T: std::fmt::Debug>(
        cases: &[(&str, &str)],
        run: impl Fn(&str) -> Result<T, String>,
    ) {
        for (input, expected) in cases {
            match run(input) {
                Ok(value) => panic!("{input:?}: expected an error, got {value:?}"),
                Err(message) => assert!(
                    message.contains(expected),
                    "{input:?}: error {message:?} does not contain {expected:?}"
                ),
            }
        }
    }

    fn check_filters<F: FieldSql + std::fmt::Debug + PartialEq>(
        cases: Vec<(&str, Filter<F>)>,
        run: impl Fn(&str) -> Result<Filter<F>, String>,
    ) {
        for (input, expected) in cases {
            match run(input) {
                Ok(filter) => assert_eq!(filter, expected, "{input:?}"),
                Err(message) => panic!("{input:?}: unexpected error {message:?}"),
            }
        }
    }

    /// A one-line summary of everything but the filter.
    fn summary<F: std::fmt::Debug>(options: &ListOptions<F>) -> String {
        let q = &options.query;
        format!(
            "take={} skip={} count={} top={:?} page={} select={:?} order={:?} after={:?}",
            q.take,
            q.skip,
            q.count,
            options.top,
            options.page_size,
            options.select,
            q.order_by,
            q.after
        )
    }

    // -- constants ---------------------------------------------------------

    #[test]
    fn field_tables_match_the_store() {
        let names: Vec<_> = ACTION_FIELDS.iter().map(|f| f.name).collect();
        assert_eq!(
            names,
            [
                "id",
                "status",
                "machineId",
                "type",
                "requestor",
                "creationDateTimeUtc",
                "lastUpdateDateTimeUtc",
                "computerDnsName"
            ]
        );
        assert_eq!(MACHINE_FIELDS.len(), 12);
        for f in ACTION_FIELDS {
            assert!(ACTION_PROPERTIES.contains(&f.name), "{}", f.name);
        }
        for f in MACHINE_FIELDS {
            assert!(MACHINE_PROPERTIES.contains(&f.name), "{}", f.name);
        }
        assert_eq!(ACTION_PROPERTIES.len(), 20);
        assert_eq!(MACHINE_PROPERTIES.len(), 29);
        assert_eq!(
            MACHINE_FIELDS
                .iter()
                .filter(|f| f.field.kind() == Kind::TextSet)
                .map(|f| f.name)
                .collect::<Vec<_>>(),
            ["machineTags"]
        );
    }

    // -- simple options ----------------------------------------------------

    #[test]
    fn simple_options() {
        let none =
            "take=10000 skip=0 count=false top=None page=10000 select=None order=[] after=None";
        let cases: &[(Option<&str>, &str)] = &[
            (None, none),
            (Some(""), none),
            (Some("&&"), none),
            (Some("foo=bar&api-version=2"), none),
            (
                Some("$top=5"),
                "take=5 skip=0 count=false top=Some(5) page=10000 select=None order=[] after=None",
            ),
            (
                Some("$top=0"),
                "take=0 skip=0 count=false top=Some(0) page=10000 select=None order=[] after=None",
            ),
            (
                Some("$top=10000"),
                "take=10000 skip=0 count=false top=Some(10000) page=10000 select=None order=[] after=None",
            ),
            (
                Some("$TOP=7"),
                "take=7 skip=0 count=false top=Some(7) page=10000 select=None order=[] after=None",
            ),
            (
                Some("%24top=7"),
                "take=7 skip=0 count=false top=Some(7) page=10000 select=None order=[] after=None",
            ),
            (
                Some("$top=+7"),
                "take=7 skip=0 count=false top=Some(7) page=10000 select=None order=[] after=None",
            ),
            (
                Some("$top=007"),
                "take=7 skip=0 count=false top=Some(7) page=10000 select=None order=[] after=None",
            ),
            (
                Some("$skip=3"),
                "take=10000 skip=3 count=false top=None page=10000 select=None order=[] after=None",
            ),
            (
                Some("$skip=18446744073709551615"),
                "take=10000 skip=18446744073709551615 count=false top=None page=10000 select=None order=[] after=None",
            ),
            (
                Some("$count=true"),
                "take=10000 skip=0 count=true top=None page=10000 select=None order=[] after=None",
            ),
            (
                Some("$count=TRUE"),
                "take=10000 skip=0 count=true top=None page=10000 select=None order=[] after=None",
            ),
            (Some("$count=False"), none),
            (
                Some("pageSize=50"),
                "take=50 skip=0 count=false top=None page=50 select=None order=[] after=None",
            ),
            (
                Some("PAGESIZE=50"),
                "take=50 skip=0 count=false top=None page=50 select=None order=[] after=None",
            ),
            (
                Some("pageSize=50&$top=120"),
                "take=50 skip=0 count=false top=Some(120) page=50 select=None order=[] after=None",
            ),
            (
                Some("pageSize=500&$top=120"),
                "take=120 skip=0 count=false top=Some(120) page=500 select=None order=[] after=None",
            ),
            (Some("pageSize=20000"), none),
            (Some("pageSize=99999999999999999999999"), none),
            (
                Some("$select=id,status"),
                "take=10000 skip=0 count=false top=None page=10000 select=Some([\"id\", \"status\"]) order=[] after=None",
            ),
            (
                Some("$select=STATUS,+id+,Status"),
                "take=10000 skip=0 count=false top=None page=10000 select=Some([\"status\", \"id\"]) order=[] after=None",
            ),
            (
                Some("$select=errorhresult"),
                "take=10000 skip=0 count=false top=None page=10000 select=Some([\"errorHResult\"]) order=[] after=None",
            ),
            (Some("$select=*"), none),
            (Some("$select=id,*"), none),
            (
                Some("$orderby=creationDateTimeUtc"),
                "take=10000 skip=0 count=false top=None page=10000 select=None order=[(CreationDateTimeUtc, Asc)] after=None",
            ),
            (
                Some("$orderby=creationDateTimeUtc desc,id"),
                "take=10000 skip=0 count=false top=None page=10000 select=None order=[(CreationDateTimeUtc, Desc), (Id, Asc)] after=None",
            ),
            (
                Some("$orderby=+STATUS+DESC+,+id+asc"),
                "take=10000 skip=0 count=false top=None page=10000 select=None order=[(Status, Desc), (Id, Asc)] after=None",
            ),
            (
                Some("$orderby=status%20desc"),
                "take=10000 skip=0 count=false top=None page=10000 select=None order=[(Status, Desc)] after=None",
            ),
            (
                Some("$orderby=id&$skiptoken=s6162.42"),
                "take=10000 skip=0 count=false top=None page=10000 select=None order=[(Id, Asc)] after=Some(Cursor { keys: [Text(\"ab\")], seq: 42 })",
            ),
            (
                Some("$skiptoken=42"),
                "take=10000 skip=0 count=false top=None page=10000 select=None order=[] after=Some(Cursor { keys: [], seq: 42 })",
            ),
            (
                Some("$orderby=creationDateTimeUtc&$skiptoken=t-5.1"),
                "take=10000 skip=0 count=false top=None page=10000 select=None order=[(CreationDateTimeUtc, Asc)] after=Some(Cursor { keys: [Time(-5)], seq: 1 })",
            ),
            (
                Some("$orderby=id&$skiptoken=n.1"),
                "take=10000 skip=0 count=false top=None page=10000 select=None order=[(Id, Asc)] after=Some(Cursor { keys: [Null], seq: 1 })",
            ),
        ];
        for (query, expected) in cases {
            let options = parse(*query, ACTION_FIELDS, ACTION_PROPERTIES)
                .unwrap_or_else(|e| panic!("{query:?}: {e}"));
            assert_eq!(summary(&options), *expected, "{query:?}");
            assert_eq!(options.query.filter, None, "{query:?}");
        }
    }

    #[test]
    fn machine_options() {
        let options = machines("$orderby=rbacGroupId desc,lastSeen&$skiptoken=i7.t9.3&$select=machineTags,isolationScope,ipAddresses").unwrap();
        assert_eq!(
            summary(&options),
            "take=10000 skip=0 count=false top=None page=10000 select=Some([\"machineTags\", \"isolationScope\", \"ipAddresses\"]) order=[(RbacGroupId, Desc), (LastSeen, Asc)] after=Some(Cursor { keys: [Int(7), Time(9)], seq: 3 })"
        );
    }

    #[test]
    fn option_errors() {
        check_errors(
            &[
                ("$top=-1", "$top must be an integer from 0 to 10000"),
                ("$top=10001", "$top must be an integer from 0 to 10000"),
                ("$top=999999999", "$top must be an integer from 0 to 10000"),
                (
                    "$top=99999999999999999999999",
                    "$top must be an integer from 0 to 10000",
                ),
                ("$top=abc", "$top must be an integer from 0 to 10000"),
                ("$top=", "$top must be an integer from 0 to 10000"),
                ("$top", "$top must be an integer from 0 to 10000"),
                ("$top=1.5", "$top must be an integer from 0 to 10000"),
                ("$top=%2B1", "$top must be an integer from 0 to 10000"),
                ("$top=1e3", "$top must be an integer from 0 to 10000"),
                ("$top=5&$top=5", "duplicate query option '$top'"),
                ("$top=5&$TOP=6", "duplicate query option '$TOP'"),
                ("$skip=-1", "$skip must be a non-negative integer"),
                ("$skip=x", "$skip must be a non-negative integer"),
                (
                    "$skip=18446744073709551616",
                    "$skip must be a non-negative integer",
                ),
                ("$skip=1&$skip=2", "duplicate query option '$skip'"),
                ("$count=yes", "$count must be true or false"),
                ("$count=1", "$count must be true or false"),
                ("$count=", "$count must be true or false"),
                ("pageSize=0", "pageSize must be an integer from 1"),
                ("pageSize=-5", "pageSize must be an integer from 1"),
                ("pageSize=ten", "pageSize must be an integer from 1"),
                ("pageSize=1.5", "pageSize must be an integer from 1"),
                ("pageSize=", "pageSize must be an integer from 1"),
                ("pageSize=5&pagesize=6", "duplicate query option 'pagesize'"),
                ("$expand=foo", "unknown query option '$expand'"),
                ("$search=foo", "unknown query option '$search'"),
                ("$foo", "unknown query option '$foo'"),
                ("$format=json", "unknown query option '$format'"),
                ("$", "unknown query option '$'"),
                ("$top%20=5", "unknown query option '$top '"),
                ("$%C3%A9=1", "unknown query option '$é'"),
                ("$filter=%FF", "not valid UTF-8"),
                ("%FF=1", "not valid UTF-8"),
                ("x=%C3", "not valid UTF-8"),
                ("$select=foo", "unknown property 'foo' in $select"),
                ("$select=id,,status", "empty property name in $select"),
                ("$select=", "empty property name in $select"),
                (
                    "$select=isolationState",
                    "unknown property 'isolationState' in $select",
                ),
                ("$orderby=foo", "unknown field 'foo' in $orderby"),
                ("$orderby=title", "unknown field 'title' in $orderby"),
                (
                    "$orderby=id sideways",
                    "invalid sort direction 'sideways' in $orderby",
                ),
                ("$orderby=id asc desc", "unexpected 'desc' in $orderby"),
                ("$orderby=id,", "empty term in $orderby"),
                ("$orderby=", "empty term in $orderby"),
                ("$orderby=id,ID desc", "duplicate field 'id' in $orderby"),
                (
                    "$orderby=id;DROP TABLE actions",
                    "unknown field 'id;DROP' in $orderby",
                ),
                ("$skiptoken=garbage", "invalid $skiptoken"),
                ("$skiptoken=", "invalid $skiptoken"),
                ("$skiptoken=s6162.1", "invalid $skiptoken"),
                ("$orderby=id&$skiptoken=1", "invalid $skiptoken"),
                ("$orderby=id&$skiptoken=s616.1", "invalid $skiptoken"),
                ("$orderby=id&$skiptoken=sff.1", "invalid $skiptoken"),
                ("$orderby=id&$skiptoken=i5.1", "invalid $skiptoken"),
                (
                    "$orderby=creationDateTimeUtc&$skiptoken=s61.1",
                    "invalid $skiptoken",
                ),
                ("$orderby=id&$skiptoken=s61.x", "invalid $skiptoken"),
                ("$orderby=id&$skiptoken=%C3%A9.1", "invalid $skiptoken"),
                (
                    "$skiptoken=1&$skiptoken=1",
                    "duplicate query option '$skiptoken'",
                ),
                (
                    "$filter=id eq 'a'&$filter=id eq 'b'",
                    "duplicate query option '$filter'",
                ),
            ],
            actions,
        );
        check_errors(
            &[
                (
                    "$orderby=machineTags",
                    "machineTags can't be used in $orderby",
                ),
                (
                    "$orderby=rbacGroupId&$skiptoken=s61.1",
                    "invalid $skiptoken",
                ),
                (
                    "$orderby=lastSeen,rbacGroupId&$skiptoken=t1.1",
                    "invalid $skiptoken",
                ),
                ("$select=title", "unknown property 'title' in $select"),
            ],
            machines,
        );
    }

    #[test]
    fn long_input_is_echoed_short() {
        let name = format!("${}", "x".repeat(1000));
        let message = actions(&name).unwrap_err();
        assert!(message.len() < 100, "{message}");
        assert!(message.contains('…'));
        let message = action_filter(&format!("{} eq 'a'", "é".repeat(500))).unwrap_err();
        assert!(message.len() < 120, "{message}");
    }

    // -- $filter -----------------------------------------------------------

    #[test]
    fn action_filters() {
        let jan1 = "2024-01-01T00:00:00Z";
        check_filters(
            vec![
                ("status eq 'Pending'", eq(A::Status, text("Pending"))),
                ("STATUS EQ 'Pending'", eq(A::Status, text("Pending"))),
                ("  status   eq\t'Pending'  ", eq(A::Status, text("Pending"))),
                ("(status eq 'Pending')", eq(A::Status, text("Pending"))),
                ("(((status eq 'Pending')))", eq(A::Status, text("Pending"))),
                (
                    "status ne 'Pending'",
                    cmp(A::Status, CmpOp::Ne, text("Pending")),
                ),
                ("requestor gt 'a'", cmp(A::Requestor, CmpOp::Gt, text("a"))),
                ("requestor ge 'a'", cmp(A::Requestor, CmpOp::Ge, text("a"))),
                ("requestor lt 'a'", cmp(A::Requestor, CmpOp::Lt, text("a"))),
                ("requestor le 'a'", cmp(A::Requestor, CmpOp::Le, text("a"))),
                ("machineId eq ''", eq(A::MachineId, text(""))),
                (
                    "computerDnsName eq null",
                    eq(A::ComputerDnsName, Value::Null),
                ),
                (
                    "computerDnsName ne NULL",
                    cmp(A::ComputerDnsName, CmpOp::Ne, Value::Null),
                ),
                ("type eq 'Isolate'", eq(A::Type, text("Isolate"))),
                ("id eq 'it''s'", eq(A::Id, text("it's"))),
                ("id eq ''''", eq(A::Id, text("'"))),
                ("id eq ''''''", eq(A::Id, text("''"))),
                (
                    "status eq 'x'' OR 1=1 --'",
                    eq(A::Status, text("x' OR 1=1 --")),
                ),
                (
                    "id eq '1; DROP TABLE actions; --'",
                    eq(A::Id, text("1; DROP TABLE actions; --")),
                ),
                ("id eq '\" or \"\"=\"'", eq(A::Id, text("\" or \"\"=\""))),
                ("id eq 'a%20b+c&d=e'", eq(A::Id, text("a%20b+c&d=e"))),
                (
                    "id eq '(not) and or eq'",
                    eq(A::Id, text("(not) and or eq")),
                ),
                (
                    "computerDnsName eq 'пример.local'",
                    eq(A::ComputerDnsName, text("пример.local")),
                ),
                (
                    "computerDnsName eq '🦀''ü'",
                    eq(A::ComputerDnsName, text("🦀'ü")),
                ),
                (
                    "creationDateTimeUtc gt 2024-01-01T00:00:00Z",
                    cmp(A::CreationDateTimeUtc, CmpOp::Gt, time(jan1)),
                ),
                (
                    "creationDateTimeUtc gt 2024-01-01T00:00:00z",
                    cmp(A::CreationDateTimeUtc, CmpOp::Gt, time(jan1)),
                ),
                (
                    "creationDateTimeUtc gt 2024-01-01",
                    cmp(A::CreationDateTimeUtc, CmpOp::Gt, time(jan1)),
                ),
                (
                    "creationDateTimeUtc gt '2024-01-01T00:00:00Z'",
                    cmp(A::CreationDateTimeUtc, CmpOp::Gt, time(jan1)),
                ),
                (
                    "creationDateTimeUtc ge 2024-01-01T00:00:00.1234567Z",
                    cmp(
                        A::CreationDateTimeUtc,
                        CmpOp::Ge,
                        Value::Time(1_704_067_200_123_456_700),
                    ),
                ),
                (
                    "lastUpdateDateTimeUtc lt 2024-01-01T02:00:00+02:00",
                    cmp(A::LastUpdateDateTimeUtc, CmpOp::Lt, time(jan1)),
                ),
                (
                    "lastUpdateDateTimeUtc lt 2023-12-31T22:00:00-02:00",
                    cmp(A::LastUpdateDateTimeUtc, CmpOp::Lt, time(jan1)),
                ),
                (
                    "creationDateTimeUtc eq null",
                    eq(A::CreationDateTimeUtc, Value::Null),
                ),
                (
                    "status eq 'Pending' and type eq 'Isolate'",
                    and(eq(A::Status, text("Pending")), eq(A::Type, text("Isolate"))),
                ),
                (
                    "status eq 'Pending' or status eq 'InProgress'",
                    Filter::In(A::Status, vec![text("Pending"), text("InProgress")]),
                ),
                (
                    "status eq 'a' or type eq 'b' or status in ('c', 'd') or status eq null",
                    or(
                        or(
                            Filter::In(A::Status, vec![text("a"), text("c"), text("d")]),
                            eq(A::Type, text("b")),
                        ),
                        eq(A::Status, Value::Null),
                    ),
                ),
                (
                    "status eq 'a' or status eq 'b' and type eq 'c'",
                    or(
                        eq(A::Status, text("a")),
                        and(eq(A::Status, text("b")), eq(A::Type, text("c"))),
                    ),
                ),
                (
                    "status eq 'a' and status eq 'b' or type eq 'c'",
                    or(
                        and(eq(A::Status, text("a")), eq(A::Status, text("b"))),
                        eq(A::Type, text("c")),
                    ),
                ),
                (
                    "(status eq 'a' or status eq 'b') and type eq 'c'",
                    and(
                        Filter::In(A::Status, vec![text("a"), text("b")]),
                        eq(A::Type, text("c")),
                    ),
                ),
                (
                    "id eq 'a' and id eq 'b' and id eq 'c'",
                    and(
                        and(eq(A::Id, text("a")), eq(A::Id, text("b"))),
                        eq(A::Id, text("c")),
                    ),
                ),
                (
                    "id eq 'a' or id eq 'b' or id eq 'c' or id eq 'd'",
                    Filter::In(A::Id, vec![text("a"), text("b"), text("c"), text("d")]),
                ),
                (
                    "id gt 'a' or id gt 'b' or id gt 'c' or id gt 'd'",
                    or(
                        or(
                            cmp(A::Id, CmpOp::Gt, text("a")),
                            cmp(A::Id, CmpOp::Gt, text("b")),
                        ),
                        or(
                            cmp(A::Id, CmpOp::Gt, text("c")),
                            cmp(A::Id, CmpOp::Gt, text("d")),
                        ),
                    ),
                ),
                ("not status eq 'a'", not(eq(A::Status, text("a")))),
                ("not(status eq 'a')", not(eq(A::Status, text("a")))),
                ("NOT not status eq 'a'", not(not(eq(A::Status, text("a"))))),
                (
                    "not status eq 'a' and type eq 'b'",
                    and(not(eq(A::Status, text("a"))), eq(A::Type, text("b"))),
                ),
                (
                    "not (status eq 'a' and type eq 'b')",
                    not(and(eq(A::Status, text("a")), eq(A::Type, text("b")))),
                ),
                (
                    "status in ('Pending','InProgress')",
                    Filter::In(A::Status, vec![text("Pending"), text("InProgress")]),
                ),
                (
                    "status IN ( 'Pending' , 'InProgress' , null )",
                    Filter::In(
                        A::Status,
                        vec![text("Pending"), text("InProgress"), Value::Null],
                    ),
                ),
                ("status in ('a')", Filter::In(A::Status, vec![text("a")])),
                (
                    "creationDateTimeUtc in (2024-01-01, '2024-01-01T00:00:00Z')",
                    Filter::In(A::CreationDateTimeUtc, vec![time(jan1), time(jan1)]),
                ),
                ("startswith(requestor,'ad')", starts(A::Requestor, "ad")),
                (
                    "StartsWith( Requestor , 'it''s' )",
                    starts(A::Requestor, "it's"),
                ),
                ("startswith(requestor,'')", starts(A::Requestor, "")),
                (
                    "startswith(requestor,'ad') eq true",
                    starts(A::Requestor, "ad"),
                ),
                (
                    "startswith(requestor,'ad') eq false",
                    not(starts(A::Requestor, "ad")),
                ),
                (
                    "startswith(requestor,'ad') ne true",
                    not(starts(A::Requestor, "ad")),
                ),
                (
                    "startswith(requestor,'ad') ne FALSE",
                    starts(A::Requestor, "ad"),
                ),
                (
                    "not startswith(requestor,'%')",
                    not(starts(A::Requestor, "%")),
                ),
                (
                    "startswith(requestor,'a') and status eq 'b'",
                    and(starts(A::Requestor, "a"), eq(A::Status, text("b"))),
                ),
            ],
            action_filter,
        );
    }

    #[test]
    fn machine_filters() {
        check_filters(
            vec![
                ("rbacGroupId eq 5", eq(M::RbacGroupId, Value::Int(5))),
                ("rbacGroupId eq -5", eq(M::RbacGroupId, Value::Int(-5))),
                ("rbacGroupId eq 0", eq(M::RbacGroupId, Value::Int(0))),
                (
                    "rbacGroupId eq 9223372036854775807",
                    eq(M::RbacGroupId, Value::Int(i64::MAX)),
                ),
                (
                    "rbacGroupId eq -9223372036854775808",
                    eq(M::RbacGroupId, Value::Int(i64::MIN)),
                ),
                ("rbacGroupId eq null", eq(M::RbacGroupId, Value::Null)),
                (
                    "rbacGroupId in (1,2,3)",
                    Filter::In(
                        M::RbacGroupId,
                        vec![Value::Int(1), Value::Int(2), Value::Int(3)],
                    ),
                ),
                (
                    "rbacGroupId ge 1 and rbacGroupId le 3",
                    and(
                        cmp(M::RbacGroupId, CmpOp::Ge, Value::Int(1)),
                        cmp(M::RbacGroupId, CmpOp::Le, Value::Int(3)),
                    ),
                ),
                (
                    "healthStatus eq 'Active'",
                    eq(M::HealthStatus, text("Active")),
                ),
                (
                    "isolationState eq 'Isolated'",
                    eq(M::IsolationState, text("Isolated")),
                ),
                ("isolationScope eq null", eq(M::IsolationScope, Value::Null)),
                (
                    "onboardingStatus ne 'Onboarded'",
                    cmp(M::OnboardingStatus, CmpOp::Ne, text("Onboarded")),
                ),
                ("osPlatform eq 'Linux'", eq(M::OsPlatform, text("Linux"))),
                (
                    "lastIpAddress eq '10.0.0.1'",
                    eq(M::LastIpAddress, text("10.0.0.1")),
                ),
                (
                    "lastSeen gt 2024-01-01T00:00:00Z",
                    cmp(M::LastSeen, CmpOp::Gt, time("2024-01-01T00:00:00Z")),
                ),
                (
                    "firstSeen le 2024-02-29",
                    cmp(M::FirstSeen, CmpOp::Le, time("2024-02-29")),
                ),
                (
                    "startswith(computerDnsName,'web-')",
                    starts(M::ComputerDnsName, "web-"),
                ),
                (
                    "machineTags eq 'prod'",
                    any(eq(M::MachineTags, text("prod"))),
                ),
                (
                    "machineTags in ('prod','dev')",
                    any(Filter::In(M::MachineTags, vec![text("prod"), text("dev")])),
                ),
                (
                    "startswith(machineTags,'pr')",
                    any(starts(M::MachineTags, "pr")),
                ),
                (
                    // No tag starts with 'pr'.
                    "startswith(machineTags,'pr') eq false",
                    not(any(starts(M::MachineTags, "pr"))),
                ),
                (
                    "machineTags/any(x: x eq 'prod')",
                    any(eq(M::MachineTags, text("prod"))),
                ),
                (
                    "MachineTags/ANY(tag:tag eq 'prod')",
                    any(eq(M::MachineTags, text("prod"))),
                ),
                (
                    "machineTags/any( t : t ne 'prod' )",
                    any(cmp(M::MachineTags, CmpOp::Ne, text("prod"))),
                ),
                (
                    "machineTags/any(t: t gt 'm')",
                    any(cmp(M::MachineTags, CmpOp::Gt, text("m"))),
                ),
                (
                    "machineTags/any(t: startswith(t, 'pr'))",
                    any(starts(M::MachineTags, "pr")),
                ),
                (
                    // Some tag does not start with 'pr'.
                    "machineTags/any(t: startswith(t, 'pr') eq false)",
                    any(not(starts(M::MachineTags, "pr"))),
                ),
                (
                    "machineTags/any(t: t in ('a','b'))",
                    any(Filter::In(M::MachineTags, vec![text("a"), text("b")])),
                ),
                (
                    "machineTags/any(t: t eq 'a' or t eq 'b')",
                    any(Filter::In(M::MachineTags, vec![text("a"), text("b")])),
                ),
                (
                    "machineTags/any(t: (t eq 'a' or (startswith(t,'b'))))",
                    any(or(
                        eq(M::MachineTags, text("a")),
                        starts(M::MachineTags, "b"),
                    )),
                ),
                (
                    "machineTags/any(t: t eq 'a') and machineTags/any(t: t eq 'b')",
                    and(
                        any(eq(M::MachineTags, text("a"))),
                        any(eq(M::MachineTags, text("b"))),
                    ),
                ),
                (
                    // One any() over the tags, one in list inside.
                    "machineTags/any(t: t eq 'a') or machineTags eq 'b' or machineTags/any(t: t in ('c') or startswith(t, 'd'))",
                    any(or(
                        Filter::In(M::MachineTags, vec![text("a"), text("b"), text("c")]),
                        starts(M::MachineTags, "d"),
                    )),
                ),
                (
                    "not machineTags/any(t: t eq 'a')",
                    not(any(eq(M::MachineTags, text("a")))),
                ),
                (
                    "machineTags/any(id: id eq 'x')",
                    any(eq(M::MachineTags, text("x"))),
                ),
                (
                    "isolationState eq 'Isolated' and (machineTags eq 'prod' or rbacGroupId eq 2)",
                    and(
                        eq(M::IsolationState, text("Isolated")),
                        or(
                            any(eq(M::MachineTags, text("prod"))),
                            eq(M::RbacGroupId, Value::Int(2)),
                        ),
                    ),
                ),
            ],
            machine_filter,
        );
    }

    #[test]
    fn filter_with_unencoded_plus_in_an_offset() {
        // A client that writes `+02:00` unencoded sends a space instead.
        let expected = cmp(
            A::CreationDateTimeUtc,
            CmpOp::Gt,
            time("2024-01-01T00:00:00Z"),
        );
        for query in [
            "$filter=creationDateTimeUtc gt 2024-01-01T02:00:00+02:00",
            "$filter=creationDateTimeUtc+gt+2024-01-01T02:00:00+02:00",
            "$filter=creationDateTimeUtc%20gt%202024-01-01T02:00:00%2B02:00",
            "$filter=(creationDateTimeUtc gt 2024-01-01T02:00:00+02:00)",
        ] {
            let options = actions(query).unwrap_or_else(|e| panic!("{query}: {e}"));
            assert_eq!(options.query.filter, Some(expected.clone()), "{query}");
        }
        // Not a date-time with a zone after joining: still an error.
        assert!(actions("$filter=creationDateTimeUtc gt 2024-01-01T02:00:00+99:00").is_err());
        assert!(actions("$filter=creationDateTimeUtc gt 2024-01-01+02:00").is_err());
    }

    #[test]
    fn action_filter_errors() {
        check_errors(
            &[
                ("", "empty $filter"),
                ("   ", "empty $filter"),
                ("foo eq 'a'", "unknown field 'foo' in $filter"),
                ("title eq 'a'", "unknown field 'title' in $filter"),
                (
                    "machineTags eq 'a'",
                    "unknown field 'machineTags' in $filter",
                ),
                (
                    "status eq 'a' xyz",
                    "unexpected token 'xyz' at position 14 in $filter",
                ),
                (
                    "status eq 'a' status eq 'b'",
                    "unexpected token 'status' at position 14",
                ),
                ("status", "unexpected end of $filter"),
                (
                    "status eq",
                    "unexpected end of $filter, expected a value for status",
                ),
                ("status eq 'a' and", "unexpected end of $filter"),
                ("status eq 'a' or", "unexpected end of $filter"),
                ("and status eq 'a'", "unexpected token 'and' at position 0"),
                (
                    "status eq 'a' and or status eq 'b'",
                    "unexpected token 'or'",
                ),
                ("status == 'a'", "unexpected character '='"),
                ("status = 'a'", "unexpected character '='"),
                ("status eq \"a\"", "unexpected character '\"'"),
                (
                    "status eq 'a'; DROP TABLE actions",
                    "unexpected character ';'",
                ),
                ("status; DROP TABLE x eq 'a'", "unexpected character ';'"),
                (
                    "status like 'a'",
                    "unexpected token 'like' at position 7 in $filter, expected eq, ne, gt, ge, lt, le or in after 'status'",
                ),
                (
                    "status eq 'abc",
                    "unterminated string literal at position 10 in $filter",
                ),
                ("status eq '", "unterminated string literal"),
                ("status eq 'it''", "unterminated string literal"),
                ("(status eq 'a'", "unexpected end of $filter, expected ')'"),
                (
                    "((status eq 'a')",
                    "unexpected end of $filter, expected ')'",
                ),
                ("status eq 'a')", "unexpected token ')' at position 13"),
                ("()", "unexpected token ')' at position 1"),
                ("(", "unexpected end of $filter"),
                (")", "unexpected token ')' at position 0"),
                ("status in ()", "empty list after 'in'"),
                ("status in 'a'", "expected '(' after 'in'"),
                (
                    "status in ('a'",
                    "unexpected end of $filter, expected ',' or ')'",
                ),
                ("status in ('a',)", "status expects a string, got ')'"),
                ("status in ('a' 'b')", "expected ',' or ')'"),
                ("status in (1)", "status expects a string, got '1'"),
                ("status eq 1", "status expects a string, got '1'"),
                (
                    "status eq Pending",
                    "status expects a string, got 'Pending'",
                ),
                ("status eq true", "status expects a string, got 'true'"),
                ("status eq status", "status expects a string, got 'status'"),
                (
                    "creationDateTimeUtc gt 'abc'",
                    "creationDateTimeUtc expects a date-time, got 'abc'",
                ),
                (
                    "creationDateTimeUtc gt abc",
                    "creationDateTimeUtc expects a date-time, got 'abc'",
                ),
                (
                    "creationDateTimeUtc gt 5",
                    "creationDateTimeUtc expects a date-time, got '5'",
                ),
                (
                    "creationDateTimeUtc gt 2024-13-01",
                    "creationDateTimeUtc expects a date-time, got '2024-13-01'",
                ),
                (
                    "creationDateTimeUtc gt 2024-01-01T00:00:00",
                    "expects a date-time, got '2024-01-01T00:00:00'",
                ),
                (
                    "creationDateTimeUtc in (2024-01-01, 'x')",
                    "creationDateTimeUtc expects a date-time, got 'x'",
                ),
                (
                    "startswith(creationDateTimeUtc,'2024')",
                    "startswith() needs a text field, and creationDateTimeUtc is not one",
                ),
                ("startswith(foo,'a')", "unknown field 'foo' in $filter"),
                (
                    "startswith(requestor,1)",
                    "expected a string in startswith()",
                ),
                (
                    "startswith(requestor,null)",
                    "expected a string in startswith()",
                ),
                ("startswith(requestor)", "expected ','"),
                (
                    "startswith(requestor,'a'",
                    "unexpected end of $filter, expected ')'",
                ),
                (
                    "startswith('a',requestor)",
                    "expected a field in startswith()",
                ),
                ("startswith", "unknown field 'startswith'"),
                (
                    "contains(requestor,'a')",
                    "unsupported function 'contains' in $filter",
                ),
                (
                    "endswith(requestor,'a')",
                    "unsupported function 'endswith' in $filter",
                ),
                (
                    "tolower(status) eq 'a'",
                    "unsupported function 'tolower' in $filter",
                ),
                ("status/any(x: x eq 'a')", "status is not a collection"),
                ("null eq status", "unexpected token 'null' at position 0"),
                ("'a' eq status", "unexpected token 'a' at position 0"),
                (
                    "2024-01-01 lt creationDateTimeUtc",
                    "unexpected token '2024-01-01' at position 0",
                ),
                ("not", "unexpected end of $filter"),
                ("status eq 'a' and not", "unexpected end of $filter"),
                ("status eq -", "unexpected character '-'"),
                ("$it eq 'a'", "unexpected character '$'"),
                ("@p eq 'a'", "unexpected character '@'"),
                (
                    "stätus eq 'a'",
                    "unexpected character 'ä' at position 2 in $filter",
                ),
                ("status eq 'a' and\u{0}", "unexpected character"),
                ("status eq 'a',", "unexpected token ','"),
                ("status:eq 'a'", "unexpected token ':'"),
            ],
            action_filter,
        );
    }

    #[test]
    fn machine_filter_errors() {
        check_errors(
            &[
                (
                    "rbacGroupId eq 'a'",
                    "rbacGroupId expects an integer, got 'a'",
                ),
                (
                    "rbacGroupId eq '5'",
                    "rbacGroupId expects an integer, got '5'",
                ),
                (
                    "rbacGroupId eq 1.5",
                    "rbacGroupId expects an integer, got '1.5'",
                ),
                (
                    "rbacGroupId eq 1e3",
                    "rbacGroupId expects an integer, got '1e3'",
                ),
                (
                    "rbacGroupId eq 9223372036854775808",
                    "rbacGroupId expects an integer",
                ),
                (
                    "rbacGroupId eq 2024-01-01",
                    "rbacGroupId expects an integer, got '2024-01-01'",
                ),
                (
                    "rbacGroupId in (1,'a')",
                    "rbacGroupId expects an integer, got 'a'",
                ),
                (
                    "lastSeen gt 'yesterday'",
                    "lastSeen expects a date-time, got 'yesterday'",
                ),
                (
                    "startswith(rbacGroupId,'1')",
                    "startswith() needs a text field",
                ),
                (
                    "machineTags ne 'a'",
                    "machineTags supports only eq, in, startswith() and any()",
                ),
                ("machineTags gt 'a'", "machineTags supports only eq"),
                (
                    "machineTags eq null",
                    "machineTags expects a string, got 'null'",
                ),
                ("machineTags eq 1", "machineTags expects a string, got '1'"),
                (
                    "machineTags in ('a', null)",
                    "machineTags expects a string, got 'null'",
                ),
                ("machineTags in ()", "empty list after 'in'"),
                ("machineTags/all(x: x eq 'a')", "all() is not supported"),
                ("machineTags/count eq 1", "expected any"),
                ("machineTags/", "unexpected end of $filter, expected any"),
                (
                    "machineTags/any",
                    "unexpected end of $filter, expected '(' after any",
                ),
                ("machineTags/any()", "any() needs a condition"),
                (
                    "machineTags/any(x)",
                    "expected ':' after the lambda variable",
                ),
                ("machineTags/any(x:)", "expected a condition on 'x'"),
                (
                    "machineTags/any(x: y eq 'a')",
                    "unexpected token 'y' at position 19 in $filter, expected a condition on 'x'",
                ),
                (
                    "machineTags/any(x: X eq 'a')",
                    "expected a condition on 'x'",
                ),
                (
                    "machineTags/any(x: x eq 'a'",
                    "unexpected end of $filter, expected ')'",
                ),
                (
                    "machineTags/any(x: x eq 'a' and x eq 'b')",
                    "'and' is not supported inside any()",
                ),
                (
                    "machineTags/any(x: not x eq 'a')",
                    "'not' is not supported inside any()",
                ),
                (
                    "machineTags/any(x: x eq null)",
                    "machineTags expects a string, got 'null'",
                ),
                (
                    "machineTags/any(x: x eq 5)",
                    "machineTags expects a string, got '5'",
                ),
                (
                    "machineTags/any(x: x like 'a')",
                    "expected eq, ne, gt, ge, lt, le or in after 'x'",
                ),
                (
                    "machineTags/any(x: startswith(y, 'a'))",
                    "expected the lambda variable 'x'",
                ),
                (
                    "machineTags/any(x: machineTags eq 'a')",
                    "expected a condition on 'x'",
                ),
                (
                    "machineTags/any(and: and eq 'a')",
                    "expected a lambda variable",
                ),
                ("machineTags/any(x: x eq 'a') x", "unexpected token 'x'"),
                ("machineTags/any(x: (x eq 'a')", "expected ')'"),
                ("id/any(x: x eq 'a')", "id is not a collection"),
                ("machineTags/any(x: x eq 'a'))", "unexpected token ')'"),
            ],
            machine_filter,
        );
    }

    #[test]
    fn nesting_is_limited() {
        let nested = |n: usize| format!("{}id eq 'a'{}", "(".repeat(n), ")".repeat(n));
        assert_eq!(
            action_filter(&nested(MAX_DEPTH)).unwrap(),
            eq(A::Id, text("a"))
        );
        for n in [MAX_DEPTH + 1, 1000, 4000] {
            let message = action_filter(&nested(n)).unwrap_err();
            assert!(message.contains("nested too deeply"), "{n}: {message}");
        }
        // Unbalanced deep openings are refused the same way.
        let message = action_filter(&"(".repeat(5000)).unwrap_err();
        assert!(message.contains("nested too deeply"), "{message}");
        let nots = |n: usize| format!("{}id eq 'a'", "not ".repeat(n));
        assert!(action_filter(&nots(MAX_DEPTH)).is_ok());
        let message = action_filter(&nots(MAX_DEPTH + 1)).unwrap_err();
        assert!(message.contains("nested too deeply"), "{message}");
        let message = action_filter(&"not(".repeat(2000)).unwrap_err();
        assert!(message.contains("nested too deeply"), "{message}");
        // Parentheses inside any() count too.
        let lambda = |n: usize| {
            format!(
                "machineTags/any(x: {}x eq 'a'{})",
                "(".repeat(n),
                ")".repeat(n)
            )
        };
        assert!(machine_filter(&lambda(MAX_DEPTH - 1)).is_ok());
        let message = machine_filter(&lambda(MAX_DEPTH)).unwrap_err();
        assert!(message.contains("nested too deeply"), "{message}");
    }

    #[test]
    fn length_is_limited_and_chains_stay_shallow() {
        let term = "id eq 'a'";
        for separator in [" or ", " and ", " OR not "] {
            let mut chain = term.to_owned();
            while chain.len() + separator.len() + term.len() <= MAX_FILTER_LEN {
                chain.push_str(separator);
                chain.push_str(term);
            }
            let terms = chain.matches(term).count();
            assert!(terms > 400, "{terms}");
            let mut parser = Parser {
                tokens: tokenize(&chain).unwrap(),
                next: 0,
                depth: 0,
                fields: ACTION_FIELDS,
            };
            let filter = parser.or().unwrap();
            assert!(depth(&filter) <= 12, "{separator}: {}", depth(&filter));
            // Only the chain of `or` fits the complexity budget: its
            // equalities become one `in` list.
            match action_filter(&chain) {
                Ok(filter) => {
                    assert_eq!(separator, " or ");
                    assert!(matches!(&filter, Filter::In(A::Id, values) if values.len() == terms));
                }
                Err(message) => {
                    assert_ne!(separator, " or ");
                    assert!(
                        message.contains(&format!("it has {terms} conditions, at most 100")),
                        "{message}"
                    );
                }
            }
        }

        let too_long = format!("id eq '{}'", "a".repeat(MAX_FILTER_LEN));
        let message = action_filter(&too_long).unwrap_err();
        assert!(message.contains("$filter is too long"), "{message}");
        // The limit is on bytes: multi-byte characters count as such.
        let wide = format!("id eq '{}'", "é".repeat(MAX_FILTER_LEN / 2));
        assert!(action_filter(&wide).unwrap_err().contains("too long"));
        let fits = format!("id eq '{}'", "é".repeat(MAX_FILTER_LEN / 2 - 8));
        assert!(action_filter(&fits).is_ok());

        let values = vec!["'x'"; 1000].join(",");
        let Filter::In(_, list) = action_filter(&format!("id in ({values})")).unwrap() else {
            panic!("not an in");
        };
        assert_eq!(list.len(), 1000);
    }

    #[test]
    fn never_panics() {
        let seeds = [
            "status eq 'x'' OR 1=1 --'",
            "machineTags/any(x: x eq 'a' or startswith(x,'é'))",
            "creationDateTimeUtc gt 2024-01-01T00:00:00.1234567+02:00 and not (id in ('a','b'))",
            "startswith(computerDnsName,'🦀') eq false",
            "rbacGroupId eq -9223372036854775808",
            "lastSeen gt 2024-01-01T02:00:00 02:00",
        ];
        let mut inputs: Vec<String> = Vec::new();
        for seed in seeds {
            for (index, _) in seed.char_indices() {
                inputs.push(seed[..index].to_owned());
                inputs.push(seed[index..].to_owned());
            }
        }
        // Deterministic pseudo-random soup of interesting pieces.
        let pieces = [
            "(",
            ")",
            "'",
            "''",
            ",",
            ":",
            "/",
            " ",
            "not",
            "and",
            "or",
            "eq",
            "in",
            "any",
            "x",
            "startswith",
            "machineTags",
            "id",
            "rbacGroupId",
            "lastSeen",
            "status",
            "null",
            "-",
            "1",
            "2024-01-01",
            "T00:00",
            "+02:00",
            "é",
            "🦀",
            "\u{0}",
            "%",
            "%C3",
            "%FF",
            "&",
            "=",
            "+",
            "$filter",
            "$top",
            "$orderby",
            "$skiptoken",
            "s61.",
            "i-",
        ];
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..3000 {
            let mut input = String::new();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 24) as usize;
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                input.push_str(pieces[(state % pieces.len() as u64) as usize]);
            }
            inputs.push(input);
        }
        for input in &inputs {
            let _ = machine_filter(input);
            let _ = action_filter(input);
            let _ = machines(input);
            let _ = actions(input);
            let cursor = Cursor {
                keys: vec![text(input)],
                seq: 1,
            };
            let _ = next_page_query(Some(input), &cursor, Some(3));
        }
    }

    // -- next_page_query ---------------------------------------------------

    #[test]
    fn next_page_query_keeps_and_replaces() {
        let cursor = Cursor {
            keys: vec![text("a b")],
            seq: 7,
        };
        let token = cursor.encode();
        let cases: &[(Option<&str>, Option<u64>, String)] = &[
            (None, None, format!("$skiptoken={token}")),
            (Some(""), Some(5), format!("$top=5&$skiptoken={token}")),
            (
                Some("$orderby=id&$top=10&$skip=3&pageSize=2"),
                Some(8),
                format!("$orderby=id&$top=8&pageSize=2&$skiptoken={token}"),
            ),
            (
                Some("$TOP=10&$orderby=id"),
                Some(8),
                format!("$top=8&$orderby=id&$skiptoken={token}"),
            ),
            (
                Some("$top=10&$orderby=id"),
                None,
                format!("$top=10&$orderby=id&$skiptoken={token}"),
            ),
            (
                Some("$orderby=id&$skiptoken=old&$SKIPTOKEN=older&%24skip=1"),
                None,
                format!("$orderby=id&$skiptoken={token}"),
            ),
            (
                Some("$filter=status+eq+'a'&flag&empty="),
                None,
                format!("$filter=status%20eq%20'a'&flag&empty=&$skiptoken={token}"),
            ),
            (
                Some("$filter=id%20eq%20'a%26b%3Dc%2Bd%23e'"),
                None,
                format!("$filter=id%20eq%20'a%26b%3Dc%2Bd%23e'&$skiptoken={token}"),
            ),
            (
                Some("$filter=computerDnsName eq 'é'"),
                None,
                format!("$filter=computerDnsName%20eq%20'%C3%A9'&$skiptoken={token}"),
            ),
            (
                Some("x=100%&y=%zz"),
                None,
                format!("x=100%25&y=%25zz&$skiptoken={token}"),
            ),
        ];
        for (raw, top, expected) in cases {
            assert_eq!(&next_page_query(*raw, &cursor, *top), expected, "{raw:?}");
        }
    }

    #[test]
    fn next_page_query_round_trips() {
        let cases: Vec<(&str, Cursor, Option<u64>)> = vec![
            (
                "",
                Cursor {
                    keys: vec![],
                    seq: 1,
                },
                None,
            ),
            (
                "$orderby=id",
                Cursor {
                    keys: vec![text("a&b=c d+e%'")],
                    seq: 42,
                },
                None,
            ),
            (
                "$orderby=creationDateTimeUtc desc,status&$top=100&$skip=5&pageSize=10&$count=true&$select=id,status",
                Cursor {
                    keys: vec![Value::Time(-1), text("Pending")],
                    seq: 9,
                },
                Some(90),
            ),
            (
                "$filter=status+eq+'x''+OR+1=1+--'+and+creationDateTimeUtc+gt+2024-01-01T00:00:00.5%2B02:00&$orderby=computerDnsName",
                Cursor {
                    keys: vec![text("пример 🦀")],
                    seq: i64::MAX,
                },
                Some(0),
            ),
            (
                "$orderby=id&$skiptoken=s61.1",
                Cursor {
                    keys: vec![Value::Null],
                    seq: -3,
                },
                Some(10_000),
            ),
        ];
        for (raw, cursor, top) in cases {
            let first = actions(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            let next = next_page_query(Some(raw), &cursor, top);
            let again = actions(&next).unwrap_or_else(|e| panic!("{next}: {e}"));
            assert_eq!(again.query.after, Some(cursor.clone()), "{next}");
            assert_eq!(again.query.skip, 0, "{next}");
            assert_eq!(again.top, top.or(first.top), "{next}");
            assert_eq!(again.query.filter, first.query.filter, "{next}");
            assert_eq!(again.query.order_by, first.query.order_by, "{next}");
            assert_eq!(again.query.count, first.query.count, "{next}");
            assert_eq!(again.select, first.select, "{next}");
            assert_eq!(again.page_size, first.page_size, "{next}");
            // Following the link again gives the same link.
            assert_eq!(next_page_query(Some(&next), &cursor, top), next);
            // The link is plain URL-safe ASCII.
            assert!(
                next.bytes()
                    .all(|b| b.is_ascii_graphic() && !b"#\"<>\\^`{|} ".contains(&b)),
                "{next}"
            );
        }
        let machine_cursor = Cursor {
            keys: vec![Value::Int(3), Value::Time(1_704_067_200_000_000_000)],
            seq: 5,
        };
        let raw = "$filter=machineTags/any(t:t eq 'a b')&$orderby=rbacGroupId,lastSeen desc";
        let next = next_page_query(Some(raw), &machine_cursor, None);
        let again = machines(&next).unwrap();
        assert_eq!(again.query.after, Some(machine_cursor));
        assert_eq!(
            again.query.filter,
            Some(any(eq(M::MachineTags, text("a b"))))
        );
    }

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a+b%20c%2b%"), b"a b c+%");
        assert_eq!(percent_decode("%4"), b"%4");
        assert_eq!(percent_decode("%g1%41"), b"%g1A");
        assert_eq!(percent_decode("é"), "é".as_bytes());
        assert_eq!(
            percent_encode("a b&=+#%é$'(),:/".as_bytes()),
            "a%20b%26%3D%2B%23%25%C3%A9$'(),:/"
        );
        assert_eq!(echo("abc"), "'abc'");
        assert_eq!(
            echo(&"é".repeat(MAX_ECHO + 1)),
            format!("'{}…'", "é".repeat(MAX_ECHO))
        );
    }
}
