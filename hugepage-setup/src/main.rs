//! hugepage-setup: reserve hugepages and mount hugetlbfs for hostplane (DPDK).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use hugepage_setup::mounts::{self, MountAction};
use hugepage_setup::pool::Scope;
use hugepage_setup::units::{parse_memory, PageSize};
use hugepage_setup::{status, ConfigRequest, Error, Root};

#[derive(Parser)]
#[command(
    version,
    about = "Reserve hugepages and mount hugetlbfs for hostplane (DPDK)"
)]
struct Cli {
    /// Prefix every /sys and /proc path with DIR (a fake tree, for tests). With a fake root
    /// nothing is mounted: mounting appends a line to DIR/proc/mounts instead.
    #[arg(long, global = true, env = "HUGEPAGE_SETUP_ROOT", value_name = "DIR")]
    root: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reserve hugepages (globally or on one NUMA node) and mount hugetlbfs if needed
    Config(ConfigArgs),
    /// Release hugepages (all sizes unless --size), refusing while any are in use
    Reset(ResetArgs),
    /// Show pools, hugetlbfs mounts and the processes holding hugepage files
    Status {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("amount").required(true).args(["pages", "memory"])))]
struct ConfigArgs {
    /// Page size, e.g. 2M or 1G [default: the kernel's default hugepage size]
    #[arg(long, value_parser = str::parse::<PageSize>)]
    size: Option<PageSize>,
    /// Number of pages to reserve
    #[arg(long)]
    pages: Option<u64>,
    /// Memory to reserve, e.g. 512M or 2G; rounded up to whole pages
    #[arg(long, value_parser = parse_memory, value_name = "SIZE")]
    memory: Option<u64>,
    /// Reserve on this NUMA node only
    #[arg(long)]
    node: Option<u32>,
    /// Mount point when hugetlbfs for the size is not mounted yet
    /// [default: /dev/hugepages, or /dev/hugepages-<SIZE> for a non-default size]
    #[arg(long, value_name = "DIR", conflicts_with = "no_mount")]
    mount: Option<String>,
    /// Do not mount hugetlbfs
    #[arg(long)]
    no_mount: bool,
}

#[derive(Args)]
struct ResetArgs {
    /// Page size, e.g. 2M or 1G [default: every size]
    #[arg(long, value_parser = str::parse::<PageSize>)]
    size: Option<PageSize>,
    /// Release on this NUMA node only
    #[arg(long)]
    node: Option<u32>,
    /// Also unmount the hugetlbfs mounts of the size once no page of it is reserved anywhere
    #[arg(long)]
    unmount: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = Root::new(cli.root);
    match run(&root, cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hugepage-setup: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(root: &Root, command: Command) -> Result<(), Error> {
    match command {
        Command::Config(args) => config(root, args),
        Command::Reset(args) => reset(root, args),
        Command::Status { json } => {
            let status = status::gather(root)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{status}");
            }
            Ok(())
        }
    }
}

fn config(root: &Root, args: ConfigArgs) -> Result<(), Error> {
    let size = match args.size {
        Some(size) => size,
        None => mounts::default_page_size(root)?.ok_or_else(|| Error::NoDefaultSize {
            path: root.path("/proc/meminfo"),
        })?,
    };
    // clap makes exactly one of --pages and --memory present.
    let pages = match args.memory {
        Some(bytes) => size.pages_for(bytes),
        None => args.pages.unwrap_or_default(),
    };
    let req = ConfigRequest {
        size,
        scope: args.node.map_or(Scope::Global, Scope::Node),
        pages,
        mount: (!args.no_mount).then_some(args.mount),
    };
    let outcome = hugepage_setup::config(root, &req)?;
    println!(
        "{size} hugepages {}: {} -> {} (requested {pages})",
        req.scope, outcome.before.total, outcome.after.total
    );
    let fake = if root.is_fake() {
        " (fake root: recorded in proc/mounts)"
    } else {
        ""
    };
    match &outcome.mount {
        Some(MountAction::AlreadyMounted(path)) => {
            println!("hugetlbfs for {size} already mounted at {path}")
        }
        Some(MountAction::Mounted(path)) => {
            println!("mounted hugetlbfs (pagesize={size}) at {path}{fake}")
        }
        None => {}
    }
    outcome.check_granted(&req)
}

fn reset(root: &Root, args: ResetArgs) -> Result<(), Error> {
    let scope = args.node.map_or(Scope::Global, Scope::Node);
    let sizes = args.size.map(|s| vec![s]);
    for r in hugepage_setup::reset(root, sizes.as_deref(), scope, args.unmount)? {
        println!(
            "{} hugepages {scope}: {} -> {}",
            r.size, r.before.total, r.after.total
        );
        for path in &r.unmounted {
            println!("unmounted hugetlbfs at {path}");
        }
        if let Some(left) = r.kept_mounts_for {
            println!(
                "kept {} hugetlbfs mounts: {left} pages still reserved system-wide",
                r.size
            );
        }
    }
    Ok(())
}
