//! pipe's modules import one way: each floor only from the floors below it (docs/development.md
//! draws the same floors). A module that reaches up, or a new module on no floor, fails here.

use std::collections::BTreeSet;
use std::path::Path;

/// The top-level modules of `src/`, floor by floor from the ground up.
const FLOORS: &[&[&str]] = &[
    &["error"],
    &["files", "hooks", "json_float"],
    &["model"],
    &["spec", "signals"],
    &["adam", "backend", "data", "distributed", "memory", "selection", "tensorboard"],
    &["checkpoint", "export", "generate", "inputs", "objective"],
    &["chat", "dpo", "response_metrics", "score"],
    &["run_dir"],
    &["runs", "train"],
    &["bench", "stages"],
    &["pipeline"],
    &["cli"],
];

fn floor_of(module: &str) -> Option<usize> {
    FLOORS.iter().position(|floor| floor.contains(&module))
}

/// The top-level modules `source` names through `crate::`, in paths and in `use crate::{…}`.
fn imports(source: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = source;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let names: Vec<&str> = match rest.strip_prefix('{') {
            // `crate::{a, b::c, d::{e, f}}`: the first segment of each item at depth 0.
            Some(group) => {
                let mut depth = 0;
                let end = group
                    .char_indices()
                    .find(|&(_, c)| {
                        depth += (c == '{') as i32 - (c == '}') as i32;
                        depth < 0
                    })
                    .map_or(group.len(), |(i, _)| i);
                let mut items = Vec::new();
                let (mut depth, mut start) = (0, 0);
                for (i, c) in group[..end].char_indices().chain([(end, ',')]) {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            items.push(group[start..i].trim());
                            start = i + 1;
                        }
                        _ => {}
                    }
                }
                items
            }
            None => vec![rest],
        };
        for name in names {
            let first: String = name.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !first.is_empty() {
                found.insert(first);
            }
        }
    }
    found
}

#[test]
fn modules_import_only_from_the_floors_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut folders = vec![src.clone()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let mut wrong = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let module =
            relative.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        // The binaries are not modules of the library.
        if module == "lib" || module == "main" || module == "bin" {
            continue;
        }
        let Some(floor) = floor_of(&module) else {
            wrong.push(format!("src/{}: module `{module}` is on no floor of FLOORS", relative.display()));
            continue;
        };
        let source = std::fs::read_to_string(&file).unwrap();
        // Unit tests may reach anywhere.
        let source = source.split("#[cfg(test)]").next().unwrap();
        for imported in imports(source) {
            if imported == module {
                continue;
            }
            match floor_of(&imported) {
                Some(below) if below < floor => {}
                Some(_) => {
                    wrong.push(format!("src/{}: `{module}` imports `{imported}`, not below it", relative.display()))
                }
                None => wrong.push(format!("src/{}: imports `crate::{imported}`, on no floor", relative.display())),
            }
        }
    }
    assert!(wrong.is_empty(), "imports that do not flow one way:\n{}", wrong.join("\n"));
}

#[test]
fn the_import_reader_finds_paths_and_groups() {
    let found = imports("use crate::model::{hf, lora};\nuse crate::{data::Tok, spec::{A, B}, error};\nlet x = crate::files::write_atomic(p);");
    let names: Vec<&str> = found.iter().map(String::as_str).collect();
    assert_eq!(names, ["data", "error", "files", "model", "spec"]);
}
