//! Scratch PostgreSQL databases for tests (this crate's suite, the server's and the CLI's):
//! each is created on the server `CUTOVER_TEST_POSTGRES` names (default: the role `.ci/run`
//! makes, `postgres://cutover_test:cutover_test@127.0.0.1:5432`) and dropped when dropped.
//! No server, no test: it panics, saying so, rather than skip.

use postgres::{Client, NoTls};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The server tests make their databases on.
pub fn server_url() -> String {
    std::env::var("CUTOVER_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://cutover_test:cutover_test@127.0.0.1:5432".into())
}

/// A database that exists until this is dropped.
#[derive(Debug)]
pub struct ScratchDb {
    /// `postgres://.../<name>`: give it to `--database` or [`crate::Store::connect`].
    pub url: String,
    pub name: String,
}

impl ScratchDb {
    /// Creates an empty database named after `tag`, this process and a counter.
    pub fn new(tag: &str) -> ScratchDb {
        static N: AtomicUsize = AtomicUsize::new(0);
        let tag: String = tag
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(30)
            .collect();
        let name = format!(
            "cutover_t_{tag}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let server = server_url();
        let mut c = Client::connect(&format!("{server}/postgres"), NoTls).unwrap_or_else(|e| {
            panic!("the tests need PostgreSQL at {server} (see .ci/run; CUTOVER_TEST_POSTGRES overrides): {e}")
        });
        c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .and_then(|()| c.batch_execute(&format!("CREATE DATABASE {name}")))
            .unwrap_or_else(|e| panic!("cannot create the test database {name}: {e:?}"));
        ScratchDb {
            url: format!("{server}/{name}"),
            name,
        }
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        if let Ok(mut c) = Client::connect(&format!("{}/postgres", server_url()), NoTls) {
            let _ = c.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}
