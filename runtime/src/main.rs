//! `runtime`: classify frames on the device with a ViT in ONNX.
//! A thin layer over the `runtime` library: parse flags, call, print; one module per command
//! in `cli/`.

mod cli;

use clap::Parser;

fn main() {
    // `runtime classify … | head` should end quietly when the reader goes away, as other
    // Unix tools do; Rust's runtime ignores SIGPIPE, which turns that into a panic in println!.
    #[cfg(unix)]
    // SAFETY: set once at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // A panic the library catches comes back as an error, printed once below.
    let report_panic = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !runtime::panic_is_caught_here() {
            report_panic(info);
        }
    }));
    match cli::run(cli::Cli::parse()) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::exit(1);
        }
    }
}
