// chukei dashboard: live updates over Server-Sent Events. Everything it inserts is HTML the
// server rendered (and escaped); announcements use textContent. Without script the pages still
// work, they just need a reload.
(function () {
  "use strict";
  var body = document.body;
  var statusEl = document.getElementById("live-status");

  // The submit form shows only the selected kind's fields.
  var kind = document.getElementById("kind");
  if (kind) {
    var showKind = function () {
      document.querySelectorAll("fieldset[data-kind]").forEach(function (fs) {
        fs.hidden = fs.getAttribute("data-kind") !== kind.value;
      });
    };
    kind.addEventListener("change", showKind);
    showKind();
  }

  if (!window.EventSource || body.getAttribute("data-page") === "login") { return; }

  function setLive(state, text) {
    body.setAttribute("data-live", state);
    if (statusEl && text) { statusEl.textContent = text; }
  }

  // Alarms this page has shown, so each is announced once, even when the relay connection drops
  // and every alarm arrives again.
  var shown = {};
  document.querySelectorAll("#alarms tr[data-alarm-id]").forEach(function (tr) {
    shown[tr.getAttribute("data-alarm-id")] = true;
  });

  var timers = {};
  // Fetch a table again (debounced: a burst of changes is one request).
  function refetch(id) {
    var box = document.getElementById(id);
    if (!box) { return; }
    clearTimeout(timers[id]);
    timers[id] = setTimeout(function () {
      var url = new URL(window.location.href);
      url.searchParams.set("fragment", "table");
      fetch(url.toString(), { credentials: "same-origin" }).then(function (r) {
        // A redirect means the session ended (the login page): keep the table, the next
        // navigation will ask for the password. Otherwise the fragment, error notice included.
        if (r.redirected) { return; }
        return r.text().then(function (t) { box.innerHTML = t; });
      }).catch(function () {});
    }, 400);
  }

  var es = new EventSource("/events");
  var linked = true;
  es.addEventListener("open", function () { setLive("connected", linked ? "Live" : "Relay not connected"); });
  es.addEventListener("error", function () { setLive("reconnecting", "Reconnecting…"); });
  es.addEventListener("link", function (e) {
    linked = e.data === "up";
    setLive("connected", linked ? "Live" : "Relay not connected");
  });
  es.addEventListener("alarms", function (e) {
    var tpl = document.createElement("template");
    tpl.innerHTML = e.data;
    var frag = tpl.content.querySelector("[data-count]");
    var count = frag ? parseInt(frag.getAttribute("data-count"), 10) || 0 : 0;
    var badge = document.getElementById("alarm-count");
    if (badge) {
      badge.textContent = String(count);
      badge.setAttribute("aria-label", count + " active");
      badge.classList.toggle("zero", count === 0);
    }
    var box = document.getElementById("alarms");
    if (!box) { return; }
    box.innerHTML = e.data;
    var fresh = [];
    box.querySelectorAll("tr[data-alarm-id]").forEach(function (tr) {
      var id = tr.getAttribute("data-alarm-id");
      if (!shown[id]) {
        shown[id] = true;
        var site = tr.getAttribute("data-site");
        fresh.push("New emergency " + tr.getAttribute("data-alarm-code") + " on " +
          tr.getAttribute("data-serial") + (site ? " (" + site + ")" : ""));
      }
    });
    var announce = document.getElementById("announce");
    if (announce && fresh.length) { announce.textContent = fresh.join(". ") + "."; }
  });
  es.addEventListener("jobs", function () { refetch("jobs-table"); });
  es.addEventListener("devices", function () { refetch("devices-table"); });
  es.addEventListener("rollouts", function () { refetch("rollouts-table"); });
}());
