//! `exporter`: train the tutorial's ViT on a folder of images, evaluate it, convert datasets.
//! A thin layer over the `exporter` library: parse flags, call, print; one module per command
//! in `cli/`.

mod cli;

use clap::Parser;

fn main() {
    keep_freed_memory();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    if let Err(error) = cli::run(cli::Cli::parse()) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

/// glibc gives freed memory back to the kernel (unmapping large blocks, trimming the heap's top)
/// and faults it in again at the next allocation. A training step frees and allocates hundreds
/// of tensors of 0.1–4 MB, so about a fifth of its time went to the kernel; keeping freed memory
/// in the heap trains 1.3× faster (docs/training.md).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only sets the allocator's parameters, before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
