/* The status page of hms-tasks: fetches the JSON endpoints and renders four cards.
   Plain JavaScript, no build step; text goes in through textContent only. */
"use strict";

(function () {
  const REFRESH_MS = 15000;
  const [servicesUrl, alertsUrl, cacheUrl, loadtestsUrl] =
    document.querySelector("main").dataset.api.split("|");

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v; else node.setAttribute(k, v);
    }
    for (const child of children || []) node.appendChild(child);
    return node;
  }

  function badge(value) {
    return el("span", { class: "badge " + String(value || "unknown"), text: value || "unknown" });
  }

  function table(head, rows) {
    return el("table", {}, [
      el("thead", {}, [el("tr", {}, head.map((h) => el("th", { text: h })))]),
      el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) =>
        el("td", {}, [typeof c === "object" ? c : document.createTextNode(c)]))))),
    ]);
  }

  function percent(x) { return x === null || x === undefined ? "–" : (x * 100).toFixed(1) + " %"; }
  function num(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }
  function when(ts) { return ts ? new Date(ts * 1000).toLocaleString() : "–"; }

  function fill(id, node) {
    const body = document.querySelector("#" + id + " .body");
    body.replaceChildren(node);
    document.getElementById(id).dataset.loaded = "1";
  }

  const renderers = {
    services(doc) {
      if (!doc.services.length) return el("p", { class: "muted", text: "No services configured." });
      return table(["Service", "Status", "Breaker", "Instances", "Latency ms", "Avail. 1 h"],
        doc.services.map((s) => [s.service, badge(s.status), badge(s.breaker),
          s.instances.filter((i) => i.status === "up" || i.status === "degraded").length +
            "/" + s.instances.length,
          num(s.latency_ms, 1), percent(s.availability_1h)]));
    },
    alerts(doc) {
      if (!doc.alerts.length) return el("p", { class: "muted", text: "No alert pending or firing." });
      return table(["Rule", "Series", "State", "Value", "Since"],
        doc.alerts.map((a) => [a.rule, a.series, badge(a.state), num(a.value, 2), when(a.since)]));
    },
    cache(doc) {
      const rate = doc.hit_rate;
      const kinds = Object.entries(doc.kinds).map(([kind, k]) => [kind, String(k.hits),
        String(k.misses), percent(k.hit_rate)]);
      return el("div", {}, [
        el("p", { class: "big", id: "hit-rate", text: percent(rate) }),
        el("div", { class: "meter" }, [el("span", { style: "width:" + ((rate || 0) * 100) + "%" })]),
        el("p", { class: "muted", text: doc.reads + " reads in the last " + doc.window_minutes + " minutes" }),
        kinds.length ? table(["Kind", "Hits", "Misses", "Hit rate"], kinds) : el("span"),
      ]);
    },
    loadtests(doc) {
      if (!doc.loadtests.length) return el("p", { class: "muted", text: "No load tests configured." });
      return table(["Test", "Verdict", "Requests", "RPS", "p95 ms", "Finished"],
        doc.loadtests.map((t) => t.run === null ? [t.test, badge("never_run"), "–", "–", "–", "–"]
          : [t.test, badge(t.status), String(t.requests ?? "–"), num(t.rps, 1), num(t.p95_ms, 0),
             when(t.finished_at)]));
    },
  };

  async function load(id, url) {
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error("HTTP " + response.status);
      fill(id, renderers[id](await response.json()));
    } catch (err) {
      fill(id, el("p", { class: "error", text: "Could not load: " + err.message }));
    }
  }

  async function refresh() {
    await Promise.all([load("services", servicesUrl), load("alerts", alertsUrl),
                       load("cache", cacheUrl), load("loadtests", loadtestsUrl)]);
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    if (!document.body.dataset.ready) performance.mark("status-ready");
    document.body.dataset.ready = "1";
  }

  refresh();
  setInterval(refresh, REFRESH_MS);
})();
