//! Ethernet ports (ethdev): configuration, queues, bursts, stats.
//!
//! Each rx or tx queue is polled by exactly one lcore: [`EthPort::configure`] returns one
//! [`RxQueue`] and one [`TxQueue`] handle per queue, and the handles are neither `Clone` nor
//! `Sync`, so the type system keeps a queue on one thread at a time.

use super::{strerror, EnvError, MbufBurst, Mempool};
use std::ffi::{CStr, CString};

// RSS hash functions (rte_ethdev.h RTE_ETH_RSS_*; macros bindgen does not export).
const RSS_IPV4: u64 = 1 << 2;
const RSS_FRAG_IPV4: u64 = 1 << 3;
const RSS_NONFRAG_IPV4_TCP: u64 = 1 << 4;
const RSS_NONFRAG_IPV4_UDP: u64 = 1 << 5;
const RSS_IPV6: u64 = 1 << 8;
const RSS_FRAG_IPV6: u64 = 1 << 9;
const RSS_NONFRAG_IPV6_TCP: u64 = 1 << 10;
const RSS_NONFRAG_IPV6_UDP: u64 = 1 << 11;
const RSS_WANTED: u64 = RSS_IPV4
    | RSS_FRAG_IPV4
    | RSS_NONFRAG_IPV4_TCP
    | RSS_NONFRAG_IPV4_UDP
    | RSS_IPV6
    | RSS_FRAG_IPV6
    | RSS_NONFRAG_IPV6_TCP
    | RSS_NONFRAG_IPV6_UDP;

/// How to set up a port.
#[derive(Clone, Debug)]
pub struct PortConfig {
    /// Number of rx queues (RSS spreads flows over them when > 1).
    pub rx_queues: u16,
    /// Number of tx queues (one per lcore that transmits on this port).
    pub tx_queues: u16,
    /// Rx descriptors per queue.
    pub rx_desc: u16,
    /// Tx descriptors per queue.
    pub tx_desc: u16,
    /// Put the port in promiscuous mode (needed for MAC-NAT: frames are addressed to VM MACs).
    pub promiscuous: bool,
}

impl Default for PortConfig {
    fn default() -> Self {
        PortConfig {
            rx_queues: 1,
            tx_queues: 1,
            rx_desc: 1024,
            tx_desc: 1024,
            promiscuous: true,
        }
    }
}

/// Link state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkStatus {
    /// Link up.
    pub up: bool,
    /// Speed in Mbit/s (0 if unknown).
    pub speed_mbps: u32,
}

/// Hardware/driver counters of a port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Received packets.
    pub ipackets: u64,
    /// Transmitted packets.
    pub opackets: u64,
    /// Received bytes.
    pub ibytes: u64,
    /// Transmitted bytes.
    pub obytes: u64,
    /// Packets dropped by the NIC (rx ring full).
    pub imissed: u64,
    /// Receive errors.
    pub ierrors: u64,
    /// Transmit errors.
    pub oerrors: u64,
    /// Rx mbuf allocation failures.
    pub rx_nombuf: u64,
}

/// An ethdev port, by id. Cheap to copy; queue access goes through [`RxQueue`]/[`TxQueue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthPort {
    id: u16,
}

fn port_err(port: u16, op: &'static str, rc: i32) -> EnvError {
    EnvError::Port {
        port,
        op,
        reason: strerror(rc),
    }
}

impl EthPort {
    /// Every available port, in id order.
    pub fn all() -> Vec<EthPort> {
        let mut out = Vec::new();
        let mut id = 0u16;
        loop {
            // SAFETY: rte_eth_find_next only reads the port table; returns RTE_MAX_ETHPORTS at the end.
            let next = unsafe { dpdk_sys::rte_eth_find_next(id) };
            if u32::from(next) >= dpdk_sys::RTE_MAX_ETHPORTS {
                break;
            }
            out.push(EthPort { id: next });
            id = next + 1;
        }
        out
    }

    /// The port with this id, if it exists.
    pub fn from_id(id: u16) -> Result<EthPort, EnvError> {
        // SAFETY: validity check on the port table.
        if unsafe { dpdk_sys::rte_eth_dev_is_valid_port(id) } == 1 {
            Ok(EthPort { id })
        } else {
            Err(EnvError::NoSuchPort(id.to_string()))
        }
    }

    /// The port with this device name (e.g. `net_null0`, `0000:01:00.0`).
    pub fn by_name(name: &str) -> Result<EthPort, EnvError> {
        let c = CString::new(name).map_err(|_| EnvError::BadArgument(name.into()))?;
        let mut id = 0u16;
        // SAFETY: c is a valid C string; id is a valid out-pointer.
        let rc = unsafe { dpdk_sys::rte_eth_dev_get_port_by_name(c.as_ptr(), &mut id) };
        if rc == 0 {
            Ok(EthPort { id })
        } else {
            Err(EnvError::NoSuchPort(name.into()))
        }
    }

    /// Port id.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Device name.
    pub fn name(&self) -> String {
        let mut buf = [0 as std::ffi::c_char; 64];
        // SAFETY: buf is RTE_ETH_NAME_MAX_LEN (64) bytes as the API requires.
        let rc = unsafe { dpdk_sys::rte_eth_dev_get_name_by_port(self.id, buf.as_mut_ptr()) };
        if rc != 0 {
            return format!("port{}", self.id);
        }
        // SAFETY: on success buf holds a NUL-terminated name.
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    fn info(&self) -> Result<dpdk_sys::rte_eth_dev_info, EnvError> {
        let mut info = dpdk_sys::rte_eth_dev_info::default();
        // SAFETY: info is a valid out-struct; the port exists.
        let rc = unsafe { dpdk_sys::rte_eth_dev_info_get(self.id, &mut info) };
        if rc != 0 {
            return Err(port_err(self.id, "dev_info_get", rc));
        }
        Ok(info)
    }

    /// Driver name (e.g. `net_null`).
    pub fn driver(&self) -> String {
        match self.info() {
            // SAFETY: driver_name is a static string owned by the PMD, or NULL.
            Ok(i) if !i.driver_name.is_null() => unsafe { CStr::from_ptr(i.driver_name) }
                .to_string_lossy()
                .into_owned(),
            _ => String::from("unknown"),
        }
    }

    /// Maximum (rx, tx) queues the driver supports.
    pub fn max_queues(&self) -> Result<(u16, u16), EnvError> {
        let i = self.info()?;
        Ok((i.max_rx_queues, i.max_tx_queues))
    }

    /// NUMA socket of the device (-1 when unknown, e.g. vdevs).
    pub fn socket(&self) -> i32 {
        // SAFETY: reads the port's numa node.
        unsafe { dpdk_sys::rte_eth_dev_socket_id(self.id) }
    }

    /// Configures queues (with RSS over IP/TCP/UDP when more than one rx queue and the driver
    /// supports it) and returns one handle per rx and tx queue. Call before [`EthPort::start`].
    pub fn configure(
        &self,
        cfg: &PortConfig,
        pool: Mempool,
    ) -> Result<(Vec<RxQueue>, Vec<TxQueue>), EnvError> {
        let info = self.info()?;
        if cfg.rx_queues == 0
            || cfg.rx_queues > info.max_rx_queues
            || cfg.tx_queues == 0
            || cfg.tx_queues > info.max_tx_queues
        {
            return Err(EnvError::Port {
                port: self.id,
                op: "configure",
                reason: format!(
                    "asked for {} rx / {} tx queues; driver {} supports 1..={} rx / 1..={} tx",
                    cfg.rx_queues,
                    cfg.tx_queues,
                    self.driver(),
                    info.max_rx_queues,
                    info.max_tx_queues
                ),
            });
        }
        let mut conf = dpdk_sys::rte_eth_conf::default();
        let rss_hf = RSS_WANTED & info.flow_type_rss_offloads;
        if cfg.rx_queues > 1 && rss_hf != 0 {
            conf.rxmode.mq_mode = dpdk_sys::RTE_ETH_MQ_RX_RSS;
            conf.rx_adv_conf.rss_conf.rss_hf = rss_hf;
        }
        // SAFETY: conf is fully initialised (zeroed defaults); the port exists and is stopped.
        let rc = unsafe {
            dpdk_sys::rte_eth_dev_configure(self.id, cfg.rx_queues, cfg.tx_queues, &conf)
        };
        if rc != 0 {
            return Err(port_err(self.id, "configure", rc));
        }
        let socket = match self.socket() {
            s if s < 0 => 0,
            s => s as u32,
        };
        let mut rxq = Vec::new();
        for q in 0..cfg.rx_queues {
            // SAFETY: NULL rx_conf selects the driver default; the pool lives for the process.
            let rc = unsafe {
                dpdk_sys::rte_eth_rx_queue_setup(
                    self.id,
                    q,
                    cfg.rx_desc,
                    socket,
                    std::ptr::null(),
                    pool.as_ptr(),
                )
            };
            if rc != 0 {
                return Err(port_err(self.id, "rx_queue_setup", rc));
            }
            rxq.push(RxQueue {
                port: self.id,
                queue: q,
                _not_sync: std::marker::PhantomData,
            });
        }
        let mut txq = Vec::new();
        for q in 0..cfg.tx_queues {
            // SAFETY: NULL tx_conf selects the driver default.
            let rc = unsafe {
                dpdk_sys::rte_eth_tx_queue_setup(self.id, q, cfg.tx_desc, socket, std::ptr::null())
            };
            if rc != 0 {
                return Err(port_err(self.id, "tx_queue_setup", rc));
            }
            txq.push(TxQueue {
                port: self.id,
                queue: q,
                _not_sync: std::marker::PhantomData,
            });
        }
        if cfg.promiscuous {
            // SAFETY: port configured. Failure is not fatal (some vdevs have no such mode).
            let _ = unsafe { dpdk_sys::rte_eth_promiscuous_enable(self.id) };
        }
        Ok((rxq, txq))
    }

    /// Starts the port.
    pub fn start(&self) -> Result<(), EnvError> {
        // SAFETY: port configured with queues set up.
        let rc = unsafe { dpdk_sys::rte_eth_dev_start(self.id) };
        if rc != 0 {
            return Err(port_err(self.id, "start", rc));
        }
        Ok(())
    }

    /// Stops the port (queues must no longer be polled).
    pub fn stop(&self) -> Result<(), EnvError> {
        // SAFETY: the port exists; callers join the polling lcores first.
        let rc = unsafe { dpdk_sys::rte_eth_dev_stop(self.id) };
        if rc != 0 {
            return Err(port_err(self.id, "stop", rc));
        }
        Ok(())
    }

    /// The port's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        let mut a = dpdk_sys::rte_ether_addr::default();
        // SAFETY: a is a valid out-struct.
        let _ = unsafe { dpdk_sys::rte_eth_macaddr_get(self.id, &mut a) };
        a.addr_bytes
    }

    /// Link status without waiting.
    pub fn link(&self) -> LinkStatus {
        let mut l = dpdk_sys::rte_eth_link::default();
        // SAFETY: l is a valid out-struct.
        let rc = unsafe { dpdk_sys::rte_eth_link_get_nowait(self.id, &mut l) };
        if rc != 0 {
            return LinkStatus {
                up: false,
                speed_mbps: 0,
            };
        }
        LinkStatus {
            up: l.link_status() != 0,
            speed_mbps: l.link_speed,
        }
    }

    /// Driver counters.
    pub fn stats(&self) -> Result<PortStats, EnvError> {
        let mut s = dpdk_sys::rte_eth_stats::default();
        // SAFETY: s is a valid out-struct.
        let rc = unsafe { dpdk_sys::rte_eth_stats_get(self.id, &mut s) };
        if rc != 0 {
            return Err(port_err(self.id, "stats_get", rc));
        }
        Ok(PortStats {
            ipackets: s.ipackets,
            opackets: s.opackets,
            ibytes: s.ibytes,
            obytes: s.obytes,
            imissed: s.imissed,
            ierrors: s.ierrors,
            oerrors: s.oerrors,
            rx_nombuf: s.rx_nombuf,
        })
    }
}

/// The right to poll one rx queue. Owned by one lcore.
pub struct RxQueue {
    port: u16,
    queue: u16,
    _not_sync: std::marker::PhantomData<std::cell::Cell<()>>,
}

/// The right to transmit on one tx queue. Owned by one lcore.
pub struct TxQueue {
    port: u16,
    queue: u16,
    _not_sync: std::marker::PhantomData<std::cell::Cell<()>>,
}

impl RxQueue {
    /// Port id.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// Queue id.
    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// Receives up to the burst's free space; returns how many arrived. They are owned by `burst`.
    #[inline]
    pub fn rx_burst(&mut self, burst: &mut MbufBurst) -> usize {
        let (p, room) = burst.spare_raw();
        if room == 0 {
            return 0;
        }
        let n =
            // SAFETY: `p` points at `room` writable slots of the burst; this handle is the only poller
            // of (port, queue). The driver writes owned mbuf pointers into the first n slots.
            unsafe { dpdk_sys::hp_eth_rx_burst(self.port, self.queue, p, room as u16) } as usize;
        // SAFETY: the driver filled exactly n slots with owned, valid mbufs.
        unsafe { burst.commit_filled(n) };
        n
    }
}

impl TxQueue {
    /// Port id.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// Queue id.
    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// Transmits the burst's mbufs. The driver takes the first `n` (returned); the rest stay in
    /// `burst`, still owned by the caller, who must retry or drop them.
    #[inline]
    pub fn tx_burst(&mut self, burst: &mut MbufBurst) -> usize {
        let (p, n) = burst.live_raw();
        if n == 0 {
            return 0;
        }
        let sent =
            // SAFETY: `p` points at n owned mbufs; this handle is the only user of (port, queue).
            unsafe { dpdk_sys::hp_eth_tx_burst(self.port, self.queue, p, n as u16) } as usize;
        // SAFETY: the driver now owns the first `sent` mbufs and will free them after transmit.
        unsafe { burst.forget_front(sent) };
        sent
    }
}

// RxQueue/TxQueue are Send (moved to their polling lcore) but not Sync: PhantomData<Cell<()>>.
