//! Noticing a game that leaves while its non-streamed answer is generated.
//!
//! actix-web reads nothing from a connection while a handler runs, so a game that closes
//! its socket before a whole answer is ready went unnoticed: the node generated the
//! answer to its end, busy for a game that had gone (a game that times out and retries
//! doubled the load it caused). Each connection's socket is noted when it opens
//! ([`note_socket`]); [`gone`] then peeks at it now and then, and ends once the peer has
//! closed it. The handler that awaits it drops the jobs, which frees their nodes.

use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::time::Duration;

/// How often a waiting handler looks at its connection.
const PEEK_INTERVAL: Duration = Duration::from_millis(250);

/// The socket of a connection, noted in its extensions when it opens.
#[derive(Debug, Clone, Copy)]
pub struct PeerSocket(RawFd);

/// `on_connect` hook: notes the connection's socket (plain TCP only).
pub fn note_socket(conn: &dyn std::any::Any, ext: &mut actix_web::dev::Extensions) {
    if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
        ext.insert(PeerSocket(tcp.as_raw_fd()));
    }
}

/// Ends once the peer of `socket` has closed the connection (never, without a socket).
///
/// The descriptor stays open while this runs: the connection's dispatcher owns both the
/// socket and the handler future that awaits this, so the socket cannot close (nor its
/// number be reused) before this future is dropped.
pub async fn gone(socket: Option<PeerSocket>) {
    let Some(PeerSocket(fd)) = socket else { return std::future::pending().await };
    loop {
        actix_web::rt::time::sleep(PEEK_INTERVAL).await;
        if closed(fd) {
            return;
        }
    }
}

/// Whether the peer closed the connection: a peek reads end-of-stream or a reset.
/// Bytes waiting (a pipelined request) or none yet mean it is still there.
fn closed(fd: RawFd) -> bool {
    // SAFETY: `fd` is the open socket of the connection this request came on (see `gone`);
    // ManuallyDrop keeps it open when the borrowed stream goes away.
    let stream = ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    let mut byte = [0u8; 1];
    match stream.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_peek_tells_a_closed_peer_from_a_quiet_or_talking_one() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let fd = server.as_raw_fd();
        assert!(!closed(fd), "a quiet peer is there");
        client.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!closed(fd), "a peer with bytes waiting is there");
        // The peek consumed nothing: the bytes are still there to read.
        let mut buf = [0u8; 32];
        let read = std::io::Read::read(&mut &server, &mut buf).unwrap();
        assert_eq!(&buf[..read], b"GET / HTTP/1.1\r\n");
        drop(client);
        std::thread::sleep(Duration::from_millis(50));
        assert!(closed(fd), "a peer that closed is gone");
    }
}
