//! The live PostgreSQL the pg tests use.

use idem_runtime::PgStore;
use idem_runtime::store::RecordsTable;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// `IDEM_TEST_PG_URL`, or the local server with trust auth.
pub fn url() -> String {
    std::env::var("IDEM_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// The records table of the `store_pg_custom_table` suite: a reserved word in mixed case, in
/// a schema of its own, so that every statement that does not quote and qualify it fails.
///
/// # Panics
///
/// Never: the name is valid.
pub fn custom_table() -> RecordsTable {
    RecordsTable::parse("idem_custom.Order").expect("a valid table name")
}

/// Connects.
///
/// # Panics
///
/// When PostgreSQL is unreachable: a missing service fails the test loudly.
pub async fn connect() -> PgStore {
    let url = url();
    PgStore::connect(&url).await.unwrap_or_else(|error| {
        panic!(
            "PostgreSQL is not reachable at {url}: {error}. Run the tests with scripts/test, which starts it, or set IDEM_TEST_PG_URL."
        )
    })
}

/// Connects, migrates `idem_records` and creates the conformance business tables.
///
/// # Panics
///
/// When PostgreSQL is unreachable: a missing service fails the test loudly.
pub async fn store() -> PgStore {
    store_on(RecordsTable::default()).await
}

/// Connects with the records in `table`, creates its schema if missing, migrates it and
/// creates the conformance business tables (in the default schema).
///
/// # Panics
///
/// When PostgreSQL is unreachable: a missing service fails the test loudly.
pub async fn store_on(table: RecordsTable) -> PgStore {
    let store = connect().await.with_records_table(table);
    create_schema_and_business_tables(&store)
        .await
        .expect("create the records table's schema and the conformance business tables");
    store.migrate().await.expect("migrate the records table");
    store
}

async fn create_schema_and_business_tables(store: &PgStore) -> Result<(), sqlx::Error> {
    let mut tx = store.pool().begin().await?;
    // Tests run in parallel; DDL races on the catalog without a lock.
    sqlx::query("SELECT pg_advisory_xact_lock(7280321149621735002)")
        .execute(&mut *tx)
        .await?;
    if let Some(schema) = store.records_table().schema() {
        // A validated identifier.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
        )))
        .execute(&mut *tx)
        .await?;
    }
    for ddl in crate::conformance::BUSINESS_TABLES {
        sqlx::query(*ddl).execute(&mut *tx).await?;
    }
    tx.commit().await
}

/// A new, empty schema, unique to this call, and a store whose connections have it as their
/// default schema (`search_path`), with the conformance business tables in it and no records
/// table: for applying a migration by hand. Drop it with [`drop_schema`].
///
/// # Panics
///
/// When PostgreSQL is unreachable or refuses the set-up.
pub async fn fresh_schema() -> (PgStore, String) {
    let schema = format!("idem_fresh_{}", crate::unique_int());
    let admin = connect().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(admin.pool())
        .await
        .expect("create a fresh schema");
    let options: PgConnectOptions = url().parse().expect("a PostgreSQL URL");
    let pool = PgPoolOptions::new()
        .connect_with(options.options([("search_path", schema.as_str())]))
        .await
        .expect("connect in the fresh schema");
    for ddl in crate::conformance::BUSINESS_TABLES {
        sqlx::query(*ddl)
            .execute(&pool)
            .await
            .expect("create the conformance business tables");
    }
    (PgStore::new(pool), schema)
}

/// Drops a schema made by [`fresh_schema`], with everything in it.
///
/// # Panics
///
/// When PostgreSQL refuses.
pub async fn drop_schema(schema: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(connect().await.pool())
    .await
    .expect("drop the fresh schema");
}

/// A TCP proxy in front of the live PostgreSQL that counts the client's round trips: a round
/// trip starts when the client sends after the server last answered, so messages the client
/// sends without waiting in between (a queued `ROLLBACK` and the pool's ping) count once. It
/// also keeps the text of each simple query, to show which statements travelled together.
#[derive(Debug, Clone)]
pub struct RoundTrips {
    address: std::net::SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Seen>>,
}

#[derive(Debug, Default)]
struct Seen {
    round_trips: u64,
    /// The client has sent something the server has not answered yet: whatever else it sends
    /// meanwhile travels in the same round trip (a queued `ROLLBACK` with the release ping).
    awaiting_reply: bool,
    simple_queries: Vec<String>,
}

impl RoundTrips {
    /// Starts the proxy on a free local port, forwarding to the server of [`url`].
    ///
    /// # Panics
    ///
    /// When it cannot listen on a local port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen on a local port");
        let address = listener.local_addr().expect("the proxy's address");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
        let upstream = server_address();
        let counted = std::sync::Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let seen = std::sync::Arc::clone(&counted);
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let answered = std::sync::Arc::clone(&seen);
                    let to_server = async move {
                        let _ = forward_counting(client_read, &mut server_write, &seen).await;
                    };
                    let to_client = async move {
                        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                        let mut buffer = vec![0; 64 * 1024];
                        while let Ok(read) = server_read.read(&mut buffer).await {
                            if read == 0 {
                                break;
                            }
                            // Before the client can see the answer and send again.
                            answered
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .awaiting_reply = false;
                            if client_write.write_all(&buffer[..read]).await.is_err() {
                                break;
                            }
                        }
                    };
                    tokio::join!(to_server, to_client);
                });
            }
        });
        Self { address, seen }
    }

    /// A pool of one connection through the proxy that does not ping a connection before
    /// handing it out, so that each measured call's round trips are its own (sqlx's default,
    /// `test_before_acquire`, adds one ping per acquire, on both sides of a comparison).
    ///
    /// # Panics
    ///
    /// When PostgreSQL is unreachable through the proxy.
    pub async fn pool(&self) -> sqlx::PgPool {
        let options: PgConnectOptions = url().parse().expect("a valid IDEM_TEST_PG_URL");
        PgPoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options.host("127.0.0.1").port(self.address.port()))
            .await
            .expect("connect through the round-trip proxy")
    }

    /// The round trips `work` took on `pool` (a pool of [`pool`](Self::pool)), counted once
    /// its connection is back in the pool: the ping with which sqlx returns a connection, and
    /// the `ROLLBACK` that a dropped transaction queues before it, are included.
    pub async fn of<T>(
        &self,
        pool: &sqlx::PgPool,
        work: impl std::future::Future<Output = T>,
    ) -> (T, u64) {
        let before = self.settled(pool).await;
        let output = work.await;
        // Each `settled` returns one connection, whose release ping the next one counts.
        let after = self.settled(pool).await;
        (output, after - before - 1)
    }

    /// The simple queries seen so far, in order.
    pub fn simple_queries(&self) -> Vec<String> {
        self.lock().simple_queries.clone()
    }

    async fn settled(&self, pool: &sqlx::PgPool) -> u64 {
        // Waits for the pool's one connection: whatever released it has finished.
        let connection = pool.acquire().await.expect("acquire the pool's connection");
        let count = self.lock().round_trips;
        drop(connection);
        count
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn server_address() -> String {
    let options: PgConnectOptions = url().parse().expect("a valid IDEM_TEST_PG_URL");
    format!("{}:{}", options.get_host(), options.get_port())
}

/// Copies the client's bytes to the server, message by message, counting round trips and
/// keeping the text of each `Query` ('Q'). The first messages of a connection (an `SSLRequest` or `GSSENCRequest`, then
/// the `StartupMessage`) have no type byte: a length, then a code.
async fn forward_counting(
    mut client: tokio::net::tcp::OwnedReadHalf,
    server: &mut tokio::net::tcp::OwnedWriteHalf,
    seen: &std::sync::Mutex<Seen>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const SSL_REQUEST: u32 = 80_877_103;
    const GSSENC_REQUEST: u32 = 80_877_104;
    // Untyped messages until the startup message (an SSL or GSS request comes first and is
    // answered with one byte, 'N' here: the test server has no TLS).
    loop {
        let length = client.read_u32().await?;
        let mut body = vec![0; usize::try_from(length).unwrap_or(0).saturating_sub(4)];
        client.read_exact(&mut body).await?;
        let mut message = length.to_be_bytes().to_vec();
        message.extend_from_slice(&body);
        server.write_all(&message).await?;
        let code = body.get(..4).map_or(0, |code| {
            u32::from_be_bytes([code[0], code[1], code[2], code[3]])
        });
        if code != SSL_REQUEST && code != GSSENC_REQUEST {
            break;
        }
    }
    loop {
        let kind = client.read_u8().await?;
        let length = client.read_u32().await?;
        let mut body = vec![0; usize::try_from(length).unwrap_or(0).saturating_sub(4)];
        client.read_exact(&mut body).await?;
        {
            let mut seen = seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // 'X' (Terminate) is not answered.
            if kind != b'X' && !seen.awaiting_reply {
                seen.round_trips += 1;
                seen.awaiting_reply = true;
            }
            if kind == b'Q' {
                let text = body.strip_suffix(&[0]).unwrap_or(&body);
                seen.simple_queries
                    .push(String::from_utf8_lossy(text).into_owned());
            }
        }
        // One write per message: separate small writes would wait on delayed ACKs.
        let mut message = Vec::with_capacity(body.len() + 5);
        message.push(kind);
        message.extend_from_slice(&length.to_be_bytes());
        message.extend_from_slice(&body);
        server.write_all(&message).await?;
    }
}

/// A twin delivery in flight: claims `key` in `scope` (with `fingerprint`) in a transaction it
/// keeps open. Returns that transaction and its id, for [`wait_for_a_waiter_on`].
///
/// # Panics
///
/// When the claim fails or finds the key taken.
pub async fn hold_key(
    store: &PgStore,
    scope: &'static str,
    key: &str,
    fingerprint: Option<&str>,
) -> (idem_runtime::PgTx<'static>, String) {
    use idem_runtime::Store as _;
    use idem_runtime::store::{Claim, NewRecord};
    let record_key = idem_runtime::Key::new(scope, &[("order_id", &key)]).expect("a valid key");
    let mut twin = store.begin().await.expect("begin the twin");
    let claim = store
        .claim(
            &mut twin,
            &NewRecord {
                key: &record_key,
                fingerprint,
                response: None,
                now_ms: store.now_ms(),
                expires_at_ms: None,
            },
        )
        .await
        .expect("the twin claims");
    assert_eq!(claim, Claim::Claimed, "the key was free");
    let xid: String = sqlx::query_scalar(
        "SELECT backend_xid::text FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    )
    .fetch_one(&mut *twin)
    .await
    .expect("the twin's transaction id");
    (twin, xid)
}

/// Waits until some transaction waits on the lock of transaction `xid` (from [`hold_key`]):
/// the server's own state, read from `pg_locks`.
pub async fn wait_for_a_waiter_on(store: &PgStore, xid: &str) {
    crate::eventually("a transaction waiting on the twin's record", || {
        let (pool, xid) = (store.pool().clone(), xid.to_owned());
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' \
                 AND NOT granted AND transactionid::text = $1",
            )
            .bind(xid)
            .fetch_one(&pool)
            .await
            .expect("read pg_locks");
            waiting > 0
        }
    })
    .await;
}
