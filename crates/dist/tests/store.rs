//! The rendezvous store over real loopback sockets.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bellows_dist::store::{StoreClient, StoreServer, MAX_FRAME};
use bellows_dist::Error;
use common::with_timeout;

const T: Duration = Duration::from_secs(5);

fn server() -> (StoreServer, String) {
    let s = StoreServer::bind("127.0.0.1:0", "tok").expect("bind loopback");
    let addr = s.local_addr().to_string();
    (s, addr)
}

#[test]
fn set_get_add_check_delete_round_trip() {
    with_timeout(30, || {
        let (srv, addr) = server();
        assert!(srv.local_addr().ip().is_loopback(), "binds only where told");
        let mut c = StoreClient::connect(&addr, "tok", T).expect("connect");
        c.set("a", b"1").expect("set");
        assert_eq!(c.get("a", T).expect("get"), b"1");
        assert_eq!(c.add("n", 5).expect("add"), 5);
        assert_eq!(c.add("n", -2).expect("add"), 3);
        assert!(c.check(&["a", "n"]).expect("check"));
        assert!(!c.check(&["a", "zz"]).expect("check"));
        assert!(c.delete("a").expect("delete"));
        assert!(!c.check(&["a"]).expect("check"));
        let err = c.add("never-int", 0).and_then(|_| {
            c.set("s", b"text")?;
            c.add("s", 1)
        });
        assert!(matches!(err, Err(Error::Store { .. })), "{err:?}");
    });
}

#[test]
fn get_blocks_until_another_client_sets_and_times_out_otherwise() {
    with_timeout(30, || {
        let (_srv, addr) = server();
        let a2 = addr.clone();
        let setter = std::thread::spawn(move || {
            let mut c = StoreClient::connect(&a2, "tok", T).expect("connect");
            std::thread::sleep(Duration::from_millis(300));
            c.set("late", b"x").expect("set");
        });
        let mut c = StoreClient::connect(&addr, "tok", T).expect("connect");
        let t0 = Instant::now();
        assert_eq!(c.get("late", T).expect("get waits"), b"x");
        assert!(t0.elapsed() >= Duration::from_millis(250));
        setter.join().expect("setter");
        c.wait(&["late"], T).expect("wait on existing key");
        let t0 = Instant::now();
        let err = c
            .get("missing", Duration::from_millis(300))
            .expect_err("must time out");
        assert!(
            matches!(err, Error::StoreTimeout { op: "get", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(3));
    });
}

#[test]
fn barrier_releases_all_clients_together() {
    with_timeout(30, || {
        let (_srv, addr) = server();
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut c = StoreClient::connect(&addr, "tok", T).expect("connect");
                    std::thread::sleep(Duration::from_millis(50 * i));
                    c.barrier("b1", 4, T)
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread").expect("barrier");
        }
        let mut c = StoreClient::connect(&addr, "tok", T).expect("connect");
        let err = c
            .barrier("b2", 2, Duration::from_millis(200))
            .expect_err("alone at the barrier");
        assert!(err.to_string().contains("1 of 2 arrived"), "{err}");
    });
}

#[test]
fn wrong_tokens_and_strangers_are_refused_and_the_server_keeps_serving() {
    with_timeout(60, || {
        let (_srv, addr) = server();
        let mut good = StoreClient::connect(&addr, "tok", T).expect("connect");
        good.set("k", b"v").expect("set");

        let err = StoreClient::connect(&addr, "not-the-token", T).expect_err("wrong token");
        assert!(err.to_string().contains("wrong job token"), "{err}");

        // A stranger speaking HTTP: the connection is closed.
        let mut s = TcpStream::connect(&addr).expect("tcp");
        s.set_read_timeout(Some(T)).expect("timeout");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);

        // A silent stranger holding a connection does not block anyone.
        let _silent = TcpStream::connect(&addr).expect("tcp");

        // An authenticated client sending an oversized frame and then a malformed one.
        let mut raw = TcpStream::connect(&addr).expect("tcp");
        raw.set_read_timeout(Some(T)).expect("timeout");
        let hello = [&[0u8][..], b"BLWS", &[1], &3u32.to_le_bytes(), b"tok"].concat();
        raw.write_all(&[&(hello.len() as u32).to_le_bytes()[..], &hello].concat())
            .expect("hello");
        let mut ok = [0u8; 5];
        raw.read_exact(&mut ok).expect("hello reply");
        assert_eq!(ok, [1, 0, 0, 0, 0], "Ok reply");
        raw.write_all(&((MAX_FRAME as u32) + 1).to_le_bytes())
            .expect("oversize");
        let mut reply = Vec::new();
        let _ = raw.read_to_end(&mut reply);
        assert!(
            String::from_utf8_lossy(&reply).contains("exceeds"),
            "{reply:?}"
        );

        let mut raw2 = TcpStream::connect(&addr).expect("tcp");
        raw2.set_read_timeout(Some(T)).expect("timeout");
        raw2.write_all(&[&(hello.len() as u32).to_le_bytes()[..], &hello].concat())
            .expect("hello");
        raw2.read_exact(&mut ok).expect("hello reply");
        raw2.write_all(&[3, 0, 0, 0, 42, 1, 2])
            .expect("garbage request");
        let mut reply = Vec::new();
        let _ = raw2.read_to_end(&mut reply);
        assert!(
            String::from_utf8_lossy(&reply).contains("malformed"),
            "{reply:?}"
        );

        // Still serving, including the existing client.
        assert_eq!(good.get("k", T).expect("get"), b"v");
        let mut fresh = StoreClient::connect(&addr, "tok", T).expect("connect after abuse");
        assert_eq!(fresh.get("k", T).expect("get"), b"v");
    });
}

#[test]
fn connecting_to_nothing_fails_within_the_timeout() {
    with_timeout(30, || {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let t0 = Instant::now();
        let err = StoreClient::connect(
            &format!("127.0.0.1:{port}"),
            "tok",
            Duration::from_millis(500),
        )
        .expect_err("nothing listens");
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(err.to_string().contains("cannot connect"), "{err}");
    });
}
