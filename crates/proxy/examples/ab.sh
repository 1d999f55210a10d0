#!/bin/bash
# A/B harness for the edge proxy's per-request cost (not part of the test suite).
#
#   cargo build --release -p cutover-proxy --example proxy_run
#   crates/proxy/examples/ab.sh ROUNDS SECONDS BIN [BIN...]
#
# Starts a backend (Debian nginx answering a 3-byte body with keep-alive) on 127.0.0.1:18080,
# nginx as a reverse proxy to it on :18081 (upstream keepalive 32, HTTP/1.1, access_log off,
# X-Forwarded-* set like cutover does) and each BIN (a build of examples/proxy_run.rs, e.g.
# target/release/examples/proxy_run copied aside per variant) on :18090+i routed to the
# backend; then loads direct, nginx and each BIN in turn with `wrk -t1 -c8 -d SECONDS`,
# ROUNDS times, and prints medians: requests/s, p50/p99 and the CPU time (utime + stime from
# /proc/PID/stat) of the proxy's and of the backend's processes per request. CPU per
# request is the steadier number on a shared machine. Needs nginx, wrk and python3; kills
# only the processes it started.
set -u
ROUNDS=$1; DUR=$2; shift 2
W=$(mktemp -d /tmp/cutover-proxy-ab.XXXXXX)
mkdir -p "$W/logs"
cleanup() { for p in ${PIDS:-}; do kill "$p" 2>/dev/null; done
            for f in backend rp; do [ -f "$W/$f.pid" ] && kill "$(cat "$W/$f.pid")" 2>/dev/null; done
            wait 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
cat > "$W/backend.conf" <<CONF
worker_processes 1; pid $W/backend.pid; error_log $W/backend.err warn; daemon on;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 10000000; keepalive_timeout 60s;
  server { listen 127.0.0.1:18080; location / { return 200 "ok\n"; } } }
CONF
cat > "$W/rp.conf" <<'CONF'
worker_processes auto; pid W/rp.pid; error_log W/rp.err warn; daemon on;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 10000000;
  upstream be { server 127.0.0.1:18080; keepalive 32; keepalive_requests 10000000; }
  server { listen 127.0.0.1:18081;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host $host; proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header X-Forwarded-Host $http_host; } } }
CONF
sed -i "s|W/|$W/|g" "$W/rp.conf"
nginx -c "$W/backend.conf" -p "$W/" && nginx -c "$W/rp.conf" -p "$W/" || exit 1
sleep 0.3
cpu() { local t=0; for p in "$@"; do read -ra f < "/proc/$p/stat"; t=$((t + f[13] + f[14])); done; echo $t; }
BE=$(pgrep -P "$(cat "$W/backend.pid")" | paste -sd,)
RPW=$(pgrep -P "$(cat "$W/rp.pid")" | paste -sd,)
targets="direct:18080: nginx:18081:$RPW"
i=0; PIDS=""
for BIN in "$@"; do
  port=$((18090 + i)); d="$W/p$i"; mkdir -p "$d"
  "$BIN" "127.0.0.1:$port" "$d" 2>"$d.log" & pid=$!
  PIDS="$PIDS $pid"
  for _ in $(seq 50); do [ -S "$d/proxy.sock" ] && break; sleep 0.1; done
  python3 - "$d/proxy.sock" <<'PY' >/dev/null
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(b'{"op":"deploy","service":"web","target":"127.0.0.1:18080","health_path":"/","health_interval_ms":10}\n')
print(s.makefile().readline())
PY
  targets="$targets $(basename "$BIN")#$i:$port:$pid"
  i=$((i + 1))
done
for t in $targets; do IFS=: read -r _ port _ <<< "$t"; wrk -t1 -c8 -d1s "http://127.0.0.1:$port/" >/dev/null; done
: > "$W/ab.out"
for _ in $(seq "$ROUNDS"); do
  for t in $targets; do
    IFS=: read -r name port P <<< "$t"; P=${P//,/ }
    b0=$(cpu ${BE//,/ }); p0=0; [ -n "$P" ] && p0=$(cpu $P)
    out=$(wrk -t1 -c8 -d"${DUR}s" --latency "http://127.0.0.1:$port/")
    b1=$(cpu ${BE//,/ }); p1=0; [ -n "$P" ] && p1=$(cpu $P)
    reqs=$(echo "$out" | awk '/requests in/{print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
    p50=$(echo "$out" | awk '$1=="50%"{print $2}'); p99=$(echo "$out" | awk '$1=="99%"{print $2}')
    errs=$(echo "$out" | grep -E "Non-2xx|Socket errors" | tr '\n' ' ')
    echo "$name $rps $p50 $p99 $(( (p1 - p0) * 1000000 / $(getconf CLK_TCK) )) $(( (b1 - b0) * 1000000 / $(getconf CLK_TCK) )) $reqs $errs" >> "$W/ab.out"
  done
done
python3 - "$W/ab.out" <<'PY'
import collections, statistics as st, sys
def us(x):
    for suf, k in (("us", 1), ("ms", 1e3), ("s", 1e6)):
        if x.endswith(suf): return float(x[:-len(suf)]) * k
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    f = line.split()
    n = int(f[6])
    rows[f[0]].append((float(f[1]), us(f[2]), us(f[3]), int(f[4]) / n, int(f[5]) / n, " ".join(f[7:])))
print(f"{'path':18} {'req/s':>8} {'(min-max)':>15} {'p50 us':>7} {'p99 us':>7} {'proxy us/req':>12} {'(min-max)':>13} {'backend us/req':>14}")
for k, v in rows.items():
    rps = [x[0] for x in v]; pu = [x[3] for x in v]
    errs = " ".join(sorted({x[5] for x in v if x[5]}))
    print(f"{k:18} {st.median(rps):8.0f} {min(rps):7.0f}-{max(rps):<7.0f} {st.median([x[1] for x in v]):7.0f} "
          f"{st.median([x[2] for x in v]):7.0f} {st.median(pu):12.2f} {min(pu):6.2f}-{max(pu):<6.2f} "
          f"{st.median([x[4] for x in v]):14.2f} {errs}")
PY
