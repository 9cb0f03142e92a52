//! Where comments go when a `[[group]]` table is added or removed.
//!
//! The TOML document model gives the comment lines between a table's last key
//! and the next header to the next header. A reader sees two blocks there: the
//! lines directly below the last key belong to the table above, and what
//! follows a blank line belongs to the header below. These helpers keep the
//! first block with the table it follows.

use toml_edit::{DocumentMut, Item, Table};

/// Before appending `new` after the last group (at `last_group`, or at the
/// end of the file when there is no group), takes the comment block that
/// belongs to the last group away from whatever follows it and puts it
/// above the new group's header.
pub(super) fn append_after(doc: &mut DocumentMut, last_group: Option<isize>, new: &mut Table) {
    let next = last_group.and_then(|after| next_position(doc, after));
    let text = text_after(doc, next);
    let (above, rest) = split(&text, next.is_some());
    if above.is_empty() {
        return;
    }
    new.decor_mut()
        .set_prefix(format!("{}\n", line_ended(above)));
    let rest = if next.is_none() && rest.trim().is_empty() {
        ""
    } else {
        rest
    };
    set_text_after(doc, next, rest.to_owned());
}

/// After `removed` was taken out of the document, drops the comment block
/// below its last key and keeps the block that belonged to the table above it.
pub(super) fn close_gap(doc: &mut DocumentMut, removed: &Table) {
    let (keep, _) = split(prefix(removed), true);
    let Some(at) = removed.position() else { return };
    let next = next_position(doc, at);
    let text = text_after(doc, next);
    let (dropped, rest) = split(&text, next.is_some());
    if keep.is_empty() && dropped.is_empty() {
        return;
    }
    let joined = match (keep.is_empty(), rest.starts_with(['\n', '\r'])) {
        (true, _) => rest.to_owned(),
        (false, true) => format!("{}{rest}", line_ended(keep)),
        (false, false) if next.is_none() && rest.is_empty() => line_ended(keep),
        (false, false) => format!("{}\n{rest}", line_ended(keep)),
    };
    set_text_after(doc, next, joined);
}

/// Splits the text between a table's last key and the next header (or the
/// end of the file) into the block directly below the key and the rest.
/// Without a blank line the block is ambiguous when a header follows, and
/// is left to the header.
fn split(text: &str, header_follows: bool) -> (&str, &str) {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim().is_empty() {
            return text.split_at(offset);
        }
        offset += line.len();
    }
    if header_follows {
        ("", text)
    } else {
        (text, "")
    }
}

fn line_ended(text: &str) -> String {
    if text.ends_with('\n') {
        text.to_owned()
    } else {
        format!("{text}\n")
    }
}

/// The text above a table's header; a table without its own uses a blank line.
fn prefix(table: &Table) -> &str {
    table
        .decor()
        .prefix()
        .and_then(|p| p.as_str())
        .unwrap_or("\n")
}

/// The prefix of the table at `next`, or the end of the file without one.
fn text_after(doc: &mut DocumentMut, next: Option<isize>) -> String {
    match next.and_then(|at| table_at(doc.as_table_mut(), at)) {
        Some(table) => prefix(table).to_owned(),
        None => doc.trailing().as_str().unwrap_or_default().to_owned(),
    }
}

fn set_text_after(doc: &mut DocumentMut, next: Option<isize>, text: String) {
    match next.and_then(|at| table_at(doc.as_table_mut(), at)) {
        Some(table) => table.decor_mut().set_prefix(text),
        None => doc.set_trailing(text),
    }
}

/// The position of the table that comes right after position `after`.
fn next_position(doc: &DocumentMut, after: isize) -> Option<isize> {
    let mut positions = Vec::new();
    collect_positions(doc.as_table(), &mut positions);
    positions.into_iter().filter(|p| *p > after).min()
}

fn collect_positions(table: &Table, out: &mut Vec<isize>) {
    for (_, item) in table.iter() {
        let tables: Vec<&Table> = match item {
            Item::Table(t) => vec![t],
            Item::ArrayOfTables(a) => a.iter().collect(),
            _ => Vec::new(),
        };
        for t in tables {
            out.extend(t.position().filter(|_| !t.is_dotted() && !t.is_implicit()));
            collect_positions(t, out);
        }
    }
}

/// The table (at any depth) that has document position `at`.
fn table_at(table: &mut Table, at: isize) -> Option<&mut Table> {
    for (_, item) in table.iter_mut() {
        let found = match item {
            Item::Table(t) => own_or_nested(t, at),
            Item::ArrayOfTables(a) => a.iter_mut().find_map(|t| own_or_nested(t, at)),
            _ => None,
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

fn own_or_nested(table: &mut Table, at: isize) -> Option<&mut Table> {
    if table.position() == Some(at) && !table.is_dotted() && !table.is_implicit() {
        Some(table)
    } else {
        table_at(table, at)
    }
}
