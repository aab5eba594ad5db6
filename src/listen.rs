//! Listening sockets for both binaries, with Go's meaning of `:port`:
//! every interface, IPv6 and IPv4 alike.

use std::net::{Ipv6Addr, SocketAddr};

use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;

/// Binds `address` (`host:port`). An empty host listens on every
/// interface of both families (one IPv6 socket that also takes IPv4), or
/// on every IPv4 interface where the host has no IPv6.
pub async fn bind(address: &str) -> std::io::Result<TcpListener> {
    match address.strip_prefix(':').and_then(|port| port.parse::<u16>().ok()) {
        Some(port) => match dual_stack(port) {
            Ok(listener) => Ok(listener),
            Err(_) => TcpListener::bind(("0.0.0.0", port)).await,
        },
        None => TcpListener::bind(address).await,
    }
}

/// `[::]:port`, taking IPv4 connections too whatever the system's default.
fn dual_stack(port: u16) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bare_port_takes_ipv4_and_ipv6_connections() {
        let listener = bind(":0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("IPv4");
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            tokio::net::TcpStream::connect(("::1", port)).await.expect("IPv6");
        }
    }
}
