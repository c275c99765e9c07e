//! `director map` a page at a time, against real Dovecot: users log in through a running
//! director (in-process here), then the CLI pages through its records. Every record is
//! listed exactly once across the pages, with its username and backend; the next page is
//! named on the last line; `--all` follows the pages itself; a backend's pages hold only
//! its users; a page size out of range is refused with the range.

mod support;

use std::collections::BTreeMap;
use std::net::IpAddr;

use support::admin_cli::AdminCli;
use support::client::imap_login;
use support::director::{DirectorOptions, TestDirector};
use support::dovecot::{user, PASSWORD};

/// Users logged in: more than a few pages of [`PAGE`].
const USERS: usize = 40;
const PAGE: usize = 7;

/// What `map` says of each user hash, page after page with `args`, following `next`;
/// panics if a hash comes twice. Also returns how many pages there were.
fn every_page(cli: &AdminCli, args: &[&str]) -> (BTreeMap<u32, (String, IpAddr)>, usize) {
    let mut seen = BTreeMap::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut a = args.to_vec();
        if let Some(n) = &after {
            a.extend(["--after", n]);
        }
        let page = cli.json(&a);
        let users = page["users"].as_array().unwrap();
        assert!(users.len() <= PAGE, "{page}");
        for e in users {
            let hash = e["hash"].as_u64().unwrap() as u32;
            let name = e["user"].as_str().unwrap_or("?").to_owned();
            let backend: IpAddr = e["backend"].as_str().unwrap().parse().unwrap();
            assert!(
                seen.insert(hash, (name, backend)).is_none(),
                "user hash {hash} listed twice ({args:?}, page {pages})"
            );
        }
        pages += 1;
        assert!(pages <= USERS + 1, "the pages do not end: {page}");
        match page["next"].as_u64() {
            Some(n) => after = Some(n.to_string()),
            None => return (seen, pages),
        }
    }
}

#[test]
fn map_pages_list_every_record_exactly_once() {
    let (pool, d) = TestDirector::start_with_pool(2, &DirectorOptions::with_configured_backends(2));
    let cli = AdminCli::of(&d);
    // Users log in and out: their records stay for user_expire (15 minutes).
    let mut landed: BTreeMap<u32, (String, IpAddr)> = BTreeMap::new();
    for i in 1..=USERS {
        let (mut c, name) = imap_login(d.imap, &user(i), PASSWORD);
        c.imap_ok("lo", "LOGOUT");
        let ip = pool.backends.iter().find(|b| b.name == name).unwrap().ip;
        landed.insert(d.router.hash(&user(i)), (user(i), ip));
    }
    assert_eq!(landed.len(), USERS);

    // One page holds them all by default, and says no more follow.
    let all = cli.json(&["map"]);
    assert_eq!(all["users"].as_array().unwrap().len(), USERS, "{all}");
    assert!(all["next"].is_null(), "{all}");

    // Pages of 7: every user once, with its name and backend.
    let limit = PAGE.to_string();
    let (seen, pages) = every_page(&cli, &["map", "--limit", &limit]);
    assert_eq!(seen, landed);
    assert_eq!(pages, USERS.div_ceil(PAGE));

    // For people, the last line names the next page.
    let human = cli.ok(&["map", "--limit", &limit]);
    assert!(
        human
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("next page: director map --limit 7 --after ")),
        "{human}"
    );

    // `--all` follows the pages: every user on one line, and no page left to ask for.
    let human = cli.ok(&["map", "--all", "--limit", &limit]);
    for (name, _) in landed.values() {
        let lines = human
            .lines()
            .filter(|l| l.split_whitespace().next() == Some(name.as_str()))
            .count();
        assert_eq!(lines, 1, "{name}:\n{human}");
    }
    assert!(!human.contains("next page"), "{human}");
    let json = cli.ok(&["map", "--all", "--limit", &limit, "--json"]);
    let objects: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objects.len(), pages, "{json}");
    let listed: usize = objects
        .iter()
        .map(|o| o["users"].as_array().unwrap().len())
        .sum();
    assert_eq!(listed, USERS);

    // One backend's pages: its users, all of them, and nobody else.
    for b in &pool.backends {
        let ip = b.ip.to_string();
        let (seen, _) = every_page(&cli, &["map", &ip, "--limit", "3"]);
        let want: BTreeMap<u32, (String, IpAddr)> = landed
            .iter()
            .filter(|(_, (_, at))| *at == b.ip)
            .map(|(h, v)| (*h, v.clone()))
            .collect();
        assert_eq!(seen, want, "{ip}");
    }

    // A page must hold 1 to 100,000 users.
    cli.fails(
        &["map", "--limit", "0"],
        None,
        "a page holds 1 to 100000 users",
    );
    cli.fails(
        &["map", "--limit", "100001"],
        None,
        "a page holds 1 to 100000 users",
    );
}
