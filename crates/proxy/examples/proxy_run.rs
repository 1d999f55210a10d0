//! `cargo run --release -p cutover-proxy --example proxy_run -- LISTEN DIR [LISTEN_TLS CERT
//! KEY]`: the edge proxy alone (what `cutover proxy run` does), for profiling it without
//! building the whole CLI; with the last three, TLS from certificate files on `LISTEN_TLS`.

fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().expect("LISTEN").parse().expect("LISTEN");
    let dir = std::path::PathBuf::from(args.next().expect("DIR"));
    std::fs::create_dir_all(&dir).expect("DIR");
    let mut config = cutover_proxy::ProxyConfig::new(
        listen,
        dir.join("proxy.sock"),
        dir.join("proxy-state.json"),
    );
    if let Some(tls) = args.next() {
        config.listen_tls = tls.parse().expect("LISTEN_TLS");
        config.tls = cutover_proxy::TlsMode::Files {
            cert: args.next().expect("CERT").into(),
            key: args.next().expect("KEY").into(),
        };
    }
    if let Err(e) = cutover_proxy::run_blocking(config) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
