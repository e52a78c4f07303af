//! The configuration table (`| variable | meaning | default |`, in the README or a page of docs/)
//! against `config::VARS`, the declarations parsing is driven by: every declared variable has a
//! row, with the declared default; the table names nothing undeclared (the AWS SDK's own
//! variables, `config::SDK_VARS`, aside); no variable has two rows.

use std::path::{Path, PathBuf};

use lambda_inference::config::{Unset, Var, SDK_VARS, VARS};

const HEADER: &str = "| variable | meaning | default |";

/// A row of the table: the variables its first cell names (in backticks), its default cell.
struct Row {
    names: Vec<String>,
    default: String,
    line: String,
}

/// The markdown files the table may live in: README.md and docs/**.md.
fn pages() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "md") {
                out.push(p);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = vec![root.join("README.md")];
    walk(&root.join("docs"), &mut out);
    out
}

/// The rows of the one table under [`HEADER`] in `text`, or `None` if `text` has no such table.
fn parse_table(text: &str) -> Option<Vec<Row>> {
    let mut lines = text.lines().skip_while(|l| l.trim() != HEADER);
    lines.next()?;
    lines.next(); // |---|---|---|
    let rows = lines
        .take_while(|l| l.trim_start().starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.trim().trim_matches('|').split('|').collect();
            let first = cells[0];
            let names = first
                .split('`')
                .skip(1)
                .step_by(2)
                .filter(|t| {
                    !t.is_empty()
                        && t.bytes()
                            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                })
                .map(str::to_owned)
                .collect();
            Row {
                names,
                default: cells.last().unwrap_or(&"").trim().to_owned(),
                line: l.to_owned(),
            }
        })
        .collect();
    Some(rows)
}

/// What is wrong with `rows` against `vars`; empty when they agree.
fn problems(rows: &[Row], vars: &[Var], sdk: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for r in rows {
        if r.names.is_empty() {
            out.push(format!("a row names no variable in backticks: {}", r.line));
        }
        for n in &r.names {
            if !vars.iter().any(|v| v.name == n) && !sdk.contains(&n.as_str()) {
                out.push(format!(
                    "the table names {n}, which config::VARS does not declare"
                ));
            }
        }
    }
    for v in vars {
        let rows: Vec<&Row> = rows
            .iter()
            .filter(|r| r.names.iter().any(|n| n == v.name))
            .collect();
        let [row] = rows.as_slice() else {
            out.push(format!(
                "{} is declared in config::VARS but has {} rows in the table (needs one)",
                v.name,
                rows.len()
            ));
            continue;
        };
        // A default value may be in backticks and followed by a remark in parentheses; what an
        // unset variable means otherwise is said in the same words as the declaration.
        let ok = match v.unset {
            Unset::Default(d) => {
                let cell = row.default.replace('`', "");
                cell == d || cell.starts_with(&format!("{d} ("))
            }
            Unset::Means(m) => row.default == m,
        };
        if !ok {
            out.push(format!(
                "{}: the table's default is {:?}, the declaration's {:?}",
                v.name, row.default, v.unset
            ));
        }
    }
    out
}

#[test]
fn the_configuration_table_matches_the_declarations() {
    let mut found = Vec::new();
    for p in pages() {
        let text = std::fs::read_to_string(&p).unwrap();
        if let Some(rows) = parse_table(&text) {
            assert_eq!(
                text.lines().filter(|l| l.trim() == HEADER).count(),
                1,
                "{} has two configuration tables",
                p.display()
            );
            found.push((p, rows));
        }
    }
    let [(page, rows)] = found.as_slice() else {
        panic!(
            "expected exactly one configuration table ({HEADER}) in README.md and docs/, found {:?}",
            found.iter().map(|(p, _)| p).collect::<Vec<_>>()
        );
    };
    let wrong = problems(rows, VARS, SDK_VARS);
    assert!(
        wrong.is_empty(),
        "{} against config::VARS:\n{}",
        page.display(),
        wrong.join("\n")
    );
}

/// The check itself: a variable declared without a row, a row for an undeclared variable and a
/// changed default are each caught.
#[test]
fn the_check_catches_a_missing_row_an_unknown_name_and_a_stale_default() {
    let declared = [
        Var {
            name: "MAX_INPUTS",
            unset: Unset::Default("2048"),
            doc: "inputs per request",
        },
        Var {
            name: "MODEL_ID",
            unset: Unset::Means("GGUF `general.name`"),
            doc: "the reported model",
        },
    ];
    let table = |rows: &str| {
        parse_table(&format!(
            "intro\n\n{HEADER}\n|---|---|---|\n{rows}\nafter\n"
        ))
        .unwrap()
    };
    let good = table(
        "| `MAX_INPUTS` | inputs | 2048 (OpenAI's limit) |\n\
         | `MODEL_ID` | the model | GGUF `general.name` |\n\
         | `AWS_REGION`, credentials | SDK | Lambda's |",
    );
    assert_eq!(
        problems(&good, &declared, &["AWS_REGION"]),
        Vec::<String>::new()
    );

    let missing = table("| `MAX_INPUTS` | inputs | 2048 |");
    let p = problems(&missing, &declared, &[]);
    assert!(p.len() == 1 && p[0].contains("MODEL_ID"), "{p:?}");

    let unknown = table(
        "| `MAX_INPUTS` | inputs | 2048 |\n| `MODEL_ID` | m | GGUF `general.name` |\n\
         | `MAX_WIDGETS` | widgets | 3 |",
    );
    let p = problems(&unknown, &declared, &[]);
    assert!(p.len() == 1 && p[0].contains("MAX_WIDGETS"), "{p:?}");

    let stale = table("| `MAX_INPUTS` | inputs | 1024 |\n| `MODEL_ID` | m | from the GGUF |");
    let p = problems(&stale, &declared, &[]);
    assert_eq!(p.len(), 2, "{p:?}");
}
