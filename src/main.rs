//! hostplane binary: parse the command line and hand over to the runtime.

use clap::Parser;
use hostplane::cli::{BenchCommand, Cli, Command};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => hostplane::runtime::run(&args),
        Command::Bench(BenchCommand::Macnat(args)) => hostplane::bench::macnat(&args),
        Command::Rpc(args) => {
            let timeout = std::time::Duration::from_secs_f64(args.timeout.max(0.001));
            hostplane::control::client::run(
                &args.socket,
                args.method.as_deref(),
                &args.params,
                args.json.as_deref(),
                timeout,
            )
            .map_err(|e| e.into())
        }
        Command::Bench(BenchCommand::Bdev(args)) => hostplane::storage::bdevperf::bench(&args),
        Command::Convert(c) => hostplane::storage::convert::tool::run(c),
        Command::Version => {
            println!("hostplane {}", env!("CARGO_PKG_VERSION"));
            println!("{}", hostplane::env::dpdk_version());
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("hostplane: error: {e}");
        std::process::exit(1);
    }
}
