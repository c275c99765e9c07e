//! The metrics listener against real Dovecot backends: after logins (good and bad) and relayed
//! sessions, `/metrics` shows them with sensible values, every metric of the catalogue is
//! exported, `promtool check metrics` accepts the scrape, `/healthz` answers, and `/readyz`
//! turns 503 when no backend can take users.

mod support;

use std::process::Command;
use std::time::Duration;

use director::metrics::CATALOGUE;
use director::state::backend::AdminState;
use support::client::{imap_login, pop3_login, quote, Conn};
use support::command::run;
use support::director::{DirectorOptions, TestDirector};
use support::dovecot::{user, PASSWORD};
use support::scrape::{get, sample};
use support::wait::wait_until;

fn options() -> DirectorOptions {
    DirectorOptions::with_extra(
        "metrics:\n  address: 127.0.0.1:0\n\
         health:\n  interval: 500ms\n  fast_interval: 200ms\n  rise: 2\n  fall: 2\n",
    )
}

fn promtool_check(text: &str) -> (bool, String) {
    let out = run(
        Command::new("promtool").args(["check", "metrics"]),
        Some(text.as_bytes()),
    )
    .expect("run promtool (Debian package prometheus; ./scripts/install-deps)");
    (out.ok, out.text())
}

#[test]
fn scrape_after_traffic_shows_logins_sessions_and_backends_and_passes_promtool() {
    let (pool, d) = TestDirector::start_with_pool(2, &options());
    let m = d.metrics.expect("metrics listener");

    assert_eq!(get(m, "/healthz"), (200, "ok\n".to_owned()));
    wait_until(
        "ready after the first check round",
        Duration::from_secs(20),
        || (get(m, "/readyz").0 == 200).then_some(()),
    );

    // Three good IMAP logins kept open, one more that runs a command and logs out (a whole
    // relayed session), a wrong password, and a POP3 session.
    let open: Vec<Conn> = (1..4)
        .map(|i| imap_login(d.imap, &user(i), PASSWORD).0)
        .collect();
    let (mut c, _) = imap_login(d.imap, &user(4), PASSWORD);
    c.imap_ok("b1", "SELECT INBOX");
    c.imap_ok("b2", "LOGOUT");
    assert!(c.ended());
    let mut bad = Conn::connect(d.imap);
    bad.line();
    let r = bad.imap(
        "c1",
        &format!("LOGIN {} {}", quote(&user(5)), quote("wrong")),
    );
    assert!(r.last().unwrap().starts_with("c1 NO"), "{r:?}");
    drop(bad);
    let mut p = pop3_login(d.pop3, &user(6), PASSWORD);
    p.pop3_ok("QUIT");
    assert!(p.ended());

    // Session ends are counted when the relay finishes: wait for both to be gone.
    wait_until("ended sessions gone", Duration::from_secs(10), || {
        (d.sessions.list().len() == 3).then_some(())
    });
    let (status, text) = get(m, "/metrics");
    assert_eq!(status, 200);

    let imap_ok = [("protocol", "imap"), ("result", "ok")];
    assert!(sample(&text, "director_logins_total", &imap_ok).unwrap() >= 4.0);
    let failed = [("protocol", "imap"), ("result", "auth_failed")];
    assert!(sample(&text, "director_logins_total", &failed).unwrap() >= 1.0);
    let pop3_ok = [("protocol", "pop3"), ("result", "ok")];
    assert!(sample(&text, "director_logins_total", &pop3_ok).unwrap() >= 1.0);
    assert!(
        sample(
            &text,
            "director_login_duration_seconds_count",
            &[("protocol", "imap")]
        )
        .unwrap()
            >= 5.0
    );
    assert!(sample(&text, "director_connections_total", &[("protocol", "imap")]).unwrap() >= 5.0);
    assert_eq!(
        sample(&text, "director_connections", &[("protocol", "imap")]),
        Some(3.0),
        "three IMAP sessions are still open"
    );
    for dir in ["in", "out"] {
        for proto in ["imap", "pop3"] {
            let bytes = sample(
                &text,
                "director_relay_bytes_total",
                &[("protocol", proto), ("direction", dir)],
            );
            assert!(bytes.unwrap() > 0.0, "{proto} {dir}: {bytes:?}");
        }
    }
    assert_eq!(
        sample(&text, "director_backend_sessions", &[("protocol", "imap")]),
        Some(3.0)
    );
    let ok_logins = sample(
        &text,
        "director_backend_logins_total",
        &[("protocol", "imap"), ("result", "ok")],
    );
    assert!(ok_logins.unwrap() >= 4.0, "{ok_logins:?}");
    assert!(sample(&text, "director_sticky_records", &[]).unwrap() >= 5.0);
    assert!(sample(&text, "director_backend_users", &[]).unwrap() >= 5.0);
    assert_eq!(sample(&text, "director_checks_paused", &[]), Some(0.0));
    for b in &pool.backends {
        let ip = b.ip.to_string();
        let l = [("backend", ip.as_str())];
        assert_eq!(sample(&text, "director_backend_up", &l), Some(1.0), "{ip}");
        assert_eq!(sample(&text, "director_backend_weight", &l), Some(100.0));
        let up = [("backend", ip.as_str()), ("state", "up")];
        assert_eq!(
            sample(&text, "director_backend_admin_state", &up),
            Some(1.0)
        );
        let ok = [("backend", ip.as_str()), ("result", "ok")];
        assert!(sample(&text, "director_backend_check_results_total", &ok).unwrap() >= 1.0);
        assert!(
            sample(&text, "director_backend_check_duration_seconds_count", &ok).unwrap() >= 1.0
        );
        assert_eq!(
            sample(&text, "director_backend_last_check_result", &ok),
            Some(1.0)
        );
    }
    // The whole catalogue is exported, with its help, and nothing outside it; a series per
    // auth service (`endpoint`) exists only where one is configured (tests/auth_director.rs,
    // tests/dashboard_prometheus.rs scrape those).
    for def in CATALOGUE.iter().filter(|d| !d.labels.contains(&"endpoint")) {
        let help = format!("# HELP {} ", def.name);
        assert!(text.contains(&help), "{} missing from the scrape", def.name);
        let ty = format!("# TYPE {} {}", def.name, def.kind.name());
        assert!(text.contains(&ty), "{ty} missing");
    }
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split(' ').nth(2).unwrap();
        assert!(
            CATALOGUE.iter().any(|d| d.name == name),
            "{name} not in the catalogue"
        );
    }
    // No user name and no client address in any label.
    for i in 1..7 {
        assert!(!text.contains(&user(i)), "{} in the scrape", user(i));
    }

    let (ok, out) = promtool_check(&text);
    assert!(ok, "promtool check metrics failed:\n{out}\n{text}");
    drop(open);
}

#[test]
fn readyz_is_503_when_every_backend_is_admin_down() {
    let (_pool, d) = TestDirector::start_with_pool(2, &options());
    let m = d.metrics.expect("metrics listener");
    wait_until("ready", Duration::from_secs(20), || {
        (get(m, "/readyz").0 == 200).then_some(())
    });
    let ips: Vec<_> = d.state.backends().backends.keys().copied().collect();
    d.state.set_admin(ips[0], AdminState::Down).unwrap();
    assert_eq!(get(m, "/readyz").0, 200, "one backend is still usable");
    d.state.set_admin(ips[1], AdminState::Maintenance).unwrap();
    let (status, body) = get(m, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no backend takes new users"), "{body}");
    assert_eq!(get(m, "/healthz").0, 200, "alive all the same");
    let (_, text) = get(m, "/metrics");
    let down = [("backend", &*ips[0].to_string()), ("state", "down")];
    assert_eq!(
        sample(&text, "director_backend_admin_state", &down),
        Some(1.0)
    );
    d.state.set_admin(ips[0], AdminState::Up).unwrap();
    assert_eq!(get(m, "/readyz").0, 200);
}

#[test]
fn no_metrics_listener_without_an_address() {
    let (_pool, d) = TestDirector::with_pool(1);
    assert!(d.metrics.is_none());
}
