//! Issue #12: strangers on the network cannot disturb a job. While two ranks rendezvous through
//! the store and run collectives, a stranger keeps connecting with no hello, a wrong token, an
//! oversized frame, garbage and HTTP; every attempt is refused and the job's results are exact.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bellows_dist::store::{StoreClient, StoreServer};
use bellows_dist::{DistConfig, DistEnv, EnvSource, ProcessGroup, ReduceOp};
use common::{data, with_timeout};

const TOKEN: &str = "the-real-job-token";

fn frame(payload: &[u8]) -> Vec<u8> {
    [&(payload.len() as u32).to_le_bytes()[..], payload].concat()
}

fn hello(token: &str) -> Vec<u8> {
    let t = token.as_bytes();
    frame(
        &[
            &[0u8][..],
            b"BLWS",
            &[1],
            &(t.len() as u32).to_le_bytes(),
            t,
        ]
        .concat(),
    )
}

/// One attack; returns what the server sent back before closing (it must never be an Ok).
fn attack(addr: &str, kind: usize) -> Vec<u8> {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return Vec::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
    let bytes: Vec<u8> = match kind {
        0 => hello("guessed-token"),
        // A request without a hello (trying to read a ring address).
        1 => frame(&[&[2u8][..], &7u32.to_le_bytes(), b"pg/addr", &[0; 8]].concat()),
        // A 4 GiB frame announced before any hello.
        2 => u32::MAX.to_le_bytes().to_vec(),
        3 => (0..200u32).map(|i| (i * 73 % 251) as u8).collect(),
        4 => b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        // An empty token.
        _ => hello(""),
    };
    let _ = s.write_all(&bytes);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    reply
}

#[test]
fn strangers_are_refused_while_a_job_runs_unaffected() {
    with_timeout(120, || {
        let server = StoreServer::bind("127.0.0.1:0", TOKEN).expect("bind");
        assert!(
            server.local_addr().ip().is_loopback(),
            "binds only where told"
        );
        let addr = server.local_addr().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let stranger = {
            let (addr, stop) = (addr.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut replies = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) || i < 12 {
                    replies.push((i % 6, attack(&addr, i % 6)));
                    i += 1;
                }
                replies
            })
        };
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                let port = server.local_addr().port();
                std::thread::spawn(move || {
                    let env = DistEnv {
                        rank,
                        world_size: 2,
                        local_rank: rank,
                        local_world_size: 2,
                        node_rank: 0,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        source: EnvSource::Bellows,
                        job_token: Some(TOKEN.into()),
                    };
                    let cfg = DistConfig {
                        timeout_secs: 30,
                        ..DistConfig::default()
                    };
                    let pg = ProcessGroup::init(&env, &cfg, "job").expect("init");
                    for step in 0..30 {
                        let mut v = data(rank, 1000 + step);
                        pg.all_reduce(&mut v, ReduceOp::Sum).expect("all_reduce");
                        let want: Vec<f64> = data(0, 1000 + step)
                            .iter()
                            .zip(data(1, 1000 + step))
                            .map(|(a, b)| a + b)
                            .collect();
                        assert_eq!(v, want, "rank {rank} step {step}");
                    }
                })
            })
            .collect();
        for r in ranks {
            r.join().expect("rank finished with exact results");
        }
        stop.store(true, Ordering::Relaxed);
        let replies = stranger.join().expect("stranger");
        assert!(replies.len() >= 12, "{} attacks", replies.len());
        let ok_reply = frame(&[0u8]);
        for (kind, reply) in &replies {
            assert_ne!(reply, &ok_reply, "attack {kind} was accepted");
            let text = String::from_utf8_lossy(reply);
            match kind {
                0 | 5 => assert!(text.contains("wrong job token"), "attack {kind}: {text:?}"),
                1 => assert!(text.contains("expected a bellows store hello"), "{text:?}"),
                _ => {}
            }
        }
        // The store still serves the job's own clients afterwards.
        let mut c = StoreClient::connect(&addr, TOKEN, Duration::from_secs(5)).expect("connect");
        c.set("after", b"ok").expect("set");
    });
}
