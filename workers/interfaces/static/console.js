// sprim console: refresh [data-refresh] blocks in place every few seconds (server-rendered
// HTML fragments from the same origin). A study page reloads once its last active job ends,
// so new outputs and previews appear, unless someone is typing in a form.
(function () {
  "use strict";
  var EVERY_MS = 3000;

  function active(el) {
    var t = el.querySelector("[data-active]");
    return t ? parseInt(t.getAttribute("data-active"), 10) || 0 : 0;
  }

  function busyTyping() {
    var a = document.activeElement;
    return a && (a.tagName === "INPUT" || a.tagName === "SELECT" || a.tagName === "TEXTAREA");
  }

  function refresh(el) {
    var url = el.getAttribute("data-refresh");
    var before = active(el);
    var open = Array.prototype.map.call(el.querySelectorAll("details"), function (d) { return d.open; });
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (r.status === 401) { window.location.reload(); return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html === null) { return; }
        el.innerHTML = html;
        el.querySelectorAll("details").forEach(function (d, i) { if (open[i]) { d.open = true; } });
        if (el.hasAttribute("data-reload-when-idle") && before > 0 && active(el) === 0 && !busyTyping()) {
          window.location.reload();
        }
      })
      .catch(function () { /* the next tick tries again */ });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh]").forEach(function (el) {
      window.setInterval(function () { if (!document.hidden) { refresh(el); } }, EVERY_MS);
    });
  });
})();
