/* The skinflint dashboard: plain ES2017, no build step. It draws the public admin API
 * (/api/spend, /api/requests, /api/alerts, /api/budgets, /api/shadow, /metrics) with Chart.js.
 *
 * Every panel loads on its own, in parallel, and marks its <section> with data-state:
 * loading, ready, empty (no data in the range), unavailable (the endpoint is missing),
 * error, or locked (the admin key is needed). <body data-ready> is set once every panel has
 * settled, and a performance measure "skinflint:load" records how long that took. Data is
 * written with textContent only, never parsed as HTML. */
(function () {
  "use strict";

  var KEY_STORE = "skinflint.adminKey";
  var REFRESH_MS = 60000;
  var STACKED = 7; // series shown apart in the stacked charts; the rest add up to "other"
  var PALETTE = ["#2f6fdf", "#e8833a", "#3aa76d", "#c94f7c", "#8a63d2", "#d4b52b",
    "#3bb0c9", "#9aa3ad"];
  var COST = "#c94f4f";
  var SAVED = "#3aa76d";

  var charts = {};
  var generation = 0; // a newer load makes the answers of an older one moot
  var STALE = new Error("stale"); // thrown for an answer that a newer load has made moot

  function $(id) { return document.getElementById(id); }

  // ---- formatting

  function usd(v) {
    if (v === null || v === undefined) { return "—"; }
    var a = Math.abs(v);
    var sign = v < 0 ? "-$" : "$";
    if (a >= 1000) { return sign + Math.round(a).toLocaleString("en-US"); }
    if (a >= 1) { return sign + a.toFixed(2); }
    if (a < 1e-10) { return "$0"; }
    // three significant digits, written out in full: $0.000004, not $4e-6
    var digits = 2 - Math.floor(Math.log10(a));
    return sign + a.toFixed(digits).replace(/\.?0+$/, "");
  }

  function count(v) { return v === null || v === undefined ? "—" : v.toLocaleString("en-US"); }

  function pct(part, whole) {
    return whole ? (100 * part / whole).toFixed(1) + "%" : "—";
  }

  function when(iso) {
    if (!iso) { return "—"; }
    return new Date(iso).toLocaleString(undefined, {
      month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit"
    });
  }

  function bucketLabel(ms, bucket) {
    var options = bucket === "day" ? { month: "short", day: "numeric" }
      : { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" };
    return new Date(ms).toLocaleString(undefined, options);
  }

  // ---- fetching

  function HttpError(status, message) {
    this.status = status;
    this.message = message;
  }

  function authHeaders() {
    var key = sessionStorage.getItem(KEY_STORE);
    return key ? { authorization: "Bearer " + key } : {};
  }

  async function fetchText(path) {
    var asked = generation;
    var answer = await fetch(path, { headers: authHeaders(), cache: "no-store" });
    var text = await answer.text();
    if (asked !== generation) { throw STALE; }
    if (!answer.ok) {
      var message = "HTTP " + answer.status;
      try { message = JSON.parse(text).error.message || message; } catch (ignored) { /* keep */ }
      throw new HttpError(answer.status, message);
    }
    return text;
  }

  async function fetchJSON(path) { return JSON.parse(await fetchText(path)); }

  function query() {
    return { since: $("since").value, by: $("by").value };
  }

  function spendLoader() {
    var asked = {};
    return function spend(by) {
      if (!asked[by]) {
        asked[by] = fetchJSON("api/spend?by=" + encodeURIComponent(by) +
          "&since=" + encodeURIComponent(query().since));
      }
      return asked[by];
    };
  }

  // ---- panels

  function setState(id, state, message) {
    var section = $(id);
    section.dataset.state = state;
    section.querySelector(".status").textContent = message || "";
  }

  function fail(id, error) {
    if (error instanceof HttpError && error.status === 401) {
      setState(id, "locked", "The admin key is needed.");
      askForKey("The admin key was refused.");
    } else if (error instanceof HttpError && (error.status === 404 || error.status === 405)) {
      setState(id, "unavailable", "Not available from this gateway.");
    } else {
      setState(id, "error", "Could not load: " + (error && error.message ? error.message : error));
    }
  }

  /* Shows the panel, then draws (or redraws) its chart: Chart.js sizes a chart by its
   * container, which a panel without data hides. */
  function draw(id, name, config) {
    setState(id, "ready");
    var chart = charts[name];
    if (chart) {
      chart.data = config.data;
      chart.options = config.options;
      chart.update("none");
    } else {
      charts[name] = new Chart($("chart-" + name), config);
    }
  }

  /* Bar chart options: stacked or not, values in USD or counts, bars upright or lying; the
   * category labels of a time axis may be thinned out, the others are all shown. */
  function barOptions(stacked, money, horizontal, timeAxis) {
    var ticks = money ? { callback: function (v) { return usd(v); } } : { precision: 0 };
    var value = { stacked: stacked, beginAtZero: true, ticks: ticks };
    var category = { stacked: stacked, ticks: { autoSkip: !!timeAxis, maxRotation: 0 } };
    return {
      indexAxis: horizontal ? "y" : "x",
      scales: horizontal ? { x: value, y: category } : { x: category, y: value },
      plugins: {
        legend: { position: "bottom", labels: { boxWidth: 12 } },
        tooltip: {
          callbacks: {
            label: function (item) {
              var v = horizontal ? item.parsed.x : item.parsed.y;
              return item.dataset.label + ": " + (money ? usd(v) : count(v));
            }
          }
        }
      }
    };
  }

  /* Bucket starts from since to until (so that empty buckets show as gaps), plus any start
   * the API answered that falls off that grid. */
  function buckets(spend) {
    var step = spend.bucket === "day" ? 86400000 : 3600000;
    var seen = {};
    var first = Math.floor(Date.parse(spend.since) / step) * step;
    var until = Date.parse(spend.until);
    for (var t = first; t < until && t - first < 1000 * step; t += step) { seen[t] = true; }
    spend.series.forEach(function (point) { seen[Date.parse(point.start)] = true; });
    return Object.keys(seen).map(Number).sort(function (a, b) { return a - b; });
  }

  function stackedSeries(spend, field) {
    var starts = buckets(spend);
    var index = {};
    starts.forEach(function (t, i) { index[t] = i; });
    var shown = spend.groups.slice(0, STACKED).map(function (g) { return g.name; });
    var rows = {};
    spend.series.forEach(function (point) {
      var name = shown.indexOf(point.name) >= 0 ? point.name : "other";
      if (!rows[name]) { rows[name] = starts.map(function () { return 0; }); }
      rows[name][index[Date.parse(point.start)]] += point[field] || 0;
    });
    var names = shown.filter(function (n) { return rows[n]; });
    if (rows.other) { names.push("other"); }
    return {
      labels: starts.map(function (t) { return bucketLabel(t, spend.bucket); }),
      datasets: names.map(function (name, i) {
        return {
          label: name || "(none)", data: rows[name],
          backgroundColor: name === "other" ? PALETTE[PALETTE.length - 1] : PALETTE[i % PALETTE.length]
        };
      })
    };
  }

  async function overTime(spend) {
    var data = await spend(query().by);
    var by = "by " + query().by;
    Array.prototype.forEach.call(document.querySelectorAll(".by-label"), function (el) {
      el.textContent = by;
    });
    [["spend-time", "spend", "cost_usd", true], ["requests-time", "requests", "requests", false]]
      .forEach(function (panel) {
        if (!data.series.length) {
          setState(panel[0], "empty", "No requests in this range.");
          return;
        }
        draw(panel[0], panel[1], { type: "bar", data: stackedSeries(data, panel[2]),
          options: barOptions(true, panel[3], false, true) });
      });
  }

  async function totals(spend, alerts) {
    var data = await spend("strategy");
    var t = data.totals;
    $("kpi-cost").textContent = usd(t.cost_usd);
    $("kpi-baseline").textContent = usd(t.baseline_cost_usd);
    $("kpi-saved").textContent = usd(t.saved_usd) + " (" + pct(t.saved_usd, t.baseline_cost_usd) + ")";
    $("kpi-requests").textContent = count(t.requests);
    $("kpi-hits").textContent = pct(t.cache_hits, t.requests);
    $("kpi-errors").textContent = count(t.errors);
    setState("totals", "ready");
    try {
      $("kpi-alerts").textContent = count((await alerts).active);
    } catch (error) {
      if (error === STALE) { throw error; }
      $("kpi-alerts").textContent = "—";
    }
  }

  async function savings(spend) {
    var data = await spend("strategy");
    if (!data.groups.length) { setState("savings", "empty", "No requests in this range."); return; }
    draw("savings", "savings", {
      type: "bar",
      data: {
        labels: data.groups.map(function (g) { return g.name || "none"; }),
        datasets: [
          { label: "cost", data: data.groups.map(function (g) { return g.cost_usd; }), backgroundColor: COST },
          { label: "saved", data: data.groups.map(function (g) { return g.saved_usd; }), backgroundColor: SAVED }
        ]
      },
      options: barOptions(true, true, false)
    });
  }

  function hitsOf(groups, strategy) {
    var found = groups.filter(function (g) { return g.name === strategy; })[0];
    return found ? found.cache_hits : 0;
  }

  async function cache(spend) {
    var data = await spend("strategy");
    var t = data.totals;
    $("hit-rate").textContent = pct(t.cache_hits, t.requests) + " of requests";
    if (!t.requests) { setState("cache", "empty", "No requests in this range."); return; }
    var exact = hitsOf(data.groups, "exact_cache");
    var semantic = hitsOf(data.groups, "semantic_cache");
    var other = Math.max(t.cache_hits - exact - semantic, 0);
    var parts = [["exact hit", exact, "#2f6fdf"], ["semantic hit", semantic, "#8a63d2"],
      ["other hit", other, "#3bb0c9"], ["not from cache", t.requests - t.cache_hits, "#d0d5db"]]
      .filter(function (p) { return p[1] > 0; });
    draw("cache", "cache", {
      type: "doughnut",
      data: {
        labels: parts.map(function (p) { return p[0]; }),
        datasets: [{ data: parts.map(function (p) { return p[1]; }),
          backgroundColor: parts.map(function (p) { return p[2]; }) }]
      },
      options: { plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } } }
    });
  }

  /* Prometheus text: the samples of the counters named, as {reason: value}. */
  function reasons(text, metric, prefix, into) {
    var pattern = new RegExp("^" + metric + "\\{reason=\"([^\"]*)\"\\} ([0-9.eE+-]+)$");
    text.split("\n").forEach(function (line) {
      var m = pattern.exec(line);
      if (m && Number(m[2]) > 0) { into[prefix + m[1]] = Number(m[2]); }
    });
    return into;
  }

  async function skips() {
    var text = await fetchText("metrics");
    var found = reasons(text, "skinflint_cache_bypassed_total", "", {});
    reasons(text, "skinflint_semantic_skipped_total", "semantic: ", found);
    var names = Object.keys(found).sort(function (a, b) { return found[b] - found[a]; });
    if (!names.length) { setState("skips", "empty", "No request has skipped the cache."); return; }
    draw("skips", "skips", {
      type: "bar",
      data: { labels: names, datasets: [{ label: "requests", backgroundColor: "#e8833a",
        data: names.map(function (n) { return found[n]; }) }] },
      options: barOptions(false, false, true)
    });
  }

  async function budgets() {
    var rows = (await fetchJSON("api/budgets")).data;
    if (!rows.length) { setState("budgets", "empty", "No budgets are configured."); return; }
    var used = rows.map(function (r) { return Math.round(1000 * r.used) / 10; });
    draw("budgets", "budgets", {
      type: "bar",
      data: {
        labels: rows.map(function (r, i) {
          return (r.subject ? r.name + " · " + r.subject : r.name) + " (" + used[i] + "%)";
        }),
        datasets: [{ label: "% of limit used", data: used, backgroundColor: used.map(function (u) {
          return u >= 100 ? COST : u >= 80 ? "#e8833a" : SAVED;
        }) }]
      },
      options: Object.assign(barOptions(false, false, true), {
        scales: { x: { beginAtZero: true, suggestedMax: 100 }, y: { ticks: { autoSkip: false } } }
      })
    });
  }

  function fill(id, rows, cells) {
    var body = $(id).querySelector("tbody");
    var fresh = document.createElement("tbody");
    rows.forEach(function (row) {
      var tr = document.createElement("tr");
      cells(row).forEach(function (value) {
        var td = document.createElement("td");
        if (value && value.nodeType) { td.appendChild(value); } else { td.textContent = value; }
        tr.appendChild(td);
      });
      fresh.appendChild(tr);
    });
    body.parentNode.replaceChild(fresh, body);
  }

  function badge(text) {
    var span = document.createElement("span");
    span.className = "badge " + text.replace(/[^a-z0-9-]/gi, "");
    span.textContent = text;
    return span;
  }

  async function top(spend, by, id) {
    var groups = (await spend(by)).groups.slice(0, 10);
    fill(id, groups, function (g) {
      return [g.name || "(none)", count(g.requests), usd(g.cost_usd), usd(g.saved_usd),
        pct(g.cache_hits, g.requests)];
    });
    setState(id, groups.length ? "ready" : "empty", groups.length ? "" : "No requests in this range.");
  }

  async function alertList(alerts) {
    var data = await alerts;
    $("alerts-active").textContent = data.active + " active";
    var rows = data.data.slice(0, 50);
    fill("alerts", rows, function (a) {
      return [badge(a.state), a.rule, a.name ? a.per + ": " + a.name : a.per, when(a.start),
        a.end ? when(a.end) : "—", usd(a.spend_usd), usd(a.baseline_usd)];
    });
    setState("alerts", rows.length ? "ready" : "empty", rows.length ? "" : "No alerts.");
  }

  async function shadow() {
    var rows = (await fetchJSON("api/shadow")).data;
    fill("shadow", rows, function (r) {
      return [badge(r.state), r.feature, r.strategy, count(r.samples),
        r.samples ? r.mean.toFixed(2) : "—", r.samples ? r.bound.toPrecision(3) : "—",
        r.floor === null ? "—" : r.floor.toFixed(2)];
    });
    setState("shadow", rows.length ? "ready" : "empty",
      rows.length ? "" : "No compressed request has been shadowed yet.");
  }

  async function recent() {
    var rows = (await fetchJSON("api/requests?limit=50")).data;
    fill("recent", rows, function (r) {
      return [when(r.ts), r.feature, r.user, r.model, r.route, badge(r.cache_status),
        usd(r.cost_usd), usd(r.saved_usd), String(r.status), Math.round(r.latency_ms) + " ms"];
    });
    setState("recent", rows.length ? "ready" : "empty", rows.length ? "" : "No requests yet.");
  }

  // ---- loading

  function settle(ids, work) {
    return work.catch(function (error) {
      if (error === STALE) { return; }
      [].concat(ids).forEach(function (id) { fail(id, error); });
    });
  }

  async function load() {
    var mine = ++generation;
    var started = performance.now();
    delete document.body.dataset.ready;
    var spend = spendLoader();
    var alerts = fetchJSON("api/alerts");
    alerts.catch(function () { /* reported by the alerts panel */ });
    await Promise.all([
      settle("totals", totals(spend, alerts)),
      settle(["spend-time", "requests-time"], overTime(spend)),
      settle("savings", savings(spend)),
      settle("cache", cache(spend)),
      settle("skips", skips()),
      settle("budgets", budgets()),
      settle("top-features", top(spend, "feature", "top-features")),
      settle("top-users", top(spend, "user", "top-users")),
      settle("shadow", shadow()),
      settle("alerts", alertList(alerts)),
      settle("recent", recent())
    ]);
    if (mine === generation) {
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
      document.body.dataset.ready = "1";
      performance.measure("skinflint:load", { start: started }); // for bench/dashboard.py
    }
  }

  function askForKey(message) {
    sessionStorage.removeItem(KEY_STORE);
    $("login-error").textContent = message || "";
    $("login").hidden = false;
    $("panels").hidden = true;
    $("key").focus();
  }

  function start() {
    Chart.defaults.animation = false;
    Chart.defaults.responsive = true;
    Chart.defaults.maintainAspectRatio = false;
    Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
    $("login").addEventListener("submit", function (event) {
      event.preventDefault();
      sessionStorage.setItem(KEY_STORE, $("key").value);
      $("key").value = "";
      $("login").hidden = true;
      $("panels").hidden = false;
      load();
    });
    ["since", "by"].forEach(function (id) { $(id).addEventListener("change", load); });
    $("refresh").addEventListener("click", load);
    setInterval(function () {
      if (!document.hidden && $("login").hidden) { load(); }
    }, REFRESH_MS);
    var meta = document.querySelector('meta[name="skinflint-admin-key"]');
    if (meta.content === "required" && !sessionStorage.getItem(KEY_STORE)) {
      askForKey("");
    } else {
      load();
    }
  }

  start();
}());
