//! spec/ops.md and the method registry agree: every method has a `## \`name\`` section
//! holding the registry's own description of it (models, base, parameters) verbatim, and
//! the spec documents no method the registry lacks.

use mergec::sema::methods::{method_names, registry_markdown};

#[test]
fn ops_md_matches_the_registry() {
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/spec/ops.md")).unwrap();
    let mut missing = Vec::new();
    for name in method_names() {
        let heading = format!("## `{name}`");
        let Some(at) = spec.find(&format!("{heading}\n")) else {
            missing.push(format!("no section `{heading}`"));
            continue;
        };
        let section_end = spec[at + heading.len()..]
            .find("\n## ")
            .map_or(spec.len(), |i| at + heading.len() + i);
        let section = &spec[at..section_end];
        let table = registry_markdown(name).unwrap();
        if !section.contains(&table) {
            missing.push(format!("section `{heading}` lacks the registry block:\n{table}"));
        }
    }
    let methods: Vec<&str> = method_names().collect();
    for line in spec.lines().filter(|l| l.starts_with("## `")) {
        let name = line.trim_start_matches("## `").trim_end_matches('`');
        if !methods.contains(&name) {
            missing.push(format!(
                "spec/ops.md documents `{name}`, which the registry lacks"
            ));
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n\n"));
    assert_eq!(methods.len(), 20);
}
