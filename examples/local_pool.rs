//! The director in front of three local Dovecot backends, for trying it by hand:
//! `./scripts/run-local` (which installs Dovecot first). Stops on Ctrl-C.
//!
//! Ports (override with the environment variables in brackets): IMAP 127.0.0.1:1143
//! [DIRECTOR_IMAP], IMAPS 1993 [DIRECTOR_IMAPS], POP3 1110 [DIRECTOR_POP3], POP3S 1995
//! [DIRECTOR_POP3S]. Users `user0001`..`user0200`, password `secret`.

#[path = "../tests/support/dovecot.rs"]
mod dovecot;
#[path = "../tests/support/env.rs"]
mod env;

use director::config::Config;
use director::server::Director;

fn port(var: &str, default: u16) -> u16 {
    env::env_or(var, default)
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let pool = dovecot::Pool::start(3);
    let mut yaml = format!(
        "trusted_networks: [127.0.0.0/8]\ntls:\n  cert: {cert}\n  key: {key}\n\
         backend_defaults:\n  ports: {{imap: {imap}, pop3: {pop3}, lmtp: {lmtp}, sieve: {sieve}}}\n\
         listeners:\n\
         \x20 - {{protocol: imap, address: 127.0.0.1:{p1}}}\n\
         \x20 - {{protocol: imap, address: 127.0.0.1:{p2}, tls: implicit}}\n\
         \x20 - {{protocol: pop3, address: 127.0.0.1:{p3}}}\n\
         \x20 - {{protocol: pop3, address: 127.0.0.1:{p4}, tls: implicit}}\n\
         backends:\n",
        cert = pool.tls.cert.display(),
        key = pool.tls.key.display(),
        imap = dovecot::IMAP_PORT,
        pop3 = dovecot::POP3_PORT,
        lmtp = dovecot::LMTP_PORT,
        sieve = dovecot::SIEVE_PORT,
        p1 = port("DIRECTOR_IMAP", 1143),
        p2 = port("DIRECTOR_IMAPS", 1993),
        p3 = port("DIRECTOR_POP3", 1110),
        p4 = port("DIRECTOR_POP3S", 1995),
    );
    for b in &pool.backends {
        yaml += &format!("  - host: {}\n    weight: 100\n", b.ip);
    }
    yaml += &format!(
        "admin:\n  socket: {}\nstate_file: {}\n",
        pool.dir().join("admin.sock").display(),
        pool.dir().join("state.yaml").display()
    );
    let path = pool.dir().join("director.yaml");
    std::fs::write(&path, &yaml).expect("write config");
    println!("backends:");
    for b in &pool.backends {
        println!("  {} on {} (IMAP {})", b.name, b.ip, b.imap());
    }
    println!("director config: {}", path.display());
    println!("users user0001..user0200, password {}", dovecot::PASSWORD);
    println!(
        "try: curl imap://127.0.0.1:{}/ -u user0001:secret -X 'ID NIL'",
        port("DIRECTOR_IMAP", 1143)
    );
    println!(
        "admin: cargo run -- -c {} status   (or map, down HOST, maintenance HOST start ...)",
        path.display()
    );
    let config = Config::parse(&yaml).expect("generated config is valid");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let director = Director::build(&config).await.expect("director starts");
        director
            .run(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await;
    });
    drop(pool);
}
