//! A minimal `launch` front end over `bellows_dist::launch::run` (the real CLI is `bellows launch`).
//!
//! Run: `cargo run -p bellows-dist --example launch -- <nproc> <program> [args...]`

use bellows_dist::launch::{run, LaunchOptions};

fn main() {
    let mut args = std::env::args().skip(1);
    let nproc: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2);
    let Some(program) = args.next() else {
        eprintln!("usage: launch <nproc> <program> [args...]");
        std::process::exit(2);
    };
    match run(&LaunchOptions::local(nproc, program, args.collect())) {
        Ok(report) => eprintln!(
            "[launch] all ranks succeeded ({} restarts)",
            report.restarts
        ),
        Err(e) => {
            eprintln!("[launch] {e}");
            std::process::exit(1);
        }
    }
}
