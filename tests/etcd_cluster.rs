//! The etcd fixture itself ([`support::etcd`]) does what the cluster tests rely on: real
//! members that replicate, keep serving with a quorum, stop committing without one, come back
//! after a kill, and a partition that really cuts one client off from every member (its
//! established connections stall, they are not reset) while other clients go on.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::etcd::{etcdctl_at, EtcdCluster, CUTTABLE_PORT};
use support::wait::wait_until;

/// Generous: only to end a test that would hang.
const DEADLINE: Duration = Duration::from_secs(20);

/// The value of `key` in member `i`'s own store (a serializable read: no leader asked).
fn local_value(cluster: &EtcdCluster, i: usize, key: &str) -> String {
    let ran = etcdctl_at(
        &[cluster.endpoint(i)],
        &["get", key, "--consistency=s", "--print-value-only"],
    );
    assert!(ran.ok, "get {key} from member {i}: {}", ran.text());
    ran.stdout.trim().to_owned()
}

/// Waits until member `i`'s own store holds `key = value`.
fn wait_local_value(cluster: &EtcdCluster, i: usize, key: &str, value: &str) {
    wait_until(
        &format!("member {i} to hold {key}={value}"),
        DEADLINE,
        || (local_value(cluster, i, key) == value).then_some(()),
    );
}

/// `etcdctl put` through `endpoints` with a 2 s command timeout.
fn put_at(endpoints: &[String], key: &str, value: &str) -> support::command::Ran {
    etcdctl_at(endpoints, &["--command-timeout=2s", "put", key, value])
}

#[test]
fn three_members_form_one_cluster_and_replicate() {
    let started = Instant::now();
    let cluster = EtcdCluster::start(3);
    eprintln!(
        "three members serve {:?} after the spawn",
        started.elapsed()
    );
    let put = put_at(&[cluster.endpoint(0)], "/fixture/k", "through-0");
    assert!(put.ok, "put through member 0: {}", put.text());
    wait_local_value(&cluster, 2, "/fixture/k", "through-0");
    assert_eq!(
        cluster
            .etcdctl(&["get", "/fixture/k", "--print-value-only"])
            .trim(),
        "through-0"
    );

    // One cluster of three, which publishes the normal client URLs only: a client that
    // syncs its endpoints never learns the cuttable ones.
    let members = cluster.etcdctl(&["member", "list"]);
    assert_eq!(members.lines().count(), 3, "member list:\n{members}");
    for (i, endpoint) in cluster.endpoints().iter().enumerate() {
        assert!(
            members.contains(&format!("m{i}")) && members.contains(endpoint.as_str()),
            "member {i} ({endpoint}) missing from:\n{members}"
        );
    }
    assert!(
        !members.contains(&format!(":{CUTTABLE_PORT}")),
        "the cuttable URLs are published:\n{members}"
    );
}

#[test]
fn a_killed_member_leaves_a_quorum_and_catches_up_after_a_restart() {
    let mut cluster = EtcdCluster::start(3);
    cluster.kill(1);
    assert!(!cluster.is_running(1));
    let refused = put_at(&[cluster.endpoint(1)], "/fixture/k", "x");
    assert!(
        !refused.ok,
        "a killed member took a write: {}",
        refused.stdout
    );

    // The two others elect a leader if member 1 led, then take writes.
    cluster.wait_ready();
    cluster.etcdctl(&["put", "/fixture/k", "while-1-was-down"]);

    let started = Instant::now();
    cluster.restart(1);
    eprintln!(
        "member 1 serves again {:?} after its restart",
        started.elapsed()
    );
    assert!(cluster.is_running(1));
    // Its own store, not a leader's answer: it has caught up with the write it missed.
    wait_local_value(&cluster, 1, "/fixture/k", "while-1-was-down");
}

#[test]
fn without_a_quorum_a_write_times_out_and_commits_once_a_member_returns() {
    let mut cluster = EtcdCluster::start(3);
    cluster.kill(1);
    cluster.kill(2);
    let put = put_at(&[cluster.endpoint(0)], "/fixture/k", "no-quorum");
    assert!(!put.ok, "a write without quorum succeeded: {}", put.stdout);
    assert!(
        put.stderr.contains("deadline exceeded") || put.stderr.contains("timed out"),
        "not a timeout: {}",
        put.stderr
    );

    // Member 2 back: two of three again. The lost write did not commit; a new one does.
    cluster.restart(2);
    let put = put_at(&cluster.endpoints(), "/fixture/k", "quorum-again");
    assert!(put.ok, "write with a quorum again: {}", put.text());
    wait_local_value(&cluster, 0, "/fixture/k", "quorum-again");
}

/// Sends `GET /version` on `stream` (an etcd client port speaks HTTP/1.1 too).
fn ask_version(stream: &mut TcpStream) {
    stream
        .write_all(b"GET /version HTTP/1.1\r\nHost: etcd\r\n\r\n")
        .unwrap();
}

/// Reads until an answer to [`ask_version`] is complete; the error when a read fails first.
fn read_version(stream: &mut TcpStream) -> Result<String, std::io::Error> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if text.contains("\"etcdcluster\"") {
            return Ok(text.into_owned());
        }
    }
}

#[test]
fn a_partition_cuts_one_client_off_and_heals() {
    let cluster = EtcdCluster::start(3);
    let cuttable = cluster.cuttable_endpoints();
    let normal = cluster.endpoints();
    let before = put_at(&cuttable, "/fixture/cut", "before");
    assert!(
        before.ok,
        "put through the cuttable URLs: {}",
        before.text()
    );

    // An established connection of the cut-off client, open before the cut.
    let mut stream = TcpStream::connect((cluster.ip(0), CUTTABLE_PORT)).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    ask_version(&mut stream);
    let answer = read_version(&mut stream).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let mut partition = cluster.partition();
    partition.cut();
    assert!(partition.is_cut());

    let cut = put_at(&cuttable, "/fixture/cut", "during");
    assert!(
        !cut.ok,
        "a write through the cut got through: {}",
        cut.stdout
    );
    let other = put_at(&normal, "/fixture/other", "during");
    assert!(
        other.ok,
        "the other clients lost etcd too: {}",
        other.text()
    );

    // The open connection stalls: no answer, and no reset or end either.
    ask_version(&mut stream);
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let stalled = read_version(&mut stream).expect_err("an answer through the cut");
    assert!(
        matches!(stalled.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "the connection was not just stalled: {stalled}"
    );

    partition.heal();
    assert!(!partition.is_cut());
    // TCP retransmits the request: the same connection gets its answer.
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let late = read_version(&mut stream).expect("the answer after the heal");
    assert!(late.starts_with("HTTP/1.1 200"), "{late}");

    let after = put_at(&cuttable, "/fixture/cut", "after");
    assert!(after.ok, "put through the healed cut: {}", after.text());
    let seen = etcdctl_at(&cuttable, &["get", "/fixture/other", "--print-value-only"]);
    assert_eq!(seen.stdout.trim(), "during", "{}", seen.text());

    // Dropping a cut partition heals too.
    partition.cut();
    assert!(!put_at(&cuttable, "/fixture/cut", "cut-again").ok);
    drop(partition);
    let dropped = put_at(&cuttable, "/fixture/cut", "dropped");
    assert!(
        dropped.ok,
        "put after dropping the partition: {}",
        dropped.text()
    );
}

#[test]
fn one_member_serves_and_the_cluster_restarts_as_a_whole() {
    let started = Instant::now();
    let mut cluster = EtcdCluster::start_one();
    eprintln!("one member serves {:?} after the spawn", started.elapsed());
    cluster.etcdctl(&["put", "/fixture/one", "kept"]);
    cluster.kill(0);
    assert!(!cluster.is_running(0));
    cluster.restart_all();
    assert_eq!(
        cluster
            .etcdctl(&["get", "/fixture/one", "--print-value-only"])
            .trim(),
        "kept"
    );
}
