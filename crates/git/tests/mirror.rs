//! The mirror against real repositories made with the `git` CLI.

use cutover_git::{Change, GitError, Mirror, RepoUrl};
use std::path::{Path, PathBuf};
use std::process::Command;

struct Repo {
    dir: PathBuf,
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Ada")
        .env("GIT_AUTHOR_EMAIL", "ada@example.com")
        .env("GIT_COMMITTER_NAME", "Ada")
        .env("GIT_COMMITTER_EMAIL", "ada@example.com")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Repo {
    fn new(name: &str) -> Repo {
        let dir =
            std::env::temp_dir().join(format!("cutover-git-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("work")).unwrap();
        git(&dir.join("work"), &["init", "-q", "-b", "main"]);
        Repo { dir }
    }

    fn work(&self) -> PathBuf {
        self.dir.join("work")
    }

    fn commit(&self, file: &str, content: &str, subject: &str) -> String {
        let p = self.work().join(file);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, content).unwrap();
        git(&self.work(), &["add", "-A"]);
        git(&self.work(), &["commit", "-q", "-m", subject]);
        git(&self.work(), &["rev-parse", "HEAD"])
    }

    fn mirror(&self) -> Mirror {
        let url = RepoUrl::parse(self.work().to_str().unwrap()).unwrap();
        Mirror::open(&self.dir.join("mirror.git"), url, None).unwrap()
    }
}

impl Drop for Repo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn resolves_branches_tags_and_relative_revisions() {
    let r = Repo::new("resolve");
    let c1 = r.commit("a.txt", "1", "first");
    git(&r.work(), &["tag", "-a", "v1.0", "-m", "release 1"]);
    let c2 = r.commit("a.txt", "2", "second");
    git(&r.work(), &["tag", "light"]);
    let mut m = r.mirror();
    let s = m.fetch().unwrap();
    assert!(s.received_pack);
    assert_eq!(m.resolve("main").unwrap().sha, c2);
    assert_eq!(m.resolve("main").unwrap().subject, "second");
    assert_eq!(m.resolve("main").unwrap().author, "Ada");
    assert_eq!(m.resolve("origin/main").unwrap().sha, c2);
    assert_eq!(m.resolve("HEAD").unwrap().sha, c2);
    assert_eq!(m.resolve("HEAD~1").unwrap().sha, c1);
    assert_eq!(m.resolve("v1.0").unwrap().sha, c1);
    assert_eq!(m.resolve("light").unwrap().sha, c2);
    assert_eq!(m.resolve(&c1).unwrap().sha, c1);
    assert_eq!(m.resolve(&c1[..7]).unwrap().sha, c1);
    assert!(matches!(m.resolve("nope"), Err(GitError::Unknown { .. })));
    assert!(matches!(
        m.resolve("main:a.txt"),
        Err(GitError::NotACommit { .. })
    ));

    // The branch moves; a second fetch follows it.
    let c3 = r.commit("b.txt", "3", "third");
    m.fetch().unwrap();
    assert_eq!(m.resolve("main").unwrap().sha, c3);
    let log = m.commits_between(&c1, &c3, 100).unwrap();
    assert_eq!(
        log.iter().map(|c| c.sha.as_str()).collect::<Vec<_>>(),
        [c3.as_str(), c2.as_str()]
    );
    let files = m.changed_files(&c1, &c3).unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(files[0].path, "a.txt");
    assert_eq!(files[0].change, Change::Modified);
    assert_eq!(files[1].path, "b.txt");
    assert_eq!(files[1].change, Change::Added);

    // Export writes exactly the tree.
    let dest = r.dir.join("export");
    let sum = m.export(&c3, &dest).unwrap();
    assert_eq!(sum.files, 2);
    assert_eq!(std::fs::read_to_string(dest.join("b.txt")).unwrap(), "3");
    assert!(!dest.join(".git").exists());
    // Dated with the commit, as git archive does.
    let info = m.commit(&c3).unwrap();
    for p in [dest.join("b.txt"), dest.clone()] {
        let t = std::fs::metadata(&p).unwrap().modified().unwrap();
        let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert_eq!(secs, info.commit_time, "{}", p.display());
    }
    assert!(
        m.export(&c3, &dest).is_err(),
        "never into an existing directory"
    );
}

#[test]
fn force_push_and_deleted_branches_follow_the_remote() {
    let r = Repo::new("force");
    r.commit("a", "1", "one");
    let c2 = r.commit("a", "2", "two");
    git(&r.work(), &["branch", "feature"]);
    let mut m = r.mirror();
    m.fetch().unwrap();
    assert_eq!(m.resolve("feature").unwrap().sha, c2);
    git(&r.work(), &["reset", "-q", "--hard", "HEAD~1"]);
    let c3 = r.commit("a", "3", "three (rewritten)");
    git(&r.work(), &["branch", "-D", "feature"]);
    m.fetch().unwrap();
    assert_eq!(m.resolve("main").unwrap().sha, c3);
    assert!(matches!(
        m.resolve("feature"),
        Err(GitError::Unknown { .. })
    ));
    // The force-pushed-away commit is still readable by its full id.
    assert_eq!(m.commit(&c2).unwrap().subject, "two");
    let gone = m.commits_between(&c3, &c2, 10).unwrap();
    assert_eq!(gone.len(), 1);
}

/// The id git gives a blob with `content` (computed like `git hash-object`).
fn blob_id(content: &str) -> String {
    let out = Command::new("git")
        .args(["hash-object", "--stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(content.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn ambiguous_and_unknown_short_shas() {
    let r = Repo::new("ambiguous");
    r.commit("a", "0", "base");
    // Blobs until two share a 4-character prefix.
    let mut seen = std::collections::HashMap::new();
    let mut pair = None;
    for i in 0..5000 {
        let content = format!("blob {i}\n");
        let id = blob_id(&content);
        if let Some((other, other_content)) =
            seen.insert(id[..4].to_string(), (id.clone(), content.clone()))
        {
            pair = Some((other_content, content));
            assert_ne!(other, id);
            break;
        }
    }
    let (a, b) = pair.expect("a shared prefix");
    // Fetch transfers only reachable objects: make both blobs reachable.
    std::fs::write(r.work().join("a"), &a).unwrap();
    std::fs::write(r.work().join("b"), &b).unwrap();
    let prefix = blob_id(&a)[..4].to_string();
    git(&r.work(), &["add", "-A"]);
    git(&r.work(), &["commit", "-q", "-m", "blobs"]);
    let mut m = r.mirror();
    m.fetch().unwrap();
    match m.resolve(&prefix) {
        Err(GitError::Ambiguous { candidates, .. }) => {
            assert!(candidates.len() >= 2, "{candidates:?}");
            assert!(
                candidates
                    .iter()
                    .all(|c| c.starts_with(&prefix) && c.len() > 40),
                "{candidates:?}"
            );
        }
        other => panic!("{prefix}: {other:?}"),
    }
    let unknown = if prefix == "ffff" {
        "0000000"
    } else {
        "ffffffff"
    };
    match m.resolve(unknown) {
        Err(e @ GitError::Unknown { .. }) => assert!(e.to_string().contains(unknown)),
        other => panic!("{other:?}"),
    }
}
