//! In-place edits of the configuration file behind `qthrottle limit set|rm`.
//! Comments, order and formatting of everything else are kept; the whole
//! result is validated before it is written, and it replaces the file
//! atomically, so a rejected edit leaves the file as it was.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use toml_edit::{Array, ArrayOfTables, DocumentMut, Item, Table, Value};

use super::reader::syntax_problem;
use super::{Config, ConfigError, layout, parse};

/// Mode of a configuration file created by an edit.
const NEW_FILE_MODE: u32 = 0o644;
/// Most symbolic links followed to find the file, as the kernel allows.
const MAX_LINKS: usize = 40;

/// Creates the group `name`, or replaces it where it stands (keeping the
/// comments around it), creating the file and its directory if missing.
/// Empty lists leave the key out. Returns the configuration as written.
pub fn set_group(
    path: &Path,
    name: &str,
    limit: u32,
    domains: &[String],
    addresses: &[String],
    mx_suffixes: &[String],
) -> Result<Config, ConfigError> {
    let values = GroupValues {
        name,
        limit,
        domains,
        addresses,
        mx_suffixes,
    };
    edit(path, |doc, text| {
        let groups = group_array(doc, path, text)?;
        if let Some(table) = find(groups, name).and_then(|i| groups.get_mut(i)) {
            values.fill(table);
            return Ok(());
        }
        let mut table = Table::new();
        values.fill(&mut table);
        let last_group = groups.iter().last().and_then(Table::position);
        layout::append_after(doc, last_group, &mut table);
        group_array(doc, path, text)?.push(table);
        Ok(())
    })
}

/// What `set_group` writes into a group's table.
struct GroupValues<'a> {
    name: &'a str,
    limit: u32,
    domains: &'a [String],
    addresses: &'a [String],
    mx_suffixes: &'a [String],
}

impl GroupValues<'_> {
    fn fill(&self, table: &mut Table) {
        set_value(table, "name", Value::from(self.name));
        set_value(table, "limit", Value::from(i64::from(self.limit)));
        set_list(table, "domains", self.domains);
        set_list(table, "mx_suffixes", self.mx_suffixes);
        set_list(table, "addresses", self.addresses);
    }
}

/// Removes the group `name` with its comments: those above its header and
/// those directly below its last key.
pub fn remove_group(path: &Path, name: &str) -> Result<Config, ConfigError> {
    edit(path, |doc, text| {
        let groups = group_array(doc, path, text)?;
        let Some(index) = find(groups, name) else {
            let (path, name) = (path.to_path_buf(), name.to_owned());
            return Err(ConfigError::NoSuchGroup { path, name });
        };
        let removed = groups.remove(index);
        if groups.is_empty() {
            doc.remove("group");
        }
        layout::close_gap(doc, &removed);
        Ok(())
    })
}

/// Reads the file (empty if missing), applies `change`, validates the result
/// and writes it, all under a lock on the file's directory. A symbolic link
/// is followed, so the file it points to is replaced and the link stays.
fn edit(
    path: &Path,
    change: impl FnOnce(&mut DocumentMut, &str) -> Result<(), ConfigError>,
) -> Result<Config, ConfigError> {
    let target = follow_links(path)?;
    let _lock = lock_directory(&target)?;
    let text = match fs::read_to_string(&target) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut doc = text
        .parse::<DocumentMut>()
        .map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems: vec![syntax_problem(&text, &e)],
        })?;
    change(&mut doc, &text)?;
    let new_text = doc.to_string();
    let config = parse(path, &new_text)?;
    write_atomic(&target, &new_text)?;
    Ok(config)
}

/// The `[[group]]` array, created when absent; an array of inline tables
/// is turned into `[[group]]` tables. Anything else is the file's own error.
fn group_array<'d>(
    doc: &'d mut DocumentMut,
    path: &Path,
    text: &str,
) -> Result<&'d mut ArrayOfTables, ConfigError> {
    if doc.get("group").is_some_and(Item::is_value) {
        inline_to_tables(doc);
    }
    let item = doc
        .entry("group")
        .or_insert(Item::ArrayOfTables(ArrayOfTables::new()));
    match item.as_array_of_tables_mut() {
        Some(groups) => Ok(groups),
        None => Err(parse(path, text).err().unwrap_or_else(|| not_groups(path))),
    }
}

/// `group = [{ ... }]` becomes `[[group]]` tables (left as is if it holds
/// anything but tables); the spacing around the key does not go into the header.
fn inline_to_tables(doc: &mut DocumentMut) {
    let Some(item) = doc.get_mut("group") else {
        return;
    };
    *item = match std::mem::take(item) {
        Item::Value(Value::Array(a)) if a.is_empty() => Item::ArrayOfTables(ArrayOfTables::new()),
        other => other
            .into_array_of_tables()
            .map_or_else(|v| v, Item::ArrayOfTables),
    };
    if !doc.contains_array_of_tables("group") {
        return;
    }
    if let Some(mut key) = doc.key_mut("group") {
        key.leaf_decor_mut().clear();
    }
}

/// The error for a `group` key that holds no tables (the parser reports it first).
fn not_groups(path: &Path) -> ConfigError {
    let problem = super::Problem {
        line: 1,
        field: "group".to_owned(),
        message: "expected [[group]] tables".to_owned(),
    };
    ConfigError::Invalid {
        path: path.to_path_buf(),
        problems: vec![problem],
    }
}

fn find(groups: &ArrayOfTables, name: &str) -> Option<usize> {
    groups
        .iter()
        .position(|t| t.get("name").and_then(Item::as_str) == Some(name))
}

/// Sets `key`, keeping the spacing and comment around an existing value.
fn set_value(table: &mut Table, key: &str, mut value: Value) {
    match table.get_mut(key) {
        Some(Item::Value(old)) => {
            *value.decor_mut() = old.decor().clone();
            *old = value;
        }
        Some(other) => *other = Item::Value(value),
        None => {
            table.insert(key, Item::Value(value));
        }
    }
}

fn set_list(table: &mut Table, key: &str, items: &[String]) {
    if items.is_empty() {
        table.remove(key);
    } else {
        let array: Array = items.iter().map(String::as_str).collect();
        set_value(table, key, Value::Array(array));
    }
}

/// The directory holding the file ("." for a bare file name).
fn directory(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Serializes edits: an exclusive lock on the directory, if it exists yet.
fn lock_directory(path: &Path) -> Result<Option<File>, ConfigError> {
    let dir = directory(path);
    let locked = File::open(dir).and_then(|file| file.lock().map(|()| file));
    match locked {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(write_error("lock directory", dir, source)),
    }
}

fn write_error(action: &'static str, path: &Path, source: io::Error) -> ConfigError {
    ConfigError::Write {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Replaces the file with `text`: a temporary file in the same directory,
/// with the old file's mode and owner, renamed over it.
fn write_atomic(target: &Path, text: &str) -> Result<(), ConfigError> {
    let dir = directory(target);
    fs::create_dir_all(dir).map_err(|e| write_error("create directory", dir, e))?;
    let old = fs::metadata(target).ok();
    let mut temp = TempFile::new(target);
    temp.write(text, old.as_ref())
        .map_err(|e| write_error("write", &temp.path, e))?;
    fs::rename(&temp.path, target).map_err(|e| write_error("replace", target, e))?;
    temp.kept = true;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| write_error("sync directory", dir, e))
}

/// The file a chain of symbolic links ends at (which need not exist yet).
fn follow_links(path: &Path) -> Result<PathBuf, ConfigError> {
    let mut target = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        match fs::symlink_metadata(&target) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let link = fs::read_link(&target).map_err(|e| write_error("follow", &target, e))?;
                target = directory(&target).join(link);
            }
            _ => return Ok(target),
        }
    }
    let source = io::Error::from_raw_os_error(libc::ELOOP);
    Err(write_error("follow", path, source))
}

/// The temporary file of one edit; removed on drop unless it was renamed.
struct TempFile {
    path: PathBuf,
    kept: bool,
}

impl TempFile {
    fn new(target: &Path) -> Self {
        let name = target.file_name().unwrap_or_default().to_string_lossy();
        let path = directory(target).join(format!(".{name}.{}.tmp", std::process::id()));
        TempFile { path, kept: false }
    }

    fn write(&self, text: &str, old: Option<&fs::Metadata>) -> io::Result<()> {
        // A leftover of an earlier process that had our pid.
        let _ = fs::remove_file(&self.path);
        let mut options = OpenOptions::new();
        let mut file = options
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.path)?;
        file.write_all(text.as_bytes())?;
        let mode = old.map_or(NEW_FILE_MODE, |m| m.mode() & 0o7777);
        if let Some(old) = old {
            let new = file.metadata()?;
            if (new.uid(), new.gid()) != (old.uid(), old.gid()) {
                std::os::unix::fs::fchown(&file, Some(old.uid()), Some(old.gid()))?;
            }
        }
        file.set_permissions(Permissions::from_mode(mode))?;
        file.sync_all()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.kept {
            let _ = fs::remove_file(&self.path);
        }
    }
}
