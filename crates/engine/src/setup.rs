//! `cutover setup`: install or upgrade the edge proxy on every host of a container app, and on
//! the preview hosts of an app with `[preview]` (a files app's previews are served by the
//! proxy as a static target, so a files app needs it there and only there). It
//! uploads the running cutover binary itself (skipped when the same bytes are there), refuses
//! a host that cannot run it (another architecture or C library), starts `cutover proxy run`
//! under systemd where the host has it, else as a supervised daemon (a shell loop that restarts
//! it), and checks that the proxy answers on its control socket. Running it again is harmless.

use crate::{par_map, Hosts};
use cutover_core::container::ProxySettings;
use cutover_core::{AppKind, Config};
use cutover_remote::{Remote, Script};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// What setup did on one host.
#[derive(Debug, Clone, Serialize)]
pub struct HostSetup {
    pub host: String,
    pub ok: bool,
    /// `uploaded`, `unchanged`, or empty when it failed before.
    pub binary: String,
    /// `systemd`, `supervised`, or empty.
    pub service: String,
    pub detail: String,
}

const PROBE: &str = r#"
dir={dir}
printf 'ARCH %s\n' "$(uname -m)"
if [ -x "$dir/cutover" ]; then
  if command -v sha256sum >/dev/null 2>&1; then printf 'SUM %s\n' "$(sha256sum "$dir/cutover" | cut -d' ' -f1)"; fi
fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then echo SYSTEMD yes; fi
"#;

/// Writes stdin to a temporary name of its own in `dir` (so no other writer, and no running
/// copy of an earlier upload, can make it busy), checks that all `size` bytes arrived and
/// that it runs, then renames it over `dir/cutover` (a running proxy keeps its old inode).
/// Every failure says which step failed and what the system said.
const UPLOAD: &str = r#"
set -u
dir={dir}
mkdir -p "$dir" && chmod 700 "$dir" || { echo "ERR cannot create $dir"; exit 3; }
# Uploads of setups that were killed (no EXIT trap runs then) are removed after an hour.
find "$dir" -maxdepth 1 -name '.cutover.upload.*' -mmin +60 -exec rm -f {} + 2>/dev/null
tmp=$(mktemp "$dir/.cutover.upload.XXXXXX" 2>/dev/null) || { tmp="$dir/.cutover.upload.$$"; rm -f "$tmp"; }
trap 'rm -f "$tmp"' EXIT
if ! err=$(cat 2>&1 >"$tmp"); then
  printf 'ERR cannot write the upload to %s: %s\n' "$tmp" "$err"; exit 3
fi
got=$(wc -c <"$tmp" | tr -d ' ')
if [ "$got" != {size} ]; then
  printf 'ERR the upload to %s is incomplete: %s of %s bytes arrived (disk full?)\n' "$tmp" "$got" {size}; exit 3
fi
chmod 755 "$tmp"
if ! v=$("$tmp" --version 2>&1); then
  case "$v" in
    *"Text file busy"*)
      printf 'ERR cannot run the uploaded binary %s: another process holds it open for writing (Text file busy): %s\n' "$tmp" "$v" ;;
    *"Permission denied"*)
      printf 'ERR cannot execute the uploaded binary %s (is %s on a file system mounted noexec?): %s\n' "$tmp" "$dir" "$v" ;;
    *)
      printf 'ERR this host cannot run the cutover binary (architecture %s; built for %s with glibc): %s\n' "$(uname -m)" {arch} "$v" ;;
  esac
  exit 3
fi
if ! err=$(mv -f "$tmp" "$dir/cutover" 2>&1); then
  printf 'ERR cannot put the new binary in place at %s: %s\n' "$dir/cutover" "$err"; exit 3
fi
trap - EXIT
printf 'VERSION %s\n' "$v"
"#;

/// Uploads `bytes` as `<dir>/cutover` on `r` (see [`UPLOAD`]): the binary's `--version`, or
/// what failed.
pub(crate) fn upload(r: &dyn Remote, dir: &str, bytes: &[u8]) -> Result<String, String> {
    let size = bytes.len().to_string();
    let mut reader: &[u8] = bytes;
    let script = Script::new(
        UPLOAD,
        &[
            ("dir", dir),
            ("size", &size),
            ("arch", std::env::consts::ARCH),
        ],
    );
    match r.run(&script, Some(&mut reader)) {
        Ok(o) if o.success() => Ok(line(&o.stdout, "VERSION ").unwrap_or("").to_string()),
        Ok(o) => Err(err_of(&o)),
        Err(e) => Err(e.to_string()),
    }
}

const START_SUPERVISED: &str = r#"
set -u
dir={dir}
listen={listen}
hold={hold}
limits={limits}
changed={changed}
# HTTPS flags (`[proxy] tls` and friends): words validated to need no quoting.
tls={tls}
set -f
pidfile="$dir/supervisor.pid"
# Changed settings restart the proxy like a new binary does (a hand-over, no request lost).
if [ "$(cat "$dir/proxy.args" 2>/dev/null)" != "$listen $hold $limits $tls" ]; then changed=yes; fi
printf '%s\n' "$listen $hold $limits $tls" > "$dir/proxy.args"
# Connections queued on a proxy that is handing over are passed to its successor, not reset.
if [ -w /proc/sys/net/ipv4/tcp_migrate_req ]; then echo 1 > /proc/sys/net/ipv4/tcp_migrate_req; fi
state=started
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  if [ "$changed" != yes ]; then echo "SERVICE running"; exit 0; fi
  # Upgrade: stop the old supervisor loop (its proxy keeps serving); the new proxy binds the
  # same port beside it, asks it to drain and stop, and takes its control socket over.
  old=$("$dir/cutover" proxy status --dir "$dir" --json 2>/dev/null | sed -n 's/^ *"pid": *\([0-9][0-9]*\).*/\1/p' | head -n 1)
  kill "$(cat "$pidfile")" 2>/dev/null
  state=upgraded
fi
# As the systemd unit's LimitNOFILE: room for many client connections (the proxy raises its soft
# limit to this hard limit and keeps its connection cap within it).
nohup setsid sh -c 'set -f; ulimit -n 65536 2>/dev/null; while :; do "$0/cutover" proxy run --listen "$1" --dir "$0" --hold "$2" --limits "$3" $4; sleep 1; done' "$dir" "$listen" "$hold" "$limits" "$tls" >>"$dir/proxy.log" 2>&1 </dev/null &
echo $! > "$pidfile"
if [ "$state" = upgraded ] && [ -n "${old:-}" ]; then
  # Wait for the old proxy to hand over and finish draining.
  i=0
  while [ $i -lt 400 ] && kill -0 $old 2>/dev/null; do i=$((i+1)); sleep 0.1; done
fi
echo "SERVICE $state"
"#;

const START_SYSTEMD: &str = r#"
set -u
dir={dir}
listen={listen}
hold={hold}
limits={limits}
changed={changed}
tls={tls}
unit=/etc/systemd/system/cutover-proxy.service
new=$(printf '[Unit]\nDescription=cutover edge proxy\nAfter=network.target\n\n[Service]\nExecStart=%s/cutover proxy run --listen %s --dir %s --hold %s --limits %s%s\nRestart=always\nRestartSec=1\nLimitNOFILE=65536\n\n[Install]\nWantedBy=multi-user.target\n' "$dir" "$listen" "$dir" "$hold" "$limits" "${tls:+ $tls}")
if [ "$(cat "$unit" 2>/dev/null)" != "$new" ]; then printf '%s\n' "$new" > "$unit"; systemctl daemon-reload; changed=yes; fi
systemctl enable cutover-proxy >/dev/null 2>&1
if [ "$changed" = yes ]; then systemctl restart cutover-proxy; echo "SERVICE restarted"; else systemctl start cutover-proxy; echo "SERVICE running"; fi
"#;

const CHECK: &str = r#"
dir={dir}
i=0
while [ $i -lt 50 ]; do
  if out=$("$dir/cutover" proxy status --dir "$dir" --json 2>/dev/null); then printf 'STATUS %s\n' "$(printf '%s' "$out" | tr -d '\n')"; exit 0; fi
  i=$((i+1)); sleep 0.1
done
echo "ERR the proxy does not answer on $dir/proxy.sock; see $dir/proxy.log"
exit 3
"#;

fn line<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| l.strip_prefix(key)).map(str::trim)
}

fn err_of(out: &cutover_remote::Output) -> String {
    line(&out.stdout, "ERR ")
        .map(str::to_string)
        .unwrap_or_else(|| out.tail())
}

/// The hosts that run the edge proxy, and its settings: a container app's hosts and its
/// preview hosts; a files app's preview hosts.
fn proxy_hosts(config: &Config) -> Result<(Config, &ProxySettings), String> {
    let proxy = config.proxy().ok_or("`cutover setup` installs the edge proxy, which a files app needs only for its previews ([preview]); this app has neither [container] nor [preview]")?;
    let mut hosts = match &config.kind {
        AppKind::Container(_) => config.hosts.clone(),
        AppKind::Files(_) => Vec::new(),
    };
    for h in config.preview.iter().flat_map(|p| &p.hosts) {
        if !hosts.iter().any(|(name, _)| *name == h.0) {
            hosts.push(h.clone());
        }
    }
    Ok((
        Config {
            hosts,
            ..config.clone()
        },
        proxy,
    ))
}

/// `--acme-peers` for host `i` of `hosts` (with `tls = "acme"` and more than one host): the
/// other hosts' proxies, at the name or address `hosts` gives them and the port of `listen`,
/// which a host asks for an HTTP-01 answer it does not have (the CA's validation reaches the
/// host DNS or a load balancer sends it to, not necessarily the one whose order it is). One
/// shell word: a name with a character other than letters, digits, `.`, `-` and `:` (IPv6)
/// is left out.
fn acme_peers(
    proxy: &ProxySettings,
    hosts: &[(String, cutover_core::host::Destination)],
    i: usize,
) -> Option<String> {
    if !matches!(
        proxy.tls.mode,
        cutover_core::container::TlsKind::Acme { .. }
    ) {
        return None;
    }
    let port = proxy.listen.rsplit_once(':')?.1;
    let peers: Vec<String> = hosts
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .filter_map(|(_, (_, d))| match d {
            cutover_core::host::Destination::Ssh { host, .. } => Some(host.as_str()),
            cutover_core::host::Destination::Local => None,
        })
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
        })
        .map(|h| {
            if h.contains(':') {
                format!("[{h}]:{port}")
            } else {
                format!("{h}:{port}")
            }
        })
        .collect();
    (!peers.is_empty()).then(|| peers.join(","))
}

/// Installs or upgrades the proxy on every host that runs it ([`proxy_hosts`]).
pub fn setup(config: &Config) -> Result<Vec<HostSetup>, String> {
    let (on, proxy) = proxy_hosts(config)?;
    let config = &on;
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the running binary: {e}"))?;
    let bytes = std::fs::read(&exe).map_err(|e| format!("cannot read {}: {e}", exe.display()))?;
    let sum: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let hosts = Hosts::new(config).map_err(|e| e.to_string())?;
    let dir = proxy.install_dir.as_str();
    let hold = format!("{}ms", proxy.hold.as_millis());
    let limits = proxy.limits.to_arg();
    let tls = proxy.run_flags().join(" ");
    Ok(par_map(hosts.len(), config.ssh.parallel, |i| {
        let r = hosts.get(i);
        let tls = match acme_peers(proxy, &config.hosts, i) {
            Some(peers) => format!("{tls} --acme-peers {peers}"),
            None => tls.clone(),
        };
        let mut s = HostSetup {
            host: config.hosts[i].0.clone(),
            ok: false,
            binary: String::new(),
            service: String::new(),
            detail: String::new(),
        };
        if let Err(e) = r.connect() {
            s.detail = e.to_string();
            return s;
        }
        let probe = match r.run(&Script::new(PROBE, &[("dir", dir)]), None) {
            Ok(o) => o,
            Err(e) => {
                s.detail = e.to_string();
                return s;
            }
        };
        let arch = line(&probe.stdout, "ARCH ").unwrap_or("").to_string();
        if arch != std::env::consts::ARCH {
            s.detail = format!("this host is {arch}, but this cutover binary is built for {}: install a {arch} build of cutover and run setup from it", std::env::consts::ARCH);
            return s;
        }
        let changed = line(&probe.stdout, "SUM ") != Some(sum.as_str());
        if changed {
            match upload(r, dir, &bytes) {
                Ok(_) => s.binary = "uploaded".into(),
                Err(e) => {
                    s.detail = e;
                    return s;
                }
            }
        } else {
            s.binary = "unchanged".into();
        }
        let systemd = line(&probe.stdout, "SYSTEMD ").is_some();
        let template = if systemd {
            START_SYSTEMD
        } else {
            START_SUPERVISED
        };
        let yes = if changed { "yes" } else { "no" };
        match r.run(
            &Script::new(
                template,
                &[
                    ("dir", dir),
                    ("listen", &proxy.listen),
                    ("hold", &hold),
                    ("limits", &limits),
                    ("changed", yes),
                    ("tls", &tls),
                ],
            ),
            None,
        ) {
            Ok(o) if o.success() => {
                s.service = format!(
                    "{} ({})",
                    if systemd { "systemd" } else { "supervised" },
                    line(&o.stdout, "SERVICE ").unwrap_or("?")
                );
            }
            Ok(o) => {
                s.detail = err_of(&o);
                return s;
            }
            Err(e) => {
                s.detail = e.to_string();
                return s;
            }
        }
        match r.run(&Script::new(CHECK, &[("dir", dir)]), None) {
            Ok(o) if o.success() => {
                s.ok = true;
                s.detail = "proxy answers".into();
            }
            Ok(o) => s.detail = err_of(&o),
            Err(e) => s.detail = e.to_string(),
        }
        s
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where setup installs the proxy: a container app's hosts and its preview hosts; only
    /// the preview hosts of a files app; nowhere for a files app without previews.
    #[test]
    fn the_proxy_goes_where_apps_and_previews_are_served() {
        let parse = |t: &str| Config::parse(std::path::Path::new("/c.toml"), t, None).unwrap();
        let names = |c: &Config| {
            let (on, proxy) = proxy_hosts(c).unwrap();
            let hosts: Vec<String> = on.hosts.iter().map(|h| h.0.clone()).collect();
            (hosts, proxy.listen.clone())
        };
        let files = "app = \"site\"\nhosts = [\"a\", \"b\"]\n[files]\nroot = \"/srv/site\"\n[health]\nurl = \"http://127.0.0.1/up\"\n";
        assert_eq!(
            proxy_hosts(&parse(files)).unwrap_err(),
            "`cutover setup` installs the edge proxy, which a files app needs only for its previews ([preview]); this app has neither [container] nor [preview]"
        );
        let with = format!("{files}[proxy]\nlisten = \"0.0.0.0:8080\"\n[preview]\ndomain = \"p.example.com\"\nhosts = [\"c\"]\n");
        assert_eq!(
            names(&parse(&with)),
            (vec!["c".into()], "0.0.0.0:8080".into())
        );
        let container = "app = \"web\"\nhosts = [\"a\", \"b\"]\n[container]\nimage = \"r.example.com/web\"\nport = 8080\n[preview]\ndomain = \"p.example.com\"\nhosts = [\"b\", \"c\"]\n";
        assert_eq!(
            names(&parse(container)),
            (
                vec!["a".into(), "b".into(), "c".into()],
                "0.0.0.0:80".into()
            )
        );
    }

    #[test]
    fn with_acme_each_host_is_told_the_other_hosts_proxies_and_without_it_none() {
        let parse = |t: &str| Config::parse(std::path::Path::new("/c.toml"), t, None).unwrap();
        let app = |tls: &str| {
            parse(&format!(
                "app = \"web\"\nhosts = [\"web1.example.com\", \"deploy@10.0.0.2:2222\", \"[2001:db8::7]:22\"]\n\
                 [container]\nimage = \"r.example.com/web\"\nport = 8080\ndomain = \"site.example\"\n\
                 [proxy]\nlisten = \"0.0.0.0:8000\"\n{tls}"
            ))
        };
        let peers = |c: &Config| {
            let (on, proxy) = proxy_hosts(c).unwrap();
            (0..on.hosts.len())
                .map(|i| acme_peers(proxy, &on.hosts, i))
                .collect::<Vec<_>>()
        };
        let acme = app("tls = \"acme\"\n");
        assert_eq!(
            peers(&acme),
            [
                Some("10.0.0.2:8000,[2001:db8::7]:8000".to_string()),
                Some("web1.example.com:8000,[2001:db8::7]:8000".to_string()),
                Some("web1.example.com:8000,10.0.0.2:8000".to_string()),
            ]
        );
        assert_eq!(peers(&app("")), [None, None, None]);
        let files = "tls = \"files\"\ncert = \"/etc/c.pem\"\nkey = \"/etc/k.pem\"\n";
        assert_eq!(peers(&app(files)), [None, None, None]);
        // One host: no peers.
        let one = parse(
            "app = \"web\"\nhosts = [\"web1\"]\n[container]\nimage = \"r.example.com/web\"\nport = 8080\n\
             [proxy]\ntls = \"acme\"\n",
        );
        assert_eq!(peers(&one), [None]);
    }

    #[test]
    fn templates_have_every_placeholder_filled() {
        let _ = Script::new(PROBE, &[("dir", "/d")]);
        let _ = Script::new(UPLOAD, &[("dir", "/d"), ("size", "1"), ("arch", "x86_64")]);
        for t in [START_SUPERVISED, START_SYSTEMD] {
            let _ = Script::new(
                t,
                &[
                    ("dir", "/d"),
                    ("listen", "0.0.0.0:80"),
                    ("hold", "30000ms"),
                    ("limits", "header_timeout=60000ms"),
                    ("changed", "no"),
                    ("tls", ""),
                ],
            );
        }
        let _ = Script::new(CHECK, &[("dir", "/d")]);
    }

    /// The supervised start carries `[proxy] tls` to `cutover proxy run` as flags, and a
    /// change of them alone restarts the proxy (as a hand-over, like a new binary).
    #[test]
    fn supervised_start_passes_the_tls_flags_and_restarts_when_they_change() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir("tls-flags");
        let bin = d.0.join("cutover");
        // A stand-in binary: records each `proxy run` command line, answers no status.
        std::fs::write(
            &bin,
            "#!/bin/sh\nif [ \"$2\" = run ]; then echo \"$*\" >> \"$(dirname \"$0\")/runs\"; exec sleep 30; fi\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir_s = d.0.to_str().unwrap();
        let start = |tls: &str| {
            let script = Script::new(
                START_SUPERVISED,
                &[
                    ("dir", dir_s),
                    ("listen", "127.0.0.1:1"),
                    ("hold", "30000ms"),
                    ("limits", "header_timeout=60000ms"),
                    ("changed", "no"),
                    ("tls", tls),
                ],
            );
            let o = cutover_remote::local::LocalHost.run(&script, None).unwrap();
            assert!(o.success(), "{o:?}");
            o.stdout
        };
        let runs = || {
            let t = std::time::Instant::now();
            loop {
                let r = std::fs::read_to_string(d.0.join("runs")).unwrap_or_default();
                if !r.is_empty() || t.elapsed() > std::time::Duration::from_secs(5) {
                    return r;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        };
        let flags = "--tls files --cert /etc/ssl/a.pem --key /etc/ssl/a.key --listen-tls 0.0.0.0:443 --redirect-http";
        assert!(start(flags).contains("SERVICE started"));
        assert_eq!(
            runs(),
            format!("proxy run --listen 127.0.0.1:1 --dir {dir_s} --hold 30000ms --limits header_timeout=60000ms {flags}\n")
        );
        assert!(
            start(flags).contains("SERVICE running"),
            "same flags: left running"
        );
        let first = std::fs::read_to_string(d.0.join("supervisor.pid")).unwrap();
        std::fs::remove_file(d.0.join("runs")).unwrap();
        assert!(
            start("").contains("SERVICE upgraded"),
            "changed flags: restarted"
        );
        assert_eq!(
            runs(),
            format!("proxy run --listen 127.0.0.1:1 --dir {dir_s} --hold 30000ms --limits header_timeout=60000ms\n")
        );
        // Stop both supervisor loops and their stand-in proxies (started by this test, each
        // in a process group of its own).
        let second = std::fs::read_to_string(d.0.join("supervisor.pid")).unwrap();
        for pid in [first, second] {
            let _ = std::process::Command::new("kill")
                .args(["--", &format!("-{}", pid.trim())])
                .status();
        }
    }

    /// A scratch install dir, removed when dropped (killing what the test started there).
    struct Dir(std::path::PathBuf, Vec<std::process::Child>);

    impl Drop for Dir {
        fn drop(&mut self) {
            for c in &mut self.1 {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("cutover-setup-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d, Vec::new())
    }

    /// Starts a running copy of `sleep` at `path`: its file is busy (a write to it fails
    /// with ETXTBSY) for as long as it runs.
    fn busy(d: &mut Dir, name: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = d.0.join(name);
        std::fs::copy("/bin/sleep", &path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        d.1.push(std::process::Command::new(&path).arg("30").spawn().unwrap());
        let e = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(26), "{name} is not busy: {e}"); // ETXTBSY
    }

    fn leftovers(d: &Dir) -> Vec<String> {
        std::fs::read_dir(&d.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".cutover.upload"))
            .collect()
    }

    const FAKE: &[u8] = b"#!/bin/sh\necho 'cutover 9.9.9'\n";

    #[test]
    fn an_upload_succeeds_while_the_binary_and_the_old_temp_name_are_busy() {
        let mut d = dir("busy");
        // The proxy running from `cutover`, and a copy still running from the temporary name
        // every earlier setup wrote to (where a write then failed with "Text file busy").
        busy(&mut d, "cutover");
        busy(&mut d, "cutover.new");
        let installed = d.0.join("cutover");
        let version = upload(
            &cutover_remote::local::LocalHost,
            d.0.to_str().unwrap(),
            FAKE,
        );
        assert_eq!(version.as_deref(), Ok("cutover 9.9.9"));
        assert_eq!(std::fs::read(&installed).unwrap(), FAKE);
        assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));
        for c in &mut d.1 {
            assert!(
                c.try_wait().unwrap().is_none(),
                "a running copy was disturbed"
            );
        }
        // A killed setup's upload is removed once it is an hour old; a fresh one is not.
        let stale = d.0.join(".cutover.upload.OLD123");
        let fresh = d.0.join(".cutover.upload.NEW123");
        std::fs::write(&stale, b"x").unwrap();
        std::fs::write(&fresh, b"x").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
            .unwrap();
        // Again, over the binary just installed.
        let version = upload(
            &cutover_remote::local::LocalHost,
            d.0.to_str().unwrap(),
            FAKE,
        );
        assert_eq!(version.as_deref(), Ok("cutover 9.9.9"));
        assert!(!stale.exists(), "a stale upload was left");
        assert!(
            fresh.exists(),
            "a fresh upload (maybe another setup's) was removed"
        );
    }

    #[test]
    fn an_upload_succeeds_while_another_writer_holds_the_old_temp_name() {
        let d = dir("writer");
        // Another setup still writing to `cutover.new`: running that name failed with
        // "Text file busy", reported as "this host cannot run the cutover binary".
        let writer = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.0.join("cutover.new"))
            .unwrap();
        let version = upload(
            &cutover_remote::local::LocalHost,
            d.0.to_str().unwrap(),
            FAKE,
        );
        assert_eq!(version.as_deref(), Ok("cutover 9.9.9"));
        assert_eq!(std::fs::read(d.0.join("cutover")).unwrap(), FAKE);
        drop(writer);
    }

    #[test]
    fn a_failed_upload_says_what_failed_and_leaves_the_installed_binary() {
        let d = dir("fail");
        let dir = d.0.to_str().unwrap();
        std::fs::write(d.0.join("cutover"), FAKE).unwrap();
        let e = upload(
            &cutover_remote::local::LocalHost,
            dir,
            b"#!/nonexistent/interpreter\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with(&format!(
                "this host cannot run the cutover binary (architecture {}; built for {} with glibc): ",
                std::env::consts::ARCH,
                std::env::consts::ARCH
            )),
            "{e}"
        );
        assert!(
            e.contains(".cutover.upload."),
            "the real error is missing: {e}"
        );
        assert_eq!(std::fs::read(d.0.join("cutover")).unwrap(), FAKE);
        assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));

        // Fewer bytes than announced (a connection that dropped mid-upload).
        let script = Script::new(UPLOAD, &[("dir", dir), ("size", "999"), ("arch", "x")]);
        let mut short: &[u8] = FAKE;
        let out = cutover_remote::local::LocalHost
            .run(&script, Some(&mut short))
            .unwrap();
        let e = err_of(&out);
        assert!(
            e.starts_with("the upload to ")
                && e.ends_with(&format!(
                    " is incomplete: {} of 999 bytes arrived (disk full?)",
                    FAKE.len()
                )),
            "{e}"
        );
        assert_eq!(std::fs::read(d.0.join("cutover")).unwrap(), FAKE);
        assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));
    }
}
