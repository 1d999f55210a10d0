//! What cutover does on a host, one remote invocation per phase (each SSH session is a round
//! trip, an `ssh` client here and a shell there, so a phase is one script, not one command per
//! step): prepare (check the root,
//! take the host lock, report `current` and the releases, clear stale `.partial` dirs), stage
//! (stream a tar or tar.gz, or a delta against the current release, into `releases/<id>.partial`,
//! flush its file system to disk, rename when complete), switch (`ln -s` to a
//! unique temp name, `mv -T` over `current`, run `reload` in the release), finish (prune and
//! unlock), and the read-only probes behind `status` and `check`.
//!
//! **Invariant:** `current` changes only by one rename(2) of a complete release's symlink; a
//! release directory exists under its final name only once it is complete.

use cutover_remote::{Output, Remote, RemoteError, Script};
use std::io::Read;

/// The host lock's state as the host reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostLock {
    Acquired,
    /// Held by this holder line (JSON written by whoever holds it; may be empty).
    Held(String),
}

/// What `prepare` found on a host.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub(crate) lock: HostLock,
    pub(crate) current: Option<String>,
    pub(crate) releases: Vec<String>,
    /// The host can stage from a delta (GNU `cp --parents` and `xargs`; see [`crate::delta`]).
    pub(crate) delta: bool,
}

/// A host-side failure that is not a connection problem.
#[derive(Debug, Clone)]
pub(crate) enum OpError {
    Remote(RemoteError),
    Host(String),
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpError::Remote(e) => write!(f, "{e}"),
            OpError::Host(m) => f.write_str(m),
        }
    }
}

impl From<RemoteError> for OpError {
    fn from(e: RemoteError) -> Self {
        OpError::Remote(e)
    }
}

fn err_line(out: &Output) -> Option<String> {
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("ERR ").map(str::to_string))
}

fn failed(out: &Output, what: &str) -> OpError {
    match err_line(out) {
        Some(m) => OpError::Host(m),
        None => OpError::Host(format!("{what} failed (exit {}): {}", out.code, out.tail())),
    }
}

// The scripts run on every host at every deploy: each external command is a fork and an
// exec on the host (about a millisecond each), so the common path uses the shell's builtins
// where it can and runs `rm` only when there is something to remove.

/// What `prepare` and `takeover` report once the lock is this run's: leftovers of a dead run
/// removed, then `current`, the releases and whether the host can stage from a delta.
macro_rules! list_host {
    () => {
        r#"
for p in "$root"/releases/*.partial "$root"/.cutover/current.*.tmp; do
  if [ -e "$p" ] || [ -L "$p" ]; then rm -rf "$root"/releases/*.partial "$root"/.cutover/current.*.tmp; break; fi
done
if [ -L "$root/current" ]; then printf 'CURRENT %s\n' "$(readlink "$root/current" 2>/dev/null)"; fi
for d in "$root"/releases/*; do [ -d "$d" ] && printf 'REL %s\n' "${d##*/}"; done
case $(cp --help 2>&1) in *--parents*) command -v xargs >/dev/null 2>&1 && echo "DELTA yes";; esac
exit 0
"#
    };
}

/// Checks the host and takes its lock; every check that can fail comes before the lock, so a
/// refused host is never left locked. Creating the lock directory is also the check that the
/// root is writable: only when it fails is it told whether the lock is held or the root is
/// not writable.
const PREPARE: &str = concat!(
    r#"
set -u
root={root}
holder={holder}
command -v tar >/dev/null 2>&1 || { echo "ERR tar is not installed on the host (cutover needs sh and tar)"; exit 3; }
if [ -e "$root/current" ] && [ ! -L "$root/current" ]; then echo "ERR $root/current exists and is not a symlink: move it away so cutover can manage it"; exit 3; fi
[ -d "$root/releases" ] || mkdir -p "$root/releases" "$root/.cutover" 2>/dev/null || { echo "ERR cannot create $root/releases: check that the SSH user may write there"; exit 3; }
if ! mkdir "$root/.cutover/lock" 2>/dev/null; then
  if [ -d "$root/.cutover/lock" ]; then
    held=
    IFS= read -r held 2>/dev/null <"$root/.cutover/lock/holder"
    printf 'LOCK held %s\n' "$held"
    exit 0
  fi
  { mkdir -p "$root/.cutover" && mkdir "$root/.cutover/lock"; } 2>/dev/null || { echo "ERR $root is not writable by the SSH user"; exit 3; }
fi
printf '%s\n' "$holder" > "$root/.cutover/lock/holder"
echo "LOCK acquired"
"#,
    list_host!()
);

const TAKEOVER: &str = concat!(
    r#"
set -u
root={root}
old={old}
new={new}
cur=
IFS= read -r cur 2>/dev/null <"$root/.cutover/lock/holder"
if [ "$cur" = "$old" ]; then
  printf '%s\n' "$new" > "$root/.cutover/lock/holder"
  echo "LOCK acquired"
else
  printf 'LOCK held %s\n' "$cur"
  exit 0
fi
"#,
    list_host!()
);

/// Unpacks the tar stream on stdin (gzip-compressed when `$gz` is `yes`) into a fresh
/// `releases/<id>.partial` (after `cd "$root/releases"`). Shared by [`STAGE`] and
/// [`STAGE_DELTA`].
macro_rules! unpack_partial {
    () => {
        r#"
rm -rf "$id.partial"
mkdir "$id.partial" || { echo "ERR cannot create $root/releases/$id.partial"; exit 3; }
if [ "$gz" = yes ]; then set -- -z; else set --; fi
# While tar runs, what it wrote is flushed every 0.2 s (if sleep takes fractions; else only at
# the end), so that the flush before the rename finds little left to write.
( while sleep 0.2; do sync -f "$id.partial" || exit 0; done ) </dev/null >/dev/null 2>&1 &
flusher=$!
if ! tar -x "$@" -o -f - -C "$id.partial"; then
  kill "$flusher" 2>/dev/null
  rm -rf "$id.partial"
  echo "ERR unpacking into $root/releases/$id.partial failed (disk full? see the tar message); the partial directory was removed"
  exit 4
fi
kill "$flusher" 2>/dev/null
"#
    };
}

/// Writes the release metadata, flushes the tree to disk and renames `.partial` to its final
/// name. Shared by [`STAGE`] and [`STAGE_DELTA`].
macro_rules! complete_partial {
    () => {
        r#"
if ! printf '%s\n' "$meta" > "$id.partial/.cutover-release.json"; then
  rm -rf "$id.partial"
  echo "ERR cannot write $id.partial/.cutover-release.json (disk full?)"
  exit 4
fi
# On disk before it can become current: a power loss after the switch must not leave
# `current` pointing at files the kernel had not written yet.
sync -f "$id.partial" 2>/dev/null || sync
mv "$id.partial" "$id" || { rm -rf "$id.partial"; echo "ERR cannot rename $id.partial to $id"; exit 4; }
echo STAGED
"#
    };
}

const STAGE: &str = concat!(
    r#"
set -u
root={root}
id={id}
meta={meta}
gz={gz}
cd "$root/releases" || { echo "ERR $root/releases is missing"; exit 3; }
"#,
    unpack_partial!(),
    complete_partial!()
);

/// Unpacks a stream that is still being packed into `releases/<token>.partial`, and stops
/// there: its release id is known only once the stream is whole (see
/// [`crate::stream`]). [`STAGE_FINISH`] names it; `prepare` removes one left by a dead run.
const STAGE_STREAM: &str = concat!(
    r#"
set -u
root={root}
id={token}
gz={gz}
cd "$root/releases" || { echo "ERR $root/releases is missing"; exit 3; }
"#,
    unpack_partial!(),
    r#"
echo UNPACKED
"#
);

/// Gives a streamed upload its release id: `<token>.partial` becomes `<id>.partial`, then
/// metadata, flush and rename as for any upload.
const STAGE_FINISH: &str = concat!(
    r#"
set -u
root={root}
token={token}
id={id}
meta={meta}
cd "$root/releases" || { echo "ERR $root/releases is missing"; exit 3; }
[ -d "$token.partial" ] || { echo "ERR the streamed upload $root/releases/$token.partial is gone"; exit 4; }
if [ -e "$id.partial" ]; then rm -rf "$id.partial"; fi
mv "$token.partial" "$id.partial" || { rm -rf "$token.partial"; echo "ERR cannot rename $token.partial to $id.partial"; exit 4; }
"#,
    complete_partial!()
);

/// Removes a streamed upload that will not become a release.
const STAGE_DISCARD: &str = r#"
root={root}
token={token}
rm -rf "$root/releases/$token.partial"
"#;

/// Stages from a delta tarball (see [`crate::delta`]): unpack it into a fresh `.partial`
/// directory, then hard-link the listed unchanged files from the base release into it.
const STAGE_DELTA: &str = concat!(
    r#"
set -u
root={root}
id={id}
base={base}
meta={meta}
links_name={links}
gz=yes
cd "$root/releases" || { echo "ERR $root/releases is missing"; exit 3; }
[ -d "$base" ] || { echo "ERR the base release $base is not on this host"; exit 3; }
"#,
    unpack_partial!(),
    r#"
links="$id.partial/$links_name"
[ -f "$links" ] || { rm -rf "$id.partial"; echo "ERR the delta carried no list of unchanged files"; exit 4; }
if ! ( cd "$base" && xargs -0 -r cp -l --parents -t "../$id.partial" -- < "../$links" ); then
  rm -rf "$id.partial"
  echo "ERR linking the unchanged files from release $base failed (was it modified on the host?); the partial directory was removed"
  exit 4
fi
rm -f "$links"
"#,
    complete_partial!()
);

const SWITCH: &str = r#"
set -u
root={root}
id={id}
reload={reload}
[ -d "$root/releases/$id" ] || { echo "ERR release $id is not on this host"; exit 3; }
tmp="$root/.cutover/current.$$.tmp"
if [ -e "$tmp" ] || [ -L "$tmp" ]; then rm -f "$tmp"; fi
ln -s "releases/$id" "$tmp" || { echo "ERR cannot create the symlink $tmp"; exit 3; }
mv -T "$tmp" "$root/current" || { rm -f "$tmp"; echo "ERR cannot rename $tmp over $root/current"; exit 3; }
echo SWITCHED
if [ -n "$reload" ]; then
  out=$(cd "$root/releases/$id" && sh -c "$reload" 2>&1 </dev/null)
  rc=$?
  printf 'RELOAD %s\n%s\n' "$rc" "$out"
fi
exit 0
"#;

const FINISH: &str = r#"
set -u
root={root}
holder={holder}
prune={prune}
# One release per line of $prune, all removed by one rm.
set -f
IFS='
'
set --
for d in $prune; do set -- "$@" "$root/releases/$d"; done
unset IFS
set +f
if [ $# -gt 0 ]; then rm -rf "$@"; fi
cur=
IFS= read -r cur 2>/dev/null <"$root/.cutover/lock/holder"
if [ "$cur" = "$holder" ]; then rm -rf "$root/.cutover/lock"; fi
echo FINISHED
"#;

const STATUS: &str = r#"
root={root}
printf 'CURRENT %s\n' "$(readlink "$root/current" 2>/dev/null)"
"#;

const CHECK: &str = r#"
set -u
root={root}
if command -v tar >/dev/null 2>&1; then echo "TAR yes"; else echo "TAR no"; fi
if mkdir -p "$root/releases" "$root/.cutover" 2>/dev/null && ( : > "$root/.cutover/.probe.$$" ) 2>/dev/null; then rm -f "$root/.cutover/.probe.$$"; echo "WRITABLE yes"; else echo "WRITABLE no"; fi
if [ -d "$root/.cutover/lock" ]; then printf 'LOCK held %s\n' "$(head -n 1 "$root/.cutover/lock/holder" 2>/dev/null)"; else echo "LOCK free"; fi
printf 'CURRENT %s\n' "$(readlink "$root/current" 2>/dev/null)"
"#;

fn parse_prepared(out: &Output) -> Result<Prepared, OpError> {
    if !out.success() {
        return Err(failed(out, "prepare"));
    }
    let mut lock = None;
    let mut current = None;
    let mut releases = Vec::new();
    let mut delta = false;
    for line in out.stdout.lines() {
        if line == "DELTA yes" {
            delta = true;
        } else if line == "LOCK acquired" {
            lock = Some(HostLock::Acquired);
        } else if let Some(h) = line.strip_prefix("LOCK held") {
            lock = Some(HostLock::Held(h.trim().to_string()));
        } else if let Some(c) = line.strip_prefix("CURRENT ") {
            current = release_of_link(c);
        } else if let Some(r) = line.strip_prefix("REL ") {
            if cutover_core::ReleaseId::parse(r).is_some() {
                releases.push(r.to_string());
            }
        }
    }
    let lock = lock.ok_or_else(|| failed(out, "prepare"))?;
    releases.sort();
    Ok(Prepared {
        lock,
        current,
        releases,
        delta,
    })
}

/// `releases/<id>` -> `<id>`; anything else (not managed by cutover) -> None.
pub(crate) fn release_of_link(target: &str) -> Option<String> {
    let t = target.trim();
    let id = t.strip_prefix("releases/").unwrap_or(t);
    let id = id.rsplit('/').next().unwrap_or(id);
    cutover_core::ReleaseId::parse(id).map(|r| r.to_string())
}

pub(crate) fn prepare(r: &dyn Remote, root: &str, holder: &str) -> Result<Prepared, OpError> {
    let s = Script::new(PREPARE, &[("root", root), ("holder", holder)]);
    parse_prepared(&r.run(&s, None)?)
}

pub(crate) fn take_over(
    r: &dyn Remote,
    root: &str,
    old: &str,
    new: &str,
) -> Result<Prepared, OpError> {
    let s = Script::new(TAKEOVER, &[("root", root), ("old", old), ("new", new)]);
    parse_prepared(&r.run(&s, None)?)
}

pub(crate) fn stage(
    r: &dyn Remote,
    root: &str,
    id: &str,
    meta: &str,
    gz: bool,
    tarball: &mut (dyn Read + Send),
) -> Result<(), OpError> {
    let gz = if gz { "yes" } else { "no" };
    let s = Script::new(
        STAGE,
        &[("root", root), ("id", id), ("meta", meta), ("gz", gz)],
    );
    let out = r.run(&s, Some(tarball))?;
    if out.success() && out.stdout.lines().any(|l| l == "STAGED") {
        Ok(())
    } else {
        Err(failed(&out, "staging"))
    }
}

/// Unpacks a stream into `releases/<token>.partial` as it arrives (see [`STAGE_STREAM`]).
pub(crate) fn stage_stream(
    r: &dyn Remote,
    root: &str,
    token: &str,
    gz: bool,
    stream: &mut (dyn Read + Send),
) -> Result<(), OpError> {
    let gz = if gz { "yes" } else { "no" };
    let s = Script::new(
        STAGE_STREAM,
        &[("root", root), ("token", token), ("gz", gz)],
    );
    let out = r.run(&s, Some(stream))?;
    if out.success() && out.stdout.lines().any(|l| l == "UNPACKED") {
        Ok(())
    } else {
        Err(failed(&out, "staging"))
    }
}

/// Makes the streamed upload `token` release `id` (see [`STAGE_FINISH`]).
pub(crate) fn stage_finish(
    r: &dyn Remote,
    root: &str,
    token: &str,
    id: &str,
    meta: &str,
) -> Result<(), OpError> {
    let s = Script::new(
        STAGE_FINISH,
        &[("root", root), ("token", token), ("id", id), ("meta", meta)],
    );
    let out = r.run(&s, None)?;
    if out.success() && out.stdout.lines().any(|l| l == "STAGED") {
        Ok(())
    } else {
        Err(failed(&out, "staging"))
    }
}

/// Removes the streamed upload `token` (best effort: `prepare` removes what is left).
pub(crate) fn stage_discard(r: &dyn Remote, root: &str, token: &str) {
    let s = Script::new(STAGE_DISCARD, &[("root", root), ("token", token)]);
    let _ = r.run(&s, None);
}

/// Stages release `id` from a delta against release `base` (already on the host).
pub(crate) fn stage_delta(
    r: &dyn Remote,
    root: &str,
    id: &str,
    base: &str,
    meta: &str,
    delta: &mut (dyn Read + Send),
) -> Result<(), OpError> {
    let s = Script::new(
        STAGE_DELTA,
        &[
            ("root", root),
            ("id", id),
            ("base", base),
            ("meta", meta),
            ("links", crate::delta::LINKS),
        ],
    );
    let out = r.run(&s, Some(delta))?;
    if out.success() && out.stdout.lines().any(|l| l == "STAGED") {
        Ok(())
    } else {
        Err(failed(&out, "staging from a delta"))
    }
}

/// The result of a switch: it happened; and the reload's exit code and output, if any.
#[derive(Debug, Clone)]
pub(crate) struct Switched {
    pub(crate) reload: Option<(i32, String)>,
}

pub(crate) fn switch(
    r: &dyn Remote,
    root: &str,
    id: &str,
    reload: Option<&str>,
) -> Result<Switched, OpError> {
    let s = Script::new(
        SWITCH,
        &[("root", root), ("id", id), ("reload", reload.unwrap_or(""))],
    );
    let out = r.run(&s, None)?;
    if !out.success() || !out.stdout.lines().any(|l| l == "SWITCHED") {
        return Err(failed(&out, "switch"));
    }
    let reload = out.stdout.split_once("\nRELOAD ").map(|(_, rest)| {
        let (code, output) = rest.split_once('\n').unwrap_or((rest, ""));
        (
            code.trim().parse().unwrap_or(-1),
            output.trim_end().to_string(),
        )
    });
    Ok(Switched { reload })
}

pub(crate) fn finish(
    r: &dyn Remote,
    root: &str,
    holder: &str,
    prune: &[String],
) -> Result<(), OpError> {
    let list = prune.join("\n");
    let s = Script::new(
        FINISH,
        &[("root", root), ("holder", holder), ("prune", &list)],
    );
    let out = r.run(&s, None)?;
    if out.success() {
        Ok(())
    } else {
        Err(failed(&out, "finish"))
    }
}

/// What `current` points at (`Ok(None)`: nothing deployed yet, or not a cutover release).
pub(crate) fn current(r: &dyn Remote, root: &str) -> Result<Option<String>, OpError> {
    let out = r.run(&Script::new(STATUS, &[("root", root)]), None)?;
    Ok(out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("CURRENT "))
        .and_then(release_of_link))
}

/// The facts `cutover check` reports for a reachable host.
#[derive(Debug, Clone)]
pub(crate) struct CheckFacts {
    pub(crate) tar: bool,
    pub(crate) writable: bool,
    pub(crate) lock: Option<String>,
    pub(crate) current: Option<String>,
}

pub(crate) fn check(r: &dyn Remote, root: &str) -> Result<CheckFacts, OpError> {
    let out = r.run(&Script::new(CHECK, &[("root", root)]), None)?;
    let has = |l: &str| out.stdout.lines().any(|x| x == l);
    Ok(CheckFacts {
        tar: has("TAR yes"),
        writable: has("WRITABLE yes"),
        lock: out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("LOCK held").map(|h| h.trim().to_string())),
        current: out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("CURRENT "))
            .and_then(release_of_link),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_targets_map_to_release_ids() {
        assert_eq!(
            release_of_link("releases/20261126T091500Z-3f9a2c1").as_deref(),
            Some("20261126T091500Z-3f9a2c1")
        );
        assert_eq!(
            release_of_link("/srv/x/releases/20261126T091500Z-3f9a2c1").as_deref(),
            Some("20261126T091500Z-3f9a2c1")
        );
        assert_eq!(release_of_link(""), None);
        assert_eq!(release_of_link("/var/www"), None);
    }

    #[test]
    fn templates_have_every_placeholder_filled() {
        // Script::new panics on a missing or unused value: build each once.
        let _ = Script::new(PREPARE, &[("root", "/r"), ("holder", "h")]);
        let _ = Script::new(TAKEOVER, &[("root", "/r"), ("old", "a"), ("new", "b")]);
        let _ = Script::new(
            STAGE,
            &[("root", "/r"), ("id", "i"), ("meta", "{}"), ("gz", "no")],
        );
        let _ = Script::new(
            STAGE_DELTA,
            &[
                ("root", "/r"),
                ("id", "i"),
                ("base", "b"),
                ("meta", "{}"),
                ("links", "l"),
            ],
        );
        let _ = Script::new(SWITCH, &[("root", "/r"), ("id", "i"), ("reload", "")]);
        let _ = Script::new(FINISH, &[("root", "/r"), ("holder", "h"), ("prune", "")]);
        let _ = Script::new(CHECK, &[("root", "/r")]);
    }

    /// A directory of its own under the system's temp dir, removed when dropped.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let p =
                std::env::temp_dir().join(format!("cutover-hostops-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const A: &str = "20261126T091500Z-3f9a2c1";
    const B: &str = "20261126T091400Z-aaaaaaa";
    const C: &str = "20261126T091300Z-bbbbbbb";

    /// The scripts of a run's lock, with `sh` on this machine (as `LocalHost` runs them): what
    /// the common path does with the shell's builtins must say what the programs said before.
    #[test]
    fn prepare_takeover_and_finish_keep_the_lock_list_the_host_and_clear_a_dead_runs_leftovers() {
        use cutover_remote::local::LocalHost;
        use std::fs;
        let s = Scratch::new("lock");
        let root = s.0.join("site"); // absent: a first deploy creates it
        let r = root.to_str().unwrap();
        let p = prepare(&LocalHost, r, "holder one").unwrap();
        assert_eq!(p.lock, HostLock::Acquired);
        assert_eq!((p.current, p.releases.len()), (None, 0));
        assert!(root.join("releases").is_dir());
        let holder = || fs::read_to_string(root.join(".cutover/lock/holder")).unwrap();
        assert_eq!(holder(), "holder one\n");
        let p = prepare(&LocalHost, r, "holder two").unwrap();
        assert_eq!(p.lock, HostLock::Held("holder one".into()));
        assert_eq!(holder(), "holder one\n", "a held lock is left as it is");

        // A release served, and what a dead run left: an upload and a temp symlink.
        fs::create_dir_all(root.join("releases").join(A)).unwrap();
        fs::create_dir_all(root.join("releases/stream-7.partial/deep")).unwrap();
        std::os::unix::fs::symlink("nowhere", root.join(".cutover/current.99.tmp")).unwrap();
        std::os::unix::fs::symlink(format!("releases/{A}"), root.join("current")).unwrap();
        finish(&LocalHost, r, "holder one", &[]).unwrap();
        assert!(!root.join(".cutover/lock").exists(), "its holder unlocks");
        let p = prepare(&LocalHost, r, "holder three").unwrap();
        assert_eq!(p.lock, HostLock::Acquired);
        assert_eq!(p.current.as_deref(), Some(A));
        assert_eq!(p.releases, vec![A.to_string()]);
        assert!(!root.join("releases/stream-7.partial").exists());
        assert!(fs::symlink_metadata(root.join(".cutover/current.99.tmp")).is_err());

        let p = take_over(&LocalHost, r, "holder three", "holder four").unwrap();
        assert_eq!(p.lock, HostLock::Acquired);
        assert_eq!(holder(), "holder four\n");
        let p = take_over(&LocalHost, r, "holder three", "holder five").unwrap();
        assert_eq!(p.lock, HostLock::Held("holder four".into()));

        // Prune: every listed release goes, with one rm; only the holder unlocks.
        for id in [B, C] {
            fs::create_dir_all(root.join("releases").join(id).join("x")).unwrap();
        }
        finish(&LocalHost, r, "holder three", &[B.into(), C.into()]).unwrap();
        assert!(!root.join("releases").join(B).exists());
        assert!(!root.join("releases").join(C).exists());
        assert!(root.join("releases").join(A).is_dir());
        assert!(
            root.join(".cutover/lock").exists(),
            "another holder's lock stays"
        );
        finish(&LocalHost, r, "holder four", &[]).unwrap();
        assert!(!root.join(".cutover/lock").exists());
    }

    #[test]
    fn prepare_refuses_a_root_it_cannot_manage_and_says_why() {
        use cutover_remote::local::LocalHost;
        let s = Scratch::new("refuse");
        let root = s.0.join("site");
        std::fs::create_dir_all(root.join("current")).unwrap();
        let r = root.to_str().unwrap();
        let e = prepare(&LocalHost, r, "h").unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{r}/current exists and is not a symlink: move it away so cutover can manage it"
            )
        );
        assert!(
            !root.join(".cutover/lock").exists(),
            "refused before the lock"
        );
        let e = prepare(&LocalHost, "/proc/cutover-no-root", "h")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "cannot create /proc/cutover-no-root/releases: check that the SSH user may write there"
        );
    }
}
