//! `exporter`: train the tutorial's ViT on a folder of images, evaluate it, convert datasets.
//! A thin layer over the `exporter` library: parse flags, call, print; one module per command
//! in `cli/`.

mod cli;

use clap::Parser;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    if let Err(error) = cli::run(cli::Cli::parse()) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
