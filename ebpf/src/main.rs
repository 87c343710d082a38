//! fae's XDP program: IPv4 TCP packets addressed to one of faed's RPC ports go to the AF_XDP socket of the
//! packet's RX queue; everything else (ARP, ICMP, other ports, IPv6, fragments, malformed frames) goes on to
//! the kernel. Per-CPU counters tell faed what happened to each packet.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray, XskMap},
    programs::XdpContext,
};

/// AF_XDP sockets by RX queue index; faed inserts one per queue it serves.
#[map]
static XSKS: XskMap = XskMap::with_max_entries(64, 0);

/// RPC ports (host byte order) whose packets are redirected; faed fills it at load.
#[map]
static PORTS: HashMap<u16, u8> = HashMap::with_max_entries(16, 0);

/// Counters, indexed as below; faed sums the per-CPU values.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(4, 0);

const REDIRECTED: u32 = 0;
const PASSED: u32 = 1;
const NO_SOCKET: u32 = 2;
const MALFORMED: u32 = 3;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;

#[inline(always)]
fn count(which: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(which) {
        // SAFETY: a per-CPU slot, written only by this CPU while this program runs on it.
        unsafe { *c += 1 };
    }
}

/// A pointer to a `T` at `offset`, if the packet holds all of it. (Checking the end of the value, not its
/// first byte: for one-byte reads LLVM turns `p + 1 > end` into `p >= end`, which the verifier does not
/// accept as a bound when `offset` is variable.)
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
fn byte(ctx: &XdpContext, offset: usize) -> Option<u8> {
    // SAFETY: ptr_at checked the bounds (the verifier checks them again).
    Some(unsafe { *ptr_at::<u8>(ctx, offset)? })
}

#[inline(always)]
fn be16(ctx: &XdpContext, offset: usize) -> Option<u16> {
    // SAFETY: as above.
    Some(u16::from_be_bytes(unsafe {
        *ptr_at::<[u8; 2]>(ctx, offset)?
    }))
}

enum Verdict {
    Steer,
    Pass,
    Malformed,
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> Verdict {
    let Some(ethertype) = be16(ctx, 12) else {
        return Verdict::Malformed;
    };
    if ethertype != ETH_P_IP {
        return Verdict::Pass;
    }
    let Some(vihl) = byte(ctx, ETH_HLEN) else {
        return Verdict::Malformed;
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Verdict::Malformed;
    }
    let Some(proto) = byte(ctx, ETH_HLEN + 9) else {
        return Verdict::Malformed;
    };
    if proto != IPPROTO_TCP {
        return Verdict::Pass;
    }
    // A fragment (more fragments set, or a non-zero offset) goes to the kernel, which reassembles.
    let Some(frag) = be16(ctx, ETH_HLEN + 6) else {
        return Verdict::Malformed;
    };
    if frag & 0x3fff != 0 {
        return Verdict::Pass;
    }
    let Some(dport) = be16(ctx, ETH_HLEN + ihl + 2) else {
        return Verdict::Malformed;
    };
    // SAFETY: a read-only lookup; the value is not kept.
    if unsafe { PORTS.get(&dport) }.is_some() {
        Verdict::Steer
    } else {
        Verdict::Pass
    }
}

#[xdp]
pub fn fae_xdp(ctx: XdpContext) -> u32 {
    match classify(&ctx) {
        Verdict::Pass => {
            count(PASSED);
            xdp_action::XDP_PASS
        }
        Verdict::Malformed => {
            count(MALFORMED);
            xdp_action::XDP_PASS
        }
        Verdict::Steer => {
            // SAFETY: ctx.ctx points at the kernel's xdp_md for this packet.
            let queue = unsafe { (*ctx.ctx).rx_queue_index };
            if XSKS.get(queue).is_none() {
                count(NO_SOCKET);
                return xdp_action::XDP_PASS;
            }
            match XSKS.redirect(queue, u64::from(xdp_action::XDP_PASS)) {
                Ok(action) => {
                    count(REDIRECTED);
                    action
                }
                Err(action) => {
                    count(NO_SOCKET);
                    action
                }
            }
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
