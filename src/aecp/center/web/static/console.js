// The AECP console's only script: plain JavaScript, no build step, no library.
//
// Parts of a page carry data-src (the URL of that part alone) and data-topics (what they
// show: inventory, tasks, alerts, audit). One EventSource on /ui/events hears which topics
// changed; every part showing one of them is fetched again and put in place. A part with
// data-every="N" is also fetched every N seconds (a VM's serial console). The pages work
// without this script; it only keeps them current.
(function () {
  "use strict";

  var busy = new WeakMap();

  function toLogin(url) {
    window.location.assign(url || "/login");
  }

  function refresh(el) {
    if (busy.get(el)) {
      el.dataset.again = "1";
      return;
    }
    busy.set(el, true);
    fetch(el.dataset.src, { credentials: "same-origin", headers: { "X-AOC-Part": "1" } })
      .then(function (res) {
        if (res.redirected && new URL(res.url).pathname === "/login") {
          toLogin(res.url);
          return null;
        }
        return res.ok ? res.text() : null;
      })
      .then(function (html) {
        if (html === null) return;
        var pre = el.querySelector("pre.console");
        var atEnd = !pre || pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
        el.innerHTML = html;
        pre = el.querySelector("pre.console");
        if (pre && atEnd) pre.scrollTop = pre.scrollHeight;
      })
      .catch(function () { /* the next event or tick tries again */ })
      .finally(function () {
        busy.set(el, false);
        if (el.dataset.again) {
          delete el.dataset.again;
          refresh(el);
        }
      });
  }

  function changed(topics) {
    document.querySelectorAll("[data-src][data-topics]").forEach(function (el) {
      var mine = el.dataset.topics.split(" ");
      if (mine.some(function (t) { return topics.indexOf(t) >= 0; })) refresh(el);
    });
  }

  function listen() {
    if (!window.EventSource || !document.querySelector("[data-topics]")) return;
    var since = document.body.dataset.since || "";
    var events = new EventSource("/ui/events?since=" + encodeURIComponent(since));
    events.addEventListener("open", function () { document.body.classList.add("live"); });
    events.addEventListener("error", function () { document.body.classList.remove("live"); });
    events.addEventListener("change", function (ev) { changed(JSON.parse(ev.data).topics); });
    events.addEventListener("login", function (ev) {
      events.close();
      toLogin(JSON.parse(ev.data).to);
    });
  }

  function tick() {
    document.querySelectorAll("[data-src][data-every]").forEach(function (el) {
      var seconds = Number(el.dataset.every);
      if (seconds > 0) setInterval(function () { refresh(el); }, seconds * 1000);
    });
    document.querySelectorAll("pre.console").forEach(function (pre) {
      pre.scrollTop = pre.scrollHeight;
    });
  }

  // a form with data-confirm asks first (deleting a VM, a user)
  document.addEventListener("submit", function (ev) {
    var question = ev.target.dataset && ev.target.dataset.confirm;
    if (question && !window.confirm(question)) ev.preventDefault();
  });

  document.addEventListener("DOMContentLoaded", function () {
    document.body.classList.add("js");
    listen();
    tick();
  });
})();
