//! Chaos across a cluster, the counterpart of Dovecot's director test (issue 10, "Proof"):
//! three `director serve` processes sharing their state through a three-member etcd, in
//! front of three real Dovecot backends. Clients log in and hold sessions through random
//! directors while backends are killed and restarted, weights change, flushes and moves run,
//! a director is SIGKILLed and restarted, an etcd member is killed and restarted, and
//! director d3 is cut off from etcd. The oracle never asks a director: it polls `doveadm
//! who` on the backends ([`support::who_oracle`]) and the test fails on any user with
//! sessions on two backends at once.
//!
//! The second test runs moves the same way with every director out of the move protocol
//! (`DIRECTOR_UNSAFE_NO_MOVE_ACKS=1`): there the oracle must find users on two backends,
//! which shows that it can fail and that the acknowledgements are what prevents it.
//!
//! The choices (which failure next, which user, director, backend) come from a seeded
//! generator: the seed is printed, and `DIRECTOR_CHAOS_SEED=N` runs the same sequence again.
//! `--nocapture` shows the events as they happen.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use director::state::cluster::NO_ACKS_ENV;
use support::crowd::{Crowd, CrowdOptions, CrowdReport};
use support::dovecot::{user, Pool};
use support::etcd::EtcdCluster;
use support::imap_session::{ImapSession, Refusal};
use support::member_process::MemberProcess;
use support::rng::Rng;
use support::serve::scratch;
use support::who_oracle::{lasting_overlaps, poll, Snapshot, WhoOracle};

/// The environment variable that imposes a seed.
const SEED_ENV: &str = "DIRECTOR_CHAOS_SEED";
/// The users the clients log in as.
const USERS: usize = 15;
/// The membership lease of every director (`support::cluster::cluster_section`).
const LEASE_TTL: Duration = Duration::from_secs(5);
/// How long director d3 stays cut off from etcd.
const CUT_FOR: Duration = Duration::from_secs(8);

/// The kinds of trouble the chaos makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// Kill a backend (SIGKILL), start it again a few steps later.
    BackendOutage,
    /// `director update IP W` through a random director.
    Weight,
    /// `director flush IP` through a random director.
    Flush,
    /// `director move USER IP` through a random director while the user holds a session
    /// through another one, then a login through a third.
    Move,
    /// SIGKILL a director, start it again (same file) a step or two later.
    DirectorCrash,
    /// Kill an etcd member, start it again a few steps later.
    EtcdOutage,
    /// Cut d3 off from etcd for [`CUT_FOR`], then heal.
    Cut,
}

/// Every kind, each of which a full run makes at least once.
const ALL_KINDS: [Kind; 7] = [
    Kind::BackendOutage,
    Kind::Weight,
    Kind::Flush,
    Kind::Move,
    Kind::DirectorCrash,
    Kind::EtcdOutage,
    Kind::Cut,
];

/// The kinds after each has had its turn, as often as they appear here.
const LATER_KINDS: [Kind; 15] = [
    Kind::Weight,
    Kind::Weight,
    Kind::Weight,
    Kind::Flush,
    Kind::Flush,
    Kind::Flush,
    Kind::Move,
    Kind::Move,
    Kind::Move,
    Kind::Move,
    Kind::BackendOutage,
    Kind::BackendOutage,
    Kind::DirectorCrash,
    Kind::DirectorCrash,
    Kind::EtcdOutage,
];

/// Three backends, a three-member etcd and three directors `d1`..`d3` (d3 on the etcd
/// endpoints a partition can cut), all serving.
struct Cluster {
    pool: Arc<Pool>,
    etcd: EtcdCluster,
    members: Vec<MemberProcess>,
    /// Where the directors keep their files (config, log).
    dir: PathBuf,
}

impl Cluster {
    fn start(test: &str, env: &[(&str, &str)]) -> Cluster {
        let pool = Arc::new(Pool::start(3));
        let etcd = EtcdCluster::start(3);
        let dir = scratch("cluster_chaos", test);
        let members: Vec<MemberProcess> = (1..=3)
            .map(|i| {
                let endpoints = if i == 3 {
                    etcd.cuttable_endpoints()
                } else {
                    etcd.endpoints()
                };
                MemberProcess::start(&pool, &dir, &endpoints, &format!("d{i}"), env)
            })
            .collect();
        for m in &members {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let status = m.admin(&["status", "--json"]);
                let listed = serde_json::from_str::<serde_json::Value>(&status.stdout)
                    .ok()
                    .and_then(|s| s["cluster"]["members"].as_array().map(Vec::len));
                let ready = m.readyz_answer();
                if ready.as_ref().is_some_and(|r| r.0 == 200) && listed == Some(3) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} not ready with 3 members after 30 s: /readyz {ready:?}, members {listed:?}",
                    m.id
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Cluster {
            pool,
            etcd,
            members,
            dir,
        }
    }

    fn addrs(&self) -> Vec<std::net::SocketAddr> {
        self.members.iter().map(|m| m.imap).collect()
    }

    /// Lines of the directors' logs that show a panic.
    fn panics(&self) -> Vec<String> {
        self.members
            .iter()
            .flat_map(|m| {
                m.log()
                    .lines()
                    .filter(|l| l.contains("panicked"))
                    .map(|l| format!("{}: {l}", m.id))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// What happened to d3 while it was cut off from etcd and after.
#[derive(Debug, Default)]
struct CutReport {
    /// Time from the cut to `/readyz` answering 503.
    fenced_after: Option<Duration>,
    /// Whether a session held through d3 before the cut was ended during it.
    held_session_ended: Option<bool>,
    /// What a login through d3 got while fenced.
    login_while_fenced: Option<Result<String, Refusal>>,
    /// Time from the heal to `/readyz` answering 200.
    ready_after_heal: Option<Duration>,
    /// Time from the heal to the first login through d3 that worked; or what the last try
    /// got.
    login_after_heal: Option<Result<Duration, Refusal>>,
}

/// The chaos thread's doing.
struct Chaos {
    /// Which test's chaos (its events are printed as they happen, beside the other test's).
    name: &'static str,
    rng: Rng,
    cluster: Cluster,
    users: Vec<String>,
    clock: Instant,
    /// What happened, in order, with times since the start.
    events: Vec<String>,
    /// Steps done by kind.
    done: BTreeMap<Kind, usize>,
    /// Admin verbs that failed, counted by verb (their errors are in `events`).
    admin_failures: BTreeMap<String, usize>,
    /// Weights as set through the CLI (to keep two backends above 0).
    weights: Vec<u32>,
    /// A killed backend, director or etcd member, and the steps until it is started again.
    backend_down: Option<(usize, u32)>,
    director_down: Option<(usize, u32)>,
    etcd_down: Option<(usize, u32)>,
    /// Moves after which a session held through another director was still open (a
    /// breach of the move protocol, seen from the client's side).
    sessions_kept_by_moves: Vec<String>,
    /// Moves after which the held session had been ended.
    sessions_ended_by_moves: usize,
    cut: CutReport,
}

impl Chaos {
    fn new(name: &'static str, cluster: Cluster, rng: Rng, clock: Instant) -> Chaos {
        Chaos {
            name,
            rng,
            cluster,
            users: (1..=USERS).map(user).collect(),
            clock,
            events: Vec::new(),
            done: BTreeMap::new(),
            admin_failures: BTreeMap::new(),
            weights: vec![100; 3],
            backend_down: None,
            director_down: None,
            etcd_down: None,
            sessions_kept_by_moves: Vec::new(),
            sessions_ended_by_moves: 0,
            cut: CutReport::default(),
        }
    }

    fn event(&mut self, what: String) {
        let line = format!("{:6.2}s {what}", self.clock.elapsed().as_secs_f64());
        eprintln!("{}: {line}", self.name);
        self.events.push(line);
    }

    /// Runs every kind once in a random order, then random kinds of `later` until `for_`
    /// has passed since the clock's start; then brings everything back up.
    fn run(&mut self, first: &[Kind], later: &[Kind], for_: Duration) {
        let mut plan = first.to_vec();
        self.rng.shuffle(&mut plan);
        let mut plan = plan.into_iter();
        loop {
            let kind = match plan.next() {
                Some(k) => k,
                None if self.clock.elapsed() < for_ => *self.rng.pick(later),
                None => break,
            };
            self.tick_outages();
            self.step(kind);
            *self.done.entry(kind).or_default() += 1;
            std::thread::sleep(Duration::from_millis(self.rng.between(200, 1000)));
        }
        self.settle();
    }

    /// Brings everything back up, then, on the whole cluster, restores the weights, flushes
    /// and moves a held user (each again, a few times, if it fails), so that every admin
    /// verb and the check of a held session are done at least once however the random
    /// part went.
    fn settle(&mut self) {
        self.end_outages();
        for b in 0..3 {
            self.admin_retrying(&["update", &self.ip(b), "100"]);
            self.weights[b] = 100;
        }
        let b = self.rng.below(3);
        self.admin_retrying(&["flush", &self.ip(b)]);
        for _ in 0..5 {
            if self.move_held_user() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// An admin verb through a random director, again after a failure (at most 5 times).
    fn admin_retrying(&mut self, args: &[&str]) {
        for _ in 0..5 {
            if self.admin_anywhere(args) {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    fn step(&mut self, kind: Kind) {
        match kind {
            Kind::BackendOutage => {
                self.end_backend_outage();
                let b = self.rng.below(3);
                let steps = self.rng.between(1, 3) as u32;
                self.cluster.pool.backend(b).kill();
                self.backend_down = Some((b, steps));
                self.event(format!("killed backend{} ({})", b + 1, self.ip(b)));
            }
            Kind::DirectorCrash => {
                self.end_director_outage();
                let d = self.rng.below(3);
                let steps = self.rng.between(1, 2) as u32;
                self.cluster.members[d].kill();
                self.director_down = Some((d, steps));
                self.event(format!("SIGKILLed d{}", d + 1));
            }
            Kind::EtcdOutage => {
                self.end_etcd_outage();
                let e = self.rng.below(3);
                let steps = self.rng.between(1, 3) as u32;
                self.cluster.etcd.kill(e);
                self.etcd_down = Some((e, steps));
                self.event(format!("killed etcd member {e}"));
            }
            Kind::Weight => {
                let b = self.rng.below(3);
                let others_up = (0..3).filter(|&o| o != b && self.weights[o] > 0).count();
                let choices: &[u32] = if others_up >= 2 {
                    &[0, 25, 50, 100, 150, 200]
                } else {
                    &[25, 50, 100, 150, 200]
                };
                let w = *self.rng.pick(choices);
                if self.admin_anywhere(&["update", &self.ip(b), &w.to_string()]) {
                    self.weights[b] = w;
                }
            }
            Kind::Flush => {
                let b = self.rng.below(3);
                self.admin_anywhere(&["flush", &self.ip(b)]);
            }
            Kind::Move => {
                self.move_held_user();
            }
            Kind::Cut => self.cut_d3(),
        }
    }

    /// A live director, chosen at random, preferring one not in `avoid`.
    fn live_director(&mut self, avoid: &[usize]) -> usize {
        let down = self.director_down.map(|(d, _)| d);
        let live: Vec<usize> = (0..3).filter(|&d| Some(d) != down).collect();
        let preferred: Vec<usize> = live
            .iter()
            .copied()
            .filter(|d| !avoid.contains(d))
            .collect();
        if preferred.is_empty() {
            *self.rng.pick(&live)
        } else {
            *self.rng.pick(&preferred)
        }
    }

    /// Runs an admin verb through a random live director; whether it succeeded.
    fn admin_anywhere(&mut self, args: &[&str]) -> bool {
        let d = self.live_director(&[]);
        self.admin_on(d, args)
    }

    fn admin_on(&mut self, d: usize, args: &[&str]) -> bool {
        let started = Instant::now();
        let ran = self.cluster.members[d].admin(args);
        let took = started.elapsed();
        if ran.ok {
            self.event(format!(
                "d{}: {} ok ({:.0?}) {}",
                d + 1,
                args.join(" "),
                took,
                ran.stdout.trim()
            ));
        } else {
            *self.admin_failures.entry(args[0].to_owned()).or_default() += 1;
            self.event(format!(
                "d{}: {} FAILED ({:.0?}): {}",
                d + 1,
                args.join(" "),
                took,
                ran.stderr.trim()
            ));
        }
        ran.ok
    }

    /// A user logs in through director H and keeps the session; director M moves the user
    /// to another backend; the session through H must have ended. Then the user logs in
    /// through a third director T, which must send it to the new backend: if H's session
    /// were still open, the oracle would see the user on two backends. Whether the move
    /// was made with a session held (and the session checked).
    fn move_held_user(&mut self) -> bool {
        let u = self.rng.pick(&self.users).clone();
        let h = self.live_director(&[]);
        let m = self.live_director(&[h]);
        let t = self.live_director(&[h, m]);
        let held = ImapSession::login(self.cluster.members[h].imap, &u);
        let from = held.as_ref().map(|s| s.backend.clone()).ok();
        let running: Vec<usize> = (0..3)
            .filter(|&b| self.backend_down.map(|(d, _)| d) != Some(b))
            .filter(|&b| from.as_deref() != Some(self.cluster.pool.backend(b).name.as_str()))
            .collect();
        let to = *self.rng.pick(&running);
        self.event(format!(
            "{u} held through d{} on {:?}; moving it to backend{} through d{}",
            h + 1,
            held.as_ref().map(|s| s.backend.as_str()),
            to + 1,
            m + 1
        ));
        let moved = self.admin_on(m, &["move", &u, &self.ip(to)]);
        let Ok(mut held) = held else { return false };
        if moved {
            if held.ended_within(Duration::from_secs(1)) {
                self.sessions_ended_by_moves += 1;
            } else {
                let what = format!(
                    "{:.2}s: {u}'s session through d{} on {} still open after d{} moved it to backend{}",
                    self.clock.elapsed().as_secs_f64(),
                    h + 1,
                    held.backend,
                    m + 1,
                    to + 1
                );
                self.event(what.clone());
                self.sessions_kept_by_moves.push(what);
            }
        }
        // Through a third director: the user goes where the move sent it, while the held
        // session, if a director failed to end it, is still on the old backend.
        match ImapSession::login(self.cluster.members[t].imap, &u) {
            Ok(mut again) => {
                self.event(format!(
                    "{u} logged in again through d{} on {}",
                    t + 1,
                    again.backend
                ));
                again.hold(Duration::from_secs(1));
                again.logout();
            }
            Err(e) => self.event(format!("{u} through d{}: {e:?}", t + 1)),
        }
        held.logout();
        moved
    }

    /// Cuts d3 off from etcd for [`CUT_FOR`]: it must fence (readyz 503, logins refused,
    /// its sessions ended), then rejoin by itself once healed.
    fn cut_d3(&mut self) {
        self.end_director_outage();
        let d3 = 2;
        let u = self.rng.pick(&self.users).clone();
        let imap = self.cluster.members[d3].imap;
        let held = login_retrying(imap, &u, Duration::from_secs(10));
        let mut partition = self.cluster.etcd.partition();
        partition.cut();
        let cut_at = Instant::now();
        self.event(format!(
            "cut d3 off from etcd (holding {u} through it: {})",
            held.is_ok()
        ));
        while cut_at.elapsed() < CUT_FOR {
            if self.cluster.members[d3].readyz() == Some(503) {
                self.cut.fenced_after = Some(cut_at.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.event(format!("d3 readyz 503 after {:?}", self.cut.fenced_after));
        if let Ok(mut s) = held {
            let left = CUT_FOR.saturating_sub(cut_at.elapsed());
            self.cut.held_session_ended = Some(s.ended_within(left));
        }
        if self.cut.fenced_after.is_some() {
            let u2 = self.rng.pick(&self.users).clone();
            let got = ImapSession::login(imap, &u2).map(|s| {
                let b = s.backend.clone();
                s.logout();
                b
            });
            self.event(format!("login of {u2} through fenced d3: {got:?}"));
            self.cut.login_while_fenced = Some(got);
        }
        std::thread::sleep(CUT_FOR.saturating_sub(cut_at.elapsed()));
        partition.heal();
        let healed_at = Instant::now();
        self.event("healed d3's cut".into());
        let ready = wait_for_status(&self.cluster.members[d3], 200, Duration::from_secs(30));
        self.cut.ready_after_heal = ready.then(|| healed_at.elapsed());
        let u3 = self.rng.pick(&self.users).clone();
        self.cut.login_after_heal =
            Some(login_retrying(imap, &u3, Duration::from_secs(20)).map(|s| {
                s.logout();
                healed_at.elapsed()
            }));
        self.event(format!(
            "d3 after the heal: ready after {:?}, login {:?}",
            self.cut.ready_after_heal, self.cut.login_after_heal
        ));
    }

    /// Counts a step off each outage; ends those whose time has come.
    fn tick_outages(&mut self) {
        for (_, steps) in [
            &mut self.backend_down,
            &mut self.director_down,
            &mut self.etcd_down,
        ]
        .into_iter()
        .flatten()
        {
            *steps = steps.saturating_sub(1);
        }
        if matches!(self.backend_down, Some((_, 0))) {
            self.end_backend_outage();
        }
        if matches!(self.director_down, Some((_, 0))) {
            self.end_director_outage();
        }
        if matches!(self.etcd_down, Some((_, 0))) {
            self.end_etcd_outage();
        }
    }

    fn end_outages(&mut self) {
        self.end_backend_outage();
        self.end_director_outage();
        self.end_etcd_outage();
    }

    fn end_backend_outage(&mut self) {
        if let Some((b, _)) = self.backend_down.take() {
            self.cluster.pool.backend(b).start();
            self.event(format!("started backend{} again", b + 1));
        }
    }

    fn end_director_outage(&mut self) {
        if let Some((d, _)) = self.director_down.take() {
            let started = Instant::now();
            self.cluster.members[d].restart();
            self.event(format!(
                "restarted d{} (listening after {:.0?})",
                d + 1,
                started.elapsed()
            ));
        }
    }

    fn end_etcd_outage(&mut self) {
        if let Some((e, _)) = self.etcd_down.take() {
            self.cluster.etcd.restart(e);
            self.event(format!("restarted etcd member {e}"));
        }
    }

    fn ip(&self, b: usize) -> String {
        self.cluster.pool.backend(b).ip.to_string()
    }
}

/// Logs `user` in through `addr`, again after temporary refusals, for at most `within`.
fn login_retrying(
    addr: std::net::SocketAddr,
    user: &str,
    within: Duration,
) -> Result<ImapSession, Refusal> {
    let deadline = Instant::now() + within;
    loop {
        match ImapSession::login(addr, user) {
            Err(Refusal::Temporary(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200))
            }
            other => return other,
        }
    }
}

/// Waits until `/readyz` of `m` answers `status`, for at most `within`.
fn wait_for_status(m: &MemberProcess, status: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if m.readyz() == Some(status) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// After the chaos: every user logs in through every director at once and is on one
/// backend only, per the backends. Returns what went wrong.
fn final_round(cluster: &Cluster, users: &[String]) -> Vec<String> {
    let mut wrong = Vec::new();
    for m in &cluster.members {
        if !wait_for_status(m, 200, Duration::from_secs(30)) {
            wrong.push(format!("{}: /readyz not 200 after the chaos", m.id));
        }
    }
    for u in users {
        let mut sessions = Vec::new();
        for m in &cluster.members {
            match login_retrying(m.imap, u, Duration::from_secs(20)) {
                Ok(s) => sessions.push(s),
                Err(e) => wrong.push(format!("{u} through {} after the chaos: {e:?}", m.id)),
            }
        }
        let n = sessions.len();
        let deadline = Instant::now() + Duration::from_secs(10);
        let on = loop {
            let on = poll(&cluster.pool).remove(u).unwrap_or_default();
            let one = on.len() == 1 && on.values().next().unwrap().len() == n;
            if one || Instant::now() > deadline {
                break on;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if on.len() != 1 || on.values().next().unwrap().len() != n {
            wrong.push(format!(
                "{u}: {n} sessions through the directors, the backends list {on:?}"
            ));
        }
        for s in sessions {
            s.logout();
        }
    }
    wrong
}

/// One line of what the clients saw.
fn crowd_summary(c: &CrowdReport) -> String {
    format!(
        "{} sessions (by director {:?}), {} ended early by the chaos, {} temporary refusals {:?}, {} wrong",
        c.ok,
        c.ok_by_director,
        c.ended_early,
        c.temporary_total(),
        c.temporary,
        c.wrong.len()
    )
}

#[test]
fn no_user_is_on_two_backends_across_three_directors_under_chaos() {
    let seed = Rng::seed_from_env(SEED_ENV);
    let rng = Rng::new(seed);
    let started = Instant::now();
    let cluster = Cluster::start("acks", &[]);
    let clock = Instant::now();
    eprintln!(
        "set up in {:.1?}; the chaos clock starts at {} (director logs in {})",
        started.elapsed(),
        humantime::format_rfc3339_millis(SystemTime::now()),
        cluster.dir.display()
    );
    let users: Vec<String> = (1..=USERS).map(user).collect();
    let oracle = WhoOracle::start(cluster.pool.clone(), clock);
    let crowd = Crowd::start(
        CrowdOptions {
            directors: cluster.addrs(),
            users: users.clone(),
            threads: 10,
            hold_ms: (300, 2000),
        },
        &rng,
        clock,
    );
    let chaos = {
        let rng = rng.fork(0);
        std::thread::spawn(move || {
            let mut chaos = Chaos::new("acks", cluster, rng, clock);
            chaos.run(&ALL_KINDS, &LATER_KINDS, Duration::from_secs(45));
            chaos
        })
    };
    let chaos = chaos.join().expect("the chaos thread panicked");
    let chaos_took = clock.elapsed();
    let crowd = crowd.stop();
    let final_wrong = final_round(&chaos.cluster, &users);
    let oracle = oracle.stop();
    let panics = chaos.cluster.panics();

    eprintln!(
        "seed {seed}; chaos {:.1?}; steps {:?}; admin failures {:?}",
        chaos_took, chaos.done, chaos.admin_failures
    );
    eprintln!("clients: {}", crowd_summary(&crowd));
    eprintln!("oracle: {}", oracle);
    eprintln!(
        "moves: {} held sessions ended, {} kept; cut: {:?}",
        chaos.sessions_ended_by_moves,
        chaos.sessions_kept_by_moves.len(),
        chaos.cut
    );
    let overlaps: Vec<String> = oracle.overlaps.iter().map(|o| o.to_string()).collect();
    assert!(
        overlaps.is_empty(),
        "users on two backends at once (seed {seed}):\n{}\nchaos:\n{}",
        overlaps.join("\n"),
        chaos.events.join("\n")
    );
    assert!(
        chaos.sessions_kept_by_moves.is_empty(),
        "moves left sessions open (seed {seed}):\n{}",
        chaos.sessions_kept_by_moves.join("\n")
    );
    assert!(
        crowd.wrong.is_empty(),
        "clients got wrong answers (seed {seed}):\n{}",
        crowd.wrong.join("\n")
    );
    assert!(
        panics.is_empty(),
        "directors panicked:\n{}",
        panics.join("\n")
    );
    for k in ALL_KINDS {
        assert!(
            chaos.done.contains_key(&k),
            "no {k:?} happened: {:?}",
            chaos.done
        );
    }
    for verb in ["update", "flush", "move"] {
        let ok = chaos
            .events
            .iter()
            .any(|e| e.contains(&format!(": {verb} ")) && e.contains(" ok ("));
        assert!(ok, "no `{verb}` succeeded:\n{}", chaos.events.join("\n"));
    }
    // Progress: the cluster served all along, through every director.
    assert!(crowd.ok >= 150, "only {} sessions", crowd.ok);
    for (d, n) in crowd.ok_by_director.iter().enumerate() {
        assert!(*n >= 20, "d{} served only {n} sessions", d + 1);
    }
    assert!(
        oracle.polls_with_sessions >= 50,
        "the oracle hardly saw sessions: {}",
        oracle
    );
    assert!(
        chaos.sessions_ended_by_moves >= 1,
        "no move ended a held session"
    );
    // d3 fenced itself while cut off, and came back by itself.
    let cut = &chaos.cut;
    assert!(
        cut.fenced_after.is_some(),
        "d3's /readyz never answered 503 during the {CUT_FOR:?} cut (lease {LEASE_TTL:?})"
    );
    assert_eq!(
        cut.held_session_ended,
        Some(true),
        "d3's session held across the cut was not ended"
    );
    match &cut.login_while_fenced {
        Some(Err(Refusal::Temporary(why))) if why.starts_with("NO [UNAVAILABLE]") => {}
        other => panic!("a login through fenced d3 got {other:?}, not NO [UNAVAILABLE]"),
    }
    assert!(
        cut.ready_after_heal.is_some(),
        "d3's /readyz did not answer 200 again after the heal"
    );
    assert!(
        matches!(cut.login_after_heal, Some(Ok(_))),
        "no login through d3 after the heal: {:?}",
        cut.login_after_heal
    );
    assert!(
        final_wrong.is_empty(),
        "after the chaos:\n{}",
        final_wrong.join("\n")
    );
}

#[test]
fn without_move_acks_the_oracle_finds_users_on_two_backends() {
    let seed = Rng::seed_from_env(SEED_ENV);
    let rng = Rng::new(seed);
    let cluster = Cluster::start("no-acks", &[(NO_ACKS_ENV, "1")]);
    let clock = Instant::now();
    let users: Vec<String> = (1..=USERS).map(user).collect();
    let oracle = WhoOracle::start(cluster.pool.clone(), clock);
    let crowd = Crowd::start(
        CrowdOptions {
            directors: cluster.addrs(),
            users: users.clone(),
            threads: 6,
            hold_ms: (300, 2000),
        },
        &rng,
        clock,
    );
    let mut chaos = Chaos::new("no-acks", cluster, rng.fork(0), clock);
    chaos.run(
        &[Kind::Move, Kind::Flush, Kind::Weight],
        &[Kind::Move, Kind::Move, Kind::Flush, Kind::Weight],
        Duration::from_secs(15),
    );
    let crowd = crowd.stop();
    let oracle = oracle.stop();
    eprintln!(
        "seed {seed}; steps {:?}; clients: {}; oracle: {}",
        chaos.done,
        crowd_summary(&crowd),
        oracle
    );
    for o in &oracle.overlaps {
        eprintln!("overlap: {o}");
    }
    assert!(
        !oracle.overlaps.is_empty(),
        "without move acknowledgements the oracle found nobody on two backends (seed {seed}); \
         {} moves left a held session open:\n{}",
        chaos.sessions_kept_by_moves.len(),
        chaos.events.join("\n")
    );
    assert!(
        !chaos.sessions_kept_by_moves.is_empty(),
        "without acknowledgements, moves still ended the sessions of other directors"
    );
}

/// What a user's record in etcd holds while a move of the user is under way.
const MOVE_MARK: &str = "\"m\":";

/// Every user record in etcd, as `etcdctl get` prints them.
fn user_records(etcd: &EtcdCluster) -> String {
    etcd.etcdctl(&["get", "--prefix", "/director/users/"])
}

/// Waits (10 s at most) until a record in etcd is marked as moving (`u`'s, in these tests).
fn wait_for_a_move_mark(etcd: &EtcdCluster, u: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !user_records(etcd).contains(MOVE_MARK) {
        assert!(Instant::now() < deadline, "{u} was never marked as moving");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `director move U IP` through `d`'s admin socket, on a thread of its own (it waits for
/// the move's acknowledgements).
fn move_in_background(
    d: &MemberProcess,
    u: &str,
    ip: std::net::IpAddr,
) -> std::thread::JoinHandle<support::command::Ran> {
    let cli = support::admin_cli::AdminCli::over(d.cli.config.clone());
    let (u, ip) = (u.to_owned(), ip.to_string());
    std::thread::spawn(move || cli.run(&["move", &u, &ip], None))
}

/// Found by the chaos: a director SIGKILLed while its move waited for acknowledgements and
/// restarted (same `director_id`) before its lease expired stayed a member, so nobody took
/// its move over and the user's record stayed `moving`: every later login of the user
/// waited and was dropped. The restarted director must finish the move it left.
#[test]
fn a_move_left_by_a_killed_director_is_finished_when_it_restarts() {
    let pool = Pool::start(2);
    let etcd = EtcdCluster::start(1);
    let dir = scratch("cluster_chaos", "killed-mover");
    let mut d1 = MemberProcess::start(&pool, &dir, &etcd.endpoints(), "d1", &[]);
    let d2 = MemberProcess::start(&pool, &dir, &etcd.cuttable_endpoints(), "d2", &[]);
    let u = user(3);
    let held = ImapSession::login(d2.imap, &u).expect("a session through d2");
    let to = pool
        .backends
        .iter()
        .find(|b| b.name != held.backend)
        .unwrap();
    // d2 cannot hear of the move: d1 waits for its acknowledgement (until d2's lease ends).
    let mut cut = etcd.partition();
    cut.cut();
    let mover = move_in_background(&d1, &u, to.ip);
    wait_for_a_move_mark(&etcd, &u);
    d1.kill();
    d1.restart();
    let _ = mover.join();
    cut.heal();
    let again = login_retrying(d1.imap, &u, Duration::from_secs(30));
    assert!(
        again.is_ok(),
        "{u} cannot log in after d1's restart: {:?}; records:\n{}",
        again.err(),
        user_records(&etcd)
    );
    assert!(
        !user_records(&etcd).contains(MOVE_MARK),
        "the move is still marked after a login went through"
    );
}

/// Found by the chaos: a director that started while another's move was under way saw the
/// move before it held a lease, could not acknowledge it then and never did, so the mover,
/// counting it as a member, waited for it until `move_timeout` (and logged that it went on
/// without it). The director acknowledges such moves once it holds its lease.
#[test]
fn a_director_restarted_during_a_move_acknowledges_it() {
    let pool = Pool::start(2);
    let etcd = EtcdCluster::start(1);
    let dir = scratch("cluster_chaos", "restarted-acker");
    let d1 = MemberProcess::start(&pool, &dir, &etcd.endpoints(), "d1", &[]);
    let mut d2 = MemberProcess::start(&pool, &dir, &etcd.endpoints(), "d2", &[]);
    let u = user(5);
    let on = ImapSession::login(d1.imap, &u).expect("a session").backend;
    let to = pool.backends.iter().find(|b| b.name != on).unwrap();
    // Killed, d2 keeps its membership until its lease expires: d1's move waits for it.
    d2.kill();
    let mover = move_in_background(&d1, &u, to.ip);
    wait_for_a_move_mark(&etcd, &u);
    d2.restart();
    let moved = mover.join().unwrap();
    assert!(moved.ok, "move: {}", moved.text());
    let log = d1.log();
    assert!(
        !log.contains("did not acknowledge the move in time"),
        "d1 waited for the restarted d2 until the move's timeout:\n{log}"
    );
    assert_eq!(
        ImapSession::login(d2.imap, &u).map(|s| s.backend),
        Ok(to.name.clone())
    );
}

/// The oracle's rule: an overlap counts when the same sessions are listed on both
/// backends in two polls in a row, not when a session that just ended lingers for a poll.
#[test]
fn the_oracle_counts_overlaps_that_last_two_polls() {
    fn snap(entries: &[(&str, &str, &[u32])]) -> Snapshot {
        let mut s = Snapshot::new();
        for (u, b, pids) in entries {
            s.entry(u.to_string())
                .or_default()
                .insert(b.to_string(), pids.iter().copied().collect());
        }
        s
    }
    let both = snap(&[("u", "backend1", &[10]), ("u", "backend2", &[20])]);
    // The old session was gone by the next poll: a move, not an overlap.
    let moved = snap(&[("u", "backend2", &[20])]);
    assert!(lasting_overlaps(&both, &moved).is_empty());
    // A new session on backend1 (another pid) is not the one that lingered.
    let other = snap(&[("u", "backend1", &[11]), ("u", "backend2", &[20])]);
    assert!(lasting_overlaps(&both, &other).is_empty());
    // The same two sessions, still there.
    let kept = snap(&[("u", "backend1", &[10, 12]), ("u", "backend2", &[20])]);
    let found = lasting_overlaps(&both, &kept);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0, "u");
    assert_eq!(found[0].1 .0, "backend1");
    assert_eq!(found[0].2 .0, "backend2");
}
