//! The library's modules form one-way layers: a module may use modules of its own layer or of
//! the layers below it, never one above, and no group of modules uses each other in a circle.
//! The order is written once, here, in [`LAYERS`]; README "How it works" describes it.
//!
//! Read from the sources: every `crate::name` path (in `use` lines, in code, in macros as
//! `$crate::name`), every name in a `use crate::{a, b::c}` group, and `super::name` in a
//! top-level module's own file. Comments are skipped, so doc links do not count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom to top. Every top-level module of `src/` is in exactly one layer.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "helpers: plain data and pure functions",
        &[
            "arn",
            "bounded",
            "glob",
            "secret",
            "time",
            "safe_dir",
            "iam",
            "metrics",
            "signal",
            "systemd",
            "shutdown",
            "http_client",
        ],
    ),
    ("configuration", &["config"]),
    ("who is calling", &["identity", "runtime"]),
    ("which app", &["policy"]),
    ("the audit trail", &["audit"]),
    ("tokens and limits", &["token", "rate_limit"]),
    ("the daemon's own credentials", &["source"]),
    ("credentials", &["credentials"]),
    (
        "what every surface shares",
        &["state", "admit", "failure", "reload"],
    ),
    (
        "surfaces",
        &["imds", "container", "admin", "exec", "explain", "doctor"],
    ),
    ("listeners", &["server"]),
    ("wiring: run and the shutdown tree's drain", &["daemon"]),
    ("the binary's commands", &["cli"]),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`None` for `lib.rs` and `main.rs`), and whether
/// the file is that module's own root (where `super::` is the crate).
fn module_of(file: &Path) -> Option<(String, bool)> {
    let rel = file.strip_prefix(src()).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs").to_owned();
    match parts.first() {
        None if stem == "lib" || stem == "main" => None,
        None => Some((stem, true)),
        Some(top) => Some((top.clone(), parts.len() == 1 && stem == "mod")),
    }
}

fn ident_at(text: &str) -> Option<&str> {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    (end > 0).then(|| &text[..end])
}

/// The names of a `{a, b::c, d::{e}}` group at its top level.
fn group_names(group: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                names.extend(ident_at(group[start..i].trim()));
                start = i + 1;
            }
            _ => {}
        }
    }
    names.extend(ident_at(group[start..].trim()));
    names
}

/// The top-level modules `code` refers to.
fn references(code: &str, is_root: bool) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut prefixes = vec!["crate::"];
    if is_root {
        prefixes.push("super::");
    }
    for prefix in prefixes {
        for (at, _) in code.match_indices(prefix) {
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue; // e.g. `imds_broker_crate::`
            }
            let rest = &code[at + prefix.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = matching_brace(group);
                out.extend(group_names(&group[..end]).into_iter().map(str::to_owned));
            } else if let Some(name) = ident_at(rest) {
                out.insert(name.to_owned());
            }
        }
    }
    out.remove("self");
    out
}

fn matching_brace(text: &str) -> usize {
    let mut depth = 1;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    text.len()
}

fn without_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            // Good enough for this code base: no `//` inside the string literals that matter.
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// module -> the other top-level modules it uses.
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let Some((module, is_root)) = module_of(&file) else {
            continue;
        };
        let code = without_comments(&std::fs::read_to_string(&file).unwrap());
        let uses = graph.entry(module.clone()).or_default();
        uses.extend(
            references(&code, is_root)
                .into_iter()
                .filter(|m| *m != module),
        );
    }
    graph
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

#[test]
fn every_module_has_a_layer_and_imports_point_down() {
    let graph = import_graph();
    assert!(graph.len() > 20, "read too few modules: {graph:?}");
    let mut problems = Vec::new();
    for (module, uses) in &graph {
        let Some(own) = layer_of(module) else {
            problems.push(format!("{module}: in no layer of tests/layers.rs"));
            continue;
        };
        for used in uses {
            match layer_of(used) {
                Some(layer) if layer > own => problems.push(format!(
                    "{module} ({}) uses {used} ({}), a higher layer",
                    LAYERS[own].0, LAYERS[layer].0
                )),
                Some(_) => {}
                None if graph.contains_key(used) => {}
                None => {} // an external path such as `crate::` inside a string
            }
        }
    }
    for (_, modules) in LAYERS {
        for module in *modules {
            if !graph.contains_key(*module) {
                problems.push(format!(
                    "{module}: listed in LAYERS but not a module of src/"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn no_modules_use_each_other_in_a_circle() {
    let graph = import_graph();
    // Depth-first search for a back edge; report the circle it closes.
    fn visit<'a>(
        module: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|m| *m == module) {
            let mut circle: Vec<String> = path[at..].iter().map(|m| m.to_string()).collect();
            circle.push(module.to_owned());
            return Some(circle);
        }
        if !done.insert(module) {
            return None;
        }
        path.push(module);
        for used in graph.get(module).into_iter().flatten() {
            if let Some(circle) = visit(used, graph, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        let mut path = Vec::new();
        if let Some(circle) = visit(module, &graph, &mut path, &mut done) {
            panic!(
                "modules use each other in a circle: {}",
                circle.join(" -> ")
            );
        }
    }
}

#[test]
fn the_reader_sees_each_kind_of_reference() {
    let code = "use crate::{a, b::{c, d}, e::f};\nfn x() { crate::g::h(); $crate::i::j!(); }\n";
    let found: Vec<String> = references(code, false).into_iter().collect();
    assert_eq!(found, ["a", "b", "e", "g", "i"]);
    assert!(references("super::k::l", true).contains("k"));
    assert!(references("super::k::l", false).is_empty());
    assert!(references(&without_comments("// see [`crate::m`]\nlet x = 1;"), false).is_empty());
}
