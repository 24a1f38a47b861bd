//! Host TAP interfaces for network tests: created with a host address, deleted on drop.

use std::process::Command;

/// A TAP interface created for a test, up, with a host address; deleted on drop.
pub struct Tap {
    pub name: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

impl Tap {
    /// Creates TAP `name` (replacing a stale one) with address `host_cidr`, e.g. "10.0.0.1/24".
    /// None when the host cannot (not root, no /dev/net/tun, no `ip`).
    pub fn new(name: &str, host_cidr: &str) -> Option<Tap> {
        let _ = Command::new("ip").args(["link", "del", name]).output();
        // Another interface in the same subnet (a TAP some other run left behind) would get
        // the guest's replies: say so rather than fail mysteriously.
        let addr = host_cidr.split('/').next().unwrap_or(host_cidr);
        let prefix = &addr[..addr.rfind('.').unwrap_or(0) + 1];
        if let Ok(out) = Command::new("ip").args(["-o", "-4", "addr"]).output() {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(l) = text.lines().find(|l| l.contains(&format!("inet {prefix}"))) {
                panic!(
                    "another host interface is in {prefix}0/24 and would take the test's traffic: {l}"
                );
            }
        }
        if !ip(&["tuntap", "add", "dev", name, "mode", "tap"]) {
            return None;
        }
        let t = Tap { name: name.into() };
        (ip(&["addr", "add", host_cidr, "dev", name]) && ip(&["link", "set", name, "up"]))
            .then_some(t)
    }

    /// A TAP name unique to this test process: `prefix` + pid (at most 15 characters).
    pub fn unique_name(prefix: &str) -> String {
        format!("{prefix}{}", std::process::id() % 100_000)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .output();
    }
}

/// A TCP echo server on `addr` (one read, echoed back, per connection), in a thread.
pub fn echo_server(addr: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(addr)?;
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 256];
            if let Ok(n) = s.read(&mut buf) {
                let _ = s.write_all(&buf[..n]);
            }
        }
    });
    Ok(())
}
