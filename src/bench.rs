//! `tally bench`: enqueue and drain throughput on each backend, and HTTP submission rate.

use clap::Args;
use tally_workflows::config::Config;

use crate::cli::CliError;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Jobs to enqueue and drain.
    #[arg(long, default_value_t = 20_000)]
    pub jobs: usize,
}

pub async fn run(_cfg: Config, _args: BenchArgs) -> Result<(), CliError> {
    Err(CliError::other("not yet"))
}
