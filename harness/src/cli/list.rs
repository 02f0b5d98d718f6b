//! `hvbench list`: the workload table, with each row's user parameters.

use workloads::params::SetBy;
use workloads::WORKLOADS;

pub fn list() -> String {
    let width = WORKLOADS.iter().map(|w| w.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for w in WORKLOADS {
        let units: Vec<&str> = w.metrics.iter().map(|m| m.unit.name()).collect();
        out.push_str(&format!(
            "{:<width$}  {:<8}  {:<5}  cpl{}  {}{}\n",
            w.name,
            w.group.name(),
            if units.is_empty() {
                "-".to_string()
            } else {
                units.join(",")
            },
            w.privilege.cpl(),
            w.description,
            if w.explicit_only {
                " (runs only when named)"
            } else {
                ""
            },
        ));
        for p in w.params.iter().filter(|p| p.set_by == SetBy::User) {
            out.push_str(&format!(
                "{:<width$}    --param {}.{}={}  ({}, {}) {}\n",
                "",
                w.name,
                p.key,
                p.default.unwrap_or("VALUE"),
                p.kind.name(),
                p.bounds(),
                p.description
            ));
        }
    }
    out
}
