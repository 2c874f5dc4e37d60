//! docs/json.md and the real `--json` output cannot drift apart: the table is parsed, every command is run against
//! the example pipeline in a state where its documents are filled in, and every documented member must be present
//! in every object that should hold it (with `null` when it has no value) and seen with a value at least once.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Down, Repo};

/// One documented member: `name`, `name[]` (an array), with the members of its object(s) when the doc lists them.
#[derive(Debug)]
struct Field {
    name: String,
    array: bool,
    children: Vec<Field>,
}

/// Parses a document cell: `a`, `b[]` (each: `c`, `d` {`e`}), with other parenthesised text ignored.
fn parse_fields(text: &[char], at: &mut usize, until: Option<char>) -> Vec<Field> {
    let mut fields: Vec<Field> = Vec::new();
    while *at < text.len() {
        let c = text[*at];
        *at += 1;
        if Some(c) == until {
            return fields;
        }
        match c {
            '`' => {
                let start = *at;
                while *at < text.len() && text[*at] != '`' {
                    *at += 1;
                }
                let mut name: String = text[start..*at].iter().collect();
                *at += 1;
                let array = name.ends_with("[]");
                if array {
                    name.truncate(name.len() - 2);
                }
                fields.push(Field { name, array, children: Vec::new() });
            }
            '{' => {
                let children = parse_fields(text, at, Some('}'));
                fields.last_mut().expect("`{` follows a member").children = children;
            }
            '(' => {
                let rest: String = text[*at..].iter().take(5).collect();
                if rest == "each:" {
                    *at += 5;
                    let children = parse_fields(text, at, Some(')'));
                    fields.last_mut().expect("`(each:` follows a member").children = children;
                } else {
                    // A remark or a list of values, not members.
                    let mut depth = 1;
                    while *at < text.len() && depth > 0 {
                        match text[*at] {
                            '(' => depth += 1,
                            ')' => depth -= 1,
                            _ => {}
                        }
                        *at += 1;
                    }
                }
            }
            _ => {}
        }
    }
    fields
}

/// command → documented members, from the table in docs/json.md.
fn documented() -> BTreeMap<String, Vec<Field>> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/json.md")).unwrap();
    let mut out = BTreeMap::new();
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').splitn(2, '|').collect();
        let text: Vec<char> = cells[1].chars().collect();
        for command in cells[0].split(',').map(|c| c.trim().trim_matches('`').to_string()) {
            out.insert(command, parse_fields(&text, &mut 0, None));
        }
    }
    out
}

/// Checks `value` against `fields`: every member present in every object; paths seen with a value are added to
/// `seen`, missing members to `missing`.
fn check(
    value: &serde_json::Value,
    fields: &[Field],
    path: &str,
    seen: &mut BTreeSet<String>,
    missing: &mut Vec<String>,
) {
    let Some(object) = value.as_object() else { return };
    for field in fields {
        let here = format!("{path}.{}{}", field.name, if field.array { "[]" } else { "" });
        let Some(member) = object.get(&field.name) else {
            missing.push(format!("{here} is missing in {value}"));
            continue;
        };
        if !member.is_null() {
            seen.insert(here.clone());
        }
        let items: Vec<&serde_json::Value> = match (field.array, member) {
            (true, serde_json::Value::Array(items)) => items.iter().collect(),
            (true, other) if !other.is_null() => {
                missing.push(format!("{here} is not an array: {other}"));
                continue;
            }
            _ => vec![member],
        };
        for item in items {
            check(item, &field.children, &here, seen, missing);
        }
    }
}

fn all_paths(fields: &[Field], path: &str, out: &mut Vec<String>) {
    for field in fields {
        let here = format!("{path}.{}{}", field.name, if field.array { "[]" } else { "" });
        all_paths(&field.children, &here, out);
        out.push(here);
    }
}

/// Edits the hello image's greeting and bakes it; returns the digest.
fn bake_greeting(repo: &Repo, greeting: &str) -> String {
    let text = std::fs::read_to_string(repo.file("images/hello.toml")).unwrap();
    let start = text.find("GREETING = \"").unwrap() + "GREETING = \"".len();
    let end = start + text[start..].find('"').unwrap();
    repo.write("images/hello.toml", &format!("{}{greeting}{}", &text[..start], &text[end..]));
    repo.run(&["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string()
}

#[test]
fn every_member_in_docs_json_md_is_in_the_real_output() {
    let documented = documented();
    assert!(documented.len() >= 14, "the table was not parsed: {documented:?}");
    let (repo, _ports) = Repo::example_on_free_ports();
    let _down = Down { repo: &repo, stages: vec!["dev", "test", "prod"], pipeline: None };
    let mut outputs: Vec<(&str, serde_json::Value)> = Vec::new();
    let mut json = |command: &'static str, args: &[&str]| {
        let mut all = args.to_vec();
        all.push("--json");
        let doc = repo.run(&all).json();
        outputs.push((command, doc));
    };

    json("bake", &["bake"]);
    json("promote", &["promote", "--stage", "dev"]);
    json("status", &["status"]);
    json("deploy", &["deploy", "--stage", "dev"]);
    let a = repo.run(&["images", "--json"]).ok().json()["images"][1]["digest"].as_str().unwrap().to_string();
    json("approve", &["approve", "--stage", "prod", "--digest", &a, "--note", "ok"]);
    let b = bake_greeting(&repo, "second");
    let c = bake_greeting(&repo, "third");
    json("gc", &["gc", "--dry-run"]);
    json("promote", &["promote", "--stage", "dev", "--digest", &c, "--no-deploy"]);
    json("promote", &["promote", "--stage", "dev", "--digest", &c, "--plan"]);
    json("deploy", &["deploy", "--stage", "dev"]);
    json("rollback", &["rollback", "--stage", "dev"]);
    json("revoke", &["revoke", &b, "--reason", "never shipped"]);
    json("images", &["images"]);
    json("log", &["log", "--limit", "100"]);
    json("lineage", &["lineage", &a]);
    json("lineage", &["lineage", &b]);
    json("verify", &["verify"]);
    json("run", &["run"]);
    json("down", &["down", "--stage", "dev"]);
    // A stopped stage fills in the members that say so.
    json("status", &["status"]);
    json("verify", &["verify"]);

    let mut problems = Vec::new();
    for (command, fields) in &documented {
        let mut seen = BTreeSet::new();
        let docs: Vec<&serde_json::Value> = outputs.iter().filter(|(c, _)| c == command).map(|(_, d)| d).collect();
        if docs.is_empty() {
            problems.push(format!("`{command}` is documented but this test never runs it"));
        }
        for doc in docs {
            check(doc, fields, command, &mut seen, &mut problems);
        }
        let mut paths = Vec::new();
        all_paths(fields, command, &mut paths);
        for path in paths.iter().filter(|p| !seen.contains(*p)) {
            // Members documented as null in this state are still checked for presence above.
            if !NULL_HERE.contains(&path.as_str()) {
                problems.push(format!("{path} was never seen with a value"));
            }
        }
    }
    assert!(problems.is_empty(), "docs/json.md and the output differ:\n{}", problems.join("\n"));
}

/// Members that are null in every state this test reaches (they hold a value only in other situations).
const NULL_HERE: &[&str] = &[
    "bake.reproducible",
    "bake.commit",
    "deploy.reconciled",
    "rollback.reconciled",
    "status.stages[].deploying",
    "lineage.image.commit",
    "lineage.stages[].deployments[].reason",
    "images.images[].commit",
    "gc.seq",
];
