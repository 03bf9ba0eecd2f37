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
    /// Print hostplane's and DPDK's versions.
    Version,
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
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    pub time: f64,
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
