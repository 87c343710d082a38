//! Facts about a network interface, from the kernel: its MAC address, IPv4 address and prefix, MTU, RX
//! queue count, and the IPv4 neighbours it has resolved.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use crate::NetError;

fn read(iface: &str, file: &str) -> Result<String, NetError> {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/{file}"))
        .map(|s| s.trim().to_owned())
        .map_err(|e| NetError::Interface(iface.into(), format!("cannot read {file}: {e}")))
}

/// The interface's MAC address.
pub fn mac(iface: &str) -> Result<[u8; 6], NetError> {
    let text = read(iface, "address")?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(NetError::Interface(
            iface.into(),
            format!("unusable MAC address {text:?}"),
        ));
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| {
            NetError::Interface(iface.into(), format!("unusable MAC address {text:?}"))
        })?;
    }
    Ok(mac)
}

pub fn mtu(iface: &str) -> Result<usize, NetError> {
    read(iface, "mtu")?
        .parse()
        .map_err(|_| NetError::Interface(iface.into(), "unreadable MTU".into()))
}

/// RX queues the interface has (each can carry one AF_XDP socket).
pub fn rx_queues(iface: &str) -> Result<u32, NetError> {
    let dir = format!("/sys/class/net/{iface}/queues");
    let n = std::fs::read_dir(&dir)
        .map_err(|e| NetError::Interface(iface.into(), format!("cannot list {dir}: {e}")))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
        .count();
    Ok(n.max(1) as u32)
}

/// The interface's first IPv4 address and its prefix length.
pub fn ipv4(iface: &str) -> Result<(Ipv4Addr, u8), NetError> {
    let mut found = None;
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `addrs` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut cur = addrs;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        // SAFETY: ifa_addr is non-null and points at a sockaddr whose family we check before casting.
        let family = unsafe { (*ifa.ifa_addr).sa_family };
        if name.to_bytes() != iface.as_bytes() || i32::from(family) != libc::AF_INET {
            continue;
        }
        // SAFETY: both are AF_INET sockaddrs (family checked; the netmask has the address's family).
        let (addr, mask) = unsafe {
            (
                *(ifa.ifa_addr as *const libc::sockaddr_in),
                *(ifa.ifa_netmask as *const libc::sockaddr_in),
            )
        };
        let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        let prefix = u32::from_be(mask.sin_addr.s_addr).count_ones() as u8;
        found = Some((ip, prefix));
        break;
    }
    // SAFETY: the list came from getifaddrs and is not used after this.
    unsafe { libc::freeifaddrs(addrs) };
    found.ok_or_else(|| NetError::Interface(iface.into(), "has no IPv4 address".into()))
}

/// The kernel's resolved IPv4 neighbours on `iface` (from /proc/net/arp).
pub fn neighbours(iface: &str) -> HashMap<Ipv4Addr, [u8; 6]> {
    let text = std::fs::read_to_string("/proc/net/arp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // IP address, HW type, Flags, HW address, Mask, Device; flags 0x2 = complete.
            if f.len() < 6 || f[5] != iface || f[2] == "0x0" {
                return None;
            }
            let ip: Ipv4Addr = f[0].parse().ok()?;
            let mut mac = [0u8; 6];
            for (m, p) in mac.iter_mut().zip(f[3].split(':')) {
                *m = u8::from_str_radix(p, 16).ok()?;
            }
            Some((ip, mac))
        })
        .collect()
}
