//! How the layers of the configuration combine, below the typed settings: a table merged over another
//! key by key (recording where each value came from), and an environment variable turned into the
//! key path it names and the value it holds.

use std::collections::BTreeMap;

use toml::{Table, Value};

use crate::config::Origin;

/// `over` into `base`, key by key for tables, recording the origin of every value `over` sets.
pub(crate) fn merge(
    base: &mut Table,
    over: Table,
    prefix: &str,
    origin: &Origin,
    origins: &mut BTreeMap<String, Origin>,
) {
    for (k, v) in over {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o, &path, origin, origins),
            (_, v) => {
                base.insert(k, v);
                origins.insert(path, origin.clone());
            }
        }
    }
}

/// The key path an environment variable names, found along the tables of the defaults (so that
/// `PAI_INGEST_FIM_RATE` is `ingest.fim.rate`, not `ingest.fim_rate`); `None` when its first part
/// is no key of pai.toml (another program's `PAI_*` variable).
pub(crate) fn env_path(name: &str, defaults: &Table) -> Option<Vec<String>> {
    let rest = name.strip_prefix("PAI_")?.to_ascii_lowercase();
    const TOP: &[&str] = &["model", "sources"];
    if TOP.contains(&rest.as_str()) {
        return Some(vec![rest]);
    }
    let mut path = Vec::new();
    let mut table = defaults;
    let mut rest = rest.as_str();
    loop {
        // The longest key of this table that the rest starts with, as a whole word.
        let mut keys: Vec<&String> = table.keys().collect();
        keys.sort_by_key(|k| std::cmp::Reverse(k.len()));
        let found = keys.into_iter().find_map(|k| {
            if rest == k.as_str() {
                Some((k, ""))
            } else {
                rest.strip_prefix(k.as_str())
                    .and_then(|r| r.strip_prefix('_'))
                    .map(|r| (k, r))
            }
        });
        match found {
            Some((k, "")) => {
                path.push(k.clone());
                return Some(path);
            }
            Some((k, tail)) if table[k.as_str()].is_table() => {
                path.push(k.clone());
                table = table[k.as_str()].as_table()?;
                rest = tail;
            }
            // Inside a table, a key the defaults leave unset (an optional one, or a typo that
            // reading the table will name).
            _ if !path.is_empty() => {
                path.push(rest.to_string());
                return Some(path);
            }
            _ => return None,
        }
    }
}

/// A variable's text as a TOML value when it reads as one, else as a string.
pub(crate) fn env_value(raw: &str) -> Value {
    toml::from_str::<Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(raw.to_string()))
}

pub(crate) fn set(table: &mut Table, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut t = table;
    for p in parents {
        let entry = t
            .entry(p.clone())
            .or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        let Value::Table(next) = entry else {
            return;
        };
        t = next;
    }
    t.insert(last.clone(), value);
}
