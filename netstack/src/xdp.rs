//! Loading fae's XDP program, attaching it to an interface, and talking to its maps.

use crate::NetError;

/// The XDP program, built from ../ebpf by build.rs (absent when the eBPF toolchain was missing).
#[cfg(not(fae_no_ebpf))]
static PROGRAM: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/fae-xdp"
)));
#[cfg(fae_no_ebpf)]
static PROGRAM: Option<&[u8]> = None;

/// Why this build has no XDP program, if it has none.
pub fn missing_program() -> Option<&'static str> {
    #[cfg(fae_no_ebpf)]
    return Some(env!("FAE_NO_EBPF_REASON"));
    #[cfg(not(fae_no_ebpf))]
    None
}

/// How to attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// Let the kernel choose (native where the driver supports it).
    Auto,
    Native,
    Generic,
}

/// What the program counted, summed over CPUs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct XdpCounters {
    pub redirected: u64,
    pub passed: u64,
    pub no_socket: u64,
    pub malformed: u64,
}

/// The loaded and attached program. Dropping it detaches it; so does the process exiting, even by
/// SIGKILL, because it is attached through a BPF link owned by this process's file descriptor.
pub struct XdpProgram {
    ebpf: aya::Ebpf,
    pub iface: String,
}

fn program_error(what: &str, e: impl std::fmt::Display) -> NetError {
    NetError::Program(format!("{what}: {e}"))
}

impl XdpProgram {
    /// Loads the program, sets its RPC ports and attaches it to `iface`.
    pub fn attach(iface: &str, ports: &[u16], mode: AttachMode) -> Result<XdpProgram, NetError> {
        let bytes =
            PROGRAM.ok_or_else(|| NetError::NoProgram(missing_program().unwrap_or("unknown")))?;
        let mut ebpf =
            aya::Ebpf::load(bytes).map_err(|e| program_error("loading the eBPF object", e))?;
        {
            let map = ebpf
                .map_mut("PORTS")
                .ok_or_else(|| program_error("map PORTS", "missing"))?;
            let mut map: aya::maps::HashMap<_, u16, u8> =
                aya::maps::HashMap::try_from(map).map_err(|e| program_error("map PORTS", e))?;
            for p in ports {
                map.insert(p, 1, 0)
                    .map_err(|e| program_error("map PORTS", e))?;
            }
        }
        let prog: &mut aya::programs::Xdp = ebpf
            .program_mut("fae_xdp")
            .ok_or_else(|| program_error("program fae_xdp", "missing"))?
            .try_into()
            .map_err(|e| program_error("program fae_xdp", e))?;
        prog.load().map_err(|e| program_error("verifier", e))?;
        let aya_mode = match mode {
            AttachMode::Auto => aya::programs::XdpMode::Default,
            AttachMode::Native => aya::programs::XdpMode::Driver,
            AttachMode::Generic => aya::programs::XdpMode::Skb,
        };
        prog.attach(iface, aya_mode).map_err(|e| {
            let hint = if e.to_string().contains("busy") || e.to_string().contains("EBUSY") {
                format!(
                    " ({iface} already has an XDP program attached by something else; fae's own detach \
                     when faed exits. Remove it with `ip link set dev {iface} xdp off`)"
                )
            } else {
                String::new()
            };
            program_error(&format!("attaching to {iface}{hint}"), e)
        })?;
        Ok(XdpProgram {
            ebpf,
            iface: iface.to_owned(),
        })
    }

    /// Steers queue `queue`'s RPC packets to the AF_XDP socket `fd`.
    pub fn register(&mut self, queue: u32, fd: i32) -> Result<(), NetError> {
        let map = self
            .ebpf
            .map_mut("XSKS")
            .ok_or_else(|| program_error("map XSKS", "missing"))?;
        let mut xsks =
            aya::maps::XskMap::try_from(map).map_err(|e| program_error("map XSKS", e))?;
        struct Raw(i32);
        impl std::os::fd::AsRawFd for Raw {
            fn as_raw_fd(&self) -> i32 {
                self.0
            }
        }
        xsks.set(queue, Raw(fd), 0)
            .map_err(|e| program_error(&format!("XSKS[{queue}]"), e))
    }

    pub fn counters(&self) -> Result<XdpCounters, NetError> {
        let map = self
            .ebpf
            .map("COUNTERS")
            .ok_or_else(|| program_error("map COUNTERS", "missing"))?;
        let arr: aya::maps::PerCpuArray<_, u64> =
            aya::maps::PerCpuArray::try_from(map).map_err(|e| program_error("map COUNTERS", e))?;
        let sum = |i: u32| -> u64 { arr.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0) };
        Ok(XdpCounters {
            redirected: sum(0),
            passed: sum(1),
            no_socket: sum(2),
            malformed: sum(3),
        })
    }
}
