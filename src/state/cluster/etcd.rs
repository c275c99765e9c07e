//! The director's link to etcd: one client (a gRPC channel over every endpoint), each
//! request bounded by `request_timeout`, timed and counted by operation in the metrics, and
//! every failure turned into [`StateError::Unavailable`] naming what failed.

use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, ConnectOptions, DeleteOptions, GetOptions, GetResponse, PutOptions, Txn,
    TxnOp, TxnResponse, WatchOptions, WatchStream,
};

use crate::config::{ConfigError, EtcdConfig};
use crate::metrics::Metrics;
use crate::state::StateError;

/// The largest answer to a full read of the prefix. gRPC's default (4 MiB) holds only about
/// 53,000 sticky records (about 79 bytes each with key and metadata): a director over more
/// could neither start nor reload its replica after a broken watch. 1 GiB: some 13 million.
const MAX_RANGE_ANSWER: usize = 1 << 30;

/// The pause before a request that could not be sent is made again.
const RESEND_PAUSE: Duration = Duration::from_millis(10);

/// Whether a request failed before it was sent: no connection to the member the client
/// picked (gRPC `Unavailable`, tonic's "tcp connect error"). Made again, it cannot be
/// applied twice.
fn never_sent(e: &etcd_client::Error) -> bool {
    const UNAVAILABLE: i32 = 14;
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if i32::from(s.code()) == UNAVAILABLE && s.message() == "tcp connect error")
}

/// A connected etcd client.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    timeout: Duration,
    metrics: Metrics,
}

/// Reads a PEM file named in the configuration, naming the field on failure.
fn pem(field: &str, path: &std::path::Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError(format!("{field}: {}: {e}", path.display())))
}

impl Etcd {
    /// Connects to the configured endpoints. Fails when none answers within
    /// `connect_timeout` (the director does not start without its shared state).
    pub async fn connect(config: &EtcdConfig, metrics: Metrics) -> Result<Etcd, ConfigError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_timeout(config.request_timeout)
            // A dead connection is noticed within a few seconds, not at TCP's pace.
            .with_keep_alive(Duration::from_secs(2), config.request_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let (Some(user), Some(password)) = (&config.user, config.password()?) {
            options = options.with_user(user.clone(), password);
        }
        if config.uses_tls() {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &config.ca_file {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem(
                    "cluster.etcd.ca_file",
                    ca,
                )?));
            }
            if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
                tls = tls.identity(etcd_client::Identity::from_pem(
                    pem("cluster.etcd.cert_file", cert)?,
                    pem("cluster.etcd.key_file", key)?,
                ));
            }
            options = options.with_tls(tls);
        }
        let connect = Client::connect(&config.endpoints, Some(options));
        let client = match tokio::time::timeout(config.connect_timeout * 2, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(ConfigError(format!(
                    "cluster.etcd.endpoints: cannot connect to etcd ({}): {e}",
                    config.endpoints.join(", ")
                )))
            }
            Err(_) => {
                return Err(ConfigError(format!(
                    "cluster.etcd.endpoints: no answer from etcd ({}) within {:?}",
                    config.endpoints.join(", "),
                    config.connect_timeout * 2
                )))
            }
        };
        Ok(Etcd {
            client,
            timeout: config.request_timeout,
            metrics,
        })
    }

    /// How long one request may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs one request with the timeout, timing it under `op` (a name of
    /// `metrics::ETCD_OPS`). `request` makes the request; it is made again, within the
    /// timeout, when it never left this process: the client balances requests over every
    /// endpoint, and keeps picking a member that is down (its connection is refused at
    /// once) beside the live ones.
    async fn timed<T, F, R>(&self, op: &'static str, mut request: R) -> Result<T, StateError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
        R: FnMut() -> F,
    {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let result = loop {
            match tokio::time::timeout_at(deadline, request()).await {
                Ok(Err(e)) if never_sent(&e) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(RESEND_PAUSE).await;
                }
                result => break result,
            }
        };
        self.metrics.etcd_request(op, started.elapsed());
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.metrics.etcd_error(op);
                Err(StateError::Unavailable(format!("etcd {op}: {e}")))
            }
            Err(_) => {
                self.metrics.etcd_error(op);
                Err(StateError::Unavailable(format!(
                    "etcd {op}: no answer within {:?}",
                    self.timeout
                )))
            }
        }
    }

    /// Every key under `prefix`.
    pub async fn get_prefix(&self, prefix: &str) -> Result<GetResponse, StateError> {
        self.timed("get", || {
            let mut kv = self
                .client
                .kv_client()
                .max_decoding_message_size(MAX_RANGE_ANSWER);
            async move { kv.get(prefix, Some(GetOptions::new().with_prefix())).await }
        })
        .await
    }

    /// Up to `limit` keys from `from` (inclusive) to the end of `prefix`, as of `revision`
    /// (0: now). Pages of a full read, so that neither answer nor memory grows with the
    /// number of records.
    pub async fn get_page(
        &self,
        prefix: &str,
        from: Vec<u8>,
        revision: i64,
        limit: i64,
    ) -> Result<GetResponse, StateError> {
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let mut options = GetOptions::new().with_range(end).with_limit(limit);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        self.timed("get", || {
            let mut kv = self
                .client
                .kv_client()
                .max_decoding_message_size(MAX_RANGE_ANSWER);
            let (from, options) = (from.clone(), options.clone());
            async move { kv.get(from, Some(options)).await }
        })
        .await
    }

    /// One key.
    pub async fn get(&self, key: &str) -> Result<GetResponse, StateError> {
        self.timed("get", || {
            let mut kv = self.client.kv_client();
            async move { kv.get(key, None).await }
        })
        .await
    }

    /// Writes `value` at `key`, under `lease` if not 0. Returns the revision of the write.
    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<i64, StateError> {
        let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let r = self
            .timed("put", || {
                let mut kv = self.client.kv_client();
                let (value, options) = (value.clone(), options.clone());
                async move { kv.put(key, value, options).await }
            })
            .await?;
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    /// Deletes every key under `prefix`.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), StateError> {
        self.timed("delete", || {
            let mut kv = self.client.kv_client();
            async move {
                kv.delete(prefix, Some(DeleteOptions::new().with_prefix()))
                    .await
            }
        })
        .await
        .map(|_| ())
    }

    /// A transaction: `then` if every comparison holds, else `otherwise`.
    pub async fn txn(
        &self,
        when: Vec<Compare>,
        then: Vec<TxnOp>,
        otherwise: Vec<TxnOp>,
    ) -> Result<TxnResponse, StateError> {
        let txn = Txn::new().when(when).and_then(then).or_else(otherwise);
        self.timed("txn", || {
            let mut kv = self.client.kv_client();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    }

    /// Drops etcd's history of every key before `revision` (counted as a `delete`): without
    /// it every refresh write stays in etcd's database until its quota is full.
    pub async fn compact(&self, revision: i64) -> Result<(), StateError> {
        self.timed("delete", || {
            let mut kv = self.client.kv_client();
            async move { kv.compact(revision, None).await }
        })
        .await
        .map(|_| ())
    }

    /// A new lease of `ttl`; returns its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, StateError> {
        let r = self
            .timed("lease_grant", || {
                let mut lease = self.client.lease_client();
                async move { lease.grant(ttl.as_secs() as i64, None).await }
            })
            .await?;
        Ok(r.id())
    }

    /// Renews lease `id` once; returns the TTL etcd granted (0: the lease is gone).
    pub async fn keep_alive(&self, id: i64) -> Result<i64, StateError> {
        self.timed("lease_keepalive", || {
            let mut lease = self.client.lease_client();
            async move {
                let (mut keeper, mut stream) = lease.keep_alive(id).await?;
                keeper.keep_alive().await?;
                match stream.message().await? {
                    Some(r) => Ok(r.ttl()),
                    None => Ok(0),
                }
            }
        })
        .await
    }

    /// Revokes lease `id` (a clean stop: the membership and election keys go at once).
    pub async fn revoke(&self, id: i64) -> Result<(), StateError> {
        self.timed("lease_keepalive", || {
            let mut lease = self.client.lease_client();
            async move { lease.revoke(id).await }
        })
        .await
        .map(|_| ())
    }

    /// Watches every key under `prefix` from `revision` on.
    pub async fn watch(&self, prefix: &str, revision: i64) -> Result<WatchStream, StateError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision)
            .with_progress_notify();
        self.timed("watch", || {
            let mut watch = self.client.watch_client();
            let options = options.clone();
            async move { watch.watch(prefix, Some(options)).await }
        })
        .await
    }
}
