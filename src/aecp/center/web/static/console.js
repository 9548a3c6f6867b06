// The AECP console's only script: plain JavaScript, no build step, no library.
//
// Parts of a page carry data-src (the URL of that part alone) and data-topics (what they
// show: inventory, tasks, alerts, audit). One EventSource on /ui/events hears which topics
// changed; every part showing one of them is fetched again and put in place. A part with
// data-every="N" is also fetched every N seconds while the page is shown (a VM's serial
// console). The pages work without this script; it only keeps them current.
//
// A browser opens at most 6 HTTP/1.1 connections to a host, and a stream holds one: a page
// lets go of its stream when it is hidden or left (and opens it again, from the versions it
// last heard, when it is shown again), and a page whose stream cannot be opened (every
// connection taken, or the browser gave up on it) refreshes its parts every FALLBACK_EVERY
// seconds instead, until the stream opens.
(function () {
  "use strict";

  var FALLBACK_EVERY = 30; // s: the slow refresh of a page without its stream
  var OPEN_WITHIN = 10; // s: a stream not open by then waits for a connection: fall back
  var REOPEN_AFTER = 30; // s: a stream the browser gave up on is opened again after this

  var busy = new WeakMap();
  var events = null; // the page's EventSource, while it has one
  var since = ""; // the versions of the topics the page last heard of
  var fallback = null;
  var opening = null;
  var reopening = null;
  var ticks = [];

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

  function refreshAll() {
    document.querySelectorAll("[data-src][data-topics]").forEach(refresh);
  }

  // ---- the slow refresh, while the page has no stream ----
  function startFallback() {
    if (fallback !== null) return;
    fallback = setInterval(function () {
      if (!document.hidden) refreshAll();
    }, FALLBACK_EVERY * 1000);
  }

  function stopFallback() {
    if (fallback === null) return;
    clearInterval(fallback);
    fallback = null;
  }

  // ---- the stream ----
  function stop() {
    clearTimeout(opening);
    clearTimeout(reopening);
    if (events !== null) {
      events.close(); // its connection is free for the host's other pages
      events = null;
    }
    document.body.classList.remove("live");
  }

  function listen() {
    if (events !== null || !document.querySelector("[data-topics]")) return;
    if (!window.EventSource) {
      startFallback();
      return;
    }
    clearTimeout(reopening);
    var es = new EventSource("/ui/events?since=" + encodeURIComponent(since));
    events = es;
    opening = setTimeout(startFallback, OPEN_WITHIN * 1000);
    es.addEventListener("open", function () {
      clearTimeout(opening);
      stopFallback();
      document.body.classList.add("live");
    });
    es.addEventListener("error", function () {
      document.body.classList.remove("live");
      startFallback(); // until it is open again (a stream ends every minute: at once)
      if (es.readyState === EventSource.CLOSED && events === es) {
        stop(); // the browser gave up on it: so does the page, for a while
        reopening = setTimeout(listen, REOPEN_AFTER * 1000);
      }
    });
    es.addEventListener("change", function (ev) {
      if (ev.lastEventId) since = ev.lastEventId;
      changed(JSON.parse(ev.data).topics);
    });
    es.addEventListener("login", function (ev) {
      stop();
      toLogin(JSON.parse(ev.data).to);
    });
  }

  // ---- parts fetched every N seconds, while the page is shown ----
  function tick() {
    ticks.forEach(clearInterval);
    ticks = [];
    document.querySelectorAll("[data-src][data-every]").forEach(function (el) {
      var seconds = Number(el.dataset.every);
      if (seconds > 0) {
        ticks.push(setInterval(function () {
          if (!document.hidden) refresh(el);
        }, seconds * 1000));
      }
    });
  }

  function shown() {
    listen(); // from the versions last heard: what changed meanwhile is named at once
    tick();
    document.querySelectorAll("[data-src][data-every]").forEach(refresh);
  }

  function gone() {
    stop();
    stopFallback();
    ticks.forEach(clearInterval);
    ticks = [];
  }

  document.addEventListener("visibilitychange", function () {
    if (document.hidden) gone();
    else shown();
  });
  window.addEventListener("pagehide", gone);
  window.addEventListener("pageshow", function (ev) {
    if (ev.persisted && !document.hidden) shown(); // back from the browser's page cache
  });

  // a form with data-confirm asks first (deleting a VM, a user)
  document.addEventListener("submit", function (ev) {
    var question = ev.target.dataset && ev.target.dataset.confirm;
    if (question && !window.confirm(question)) ev.preventDefault();
  });

  document.addEventListener("DOMContentLoaded", function () {
    document.body.classList.add("js");
    since = document.body.dataset.since || "";
    if (!document.hidden) {
      listen();
      tick();
    }
    document.querySelectorAll("pre.console").forEach(function (pre) {
      pre.scrollTop = pre.scrollHeight;
    });
  });
})();
