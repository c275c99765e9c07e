//! The shipped alert rules and dashboard: Prometheus' own `promtool` checks the rules and runs
//! their unit tests (each alert firing), and the dashboard is importable Grafana JSON with the
//! variables the issue asks for.

mod support;

use std::path::Path;
use std::process::Command;

use support::command::run;

fn promtool(args: &[&str]) -> String {
    let out = run(
        Command::new("promtool")
            .args(args)
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards")),
        None,
    )
    .expect("promtool runs (Debian package prometheus, installed by ./scripts/test)");
    let text = out.text();
    assert!(out.ok, "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let text = promtool(&["check", "rules", "alerts.yml"]);
    assert!(text.contains("SUCCESS: 9 rules found"), "{text}");
    let text = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(text.contains("SUCCESS"), "{text}");
    // Every alert has a unit test that makes it fire.
    let tests = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/alerts_test.yml"),
    )
    .unwrap();
    for alert in [
        "DirectorBackendDown",
        "DirectorAllBackendsOfTagDown",
        "DirectorLoginFailureRatioHigh",
        "DirectorBackendLoginTurnsMissed",
        "DirectorChecksPausedTooLong",
        "DirectorAuthServiceDown",
        "DirectorClusterLeaseLost",
        "DirectorClusterWatchLagging",
        "DirectorDown",
    ] {
        assert!(
            tests.contains(&format!(
                "alertname: {alert}\n        exp_alerts:\n          - exp_labels"
            )),
            "no firing test for {alert}"
        );
    }
}

#[test]
fn dashboard_is_grafana_json_with_the_expected_variables_and_panels() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/director.json"),
    )
    .unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "instance", "backend"]);
    assert_eq!(dash["templating"]["list"][0]["query"], "prometheus");
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    let mut ids = std::collections::HashSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "panel id {} twice",
            p["id"]
        );
    }
    // Rows only group: an expanded row holds no panels of its own (a collapsed row would
    // hide its panels, and their queries, from these checks and the Prometheus test).
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| {
            assert_eq!(p["collapsed"], false, "row {} is collapsed", p["title"]);
            assert!(p["panels"].as_array().is_none_or(|a| a.is_empty()));
            p["title"].as_str().unwrap()
        })
        .collect();
    assert_eq!(rows, ["Cluster"]);
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            assert!(t["expr"].as_str().unwrap().contains("director_"), "{t}");
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}");
    }
}
