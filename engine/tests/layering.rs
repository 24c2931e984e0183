//! The engine's modules import each other one way only: this reads `src/` and fails on any
//! import cycle among the top-level modules (a module's files and submodules count as that
//! module), and on any use of `kvm_ioctls` (the VMM owns KVM).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The top-level module a file of `src/` belongs to (`lib` for lib.rs).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// The top-level modules `text` names through `crate::NAME`.
fn imports(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        // `capsule_snapshot::` and the like are other crates, not `crate::`.
        let before = text[..i].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &text[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if modules.contains(&name) {
            found.insert(name);
        }
        // `crate::{a, b}`
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if modules.contains(&name) {
                    found.insert(name);
                }
            }
        }
    }
    found
}

#[test]
fn engine_modules_import_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    if !src.is_dir() {
        // The nested harness runs this binary in a VM without the source tree; the host run
        // (`cargo test`) already checked the same sources.
        eprintln!("SKIPPED: the engine's sources are not on this machine");
        return;
    }
    let files = sources(&src);
    let modules: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(&src, f))
        .filter(|m| m != "lib")
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(&src, file);
        if module == "lib" {
            continue; // the crate root declares and re-exports everything
        }
        let text = std::fs::read_to_string(file).unwrap();
        assert!(
            !text.contains("kvm_ioctls"),
            "{} uses kvm_ioctls: KVM belongs to capsule-vmm",
            file.display()
        );
        let mut deps = imports(&text, &modules);
        deps.remove(&module);
        graph.entry(module).or_default().extend(deps);
    }
    // Depth-first search for a back edge; report the cycle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(node) {
            return;
        }
        if let Some(at) = path.iter().position(|n| n == node) {
            panic!(
                "import cycle among the engine's modules: {} -> {node}",
                path[at..].join(" -> ")
            );
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, path, done);
        }
        path.pop();
        done.insert(node.to_owned());
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, &graph, &mut Vec::new(), &mut done);
    }
    assert!(graph.len() >= 10, "modules found: {:?}", graph.keys());
}

#[test]
fn the_cycle_finder_sees_grouped_imports() {
    let modules: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
    let found = imports(
        "use crate::a::X;\nuse crate::{b, c::Y};\nuse capsule_snapshot::crate_x;",
        &modules,
    );
    assert_eq!(found, modules);
}
