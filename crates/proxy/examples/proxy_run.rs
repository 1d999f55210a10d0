//! `cargo run --release -p cutover-proxy --example proxy_run -- LISTEN DIR`: the edge proxy
//! alone (what `cutover proxy run` does), for profiling it without building the whole CLI.

fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().expect("LISTEN").parse().expect("LISTEN");
    let dir = std::path::PathBuf::from(args.next().expect("DIR"));
    std::fs::create_dir_all(&dir).expect("DIR");
    let config = cutover_proxy::ProxyConfig::new(
        listen,
        dir.join("proxy.sock"),
        dir.join("proxy-state.json"),
    );
    if let Err(e) = cutover_proxy::run_blocking(config) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
