//! Reading typed values out of a parsed TOML document while collecting every
//! problem with the line and the field it belongs to.

use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml_edit::{Item, TableLike, TomlError, Value};

use super::{ConfigError, Problem};

/// A field being read: its dotted name and the line it is on.
#[derive(Debug, Clone)]
pub(super) struct Field {
    pub name: String,
    pub line: usize,
}

/// An entry of a list value, with its own line.
pub(super) struct Entry<T> {
    pub value: T,
    pub line: usize,
}

/// The reading context: the source text (for line numbers) and the problems so far.
pub(super) struct Reader<'t> {
    text: &'t str,
    problems: Vec<Problem>,
}

impl<'t> Reader<'t> {
    pub fn new(text: &'t str) -> Self {
        Reader {
            text,
            problems: Vec::new(),
        }
    }

    /// The value if no problem was found, else every problem in line order.
    pub fn finish<T>(mut self, path: &Path, value: T) -> Result<T, ConfigError> {
        if self.problems.is_empty() {
            return Ok(value);
        }
        self.problems.sort_by_key(|p| p.line);
        Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            problems: self.problems,
        })
    }

    /// The 1-based line of a byte span's start, or `fallback` without a span.
    pub fn line(&self, span: Option<Range<usize>>, fallback: usize) -> usize {
        span.map_or(fallback, |span| line_at(self.text, span.start))
    }

    pub fn report(&mut self, field: &Field, message: impl Into<String>) {
        self.report_at(field.line, &field.name, message);
    }

    pub fn report_at(&mut self, line: usize, field: &str, message: impl Into<String>) {
        let problem = Problem {
            line,
            field: field.to_owned(),
            message: message.into(),
        };
        self.problems.push(problem);
    }

    /// Calls `visit` for each key of `table` (named `prefix.key`); a key for
    /// which it returns false is reported as unknown, listing `known`.
    pub fn each_key<'a>(
        &mut self,
        table: &'a dyn TableLike,
        prefix: &str,
        fallback_line: usize,
        known: &[&str],
        mut visit: impl FnMut(&mut Self, &str, &Field, &'a Item) -> bool,
    ) {
        for (key, item) in table.iter() {
            let key_span = table.key(key).and_then(|k| k.span());
            let line = self.line(item.span().or(key_span), fallback_line);
            let name = if prefix.is_empty() {
                key.to_owned()
            } else {
                format!("{prefix}.{key}")
            };
            let field = Field { name, line };
            if !visit(self, key, &field, item) {
                let message = format!("unknown field (known: {})", known.join(", "));
                self.report(&field, message);
            }
        }
    }

    /// The item as a table (`[name]` or inline).
    pub fn table<'a>(&mut self, field: &Field, item: &'a Item) -> Option<&'a dyn TableLike> {
        let table = item.as_table_like();
        if table.is_none() {
            self.report(
                field,
                format!("expected a table, found {}", item.type_name()),
            );
        }
        table
    }

    /// The item as a plain value (not a table).
    fn value<'a>(&mut self, field: &Field, item: &'a Item) -> Option<&'a Value> {
        let value = item.as_value();
        if value.is_none() {
            self.report(
                field,
                format!("expected a value, found {}", item.type_name()),
            );
        }
        value
    }

    /// An integer within `min..=max`, converted to `T` (which holds `max`).
    pub fn int<T: TryFrom<u64>>(
        &mut self,
        f: &Field,
        item: &Item,
        min: u64,
        max: u64,
    ) -> Option<T> {
        let value = self.value(f, item)?;
        self.int_value(f, value, min, max)
    }

    fn int_value<T: TryFrom<u64>>(
        &mut self,
        f: &Field,
        v: &Value,
        min: u64,
        max: u64,
    ) -> Option<T> {
        let Some(n) = v.as_integer() else {
            self.report(f, format!("expected an integer, found {}", v.type_name()));
            return None;
        };
        match u64::try_from(n) {
            Ok(n) if (min..=max).contains(&n) => T::try_from(n).ok(),
            _ => {
                self.report(f, format!("must be between {min} and {max}, found {n}"));
                None
            }
        }
    }

    /// A number of seconds within `min..=max`.
    pub fn secs(&mut self, f: &Field, item: &Item, min: u64, max: u64) -> Option<Duration> {
        self.int(f, item, min, max).map(Duration::from_secs)
    }

    /// A string checked and converted by `check`.
    pub fn parsed<T>(
        &mut self,
        f: &Field,
        item: &Item,
        check: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let value = self.value(f, item)?;
        self.string_value(f, value, check)
    }

    /// An array of strings, each checked and converted by `check`; entries
    /// with a problem are left out.
    pub fn list<T>(
        &mut self,
        f: &Field,
        item: &Item,
        mut check: impl FnMut(&str) -> Result<T, String>,
    ) -> Option<Vec<Entry<T>>> {
        let elements = self.elements(f, item)?;
        let entries = elements.into_iter().filter_map(|(field, element)| {
            let value = self.string_value(&field, element, &mut check)?;
            Some(Entry {
                value,
                line: field.line,
            })
        });
        Some(entries.collect())
    }

    /// An array of integers within `min..=max`; entries with a problem are left out.
    pub fn int_list<T: TryFrom<u64>>(
        &mut self,
        f: &Field,
        item: &Item,
        min: u64,
        max: u64,
    ) -> Option<Vec<Entry<T>>> {
        let elements = self.elements(f, item)?;
        let entries = elements.into_iter().filter_map(|(field, element)| {
            let value = self.int_value(&field, element, min, max)?;
            Some(Entry {
                value,
                line: field.line,
            })
        });
        Some(entries.collect())
    }

    /// The elements of an array, each with the field name of the array and its own line.
    fn elements<'a>(&mut self, f: &Field, item: &'a Item) -> Option<Vec<(Field, &'a Value)>> {
        let value = self.value(f, item)?;
        let Some(array) = value.as_array() else {
            self.report(f, format!("expected an array, found {}", value.type_name()));
            return None;
        };
        let field = |v: &Value| Field {
            name: f.name.clone(),
            line: self.line(v.span(), f.line),
        };
        Some(array.iter().map(|v| (field(v), v)).collect())
    }

    fn string_value<T>(
        &mut self,
        f: &Field,
        value: &Value,
        check: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let Some(s) = value.as_str() else {
            self.report(f, format!("expected a string, found {}", value.type_name()));
            return None;
        };
        check(s).map_err(|message| self.report(f, message)).ok()
    }
}

/// The 1-based line holding byte `offset` of `text`.
pub(super) fn line_at(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The problem for a TOML syntax error: its line, and the key nearest
/// before it as the field.
pub(super) fn syntax_problem(text: &str, error: &TomlError) -> Problem {
    let line = line_at(text, error.span().map_or(0, |span| span.start));
    let message = error
        .message()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    Problem {
        line,
        field: nearest_key(text, line),
        message: format!("invalid TOML: {message}"),
    }
}

/// Names the key on or before `line` the way validation errors do
/// (`group[1].limit`), found by scanning lines since the document did not parse.
fn nearest_key(text: &str, line: usize) -> String {
    let mut table = String::new();
    let mut groups = 0usize;
    let mut key: Option<String> = None;
    for raw in text.lines().take(line) {
        let raw = raw.trim_start();
        if let Some(header) = raw.strip_prefix('[') {
            let array = header.starts_with('[');
            table = header
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .into();
            groups += usize::from(array && table == "group");
            key = None;
        } else if let Some((name, _)) = raw.split_once('=') {
            let name = name.trim();
            if is_key(name) {
                key = Some(name.to_owned());
            }
        }
    }
    join_key(&table, groups, key)
}

fn is_key(name: &str) -> bool {
    let ok = |c: char| c.is_ascii_alphanumeric() || "_-.\"' ".contains(c);
    !name.is_empty() && name.chars().all(ok)
}

fn join_key(table: &str, groups: usize, key: Option<String>) -> String {
    let table = match table {
        "group" if groups > 0 => format!("group[{}]", groups - 1),
        other => other.to_owned(),
    };
    match (table.is_empty(), key) {
        (true, Some(key)) => key,
        (false, Some(key)) => format!("{table}.{key}"),
        (false, None) => table,
        (true, None) => "toml".to_owned(),
    }
}
