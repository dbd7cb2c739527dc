//! `--pg-latency-us N`: a database a network hop away, for the PostgreSQL scenarios. A proxy on
//! a local port forwards every chunk of bytes after holding it `N` µs, in each direction, so a
//! round trip costs `2N` µs more; both sides of a scenario connect through it. Plain threads
//! and blocking sockets: tokio's timer has a 1 ms resolution, `std::thread::sleep` does not.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// Starts the proxy in front of `upstream` (`host:port`); returns its local port.
pub(crate) fn start(upstream: String, one_way: Duration) -> std::io::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (Ok(client_back), Ok(server_back)) = (client.try_clone(), server.try_clone())
            else {
                continue;
            };
            std::thread::spawn(move || pump(client, server, one_way));
            std::thread::spawn(move || pump(server_back, client_back, one_way));
        }
    });
    Ok(port)
}

/// Copies `from` to `to`, each chunk held `delay` first.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let mut buffer = vec![0; 64 * 1024];
    while let Ok(read) = from.read(&mut buffer) {
        if read == 0 {
            break;
        }
        std::thread::sleep(delay);
        if to.write_all(&buffer[..read]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}
