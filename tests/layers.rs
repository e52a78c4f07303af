//! The dependency rule, checked: every path from one top-level module of `src/` to another
//! (`crate::m`, `use crate::{m, ...}`, `super::` that climbs to the crate root, and
//! `lambda_inference::m` from the binaries) must be an edge listed in `src/layers.txt`, and every
//! listed edge must point to a module on a later line (down). No exceptions: a new import that
//! points up, or sideways into a cycle, fails here until the layering is changed on purpose.
//!
//! Read from the source text, not the compiler: comments are skipped, and an inline `mod x {`
//! block (rustfmt's layout: its closing `}` at the same indentation) counts as one level for
//! `super::`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const LAYERS: &str = include_str!("../src/layers.txt");

/// `module -> targets`, in file order (top layer first).
fn allowed() -> Vec<(String, BTreeSet<String>)> {
    LAYERS
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (m, targets) = l
                .split_once("->")
                .unwrap_or_else(|| panic!("src/layers.txt: {l:?} is not `module -> targets`"));
            (
                m.trim().to_owned(),
                targets.split_whitespace().map(str::to_owned).collect(),
            )
        })
        .collect()
}

/// The top-level modules `lib.rs` declares.
fn lib_modules() -> BTreeSet<String> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    lib.lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_owned())
        .collect()
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Which node a file belongs to, and its module path inside its crate (for `super::`).
/// `None` for lib.rs (it only declares the modules).
fn node_of(rel: &Path) -> Option<(String, Vec<String>, bool)> {
    let parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    let strip = |f: &str| f.trim_end_matches(".rs").to_owned();
    match parts.as_slice() {
        [f] if f == "lib.rs" => None,
        [f] if f == "main.rs" => Some(("bin".into(), vec![], true)),
        [b, rest @ ..] if b == "bin" => {
            // src/bin/<name>.rs or src/bin/<name>/main.rs is a crate root; its other files are
            // modules of that binary.
            let path = match rest {
                [_, f] if f != "main.rs" => vec![strip(f)],
                _ => vec![],
            };
            Some(("bin".into(), path, true))
        }
        [f] => Some((strip(f), vec![strip(f)], false)),
        [d, rest @ ..] => {
            let mut path = vec![d.clone()];
            path.extend(rest.iter().map(|f| strip(f)).filter(|f| f != "mod"));
            Some((d.clone(), path, false))
        }
        [] => None,
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn ident_at(s: &str) -> &str {
    let s = s.trim_start();
    let end = s.find(|c: char| !is_ident(c)).unwrap_or(s.len());
    &s[..end]
}

/// The first segment of each path in `{a::b, c, d::{e, f}}` (`s` starts after the `{`).
fn group_heads(s: &str) -> Vec<&str> {
    let mut heads = vec![ident_at(s)];
    let mut depth = 1;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => heads.push(ident_at(&s[i + 1..])),
            _ => {}
        }
    }
    heads.retain(|h| !h.is_empty() && *h != "self");
    heads
}

/// The top-level modules a path starting at `s` (just after `crate::`) names.
fn heads(s: &str) -> Vec<&str> {
    match s.strip_prefix('{') {
        Some(g) => group_heads(g),
        None => vec![ident_at(s)],
    }
}

/// Every (from, to, where) reference between top-level modules in `src/`.
fn edges() -> Vec<(String, String, String)> {
    let modules = lib_modules();
    let mut files = vec![];
    rust_files(&src(), &mut files);
    files.sort();
    let mut out = vec![];
    for file in files {
        let rel = file.strip_prefix(src()).unwrap().to_owned();
        let Some((node, path, is_bin)) = node_of(&rel) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        // Code only, one entry per line, with the inline-module depth at that line.
        let mut code = String::new();
        let mut line_of = vec![]; // (offset in `code`, line number, inline depth)
        let mut inline: Vec<usize> = vec![];
        for (n, line) in text.lines().enumerate() {
            let indent = line.len() - line.trim_start().len();
            let t = line.trim_start();
            if t.starts_with("//") {
                continue;
            }
            let line = match line.find(" // ") {
                Some(i) => &line[..i],
                None => line,
            };
            line_of.push((code.len(), n + 1, inline.len()));
            code.push_str(line);
            code.push('\n');
            let head = t
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("pub ");
            if head.starts_with("mod ") && t.ends_with('{') {
                inline.push(indent);
            } else if t == "}" && inline.last() == Some(&indent) {
                inline.pop();
            }
        }
        let at = |offset: usize| {
            let i = line_of.partition_point(|&(o, _, _)| o <= offset) - 1;
            (line_of[i].1, line_of[i].2)
        };
        let mut found = |to: &str, offset: usize| {
            let (line, _) = at(offset);
            if modules.contains(to) && to != node {
                out.push((
                    node.clone(),
                    to.to_owned(),
                    format!("src/{}:{line}", rel.display()),
                ));
            }
        };
        let prefixes: &[&str] = if is_bin {
            &["lambda_inference::"]
        } else {
            &["crate::"]
        };
        for prefix in prefixes {
            for (i, _) in code.match_indices(prefix) {
                let before = code[..i].chars().next_back();
                if before.is_some_and(|c| is_ident(c) || c == '$') {
                    continue;
                }
                for h in heads(&code[i + prefix.len()..]) {
                    found(h, i);
                }
            }
        }
        if !is_bin {
            for (i, _) in code.match_indices("super::") {
                let before = code[..i].chars().next_back();
                if before.is_some_and(|c| is_ident(c) || c == ':') {
                    continue; // counted from the first `super::` of a run
                }
                let mut rest = &code[i..];
                let mut climbs = 0;
                while let Some(r) = rest.strip_prefix("super::") {
                    climbs += 1;
                    rest = r;
                }
                let (_, depth) = at(i);
                if climbs >= path.len() + depth {
                    for h in heads(rest) {
                        found(h, i);
                    }
                }
            }
        }
    }
    out
}

#[test]
fn every_import_follows_an_allowed_edge_down() {
    let layers = allowed();
    let modules = lib_modules();
    let mut problems = vec![];

    // The list itself: every module once, every target a real module on a later line.
    let order: BTreeMap<&str, usize> = layers
        .iter()
        .enumerate()
        .map(|(i, (m, _))| (m.as_str(), i))
        .collect();
    if order.len() != layers.len() {
        problems.push("src/layers.txt names a module twice".to_owned());
    }
    for m in modules.iter().chain(["bin".to_owned()].iter()) {
        if !order.contains_key(m.as_str()) {
            problems.push(format!(
                "src/layers.txt has no line for `{m}`: give it a layer"
            ));
        }
    }
    for (i, (m, targets)) in layers.iter().enumerate() {
        if m != "bin" && !modules.contains(m) {
            problems.push(format!("src/layers.txt: `{m}` is not a module of lib.rs"));
        }
        for t in targets {
            match order.get(t.as_str()) {
                Some(&j) if j > i => {}
                Some(_) => problems.push(format!(
                    "src/layers.txt: `{m} -> {t}` points up (or to itself): `{t}` is listed above `{m}`"
                )),
                None => problems.push(format!("src/layers.txt: `{m} -> {t}`: no module `{t}`")),
            }
        }
    }

    // The code against the list.
    let allowed: BTreeMap<&str, &BTreeSet<String>> =
        layers.iter().map(|(m, t)| (m.as_str(), t)).collect();
    let mut used: BTreeSet<(String, String)> = BTreeSet::new();
    for (from, to, at) in edges() {
        if !allowed.get(from.as_str()).is_some_and(|t| t.contains(&to)) {
            problems.push(format!(
                "{at}: `{from}` uses `{to}`, not an allowed edge in src/layers.txt"
            ));
        }
        used.insert((from, to));
    }
    // And the list against the code, so that it stays the true map.
    for (m, targets) in &layers {
        for t in targets {
            if !used.contains(&(m.clone(), t.clone())) {
                problems.push(format!(
                    "src/layers.txt: `{m} -> {t}` is listed but nothing in src/ uses it: drop it"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
}

/// The scanner itself, on the shapes it must read.
#[test]
fn the_scanner_reads_grouped_and_nested_paths() {
    assert_eq!(heads("{a::b, c, d::{e, f}, self};"), ["a", "c", "d"]);
    assert_eq!(
        heads("{\n    app,\n    config::Config,\n    events,\n};"),
        ["app", "config", "events"]
    );
    assert_eq!(heads("service::Limits;"), ["service"]);
    let n = |p: &str| node_of(Path::new(p)).map(|(n, path, _)| (n, path));
    assert_eq!(n("jobs/mod.rs"), Some(("jobs".into(), vec!["jobs".into()])));
    assert_eq!(
        n("service/meter.rs"),
        Some(("service".into(), vec!["service".into(), "meter".into()]))
    );
    assert_eq!(
        n("bin/lambda-inference/main.rs"),
        Some(("bin".into(), vec![]))
    );
    assert_eq!(
        n("bin/lambda-inference/serve.rs"),
        Some(("bin".into(), vec!["serve".into()]))
    );
    assert_eq!(n("lib.rs"), None);
}
