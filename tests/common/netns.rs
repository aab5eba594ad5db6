//! Hosts of their own for network-fault tests: each host a network
//! namespace with one interface on a switch (a bridge in a namespace of its
//! own), all on 10.0.0.0/24. What a real network does wrong is done with
//! nftables in the hosts' namespaces, on the receiving side, so that
//! nothing answers: a cut link drops packets silently both ways (a sender
//! is not told, as it would be by a local output drop), a forgotten flow
//! drops one connection's packets as a NAT that lost its state does, and a
//! spread address sends each new connection to the next of several hosts,
//! as a Kubernetes Service does. A host's name resolves through
//! `/etc/netns/NAME/hosts`, which `ip netns exec` mounts over /etc/hosts,
//! so an address can move.
//!
//! Every namespace is deleted when the [`Net`] is dropped; declare the
//! processes after the net, so that they are stopped first.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
};

use super::Process;

/// `ip`, found where Debian puts it.
fn ip_binary() -> Option<PathBuf> {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].iter().map(PathBuf::from).find(|path| path.is_file())
}

/// `nft`, found where Debian puts it.
fn nft_binary() -> Option<PathBuf> {
    ["/usr/sbin/nft", "/sbin/nft"].iter().map(PathBuf::from).find(|path| path.is_file())
}

/// Runs `program` with `args`, failing the test with what it said if it fails.
fn must(program: &Path, args: &[&str]) -> String {
    let output = Command::new(program).args(args).stdin(Stdio::null()).output().expect("the command starts");
    assert!(
        output.status.success(),
        "{} {}: {}",
        program.display(),
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A host: a namespace and its address on the switch.
#[derive(Debug, Clone)]
pub struct Host {
    /// The namespace's name.
    pub ns: String,
    /// Its address.
    pub address: Ipv4Addr,
}

impl Host {
    /// Starts `binary` with `args` and a clean environment plus `env` in
    /// this host's namespace. `ip netns exec` execs the binary, so the
    /// process's PID is the binary's.
    pub fn start(
        &self,
        name: &'static str,
        binary: &str,
        args: &[&str],
        env: &[(&str, String)],
        dir: &Path,
    ) -> Process {
        let ip = ip_binary().expect("ip is installed");
        let mut all = vec!["netns", "exec", &self.ns, binary];
        all.extend_from_slice(args);
        Process::start(name, ip.to_str().expect("a UTF-8 path"), &all, env, dir)
    }

    /// Runs `work` on a thread of its own that has joined this host's
    /// namespace (a network namespace belongs to a thread), so that the
    /// test reaches this host's servers on its 127.0.0.1.
    pub fn within<T: Send>(&self, work: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = std::fs::File::open(&path).expect("the namespace exists");
                    // SAFETY: setns(2) on a namespace file this thread holds
                    // open; it changes only this thread's network namespace.
                    let joined = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
                    assert_eq!(joined, 0, "setns into {}", self.ns);
                    work()
                })
                .join()
                .expect("the work in the namespace does not panic")
        })
    }

    /// Runs `nft` with `args` in this host's namespace.
    fn nft(&self, args: &[&str]) {
        let nft = nft_binary().expect("nft is installed");
        let ip = ip_binary().expect("ip is installed");
        let mut all = vec!["netns", "exec", &self.ns, nft.to_str().expect("a UTF-8 path")];
        all.extend_from_slice(args);
        must(&ip, &all);
    }

    /// Drops, silently, every packet arriving from `from`'s address that
    /// `rule` (an nftables match, possibly empty) also matches, under the
    /// table `table`.
    fn drop_from(&self, table: &str, from: Ipv4Addr, rule: &str) {
        self.nft(&["add", "table", "inet", table]);
        self.nft(&["add", "chain", "inet", table, "input", "{ type filter hook input priority 0; }"]);
        let rule = format!("ip saddr {from} {rule} drop");
        let mut args = vec!["add", "rule", "inet", table, "input"];
        args.extend(rule.split_whitespace());
        self.nft(&args);
    }

    /// Removes the table `table` (and its rules).
    fn remove(&self, table: &str) {
        self.nft(&["delete", "table", "inet", table]);
    }

    /// Makes `name` resolve to `address` here (the namespace's hosts file).
    pub fn resolve(&self, name: &str, address: Ipv4Addr) {
        self.resolve_all(name, &[address]);
    }

    /// Makes `name` resolve to `addresses`, in this order.
    pub fn resolve_all(&self, name: &str, addresses: &[Ipv4Addr]) {
        let dir = PathBuf::from("/etc/netns").join(&self.ns);
        std::fs::create_dir_all(&dir).unwrap();
        let mut text = String::from("127.0.0.1 localhost\n");
        for address in addresses {
            text.push_str(&format!("{address} {name}\n"));
        }
        // Written in place: `ip netns exec` bind-mounts this very file, so
        // a new file (a rename) would not be seen by processes started.
        std::fs::write(dir.join("hosts"), text).unwrap();
    }

    /// The local ports of this host's established TCP connections to
    /// `port` on `server`.
    pub fn connections_to(&self, server: &Host, port: u16) -> Vec<u16> {
        self.established(&format!("( dst {}:{port} )", server.address))
    }

    /// How many connections from `client` this host holds on its `port`
    /// (by the client's own address: behind a spread address, the client
    /// sees only that address).
    pub fn connections_from(&self, client: &Host, port: u16) -> usize {
        self.established(&format!("( sport = :{port} and dst {} )", client.address)).len()
    }

    /// The local ports of this host's established TCP connections that
    /// `filter` (an `ss` filter) matches.
    fn established(&self, filter: &str) -> Vec<u16> {
        let ip = ip_binary().expect("ip is installed");
        let text = must(&ip, &["netns", "exec", &self.ns, "ss", "-Htn", "state", "established", filter]);
        // With a state given, ss leaves the state column out: Recv-Q,
        // Send-Q, local address, peer address.
        text.lines()
            .filter_map(|line| line.split_whitespace().nth(2))
            .filter_map(|local| local.rsplit_once(':')?.1.parse().ok())
            .collect()
    }
}

/// A switch and the hosts on it.
pub struct Net {
    /// Names start with this: `tn<pid>-<n>`.
    prefix: String,
    /// The switch's namespace.
    switch: String,
    hosts: Vec<Host>,
}

/// Numbers the nets of one test process.
static NETS: AtomicUsize = AtomicUsize::new(0);

impl Net {
    /// An empty switch, or `None` (with `skipped: …` said) where namespaces
    /// cannot be made here: not root, no `ip`, no `nft`. Under CI (`CI`
    /// set) that fails the test instead.
    pub fn new() -> Option<Self> {
        let missing = if ip_binary().is_none() {
            Some("ip (iproute2) not installed")
        } else if nft_binary().is_none() {
            Some("nft (nftables) not installed")
        // SAFETY: geteuid(2) reads the process's user and cannot fail.
        } else if unsafe { libc::geteuid() } != 0 {
            Some("network namespaces need root")
        } else {
            None
        };
        if let Some(missing) = missing {
            assert!(std::env::var_os("CI").is_none(), "network tests must run under CI: {missing}");
            eprintln!("skipped: {missing}");
            return None;
        }
        sweep();
        let prefix = format!("tn{}-{}", std::process::id(), NETS.fetch_add(1, Ordering::Relaxed));
        let switch = format!("{prefix}-switch");
        let ip = ip_binary().expect("checked above");
        must(&ip, &["netns", "add", &switch]);
        let net = Self { prefix, switch, hosts: Vec::new() };
        must(&ip, &["-n", &net.switch, "link", "add", "br0", "type", "bridge"]);
        must(&ip, &["-n", &net.switch, "link", "set", "br0", "up"]);
        Some(net)
    }

    /// A new host on the switch, at the next address (10.0.0.2 and up).
    pub fn host(&mut self, name: &str) -> Host {
        let ip = ip_binary().expect("checked in new");
        let number = self.hosts.len() + 2;
        let ns = format!("{}-{name}", self.prefix);
        let address = Ipv4Addr::new(10, 0, 0, u8::try_from(number).expect("fewer than 250 hosts"));
        must(&ip, &["netns", "add", &ns]);
        let port = format!("p{number}");
        must(&ip, &["-n", &self.switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
        must(&ip, &["-n", &self.switch, "link", "set", &port, "master", "br0", "up"]);
        must(&ip, &["-n", &ns, "addr", "add", &format!("{address}/24"), "dev", "eth0"]);
        must(&ip, &["-n", &ns, "link", "set", "eth0", "up"]);
        must(&ip, &["-n", &ns, "link", "set", "lo", "up"]);
        let host = Host { ns, address };
        self.hosts.push(host.clone());
        host
    }

    /// Partitions `a` from `b`: every packet between them is dropped, both
    /// ways, and neither is told. Connections stay open on both sides.
    pub fn cut(&self, a: &Host, b: &Host) {
        self.cut_one_way(a, b);
        self.cut_one_way(b, a);
    }

    /// Ends the partition of `a` and `b`: their connections go on.
    pub fn heal(&self, a: &Host, b: &Host) {
        a.remove(&cut_table(b));
        b.remove(&cut_table(a));
    }

    /// Drops what `from` sends `to`, silently; the other way still works.
    pub fn cut_one_way(&self, to: &Host, from: &Host) {
        to.drop_from(&cut_table(from), from.address, "");
    }

    /// Ends [`Net::cut_one_way`].
    pub fn heal_one_way(&self, to: &Host, from: &Host) {
        to.remove(&cut_table(from));
    }

    /// Forgets the connections `client` now holds to `port` on `server`, as
    /// a NAT or a firewall that lost their state would: their packets are
    /// dropped both ways, silently, for good, while new connections pass.
    /// Returns how many were forgotten.
    pub fn forget_connections(&self, client: &Host, server: &Host, port: u16) -> usize {
        let ports = client.connections_to(server, port);
        for (n, local) in ports.iter().enumerate() {
            let table = format!("forget{n}_{local}");
            server.drop_from(&table, client.address, &format!("tcp sport {local}"));
            client.drop_from(&table, server.address, &format!("tcp dport {local}"));
        }
        ports.len()
    }

    /// Makes `address:port`, seen from `client`, a spread address: each new
    /// connection goes to the next of `backends`, in turn (what kube-proxy
    /// does for a Service, with the same nftables DNAT).
    pub fn spread(&self, client: &Host, address: Ipv4Addr, port: u16, backends: &[&Host]) {
        let map: Vec<String> = backends.iter().enumerate().map(|(n, host)| format!("{n} : {}", host.address)).collect();
        client.nft(&["add", "table", "ip", "spread"]);
        client.nft(&["add", "chain", "ip", "spread", "output", "{ type nat hook output priority -100; }"]);
        let rule = format!(
            "ip daddr {address} tcp dport {port} dnat to numgen inc mod {} map {{ {} }}",
            backends.len(),
            map.join(", ")
        );
        let mut args = vec!["add", "rule", "ip", "spread", "output"];
        args.extend(rule.split_whitespace());
        client.nft(&args);
    }
}

/// The name of the table that drops what comes from `from`.
fn cut_table(from: &Host) -> String {
    format!("cut_{}", from.address.octets()[3])
}

impl Drop for Net {
    fn drop(&mut self) {
        let Some(ip) = ip_binary() else { return };
        for ns in self.hosts.iter().map(|host| &host.ns).chain([&self.switch]) {
            let _ = Command::new(&ip).args(["netns", "delete", ns]).stderr(Stdio::null()).status();
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(ns));
        }
    }
}

/// Deletes the namespaces that test processes no longer running left
/// behind (a test killed before its `Net` was dropped).
fn sweep() {
    let Some(ip) = ip_binary() else { return };
    let Ok(output) = Command::new(&ip).args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(ns) = line.split_whitespace().next() else { continue };
        let Some(pid) = ns.strip_prefix("tn").and_then(|rest| rest.split('-').next()) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new(&ip).args(["netns", "delete", ns]).stderr(Stdio::null()).status();
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(ns));
        }
    }
}
