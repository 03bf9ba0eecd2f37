//! Command-line interface (clap).

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// hostplane: kernel-bypass host dataplane on DPDK (MAC-NAT networking, vhost-user-blk storage).
#[derive(Parser, Debug)]
#[command(name = "hostplane", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the dataplane. Without --config: the ports given as --vdev after `--` (first = uplink),
    /// or else the embedded default (two net_pcap ports replaying generated VM/uplink traffic).
    Run(RunArgs),
    /// Benchmarks that print a ratio against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Call a JSON-RPC method on a running hostplane: `rpc macnat_list --limit 10`.
    Rpc(RpcArgs),
    /// Online disk conversion: start/status/pause/resume in a running hostplane, or offline.
    #[command(subcommand)]
    Convert(ConvertCommand),
    /// Print hostplane's and DPDK's versions.
    Version,
}

/// `hostplane convert ...`.
#[derive(Subcommand, Debug)]
pub enum ConvertCommand {
    /// `bdev_convert_start` on a running hostplane, then show progress (unless --no-wait).
    Start(ConvertStartArgs),
    /// `bdev_convert_status` (all conversions, or --name); --watch shows a progress bar.
    Status(ConvertNameArgs),
    /// `bdev_convert_pause`: stop the background converter (VM-triggered copies continue).
    Pause(ConvertNameArgs),
    /// `bdev_convert_resume`.
    Resume(ConvertNameArgs),
    /// Convert without a running hostplane (own reactor thread, same code); resumes from the map.
    Offline(ConvertOfflineArgs),
}

/// What to convert (the `bdev_convert_start` parameters).
#[derive(Args, Debug, Clone)]
pub struct ConvertSpecArgs {
    /// Name of the convert bdev.
    #[arg(long, default_value = "convert0")]
    pub name: String,
    /// Source image (opened read-only).
    #[arg(long, value_name = "FILE")]
    pub source: PathBuf,
    /// Source format: raw, qcow2, vmdk.
    #[arg(long, value_name = "FMT")]
    pub source_format: String,
    /// Target raw file (the map goes to FILE.convmap).
    #[arg(long, value_name = "FILE")]
    pub target: PathBuf,
    /// Bytes per grain.
    #[arg(long, default_value_t = 65536)]
    pub grain_size: u64,
    /// Background rate limit, MiB/s (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    pub rate_mib: u64,
    /// Target block size.
    #[arg(long, default_value_t = 512)]
    pub block_size: u32,
    /// Buffered target IO instead of O_DIRECT.
    #[arg(long)]
    pub no_direct: bool,
}

/// `hostplane convert start`.
#[derive(Args, Debug)]
pub struct ConvertStartArgs {
    /// Control socket.
    #[arg(short = 's', long = "socket", value_name = "SOCK", env = "HOSTPLANE_RPC_SOCKET", default_value = crate::control::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// What to convert.
    #[command(flatten)]
    pub spec: ConvertSpecArgs,
    /// Reactor that owns the conversion.
    #[arg(long, default_value_t = 0)]
    pub reactor: u32,
    /// Return after starting instead of showing progress until done.
    #[arg(long)]
    pub no_wait: bool,
}

/// `hostplane convert status|pause|resume`.
#[derive(Args, Debug)]
pub struct ConvertNameArgs {
    /// Control socket.
    #[arg(short = 's', long = "socket", value_name = "SOCK", env = "HOSTPLANE_RPC_SOCKET", default_value = crate::control::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Conversion name (status: all when absent).
    #[arg(long)]
    pub name: Option<String>,
    /// status: show a progress bar until done.
    #[arg(long)]
    pub watch: bool,
}

/// `hostplane convert offline`.
#[derive(Args, Debug)]
pub struct ConvertOfflineArgs {
    /// What to convert.
    #[command(flatten)]
    pub spec: ConvertSpecArgs,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Test aid: also run a host-side pattern writer through the convert bdev, logging each
    /// write's intent before submitting it and its acknowledgement after ("I seq off len",
    /// "A seq") to this file; a restarted run continues the sequence.
    #[arg(long, value_name = "FILE")]
    pub writer_log: Option<PathBuf>,
    /// Pattern writer: writes in flight.
    #[arg(long, default_value_t = 4)]
    pub writer_qd: usize,
    /// Pattern writer: stop after this many writes in total (across restarts).
    #[arg(long, default_value_t = 1000)]
    pub writer_ops: u64,
}

/// Lcore and EAL options shared by `run` and `bench`.
#[derive(Args, Debug, Clone, Default)]
pub struct EalArgs {
    /// Lcores to use, as EAL's -l: `0-3,5`. The main lcore prints stats; the others poll ports.
    #[arg(
        short = 'l',
        long = "lcore-list",
        value_name = "LIST",
        conflicts_with = "lcores"
    )]
    pub lcore_list: Option<String>,
    /// Lcore-to-CPU map, as EAL's --lcores: `(0-3)@0,4@1`.
    #[arg(long, value_name = "MAP")]
    pub lcores: Option<String>,
    /// The main lcore (default: the first lcore).
    #[arg(long, value_name = "N")]
    pub main_lcore: Option<u32>,
    /// Extra EAL arguments after `--`, as testpmd takes them: `-- --no-huge --vdev net_null0`.
    #[arg(last = true, value_name = "EAL ARGS")]
    pub eal: Vec<String>,
}

/// `hostplane run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Config file (TOML; see docs/config.md).
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Stop after S seconds (default: run until SIGINT/SIGTERM).
    #[arg(long, value_name = "S")]
    pub duration: Option<f64>,
    /// JSON-RPC socket (mode 0600). Another live hostplane on it is an error; a stale one is removed.
    #[arg(short = 'r', long, value_name = "PATH", env = "HOSTPLANE_RPC_SOCKET", default_value = crate::control::DEFAULT_SOCKET)]
    pub rpc_socket: PathBuf,
    /// Replay a saved config (SPDK save_config format) at startup. Its macnat subsystem
    /// replaces the [[macnat]] entries of --config.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Print counters every S seconds (0 = only the summary at exit).
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    pub stats_interval: f64,
    /// Directory of the vhost-user-blk controller sockets (`<DIR>/<ctrlr>`), like SPDK's -S.
    #[arg(long, value_name = "DIR", env = "HOSTPLANE_VHOST_DIR", default_value = crate::storage::vhost::service::DEFAULT_VHOST_DIR)]
    pub vhost_dir: PathBuf,
    /// Take over from the running hostplane listening on this handover socket (process hot
    /// upgrade): its vhost-user connections, guest memory, rings and RPC socket move here without
    /// a guest-visible disconnect; it exits. Give this process its own EAL `--file-prefix`.
    #[arg(long, value_name = "SOCK")]
    pub takeover: Option<PathBuf>,
    /// Where this process waits for a successor (`--takeover`). Default: the RPC socket path
    /// with `.handover` appended.
    #[arg(long, value_name = "SOCK")]
    pub handover_socket: Option<PathBuf>,
    /// Lcores and EAL arguments.
    #[command(flatten)]
    pub eal: EalArgs,
}

/// `hostplane rpc`.
#[derive(Args, Debug)]
pub struct RpcArgs {
    /// Control socket.
    #[arg(short = 's', long = "socket", value_name = "SOCK", env = "HOSTPLANE_RPC_SOCKET", default_value = crate::control::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Seconds to wait for the answer.
    #[arg(
        short = 't',
        long = "timeout",
        value_name = "S",
        default_value_t = 60.0
    )]
    pub timeout: f64,
    /// Send this request (or batch) as is: `--json '{"method":"macnat_list","params":{"limit":5}}'`.
    #[arg(long, value_name = "JSON", conflicts_with = "method")]
    pub json: Option<String>,
    /// Method name.
    pub method: Option<String>,
    /// Params as `--name value` pairs (`-` in names becomes `_`; JSON values are parsed).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "--NAME VALUE"
    )]
    pub params: Vec<String>,
}

/// `hostplane bench ...`.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// MAC-NAT vs plain MAC swap on net_null, 64 B IPv4 frames, at 1 k and 1 M entries.
    Macnat(BenchMacnatArgs),
    /// bdevperf-like: keep --qd IOs in flight per reactor on a bdev; optionally compare with fio.
    Bdev(BenchBdevArgs),
    /// QoS on the IO path, real clock, malloc bdevs: limits achieved, weighted shares, overhead.
    Qos(BenchQosArgs),
}

/// `hostplane bench qos`.
#[derive(Args, Debug)]
pub struct BenchQosArgs {
    /// Seconds per measurement (the overhead runs use at most 5).
    #[arg(long, default_value_t = 10.0)]
    pub time: f64,
    /// IOs in flight per disk.
    #[arg(long, default_value_t = 32)]
    pub qd: usize,
    /// Capacity of the shared device in the weights test (IOPS).
    #[arg(long, default_value_t = 40_000)]
    pub device_iops: u64,
    /// Run the reactor on a plain thread instead of an EAL lcore.
    #[arg(long)]
    pub threads: bool,
    /// Extra EAL arguments after `--`.
    #[arg(last = true, value_name = "EAL ARGS")]
    pub eal: Vec<String>,
}

/// `hostplane bench bdev`.
#[derive(Args, Debug)]
pub struct BenchBdevArgs {
    /// The bdev: `TYPE:key=value,...`, e.g. `malloc:size_mib=1024` or
    /// `file:path=/var/tmp/b.img,size_mib=1024` (see docs/storage.md for each type's keys).
    #[arg(long, value_name = "SPEC", conflicts_with = "config")]
    pub bdev: Option<String>,
    /// Take the bdev from a config file's [[vm]] disks (with --disk VM/DISK).
    #[arg(long, value_name = "FILE", requires = "disk")]
    pub config: Option<PathBuf>,
    /// The disk, as VM/DISK.
    #[arg(long, value_name = "VM/DISK")]
    pub disk: Option<String>,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "randread")]
    pub rw: crate::storage::bdevperf::Pattern,
    /// Bytes per IO.
    #[arg(long, default_value_t = 4096)]
    pub bs: u64,
    /// IOs in flight per reactor.
    #[arg(long, default_value_t = 32)]
    pub qd: usize,
    /// Seconds.
    #[arg(long, default_value_t = 5.0)]
    pub time: f64,
    /// Reactors (one job each).
    #[arg(long, default_value_t = 1)]
    pub reactors: usize,
    /// Run reactors on plain threads instead of EAL lcores.
    #[arg(long)]
    pub threads: bool,
    /// Then run `fio --ioengine=io_uring` on the same file (file bdevs) and print the ratio.
    #[arg(long)]
    pub fio: bool,
    /// Then run `rbd bench` on the same image, same io size/depth/pattern (rbd bdevs) and print
    /// the ratio.
    #[arg(long)]
    pub rbd_bench: bool,
    /// Reactors sleep this long after 1000 idle polls (0 = spin, as on a dedicated core). Use it
    /// when the reactor shares its CPUs with the storage system (a local Ceph cluster).
    #[arg(long, default_value_t = 0)]
    pub idle_sleep_us: u64,
    /// Extra EAL arguments after `--`.
    #[arg(last = true, value_name = "EAL ARGS")]
    pub eal: Vec<String>,
}

/// `hostplane bench macnat`.
#[derive(Args, Debug)]
pub struct BenchMacnatArgs {
    /// Seconds of the one-lcore comparison (and of each lcore count with --scaling).
    #[arg(long, default_value_t = 5.0)]
    pub time: f64,
    /// Bursts per slice: on one lcore the swap and MAC-NAT alternate every this many bursts, so
    /// that a noisy neighbour hits both halves of a pair alike.
    #[arg(long, default_value_t = 2048)]
    pub slice: u64,
    /// With --scaling: rounds of separate runs of each mode on 1 and on 2 lcores.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Table sizes to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1_000usize, 1_000_000])]
    pub entries: Vec<usize>,
    /// Also measure with two worker lcores.
    #[arg(long)]
    pub scaling: bool,
    /// Lcores and EAL arguments.
    #[command(flatten)]
    pub eal: EalArgs,
}
