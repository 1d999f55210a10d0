// cutover panel: the only script the pages load (CSP forbids inline scripts). No framework.
// 1. Forms with data-confirm ask once with confirm(); on OK they are sent with confirmed=1, so
//    the server does not ask again (without JS the server shows its own confirmation page).
// 2. Buttons with data-copy copy that text (the full commit SHA).
// 3. The run page (#run[data-events]) follows the run's events over Server-Sent Events,
//    appending each new event (never re-rendering the log); EventSource reconnects by itself
//    with Last-Event-ID. The stream's `end` event carries the final run. A bake event carries
//    its host's rows of the #bake table (counts per release, verdict), which replace them.
//    The run's release (#release) and its commit and subject (#commit) are filled in from the
//    events once the run has chosen it (the page may have been loaded before), as text only.
"use strict";
(function () {
  document.addEventListener("submit", function (e) {
    var form = e.target;
    var question = form.getAttribute("data-confirm");
    if (!question) return;
    if (!window.confirm(question)) { e.preventDefault(); return; }
    var mark = document.createElement("input");
    mark.type = "hidden"; mark.name = "confirmed"; mark.value = "1";
    form.appendChild(mark);
  });

  document.addEventListener("click", function (e) {
    var b = e.target.closest ? e.target.closest("[data-copy]") : null;
    if (!b) return;
    var text = b.getAttribute("data-copy");
    if (navigator.clipboard) {
      navigator.clipboard.writeText(text).then(function () { b.textContent = "copied"; });
    }
  });

  var run = document.getElementById("run");
  if (!run || !run.getAttribute("data-events")) return;
  var list = document.getElementById("events");
  var status = document.getElementById("run-status");
  var diagnosis = document.getElementById("diagnosis");
  var last = 0;
  Array.prototype.forEach.call(list.children, function (li) {
    last = Math.max(last, parseInt(li.getAttribute("data-seq"), 10) || 0);
  });
  if (status.getAttribute("data-final") === "1") return;

  function cell(cls, text) {
    var s = document.createElement("span");
    s.className = cls; s.textContent = text;
    return s;
  }
  function hostRow(host) {
    var rows = document.querySelectorAll("#hosts tr[data-host]");
    for (var i = 0; i < rows.length; i++) {
      if (rows[i].getAttribute("data-host") === host) return rows[i];
    }
    return null;
  }

  // A host's bake rows (the server read the event's counts): they replace the host's rows.
  function showBake(host, rows) {
    var body = document.querySelector("#bake tbody");
    if (!body) return;
    Array.prototype.slice.call(body.querySelectorAll("tr[data-host]")).forEach(function (tr) {
      if (tr.getAttribute("data-host") === host) body.removeChild(tr);
    });
    rows.forEach(function (r) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-host", host);
      [r.host, r.state, r.release, r.requests, r.errors_5xx, r.failures, r.rate, r.p99, r.verdict]
        .forEach(function (text) {
          var td = document.createElement("td");
          td.textContent = text;
          tr.appendChild(td);
        });
      body.appendChild(tr);
    });
    document.getElementById("bake-section").hidden = false;
  }

  // The release an event names; the first event naming it carries its commit and subject.
  function showRelease(ev) {
    var release = document.getElementById("release");
    if (!ev.release || release.textContent === ev.release) return;
    release.textContent = ev.release;
    var commit = document.getElementById("commit");
    commit.hidden = !ev.commit;
    if (!ev.commit) return;
    var sha = commit.querySelector(".sha");
    sha.textContent = ev.commit.slice(0, 7);
    sha.setAttribute("title", ev.commit);
    document.getElementById("subject").textContent = ev.commit_subject || "";
  }

  var es = new EventSource(run.getAttribute("data-events"));
  es.onmessage = function (m) {
    var ev;
    try { ev = JSON.parse(m.data); } catch (_) { return; }
    showRelease(ev);
    if (ev.seq <= last) return;
    last = ev.seq;
    var li = document.createElement("li");
    li.setAttribute("data-seq", String(ev.seq));
    li.appendChild(cell("time", (ev.time || "").replace("T", " ").replace("Z", "") + " "));
    li.appendChild(cell("host", (ev.host || "") + " "));
    li.appendChild(cell("step", ev.step + " "));
    li.appendChild(cell("state", ev.state + " "));
    li.appendChild(cell("detail", ev.detail || ""));
    list.appendChild(li);
    if (ev.host && ev.bake) showBake(ev.host, ev.bake);
    if (ev.host) {
      var row = hostRow(ev.host);
      if (row) {
        row.querySelector(".step").textContent = ev.step;
        row.querySelector(".state").textContent = ev.state;
      }
    }
    status.textContent = "running";
  };
  es.addEventListener("end", function (m) {
    es.close();
    var r = null;
    try { r = JSON.parse(m.data); } catch (_) { /* keep the page as it is */ }
    if (!r) return;
    if (!r.release) document.getElementById("release").textContent = "none";
    if (r.message && r.status !== "succeeded") diagnosis.textContent = r.message;
    if (r.finished) {
      document.getElementById("finished").textContent = r.finished.replace("T", " ").replace("Z", "");
    }
    status.className = "status " + r.status;
    status.textContent = r.status;
    status.setAttribute("data-final", "1");
  });
})();
