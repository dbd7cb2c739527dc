//! Private, restartable server instances for the chaos harness: a PostgreSQL cluster, a
//! RabbitMQ node and a NATS server (with JetStream), each in a directory of its own, on free
//! ports, so that the harness can crash and restart them without touching the machine's shared
//! services (PostgreSQL on 5432, RabbitMQ on 5672/25672, NATS on 4222).
//!
//! A restart is a crash: the server is killed without a chance to flush or checkpoint
//! (`pg_ctl stop -m immediate`, `kill -9` of RabbitMQ's Erlang VM, `SIGKILL` of `nats-server`),
//! then started again on the same port and directories, so that it recovers from what it had
//! made durable.
//!
//! Run as root, the servers that refuse root run as their Debian system users (`postgres`,
//! `rabbitmq`) and their directories are handed over to those users; run as another user,
//! everything runs as that user.
//!
//! Each value stops its server when dropped (best effort, synchronously), so that a harness
//! that errors out does not leave servers behind; a harness killed outright does.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use idem_runtime::broker::rabbitmq::lapin;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

/// Any error, with a message that says what failed and which log to read.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How often the readiness and shutdown polls look again.
const POLL: Duration = Duration::from_millis(100);

/// Ports the machine's shared services use (or may use), never handed out.
const SHARED_PORTS: &[u16] = &[
    1883, 2024, 3306, 4222, 4369, 5432, 5672, 6222, 6379, 8222, 15672, 25672,
];

/// Whether this process runs as root (then `initdb`, `pg_ctl` and RabbitMQ run as their
/// system users).
fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
    })
}

/// A free port on 127.0.0.1 that this process has not handed out before.
///
/// The port is chosen below the kernel's ephemeral range when possible: a server's port inside
/// that range can be taken while the server is down (restarting) by the local end of an
/// outgoing connection, even by a client's connection to that very port (TCP self-connect),
/// and then the server cannot bind it again.
fn free_port() -> Result<u16, BoxError> {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    let usable = |port: u16| {
        !SHARED_PORTS.contains(&port)
            && !handed_out.contains(&port)
            && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
    };
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let mut chosen = None;
    if ephemeral_low > 12_000 {
        for _ in 0..500 {
            let port = fastrand::u16(10_000..ephemeral_low);
            if usable(port) {
                chosen = Some(port);
                break;
            }
        }
    }
    let port = match chosen {
        Some(port) => port,
        None => loop {
            // Whatever the kernel gives.
            let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
                .local_addr()?
                .port();
            if !SHARED_PORTS.contains(&port) && !handed_out.contains(&port) {
                break port;
            }
        },
    };
    handed_out.insert(port);
    Ok(port)
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
async fn port_open(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)),
        )
        .await,
        Ok(Ok(_))
    )
}

/// Waits until nothing accepts connections on `port` any more, for `limit` at most.
async fn wait_port_closed(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !port_open(port).await {
            return true;
        }
        tokio::time::sleep(POLL).await;
    }
    false
}

/// The last `lines` lines of the file at `path` (empty when it cannot be read).
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// An error saying `what` failed, pointing at `logs` and quoting the end of the first.
fn failure(what: impl std::fmt::Display, logs: &[&Path]) -> BoxError {
    let mut message = what.to_string();
    if let Some((first, rest)) = logs.split_first() {
        message.push_str(&format!("; see {}", first.display()));
        for log in rest {
            message.push_str(&format!(" and {}", log.display()));
        }
        let end = tail(first, 15);
        if !end.is_empty() {
            message.push_str(&format!(
                "\n--- last lines of {} ---\n{end}",
                first.display()
            ));
        }
    }
    message.into()
}

/// `path`, opened for appending (created if missing), as a child's stdout or stderr.
fn append_to(path: &Path) -> Result<Stdio, BoxError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|error| format!("cannot open {} for writing: {error}", path.display()))?;
    Ok(Stdio::from(file))
}

/// Runs `command` with its output appended to `log` and waits for it, for `limit` at most.
async fn run_logged(
    mut command: Command,
    what: &str,
    log: &Path,
    limit: Duration,
) -> Result<(), BoxError> {
    command
        .stdin(Stdio::null())
        .stdout(append_to(log)?)
        .stderr(append_to(log)?)
        .kill_on_drop(true);
    let status: ExitStatus = match tokio::time::timeout(limit, command.status()).await {
        Ok(Ok(status)) => status,
        Ok(Err(error)) => return Err(failure(format!("{what}: cannot run it: {error}"), &[log])),
        Err(_) => return Err(failure(format!("{what}: no answer in {limit:?}"), &[log])),
    };
    if status.success() {
        Ok(())
    } else {
        Err(failure(format!("{what} failed ({status})"), &[log]))
    }
}

/// Creates `dir` and returns its absolute path. As root, also hands it to `user` and makes its
/// parent traversable, so that a server running as `user` can reach it.
fn prepare_dir(dir: &Path) -> Result<PathBuf, BoxError> {
    std::fs::create_dir_all(dir)
        .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    let dir = dir.canonicalize()?;
    if is_root()
        && let Some(parent) = dir.parent()
    {
        let mut permissions = std::fs::metadata(parent)?.permissions();
        permissions.set_mode(permissions.mode() | 0o755);
        std::fs::set_permissions(parent, permissions)?;
    }
    Ok(dir)
}

/// `chown -R user:user dir` (as root only).
fn hand_over(dir: &Path, user: &str) -> Result<(), BoxError> {
    if !is_root() {
        return Ok(());
    }
    let status = std::process::Command::new("chown")
        .arg("-R")
        .arg(format!("{user}:{user}"))
        .arg(dir)
        .status()
        .map_err(|error| format!("cannot run chown: {error}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("chown -R {user}:{user} {} failed ({status})", dir.display()).into())
    }
}

/// `kill -9 pid` (no `unsafe` for `libc::kill`).
fn kill_9(pid: u32) -> bool {
    std::process::Command::new("kill")
        .arg("-9")
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Waits for `child` to exit, for `limit` at most (it then stays to be reaped by tokio).
async fn reap(child: &mut Child, limit: Duration) {
    let _ = tokio::time::timeout(limit, child.wait()).await;
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

/// A private PostgreSQL cluster (trust authentication, superuser `postgres`) listening on
/// 127.0.0.1 on a port of its own, with its unix socket in its directory.
pub(crate) struct Postgres {
    /// The directory given to [`Postgres::start`] (absolute).
    dir: PathBuf,
    /// The cluster's data directory, `dir/data`.
    data: PathBuf,
    /// The server's log, `dir/postgres.log`.
    log: PathBuf,
    /// `initdb`'s and `pg_ctl`'s own output, `dir/pg_ctl.log`.
    ctl_log: PathBuf,
    /// The directory holding `initdb`, `pg_ctl` and `pg_isready` (empty: from `PATH`).
    bin: PathBuf,
    port: u16,
    /// Whether the server is (believed to be) running.
    running: bool,
}

impl Postgres {
    /// initdb a fresh cluster under `dir` (trust auth, superuser `postgres`), start it on a free
    /// 127.0.0.1 port with its unix socket inside `dir`, wait until it accepts connections.
    pub(crate) async fn start(dir: &Path) -> Result<Self, BoxError> {
        let dir = prepare_dir(dir)?;
        let mut postgres = Self {
            data: dir.join("data"),
            log: dir.join("postgres.log"),
            ctl_log: dir.join("pg_ctl.log"),
            bin: newest_postgres_bin(),
            port: free_port()?,
            running: false,
            dir,
        };
        // The logs exist before the hand-over, so that they belong to `postgres` as well.
        std::fs::File::create(&postgres.log)?;
        std::fs::File::create(&postgres.ctl_log)?;
        hand_over(&postgres.dir, "postgres")?;
        let mut initdb = postgres.tool("initdb");
        initdb.arg("-D").arg(&postgres.data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        run_logged(
            initdb.into(),
            "PostgreSQL: initdb",
            &postgres.ctl_log,
            Duration::from_secs(120),
        )
        .await?;
        postgres.boot().await?;
        Ok(postgres)
    }

    /// The port it listens on (127.0.0.1).
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:{port}/postgres`
    pub(crate) fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A crash and a restart: `pg_ctl stop -m immediate` (no checkpoint; WAL recovery on
    /// start), then start again on the same port and wait until it accepts connections.
    pub(crate) async fn restart(&mut self) -> Result<(), BoxError> {
        if self.running {
            run_logged(
                self.stop_command().into(),
                "PostgreSQL: pg_ctl stop -m immediate",
                &self.ctl_log,
                Duration::from_secs(60),
            )
            .await?;
            self.running = false;
        }
        self.boot().await
    }

    /// Stops it (`-m immediate`) and removes nothing (the caller removes its directory).
    pub(crate) async fn stop(&mut self) {
        if self.running {
            let _ = run_logged(
                self.stop_command().into(),
                "PostgreSQL: pg_ctl stop -m immediate",
                &self.ctl_log,
                Duration::from_secs(60),
            )
            .await;
            self.running = false;
        }
    }

    /// `pg_ctl start`, waiting until it accepts connections on its port.
    async fn boot(&mut self) -> Result<(), BoxError> {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' \
             -c max_connections=200 -c fsync=on",
            self.port,
            self.dir.display()
        );
        let mut start = self.tool("pg_ctl");
        start
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "120", "-o", &options, "start"]);
        // From here on a server may be up, even when `pg_ctl` reports a failure.
        self.running = true;
        let started = run_logged(
            start.into(),
            &format!("PostgreSQL: pg_ctl start (port {})", self.port),
            &self.ctl_log,
            Duration::from_secs(150),
        )
        .await;
        if let Err(error) = started {
            return Err(failure(
                format!("PostgreSQL did not start on port {}: {error}", self.port),
                &[&self.log],
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
                .args(["-t", "2", "-p", &self.port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .is_ok_and(|status| status.success());
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(failure(
                    format!(
                        "PostgreSQL started but does not accept connections on port {} after 60 s",
                        self.port
                    ),
                    &[&self.log],
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `tool` from the PostgreSQL binaries, as `postgres` when we are root.
    fn tool(&self, tool: &str) -> std::process::Command {
        let program = self.bin.join(tool);
        let mut command = if is_root() {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            std::process::Command::new(program)
        };
        // A working directory `postgres` can enter (root's home is not one).
        command.current_dir(&self.dir);
        command
    }

    /// `pg_ctl stop -m immediate`, waiting until the server has exited.
    fn stop_command(&self) -> std::process::Command {
        let mut stop = self.tool("pg_ctl");
        stop.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "60", "stop"]);
        stop
    }
}

impl Drop for Postgres {
    /// Best effort: `pg_ctl stop -m immediate`, synchronously.
    fn drop(&mut self) {
        if self.running {
            let mut stop = self.stop_command();
            let _ = stop
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            self.running = false;
        }
    }
}

/// The `bin` directory of the newest PostgreSQL under `/usr/lib/postgresql` (empty, meaning
/// "from `PATH`", when there is none).
fn newest_postgres_bin() -> PathBuf {
    let mut newest: Option<(Vec<u32>, PathBuf)> = None;
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let bin = entry.path().join("bin");
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Ok(version) = name
                .split('.')
                .map(str::parse::<u32>)
                .collect::<Result<Vec<u32>, _>>()
            else {
                continue;
            };
            if bin.join("pg_ctl").is_file()
                && newest.as_ref().is_none_or(|(best, _)| version > *best)
            {
                newest = Some((version, bin));
            }
        }
    }
    newest.map(|(_, bin)| bin).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ
// ---------------------------------------------------------------------------------------------

/// A private RabbitMQ node (`idem-chaos-PID@localhost`, user `guest`), its AMQP listener on
/// 127.0.0.1 on a port of its own, its Erlang distribution on another, its data and logs in its
/// directory.
pub(crate) struct RabbitMq {
    /// The directory given to [`RabbitMq::start`] (absolute).
    dir: PathBuf,
    port: u16,
    /// The Erlang distribution port (`rabbitmqctl` talks to the node through it).
    dist_port: u16,
    /// The node name, `idem-chaos-PID@localhost`.
    node: String,
    /// The `rabbitmq-server` process (through `su` when we are root), to notice an early exit
    /// and to reap it.
    child: Option<Child>,
    /// Whether the node is (believed to be) running.
    running: bool,
}

impl RabbitMq {
    /// Sets up a fresh node under `dir` (no plugins, listening on 127.0.0.1 only), starts it on
    /// free ports and waits until it accepts AMQP connections (90 s at most).
    pub(crate) async fn start(dir: &Path) -> Result<Self, BoxError> {
        static NODES: AtomicU32 = AtomicU32::new(0);
        let dir = prepare_dir(dir)?;
        std::fs::create_dir_all(dir.join("mnesia"))?;
        std::fs::create_dir_all(dir.join("log"))?;
        let port = free_port()?;
        let dist_port = free_port()?;
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\n"),
        )?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        std::fs::File::create(dir.join("out.log"))?;
        hand_over(&dir, "rabbitmq")?;
        let node = match NODES.fetch_add(1, Ordering::Relaxed) {
            0 => format!("idem-chaos-{}@localhost", std::process::id()),
            n => format!("idem-chaos-{}-{n}@localhost", std::process::id()),
        };
        let mut rabbitmq = Self {
            dir,
            port,
            dist_port,
            node,
            child: None,
            running: false,
        };
        rabbitmq.boot().await?;
        Ok(rabbitmq)
    }

    /// The AMQP port (127.0.0.1).
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// `amqp://guest:guest@127.0.0.1:{port}/%2f`
    pub(crate) fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The node name, for `rabbitmqctl -n` (which finds the node through the machine's `epmd`
    /// and the `rabbitmq` user's Erlang cookie; no other setting needed when run as root).
    pub(crate) fn node_name(&self) -> &str {
        &self.node
    }

    /// A crash and a restart: `kill -9` of the node's Erlang VM, then a start with the same
    /// node name, ports and directories (durable queues and persistent messages survive), and
    /// a wait until it accepts AMQP connections again.
    pub(crate) async fn restart(&mut self) -> Result<(), BoxError> {
        if self.running {
            self.kill().await?;
        }
        self.boot().await
    }

    /// Stops it (`rabbitmqctl -n NODE stop`, falling back to `kill -9`) and removes nothing.
    pub(crate) async fn stop(&mut self) {
        if !self.running {
            return;
        }
        let mut stop = self.command(self.ctl_program());
        stop.arg("-n")
            .arg(&self.node)
            .arg("stop")
            .arg(self.dir.join("pid"));
        let log = self.dir.join("out.log");
        let stopped = run_logged(
            stop.into(),
            "rabbitmqctl stop",
            &log,
            Duration::from_secs(60),
        )
        .await
        .is_ok();
        if !stopped {
            let _ = self.kill().await;
        }
        if let Some(mut child) = self.child.take() {
            reap(&mut child, Duration::from_secs(10)).await;
        }
        self.running = false;
    }

    /// Spawns `rabbitmq-server` and waits until it accepts AMQP connections.
    async fn boot(&mut self) -> Result<(), BoxError> {
        let out = self.dir.join("out.log");
        let node_log = self.dir.join("log").join(format!("{}.log", self.node));
        // A stale pid file (from before a crash) must not be taken for the new VM's.
        let _ = std::fs::remove_file(self.dir.join("pid"));
        let mut server = self.command(self.server_program());
        server
            .stdin(Stdio::null())
            .stdout(append_to(&out)?)
            .stderr(append_to(&out)?);
        let child = Command::from(server)
            .spawn()
            .map_err(|error| failure(format!("cannot run rabbitmq-server: {error}"), &[&out]))?;
        self.child = Some(child);
        self.running = true;

        let started = Instant::now();
        let limit = Duration::from_secs(90);
        let url = self.url();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                self.running = false;
                return Err(failure(
                    format!(
                        "RabbitMQ node {} exited while starting ({status}), port {}",
                        self.node, self.port
                    ),
                    &[&out, &node_log],
                ));
            }
            if port_open(self.port).await {
                let connected = tokio::time::timeout(
                    Duration::from_secs(5),
                    lapin::Connection::connect(&url, lapin::ConnectionProperties::default()),
                )
                .await;
                if let Ok(Ok(connection)) = connected {
                    let _ = connection.close(200, "ready".into()).await;
                    return Ok(());
                }
            }
            if started.elapsed() >= limit {
                return Err(failure(
                    format!(
                        "RabbitMQ node {} does not accept AMQP connections on port {} after {limit:?}",
                        self.node, self.port
                    ),
                    &[&node_log, &out],
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `kill -9` of the node's Erlang VM; waits until its port is closed and the
    /// `rabbitmq-server` process has exited.
    async fn kill(&mut self) -> Result<(), BoxError> {
        let pid_file = self.dir.join("pid");
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok())
            .ok_or_else(|| {
                failure(
                    format!(
                        "RabbitMQ node {}: no pid in {}, cannot kill it",
                        self.node,
                        pid_file.display()
                    ),
                    &[&self.dir.join("out.log")],
                )
            })?;
        if !kill_9(pid) {
            return Err(format!("RabbitMQ node {}: kill -9 {pid} failed", self.node).into());
        }
        self.running = false;
        if !wait_port_closed(self.port, Duration::from_secs(30)).await {
            return Err(format!(
                "RabbitMQ node {}: port {} still open 30 s after kill -9 {pid}",
                self.node, self.port
            )
            .into());
        }
        if let Some(mut child) = self.child.take() {
            reap(&mut child, Duration::from_secs(10)).await;
        }
        Ok(())
    }

    /// `rabbitmq-server`: the Debian wrapper as root (it switches to the `rabbitmq` user), the
    /// script behind it otherwise (the wrapper only lets root and `rabbitmq` through).
    fn server_program(&self) -> PathBuf {
        Self::program("rabbitmq-server")
    }

    /// `rabbitmqctl`, chosen as [`RabbitMq::server_program`] is.
    fn ctl_program(&self) -> PathBuf {
        Self::program("rabbitmqctl")
    }

    /// `name` from `/usr/lib/rabbitmq/bin` when we are not root, from `PATH` otherwise.
    fn program(name: &str) -> PathBuf {
        let behind = Path::new("/usr/lib/rabbitmq/bin").join(name);
        if !is_root() && behind.is_file() {
            behind
        } else {
            PathBuf::from(name)
        }
    }

    /// `program` with this node's environment.
    fn command(&self, program: PathBuf) -> std::process::Command {
        let dir = &self.dir;
        let mut command = std::process::Command::new(program);
        command
            .current_dir(dir)
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", dir.join("feature_flags"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("ERL_CRASH_DUMP", dir.join("log").join("erl_crash.dump"));
        command
    }
}

impl Drop for RabbitMq {
    /// Best effort: `kill -9` of the Erlang VM (or `rabbitmqctl stop` when there is no pid
    /// file yet), synchronously.
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let pid = std::fs::read_to_string(self.dir.join("pid"))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok());
        let killed = pid.is_some_and(kill_9);
        if !killed {
            let mut stop = self.command(self.ctl_program());
            let _ = stop
                .arg("-n")
                .arg(&self.node)
                .arg("stop")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        self.running = false;
    }
}

// ---------------------------------------------------------------------------------------------
// NATS
// ---------------------------------------------------------------------------------------------

/// A private NATS server with JetStream (file storage in its directory), listening on
/// 127.0.0.1 on a port of its own.
pub(crate) struct Nats {
    /// The directory given to [`Nats::start`] (absolute).
    dir: PathBuf,
    port: u16,
    /// The `nats-server` process (killed when dropped).
    child: Option<Child>,
}

impl Nats {
    /// Starts `nats-server -js` with its store under `dir` on a free port and waits until it
    /// greets clients (30 s at most).
    pub(crate) async fn start(dir: &Path) -> Result<Self, BoxError> {
        let dir = prepare_dir(dir)?;
        let mut nats = Self {
            dir,
            port: free_port()?,
            child: None,
        };
        nats.boot().await?;
        Ok(nats)
    }

    /// The port it listens on (127.0.0.1).
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:{port}`
    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A crash and a restart: `SIGKILL`, then a start with the same port and store, and a wait
    /// until it greets clients again.
    pub(crate) async fn restart(&mut self) -> Result<(), BoxError> {
        self.kill().await;
        if !wait_port_closed(self.port, Duration::from_secs(10)).await {
            return Err(format!("NATS: port {} still open after SIGKILL", self.port).into());
        }
        self.boot().await
    }

    /// Stops it (`SIGKILL`) and removes nothing.
    pub(crate) async fn stop(&mut self) {
        self.kill().await;
    }

    /// `SIGKILL`, and a wait until the process has exited.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            reap(&mut child, Duration::from_secs(10)).await;
        }
    }

    /// Spawns `nats-server` and waits until it sends its `INFO` greeting.
    async fn boot(&mut self) -> Result<(), BoxError> {
        let log = self.dir.join("nats.log");
        let out = self.dir.join("out.log");
        let child = Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.join("jetstream"))
            .arg("-l")
            .arg(&log)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(append_to(&out)?)
            .stderr(append_to(&out)?)
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| failure(format!("cannot run nats-server: {error}"), &[&out]))?;
        let child = self.child.insert(child);
        let started = Instant::now();
        let limit = Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(failure(
                    format!(
                        "nats-server exited while starting ({status}), port {}",
                        self.port
                    ),
                    &[&log, &out],
                ));
            }
            if greets(self.port).await {
                return Ok(());
            }
            if started.elapsed() >= limit {
                return Err(failure(
                    format!(
                        "nats-server does not greet clients on port {} after {limit:?}",
                        self.port
                    ),
                    &[&log, &out],
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Nats {
    /// Best effort: `SIGKILL` (the child is also `kill_on_drop`).
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// Whether a NATS server on `port` accepts a connection and sends its `INFO` line.
async fn greets(port: u16) -> bool {
    let greeting = async {
        let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        let mut first = [0_u8; 5];
        stream.read_exact(&mut first).await?;
        Ok::<_, std::io::Error>(&first == b"INFO ")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), greeting).await,
        Ok(Ok(true))
    )
}
