//! WebSockets through the edge proxy across a switch, against a small WebSocket echo app: an
//! open socket keeps echoing from the old release until the drain deadline, then is closed
//! cleanly (close frame 1001); a socket opened after the switch reaches the new release.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::{fast, get, TempDir, TestProxy};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

/// An app that answers `/up` and `/` with its name and echoes WebSocket text messages as
/// `name:message`.
async fn echo_app(name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(
                    move |mut req: hyper::Request<hyper::body::Incoming>| async move {
                        let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
                            return Ok::<_, Infallible>(hyper::Response::new(Full::new(
                                Bytes::from(format!("{name}\n")),
                            )));
                        };
                        let on = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            let Ok(up) = on.await else { return };
                            let mut ws = WebSocketStream::from_raw_socket(
                                TokioIo::new(up),
                                Role::Server,
                                None,
                            )
                            .await;
                            while let Some(Ok(m)) = ws.next().await {
                                match m {
                                    Message::Text(t) => {
                                        let reply = format!("{name}:{}", t.as_str());
                                        if ws.send(Message::text(reply)).await.is_err() {
                                            return;
                                        }
                                    }
                                    Message::Close(_) => return,
                                    _ => {}
                                }
                            }
                        });
                        let resp = hyper::Response::builder()
                            .status(101)
                            .header("connection", "upgrade")
                            .header("upgrade", "websocket")
                            .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
                            .body(Full::new(Bytes::new()))
                            .unwrap();
                        Ok(resp)
                    },
                );
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

async fn connect(proxy: SocketAddr) -> Ws {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let req = tokio_tungstenite::tungstenite::handshake::client::Request::builder()
        .uri("ws://app.test/socket")
        .header("host", "app.test")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header(
            "sec-websocket-key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        )
        .body(())
        .unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

async fn echo(ws: &mut Ws, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t.as_str().to_string(),
        other => panic!("no echo of {text}: {other:?}"),
    }
}

#[test]
fn websockets_stay_on_the_old_release_until_the_drain_deadline_then_close_cleanly() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = TempDir::new("websocket");
    let proxy = TestProxy::start(dir.path());
    let (a, b) = rt.block_on(async { (echo_app("a").await, echo_app("b").await) });
    proxy.deploy("app", a).unwrap();

    let mut old = rt.block_on(connect(proxy.addr));
    assert_eq!(rt.block_on(echo(&mut old, "1")), "a:1");

    // Switch to b with a 2 s drain, in the background.
    let drain = Duration::from_secs(2);
    let socket = proxy.socket.clone();
    let started = Instant::now();
    let switch = std::thread::spawn(move || {
        let req = cutover_proxy::Request::Deploy(cutover_proxy::DeployRequest {
            service: "app".into(),
            target: b.to_string(),
            health_path: "/up".into(),
            domains: vec![],
            options: cutover_proxy::DeployOptions { drain, ..fast() },
        });
        cutover_proxy::control_request_blocking(&socket, &req)
    });
    // Once the swap is done (new requests reach b), the open socket still talks to a.
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(proxy.addr, "app.test", "/").first_line() != "b" {
        assert!(Instant::now() < deadline, "the switch did not happen");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(rt.block_on(echo(&mut old, "2")), "a:2");
    let mut new = rt.block_on(connect(proxy.addr));
    assert_eq!(rt.block_on(echo(&mut new, "3")), "b:3");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rt.block_on(echo(&mut old, "4")), "a:4");

    // The drain runs to its deadline (the socket is in flight), then the socket is closed
    // with a close frame saying "going away".
    let report = switch.join().unwrap().unwrap();
    println!("switch: {report:?} after {:?}", started.elapsed());
    let cutover_proxy::Response::Deployed(report) = report else {
        panic!("{report:?}")
    };
    assert!(report.switched && !report.drained, "{report:?}");
    assert_eq!(report.in_flight_left, 1);
    let closed =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(3), old.next()).await });
    println!("old socket after the drain deadline: {closed:?}");
    match closed {
        Ok(Some(Ok(Message::Close(Some(frame))))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected a close frame 1001, got {other:?}"),
    }
    assert!(started.elapsed() >= drain);
    // The new socket is untouched, and the old target has nothing in flight any more.
    assert_eq!(rt.block_on(echo(&mut new, "5")), "b:5");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let s = proxy.status();
        if s.services[0].in_flight <= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn open_websockets_count_against_the_connection_cap() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = TempDir::new("wscap");
    let proxy = TestProxy::start_with(
        dir.path(),
        cutover_proxy::Limits {
            max_connections: 2,
            ..Default::default()
        },
    );
    let a = rt.block_on(echo_app("a"));
    proxy.deploy("app", a).unwrap();
    let mut one = rt.block_on(connect(proxy.addr));
    let mut two = rt.block_on(connect(proxy.addr));
    assert_eq!(rt.block_on(echo(&mut one, "1")), "a:1");
    assert_eq!(rt.block_on(echo(&mut two, "2")), "a:2");
    // Both slots are open tunnels (never idle): a third connection is told why it is refused.
    let r = get(proxy.addr, "app.test", "/");
    assert_eq!(
        (r.status, r.body.as_str()),
        (503, "too many connections to this proxy; try again\n")
    );
    assert_eq!(rt.block_on(echo(&mut one, "3")), "a:3");
    rt.block_on(one.close(None)).unwrap();
    drop(one);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = get(proxy.addr, "app.test", "/");
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "{r:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
