// Live updates for istream's pages: the pages are complete without this script; it only
// listens to /ui/events and, when something the page shows has changed, fetches the same
// page again and swaps its <main> in place (no navigation, focus kept where it was).
(function () {
  "use strict";
  var live = document.body.getAttribute("data-live");
  if (!live || !window.EventSource || !window.fetch) return;
  var status = document.getElementById("live-status");
  var pending = null;
  var say = function (text) { if (status) status.textContent = text; };

  function refresh() {
    pending = null;
    fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) return;
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("main");
        var main = document.getElementById("main");
        if (!fresh || !main) return;
        var focused = document.activeElement && document.activeElement.id;
        var open = Array.prototype.map.call(main.querySelectorAll("details[open]"), function (d) {
          return d.parentElement && d.parentElement.id;
        });
        main.innerHTML = fresh.innerHTML;
        open.forEach(function (id) {
          var d = id && document.getElementById(id);
          var det = d && d.querySelector("details");
          if (det) det.open = true;
        });
        if (focused) {
          var f = document.getElementById(focused);
          if (f) f.focus();
        }
        document.body.setAttribute("data-updated", String(Date.now()));
      })
      .catch(function () {});
  }
  function soon() { if (!pending) pending = setTimeout(refresh, 250); }

  // Browsers allow about six HTTP/1.1 connections per host: a page left behind (or kept in
  // the back/forward cache) must give its event stream back, or later pages stall.
  var source = null;
  function connect() {
    source = new EventSource("/ui/events");
    source.addEventListener("open", function () { say("live"); });
    source.addEventListener("error", function () { say("reconnecting…"); });
    source.addEventListener("tag", function (e) {
      var d;
      try { d = JSON.parse(e.data); } catch (_) { return; }
      if (live === "streams" || live === "stream:" + d.namespace + "/" + d.stream) soon();
    });
    source.addEventListener("deliveries", function () {
      if (live === "triggers" || live.indexOf("trigger:") === 0) soon();
    });
    source.addEventListener("resync", soon);
  }
  window.addEventListener("pagehide", function () {
    if (source) { source.close(); source = null; }
  });
  window.addEventListener("pageshow", function (e) {
    if (e.persisted && !source) { connect(); soon(); }
  });
  connect();
})();
