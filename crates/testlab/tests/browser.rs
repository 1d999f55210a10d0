//! The browser harness against pages of its own: it reads text, sees a dialog a page opens and
//! accepts a `confirm`, and renders at the width it was asked for.

use std::time::Duration;
use testlab::Browser;

#[test]
fn reads_the_page_and_sees_dialogs() {
    let b = Browser::start(375, 700);
    b.goto("data:text/html,<p id=x>hello &lt;b&gt;</p><button id=c>go</button>");
    assert_eq!(b.text("#x"), "hello <b>");
    assert_eq!(b.js("return window.innerWidth"), 375);
    assert_eq!(b.dialog(), None);
    b.js("document.getElementById('c').onclick = () => { document.title = confirm('sure?') ? 'yes' : 'no' }");
    b.click("#c");
    assert_eq!(b.dialog().as_deref(), Some("sure?"));
    b.accept_dialog();
    b.wait_for("the title", Duration::from_secs(5), || {
        (b.js("return document.title") == "yes").then_some(())
    });
    assert_eq!(b.dialog(), None);
}
