//! SIGTERM to the launcher is forwarded to the workers (own binary: the signal hits the whole process).

mod common;

use std::time::{Duration, Instant};

use bellows_dist::launch::{run, LaunchOptions};
use bellows_dist::Error;
use common::with_timeout;

#[test]
fn sigterm_is_forwarded_and_reported() {
    with_timeout(60, || {
        // Workers that would sleep for a minute; SIGTERM must end them quickly.
        let mut o = LaunchOptions::local(
            2,
            "/bin/sh",
            vec!["-c".into(), "echo started; sleep 60".into()],
        );
        o.stop_grace = Duration::from_secs(2);
        let t0 = Instant::now();
        let killer = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(700));
            std::process::Command::new("kill")
                .args(["-TERM", &std::process::id().to_string()])
                .status()
                .expect("kill")
        });
        let err = run(&o).expect_err("interrupted");
        killer.join().expect("killer");
        assert!(matches!(err, Error::Interrupted { signal: 15 }), "{err}");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "took {:?}",
            t0.elapsed()
        );
    });
}
