//! A real browser for panel tests: Debian's `chromedriver` on a free loopback port driving a
//! headless chromium (`--headless=new --no-sandbox`), and a fantoccini WebDriver client to it.
//! The calls are blocking (the harness owns a small tokio runtime), so a plain `#[test]` reads
//! like what a user does: `b.goto(url); b.fill("#login [name=user]", "admin"); b.click(..)`.
//!
//! Dropping a [`Browser`] ends the WebDriver session (chromium exits) and kills the
//! chromedriver process group it started, nothing else. Prompts (`alert`, `confirm`) are left
//! open for the test to see ([`Browser::dialog`]) instead of being dismissed silently, so a
//! test can assert that hostile data opened no dialog.

use crate::sys;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A headless chromium under chromedriver; see the module doc.
pub struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Child,
}

impl Browser {
    /// Starts chromedriver and a headless chromium window of `width` x `height` CSS pixels.
    /// Panics with what went wrong (e.g. chromedriver not installed).
    pub fn start(width: u32, height: u32) -> Browser {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
            l.local_addr().unwrap().port()
        };
        let mut driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that drop can end chromedriver and every chromium it
            // started without touching anything else.
            .process_group(0)
            .spawn()
            .expect("chromedriver (Debian: apt-get install chromium-driver)");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if let Err(e) = sys::wait_port(addr, Some(&mut driver), Duration::from_secs(20)) {
            let _ = driver.kill();
            panic!("chromedriver did not start: {e}");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let mut chrome = json!({
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                format!("--window-size={width},{height}"),
            ]
        });
        for binary in ["/usr/lib/chromium/chromium", "/usr/bin/chromium"] {
            if Path::new(binary).exists() {
                chrome["binary"] = json!(binary);
                break;
            }
        }
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("goog:chromeOptions".into(), chrome);
        caps.insert("unhandledPromptBehavior".into(), json!("ignore"));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = rt.block_on(async {
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&format!("http://{addr}"))
                .await
        });
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                sys::signal(&[driver.id()], "KILL");
                let _ = driver.wait();
                panic!("chromium did not start under chromedriver: {e}");
            }
        };
        let b = Browser {
            rt,
            client: Some(client),
            driver,
        };
        b.resize(width, height);
        b
    }

    /// Makes the viewport `width` x `height` CSS pixels (e.g. 375 wide: a phone).
    pub fn resize(&self, width: u32, height: u32) {
        // The window's size includes its frame: add what the frame takes now.
        let v = self.js(
            "return [window.outerWidth - window.innerWidth, window.outerHeight - window.innerHeight]",
        );
        let dw = v[0].as_u64().unwrap_or(0) as u32;
        let dh = v[1].as_u64().unwrap_or(0) as u32;
        self.block_on(self.client().set_window_size(width + dw, height + dh))
            .expect("set the window size");
    }

    /// The WebDriver client, for what the helpers below do not cover (use with
    /// [`Browser::block_on`]).
    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("a live session")
    }

    /// Runs a future on the harness's runtime.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Opens `url` and waits for its load event.
    pub fn goto(&self, url: &str) {
        self.block_on(self.client().goto(url))
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// The address of the page shown.
    pub fn url(&self) -> String {
        self.block_on(self.client().current_url())
            .expect("the current url")
            .to_string()
    }

    /// Whether an element matches `css` now.
    pub fn exists(&self, css: &str) -> bool {
        self.block_on(self.client().find_all(Locator::Css(css)))
            .map(|v| !v.is_empty())
            .unwrap_or(false)
    }

    /// The visible text of the first element matching `css` (panics if there is none).
    pub fn text(&self, css: &str) -> String {
        self.block_on(async { self.client().find(Locator::Css(css)).await?.text().await })
            .unwrap_or_else(|e| panic!("text of {css}: {e}"))
    }

    /// The visible text of every element matching `css`, in document order.
    pub fn texts(&self, css: &str) -> Vec<String> {
        self.block_on(async {
            let mut out = Vec::new();
            for e in self.client().find_all(Locator::Css(css)).await? {
                out.push(e.text().await?);
            }
            Ok::<_, fantoccini::error::CmdError>(out)
        })
        .unwrap_or_else(|e| panic!("texts of {css}: {e}"))
    }

    /// The attribute `name` of the first element matching `css`.
    pub fn attr(&self, css: &str, name: &str) -> Option<String> {
        self.block_on(async {
            self.client()
                .find(Locator::Css(css))
                .await?
                .attr(name)
                .await
        })
        .unwrap_or_else(|e| panic!("attribute {name} of {css}: {e}"))
    }

    /// Clicks the first element matching `css`.
    pub fn click(&self, css: &str) {
        self.block_on(async { self.client().find(Locator::Css(css)).await?.click().await })
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Clears the input matching `css` and types `value` into it.
    pub fn fill(&self, css: &str, value: &str) {
        self.block_on(async {
            let e = self.client().find(Locator::Css(css)).await?;
            e.clear().await?;
            e.send_keys(value).await
        })
        .unwrap_or_else(|e| panic!("fill {css}: {e}"));
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub fn js(&self, script: &str) -> Value {
        self.block_on(self.client().execute(script, Vec::new()))
            .unwrap_or_else(|e| panic!("script {script:?}: {e}"))
    }

    /// The text of the open `alert`/`confirm`/`prompt` dialog, if one is open.
    pub fn dialog(&self) -> Option<String> {
        self.block_on(self.client().get_alert_text()).ok()
    }

    /// Accepts the open dialog (OK on a `confirm`); panics if none is open.
    pub fn accept_dialog(&self) {
        self.block_on(self.client().accept_alert())
            .unwrap_or_else(|e| panic!("accept the dialog: {e}"));
    }

    /// Polls `f` until it returns `Some`, or panics after `timeout` naming `what`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return v;
            }
            if Instant::now() >= deadline {
                panic!("waited {timeout:?} for {what}; the page is {}", self.url());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until an element matches `css`.
    pub fn wait_for_element(&self, css: &str, timeout: Duration) {
        self.wait_for(css, timeout, || self.exists(css).then_some(()));
    }

    /// A PNG of the viewport, written to `path`.
    pub fn screenshot(&self, path: &Path) {
        let png = self
            .block_on(self.client().screenshot())
            .expect("a screenshot");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), c.close()).await });
        }
        // The group chromedriver leads (see `start`): itself and any chromium left over.
        sys::run_quiet("kill", &["-KILL", "--", &format!("-{}", self.driver.id())]);
        let _ = self.driver.wait();
    }
}
