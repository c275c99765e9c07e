//! The shape of `src/`: no module imports one that imports it back, neither file by file nor
//! folder by folder, and `config` imports nothing of the crate but its own modules (issue 11:
//! configuration is a leaf that the runtime reads). Read from the sources, the way a reviewer
//! would: every `crate::a::b` path outside comments and outside `#[cfg(test)]` code counts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`protocol::imap::frontend`) -> source text without tests and comments.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let text = match text.find("#[cfg(test)]") {
                Some(i) => &text[..i],
                None => &text[..],
            };
            let code: String = text
                .lines()
                .map(|l| match l.find("//") {
                    Some(i) => &l[..i],
                    None => l,
                })
                .collect::<Vec<_>>()
                .join("\n");
            out.insert(parts.join("::"), code);
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

/// The crate paths a source names: `crate::a::b` and each item of `crate::a::{b, c::d}`.
fn named_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let base = rest[..end].trim_end_matches(':').to_string();
        if rest[end..].starts_with('{') && rest[..end].ends_with("::") {
            let close = rest[end..].find(';').map_or(rest.len(), |j| end + j);
            for item in rest[end + 1..close].split([',', '{', '}', ' ', '\n']) {
                let first = item.split("::").next().unwrap_or("");
                if !first.is_empty() && first != "self" {
                    out.push(format!("{base}::{first}"));
                }
            }
        }
        out.push(base);
    }
    out
}

/// Edges between modules, each path resolved to the longest module it names.
fn edges(modules: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for (name, code) in modules {
        let mut to = BTreeSet::new();
        for path in named_paths(code) {
            let segs: Vec<&str> = path.split("::").collect();
            let target = (1..=segs.len())
                .rev()
                .map(|n| segs[..n].join("::"))
                .find(|m| modules.contains_key(m));
            if let Some(t) = target {
                if &t != name {
                    to.insert(t);
                }
            }
        }
        out.insert(name.clone(), to);
    }
    out
}

/// One cycle of the graph, if there is any (depth-first search).
fn a_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                0 => {
                    if let Some(c) = visit(m, graph, state, stack) {
                        return Some(c);
                    }
                }
                1 => {
                    let from = stack.iter().position(|s| s == m).unwrap();
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn top(module: &str) -> String {
    module.split("::").next().unwrap_or("").to_string()
}

#[test]
fn the_reader_sees_the_imports() {
    // The check itself must see what it checks: a known edge is there.
    let graph = edges(&modules());
    assert!(
        graph["login"].contains("state::router"),
        "login -> state::router not seen: {:?}",
        graph["login"]
    );
    assert_eq!(
        named_paths("use crate::a::{b, c::d};\nx = crate::e::f(1);"),
        ["a::b", "a::c", "a", "e::f"]
    );
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let graph = edges(&modules());
    if let Some(cycle) = a_cycle(&graph) {
        panic!("import cycle among modules: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_folders_are_layers() {
    // Folder by folder: `src/lib.rs` lists the folders from the bottom up, and a folder
    // imports only from the folders below it.
    let mut folders: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, to) in edges(&modules()) {
        let entry = folders.entry(top(&module)).or_default();
        entry.extend(to.iter().map(|m| top(m)).filter(|m| *m != top(&module)));
    }
    if let Some(cycle) = a_cycle(&folders) {
        panic!("import cycle among folders: {}", cycle.join(" -> "));
    }
}

#[test]
fn config_imports_nothing_of_the_runtime() {
    let graph = edges(&modules());
    for (module, to) in &graph {
        if top(module) != "config" {
            continue;
        }
        let outside: Vec<&String> = to.iter().filter(|m| top(m) != "config").collect();
        assert!(
            outside.is_empty(),
            "{module} imports {outside:?}: config must be a leaf"
        );
    }
}
