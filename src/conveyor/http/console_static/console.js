// Conveyor console: refresh the parts of a page marked data-live by fetching
// the same page again (short polling) and swapping those parts in place.
// No framework, nothing loaded from elsewhere.
(function () {
  "use strict";
  var parts = document.querySelectorAll("[data-live]");
  if (!parts.length) { return; }
  var every = parseInt(document.body.getAttribute("data-refresh") || "2000", 10);
  var busy = false;
  function refresh() {
    if (busy || document.hidden) { return; }
    busy = true;
    fetch(window.location.href, { headers: { "X-Console-Refresh": "1" }, credentials: "same-origin" })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (text) {
        if (text === null) { return; }
        var page = new DOMParser().parseFromString(text, "text/html");
        parts.forEach(function (part) {
          var fresh = page.getElementById(part.id);
          if (fresh) { part.innerHTML = fresh.innerHTML; }
        });
        document.body.setAttribute("data-refreshed", String(Date.now()));
      })
      .catch(function () {})
      .then(function () { busy = false; });
  }
  window.setInterval(refresh, every);
})();
