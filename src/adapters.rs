//! `pai-train adapters | promote | rollback`: the command-line edge of pai-adapters' registry, and
//! `locate`, which turns what a user types for an adapter (`personal`, `personal@v2`, a directory)
//! into a verified directory.

use std::path::{Path, PathBuf};

use anyhow::Context;
use pai_adapters::{AdapterMeta, Registry, Version};

/// The directory of an adapter named by `spec`, and how to record it as a parent: an existing
/// directory is taken as it is; otherwise `spec` is `name` (its current version) or `name@vN`, whose
/// files are checked against their recorded sha256.
pub fn locate(home: &Path, spec: &str) -> anyhow::Result<(PathBuf, String)> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok((path.to_path_buf(), path.display().to_string()));
    }
    let registry = Registry::new(home);
    let (name, version) = registry.resolve(spec).with_context(|| {
        format!("{spec:?} is neither a directory nor an adapter in the registry")
    })?;
    let verified = registry.verify(&name, version)?;
    Ok((verified.dir, format!("{name}@{version}")))
}

/// `adapters list`.
pub fn list(json: bool) -> anyhow::Result<()> {
    let registry = Registry::new(&crate::pai_home());
    let all = registry.list()?;
    if json {
        println!("{}", serde_json::to_string(&all)?);
        return Ok(());
    }
    if all.is_empty() {
        println!(
            "no adapters in {} yet (pai-train train adds one)",
            registry.root().display()
        );
    }
    for a in all {
        let current = a
            .current
            .map_or("none promoted".to_string(), |v| format!("current {v}"));
        let versions: Vec<String> = a.versions.iter().map(Version::to_string).collect();
        println!(
            "{:<20} {current:<16} versions {}",
            a.name,
            versions.join(" ")
        );
    }
    Ok(())
}

/// `adapters show NAME[@vN]`: one version's pai.json, or a name's versions and history.
pub fn show(spec: &str, json: bool) -> anyhow::Result<()> {
    let registry = Registry::new(&crate::pai_home());
    if let Some((name, version)) = spec.split_once('@') {
        let version: Version = version.parse()?;
        let meta = registry.meta(name, version)?;
        let current = registry.current(name)? == Some(version);
        if json {
            let mut value = serde_json::to_value(&meta)?;
            value["current"] = current.into();
            println!("{value}");
        } else {
            println!(
                "{name}@{version}{} in {}",
                if current { " (current)" } else { "" },
                registry.dir(name, version).display()
            );
            println!("{}", String::from_utf8_lossy(&meta.to_json()).trim_end());
        }
        return Ok(());
    }
    let versions = registry.versions(spec)?;
    let current = registry.current(spec)?;
    let history = registry.history(spec)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"name": spec, "current": current, "versions": versions, "history": history})
        );
        return Ok(());
    }
    for v in &versions {
        let meta = registry.meta(spec, *v)?;
        println!("{}", version_line(spec, *v, &meta, current == Some(*v)));
    }
    println!("history:");
    for e in history {
        let previous = e
            .previous
            .map(|p| format!(" (was {p})"))
            .unwrap_or_default();
        let reason = if e.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", e.reason)
        };
        println!(
            "  {} {:?} {}{previous}{reason}",
            e.time, e.action, e.version
        );
    }
    Ok(())
}

fn version_line(name: &str, v: Version, meta: &AdapterMeta, current: bool) -> String {
    let day = meta.dataset.as_ref().map_or("-", |d| d.day.as_str());
    let holdout = meta
        .metrics
        .as_ref()
        .and_then(|m| m["best_holdout_loss"].as_f64())
        .map_or("-".into(), |l| format!("{l:.3}"));
    let parent = meta.parent.as_deref().unwrap_or("base");
    format!(
        "{}{name}@{v}  day {day}  holdout loss {holdout}  from {parent}  created {}",
        if current { "* " } else { "  " },
        meta.created
    )
}

/// `promote NAME[@vN]`: serve that version (the newest when none is named).
pub fn promote(spec: &str, reason: &str) -> anyhow::Result<()> {
    let registry = Registry::new(&crate::pai_home());
    let (name, version) = match spec.split_once('@') {
        Some((n, v)) => (n.to_string(), v.parse::<Version>()?),
        None => {
            let newest = registry.versions(spec)?.last().copied();
            (
                spec.to_string(),
                newest.with_context(|| format!("adapter {spec:?} has no versions"))?,
            )
        }
    };
    let previous = registry.promote(&name, version, reason)?;
    match previous {
        Some(p) if p == version => println!("{name}@{version} was already current"),
        Some(p) => println!("{name}: {p} → {version}"),
        None => println!("{name}: serving {version}"),
    }
    Ok(())
}

/// `rollback NAME [--to VERSION]`.
pub fn rollback(name: &str, to: Option<&str>) -> anyhow::Result<()> {
    let registry = Registry::new(&crate::pai_home());
    let to = to.map(str::parse::<Version>).transpose()?;
    let (from, to) = registry.rollback(name, to)?;
    println!("{name}: {from} → {to}");
    Ok(())
}

/// `adapters gc [NAME] --keep N`.
pub fn gc(name: Option<&str>, keep: usize) -> anyhow::Result<()> {
    let registry = Registry::new(&crate::pai_home());
    let names = match name {
        Some(n) => vec![n.to_string()],
        None => registry.names()?,
    };
    for n in names {
        let removed = registry.gc(&n, keep)?;
        let removed: Vec<String> = removed.iter().map(Version::to_string).collect();
        println!(
            "{n}: removed {}",
            if removed.is_empty() {
                "nothing".to_string()
            } else {
                removed.join(" ")
            }
        );
    }
    Ok(())
}

/// `adapters import DIR --name NAME`: an adapter made elsewhere (PEFT in Python), loaded onto the
/// base first (which checks its targets and shapes, and refuses one whose pai.json names another
/// base), then registered with this base's fingerprint.
pub fn import(dir: &Path, name: &str, model: Option<PathBuf>) -> anyhow::Result<()> {
    pai_adapters::check_name(name)?;
    pai_adapters::check_peft_dir(dir)?;
    let (base, _) = crate::load_model(
        model,
        std::slice::from_ref(&dir.to_path_buf()),
        pai_model::LoadOptions::default(),
    )?;
    let mut meta = AdapterMeta::read(dir)?;
    meta.base = pai_adapters::BaseFingerprint {
        sha256: base.sha256()?.to_string(),
        name: Some(base.name().to_string()),
        path: Some(base.path().to_path_buf()),
    };
    if meta.created.is_empty() {
        meta.created = chrono::Local::now().to_rfc3339();
    }
    let version = Registry::new(&crate::pai_home()).import(name, dir, meta)?;
    println!(
        "imported {} as {name}@{version} (not served until promoted: pai-train promote \
         {name}@{version})",
        dir.display()
    );
    Ok(())
}
