// noisescale dashboard: a thin client over the read-only JSON API (/api, described at /api/openapi.json).
// Every value from the API reaches the page as text (textContent, createTextNode) or as a number drawn on a
// canvas: run names, config values and alert texts are never parsed as HTML.
"use strict";

(function () {
  const TOKEN = new URLSearchParams(window.location.search).get("token");
  const POINTS = 1000; // points per series asked from the server (it keeps each bucket's min and max)
  const NOISE_COLUMNS = ["b_simple", "b_simple_low", "b_simple_high", "batch_size"];
  const GRAD_COLUMNS = ["grad_sq", "trace_cov"];
  // Adam's preconditioned noise scale (GNSMonitor(precondition=)), stored as metrics: drawn with B_simple.
  const PRECOND = ["b_precond", "b_precond_low", "b_precond_high"];
  const MEASUREMENT_FIELDS = [
    "b_simple", "b_simple_low", "b_simple_high", "b_simple_raw", "grad_sq", "trace_cov", "grad_sq_raw",
    "trace_cov_raw", "batch_size", "coverage", "skipped_steps",
  ];
  const X_AXES = { examples: "examples seen", step: "step", wall_time: "wall time" };
  const COLORS = ["#c0392b", "#2471a3", "#229954", "#b9770e", "#7d3c98", "#17a589", "#a04000", "#5d6d7e"];

  let view = null; // the view on screen; has close()

  // -- DOM helpers: text only ----------------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = String(v);
      else if (k === "testid") node.setAttribute("data-testid", v);
      else if (k === "num") node.setAttribute("data-value", String(v)); // the exact number behind the text
      else if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  function runLink(id, text) {
    return el("a", { href: "#/run/" + encodeURIComponent(id), text: text });
  }

  // -- numbers ---------------------------------------------------------------------------------------------------

  function num(v) {
    if (v === "inf") return Infinity;
    if (v === "-inf") return -Infinity;
    return v === null || v === undefined ? null : v;
  }

  function fmt(v) {
    v = num(v);
    if (v === null) return "–";
    if (v === Infinity) return "∞";
    if (v === -Infinity) return "-∞";
    if (Number.isInteger(v) && Math.abs(v) < 1e9) return v.toLocaleString("en-US");
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(3);
    return String(Number(v.toPrecision(4)));
  }

  function fmtTime(t) {
    if (t === null || t === undefined) return "–";
    return new Date(t * 1000).toLocaleString();
  }

  function fmtDuration(s) {
    if (s === null || s === undefined) return "–";
    if (s < 90) return s.toFixed(0) + " s";
    if (s < 5400) return (s / 60).toFixed(0) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  function positive(v) {
    v = num(v);
    return v !== null && isFinite(v) && v > 0 ? v : null;
  }

  function finite(v) {
    v = num(v);
    return v !== null && isFinite(v) ? v : null;
  }

  // -- API -------------------------------------------------------------------------------------------------------

  function apiUrl(path, params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params || {})) if (v !== null && v !== undefined) q.set(k, String(v));
    const s = q.toString();
    return path + (s ? "?" + s : "");
  }

  async function api(path, params) {
    const headers = TOKEN ? { "X-Noisescale-Token": TOKEN } : {};
    const resp = await fetch(apiUrl(path, params), { headers: headers, cache: "no-store" });
    let body = null;
    try {
      body = await resp.json();
    } catch (e) {
      body = null;
    }
    if (!resp.ok) throw new Error((body && body.error) || resp.status + " " + resp.statusText);
    return body;
  }

  function stream(path, params) {
    const p = Object.assign({}, params);
    if (TOKEN) p.token = TOKEN;
    return new EventSource(apiUrl(path, p));
  }

  function showError(message) {
    const box = document.getElementById("error");
    if (!message) {
      box.hidden = true;
      clear(box);
      return;
    }
    box.hidden = false;
    box.textContent = message;
  }

  function setLive(text, cls) {
    const live = document.getElementById("live");
    live.textContent = text;
    live.className = "live " + (cls || "");
  }

  function setCrumbs(...parts) {
    const nav = clear(document.getElementById("crumbs"));
    for (const p of parts) nav.appendChild(el("span", { class: "sep", text: "/" })).after(p);
  }

  // -- series (the API's points form) ----------------------------------------------------------------------------

  function emptySeries(columns) {
    const values = {};
    for (const c of columns) values[c] = [];
    return { rows: 0, downsampled: false, bucket_steps: 1, step: [], examples: [], wall_time: [], values: values };
  }

  // Append new rows (the live stream's) to a series, skipping any step it already holds: two requests that read
  // a file being written a moment apart may overlap.
  function appendSeries(into, add) {
    const last = into.step.length ? into.step[into.step.length - 1] : -Infinity;
    let i0 = 0;
    while (i0 < add.step.length && add.step[i0] <= last) i0++;
    if (i0 >= add.step.length) return;
    into.rows += add.step.length - i0;
    for (const k of ["step", "examples", "wall_time"]) into[k] = into[k].concat(add[k].slice(i0));
    for (const c of Object.keys(into.values)) {
      const vs = add.values[c] || add.step.map(() => null);
      into.values[c] = into.values[c].concat(vs.slice(i0));
    }
  }

  // A uPlot table [xs, ys...] from a series: rows without x dropped, equal x kept once (the last).
  function table(series, xKey, columns, map) {
    const xs = [];
    const ys = columns.map(() => []);
    const src = series[xKey];
    for (let i = 0; i < src.length; i++) {
      const x = src[i];
      if (x === null || x === undefined) continue;
      const last = xs.length - 1;
      const row = columns.map((c) => map(series.values[c] ? series.values[c][i] : null));
      if (last >= 0 && xs[last] === x) {
        row.forEach((v, j) => (ys[j][last] = v));
        continue;
      }
      xs.push(x);
      row.forEach((v, j) => ys[j].push(v));
    }
    return [xs, ...ys];
  }

  // Several tables on the union of their x values (null where a table has no point there).
  function joined(tables) {
    if (tables.length === 1) return tables[0];
    const all = new Set();
    for (const t of tables) for (const x of t[0]) all.add(x);
    const xs = Array.from(all).sort((a, b) => a - b);
    const index = new Map(xs.map((x, i) => [x, i]));
    const out = [xs];
    for (const t of tables) {
      for (let k = 1; k < t.length; k++) {
        const col = new Array(xs.length).fill(null);
        t[0].forEach((x, i) => (col[index.get(x)] = t[k][i]));
        out.push(col);
      }
    }
    return out;
  }

  // -- charts ----------------------------------------------------------------------------------------------------

  function chartWidth(node) {
    return Math.max(320, (node.clientWidth || node.parentNode.clientWidth || 800) - 4);
  }

  // A uPlot chart inside `box`, redrawn with set(data); markers(u) draws alert lines.
  function makeChart(box, opts) {
    let plot = null;
    let lastData = null;
    function build(data) {
      if (plot) plot.destroy();
      const o = Object.assign({ width: chartWidth(box), height: opts.height || 240 }, opts.uplot);
      plot = new uPlot(o, data, box);
    }
    return {
      set(data) {
        lastData = data;
        if (!plot) build(data);
        else plot.setData(data);
      },
      resize() {
        if (plot) plot.setSize({ width: chartWidth(box), height: opts.height || 240 });
      },
      redraw() {
        if (plot) plot.redraw(false, false);
      },
      rebuild() {
        if (lastData) build(lastData);
      },
      destroy() {
        if (plot) plot.destroy();
        plot = null;
      },
      get plot() {
        return plot;
      },
    };
  }

  function xScale(xKey) {
    return { time: xKey === "wall_time" };
  }

  function xValue(xKey) {
    return (u, v) => (v === null || v === undefined ? "–" : xKey === "wall_time" ? fmtTime(v) : fmt(v));
  }

  function caption(node, parts) {
    node.textContent = parts.filter(Boolean).join(" · ");
  }

  // -- views -----------------------------------------------------------------------------------------------------

  function route() {
    if (view) view.close();
    view = null;
    showError(null);
    const hash = window.location.hash || "#/";
    const [path, query] = hash.slice(1).split("?");
    const params = new URLSearchParams(query || "");
    const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    const app = clear(document.getElementById("app"));
    if (parts[0] === "run" && parts[1]) view = runView(app, parts[1], params);
    else if (parts[0] === "compare" && parts[1]) view = compareView(app, parts[1].split(","), params);
    else view = runsView(app);
  }

  // The runs list, refreshed every few seconds.
  function runsView(app) {
    setCrumbs();
    setLive("", "");
    const selected = new Set();
    const compareBtn = el("button", { type: "button", testid: "compare-button", disabled: true, text: "Overlay selected runs" });
    compareBtn.addEventListener("click", () => {
      window.location.hash = "#/compare/" + Array.from(selected).map(encodeURIComponent).join(",");
    });
    const tbody = el("tbody", { testid: "runs-body" });
    const note = el("p", { class: "muted", testid: "runs-note" });
    app.appendChild(el("section", { class: "card" },
      el("h1", { text: "Runs" }),
      el("table", { class: "runs", testid: "runs" },
        el("thead", {}, el("tr", {}, ...["", "run", "status", "step", "examples", "batch", "B_simple", "band",
          "loss", "lr", "alerts", "updated"].map((h) => el("th", { text: h })))),
        tbody),
      el("div", { class: "actions" }, compareBtn),
      note));
    let timer = null;
    let closed = false;
    async function load() {
      try {
        const doc = await api("/api/runs");
        if (closed) return;
        showError(null);
        clear(tbody);
        for (const r of doc.runs) {
          const box = el("input", { type: "checkbox", testid: "select-run", "aria-label": "select " + r.name });
          box.checked = selected.has(r.id);
          box.addEventListener("change", () => {
            if (box.checked) selected.add(r.id);
            else selected.delete(r.id);
            compareBtn.disabled = selected.size < 1;
          });
          const b = r.b_simple || {};
          const status = r.stale ? "running (no write for a while)" : r.status;
          const firing = r.alerts.firing.length;
          tbody.appendChild(el("tr", { testid: "run-row", "data-run": r.id },
            el("td", {}, box),
            el("td", { testid: "run-name" }, runLink(r.id, r.name), el("div", { class: "muted small", text: r.id })),
            el("td", { class: "status " + r.status, text: status }),
            el("td", { class: "num", text: fmt(r.last_step), num: r.last_step }),
            el("td", { class: "num", text: fmt(r.examples), num: r.examples }),
            el("td", { class: "num", text: fmt(r.batch_size), num: r.batch_size }),
            el("td", { class: "num", testid: "run-b-simple", text: fmt(b.value), num: b.value }),
            el("td", { class: "num", text: "[" + fmt(b.low) + ", " + fmt(b.high) + "]" }),
            el("td", { class: "num", text: fmt(r.loss && r.loss.value) }),
            el("td", { class: "num", text: fmt(r.lr && r.lr.value) }),
            el("td", { class: firing ? "num alert-firing" : "num", text: firing ? firing + " firing" : String(r.alerts.events) }),
            el("td", { class: "small", text: fmtTime(r.updated_at) })));
        }
        const bad = doc.unreadable.map((u) => u.file + ": " + u.error);
        note.textContent = doc.runs.length === 0 ? "No run files in this folder yet; the list refreshes by itself." : "";
        if (bad.length) note.textContent += " Unreadable: " + bad.join("; ");
      } catch (e) {
        showError("Could not list the runs: " + e.message);
      }
      if (!closed) timer = setTimeout(load, 3000);
    }
    load();
    return {
      close() {
        closed = true;
        clearTimeout(timer);
      },
    };
  }

  // One run: key numbers, charts, heat map, alerts, decisions, config; live while it is written.
  function runView(app, id, params) {
    let xKey = params.get("x") in X_AXES ? params.get("x") : "examples";
    const state = {
      meas: emptySeries(NOISE_COLUMNS),
      grad: emptySeries(GRAD_COLUMNS),
      metrics: {},
      events: [],
      cursor: null,
      overview: null,
      layersAt: 0,
      closed: false,
      es: null,
    };
    setCrumbs(runLink(id, id));
    setLive("loading…", "");

    const title = el("h1", { testid: "run-name" });
    const subtitle = el("div", { class: "muted small", testid: "run-id" });
    const kn = el("dl", { class: "key-numbers", testid: "key-numbers" });
    const xSelect = el("select", { testid: "x-axis", "aria-label": "x axis" },
      ...Object.entries(X_AXES).map(([k, label]) => el("option", { value: k, text: label })));
    xSelect.value = xKey;
    xSelect.addEventListener("change", () => {
      xKey = xSelect.value;
      for (const k of ["noise", "loss", "grad"]) if (charts[k]) charts[k].destroy();  // charts holds more than charts
      draw();
    });
    const box = (testid) => el("div", { class: "chart", testid: testid });
    const noiseBox = box("chart-noise");
    const noiseCap = el("div", { class: "caption", testid: "chart-noise-caption" });
    const lossBox = box("chart-loss");
    const lossCap = el("div", { class: "caption", testid: "chart-loss-caption" });
    const gradBox = box("chart-gradients");
    const gradCap = el("div", { class: "caption", testid: "chart-gradients-caption" });
    const metricsBox = el("div", { class: "small-multiples", testid: "metric-charts" });
    const heat = el("div", { class: "heatmap", testid: "heatmap" });
    const alertsBody = el("tbody", { testid: "alerts-body" });
    const decisionsBody = el("tbody", { testid: "decisions-body" });
    const otherEvents = el("ul", { class: "events", testid: "other-events" });
    const configBody = el("tbody", { testid: "config-body" });

    app.appendChild(el("section", { class: "card head" }, title, subtitle, kn,
      el("label", { class: "control" }, "x axis ", xSelect)));
    app.appendChild(el("section", { class: "card" },
      el("h2", { text: "B_simple with its band, batch size and learning rate" }), noiseBox, noiseCap));
    app.appendChild(el("section", { class: "card" }, el("h2", { text: "Loss" }), lossBox, lossCap, metricsBox));
    app.appendChild(el("section", { class: "card" },
      el("h2", { text: "|G|² and tr(Σ) (smoothed)" }), gradBox, gradCap));
    app.appendChild(el("section", { class: "card" },
      el("h2", { text: "B_simple per layer (noisiest first)" }), heat));
    app.appendChild(el("section", { class: "card" }, el("h2", { text: "Alerts" }),
      el("table", { class: "events", testid: "alerts" },
        el("thead", {}, el("tr", {}, ...["step", "state", "severity", "rule", "layer", "what", "suggested action"]
          .map((h) => el("th", { text: h })))), alertsBody)));
    app.appendChild(el("section", { class: "card" }, el("h2", { text: "Controller decisions" }),
      el("table", { class: "events", testid: "decisions" },
        el("thead", {}, el("tr", {}, ...["step", "policy", "batch size", "accumulation", "lr scale", "B_simple", "reason"]
          .map((h) => el("th", { text: h })))), decisionsBody)));
    app.appendChild(el("section", { class: "card" }, el("h2", { text: "Other events" }), otherEvents));
    app.appendChild(el("section", { class: "card" }, el("h2", { text: "Config" }),
      el("table", { class: "config", testid: "config" }, configBody)));

    const charts = {};
    let noiseHasPre = false; // whether the noise chart was built with b_precond's series
    const markers = (u) => drawMarkers(u, state.events, xKey);

    function noiseChart() {
      const base = table(state.meas, xKey, NOISE_COLUMNS, positive);
      const lr = state.metrics.lr ? table(state.metrics.lr, xKey, ["value"], finite) : [[], []];
      const pre = PRECOND.map((k) => (state.metrics[k] ? table(state.metrics[k], xKey, ["value"], positive) : [[], []]));
      const data = joined([base, lr, ...pre]);
      const hasLr = lr[0].length > 0;
      const hasPre = pre[0][0].length > 0;
      if (charts.noise && noiseHasPre !== hasPre) {  // b_precond appeared: its series are drawn from now on
        charts.noise.destroy();
        charts.noise = null;
      }
      if (!charts.noise) {
        noiseHasPre = hasPre;
        charts.noise = makeChart(noiseBox, {
          height: 280,
          uplot: {
            scales: { x: xScale(xKey), y: { distr: 3 }, lr: { auto: true } },
            series: [
              { label: X_AXES[xKey], value: xValue(xKey) },
              { label: "B_simple", stroke: COLORS[0], width: 2, spanGaps: true, value: (u, v) => fmt(v) },
              { label: "band low", stroke: "rgba(192,57,43,0.35)", width: 1, spanGaps: true, value: (u, v) => fmt(v) },
              { label: "band high", stroke: "rgba(192,57,43,0.35)", width: 1, spanGaps: true, value: (u, v) => fmt(v) },
              { label: "batch size", stroke: COLORS[1], width: 2, paths: uPlot.paths.stepped({ align: 1 }), spanGaps: true, value: (u, v) => fmt(v) },
              { label: "lr", stroke: COLORS[3], width: 1.5, scale: "lr", spanGaps: true, show: hasLr, value: (u, v) => fmt(v) },
              { label: "B_precond", stroke: COLORS[4], width: 2, dash: [6, 3], spanGaps: true, show: hasPre, value: (u, v) => fmt(v) },
              { label: "precond low", stroke: "rgba(125,60,152,0.35)", width: 1, spanGaps: true, show: hasPre, value: (u, v) => fmt(v) },
              { label: "precond high", stroke: "rgba(125,60,152,0.35)", width: 1, spanGaps: true, show: hasPre, value: (u, v) => fmt(v) },
            ],
            bands: [{ series: [3, 2], fill: "rgba(192,57,43,0.12)" }, { series: [8, 7], fill: "rgba(125,60,152,0.10)" }],
            axes: [
              { values: xKey === "wall_time" ? undefined : (u, vs) => vs.map(fmt) },
              { scale: "y", label: "examples", values: (u, vs) => vs.map(fmt) },
              { scale: "lr", side: 1, label: "lr", grid: { show: false }, values: (u, vs) => vs.map(fmt) },
            ],
            hooks: { draw: [markers] },
          },
        });
      }
      charts.noise.set(data);
      caption(noiseCap, [
        state.meas.step.length.toLocaleString("en-US") + " points",
        state.meas.downsampled ? "downsampled: each bucket of " + state.meas.bucket_steps + " steps shows its min and max" : null,
        state.meas.step.length ? "last step " + fmt(state.meas.step[state.meas.step.length - 1]) : null,
        hasLr ? null : "no 'lr' metric logged",
      ]);
      noiseCap.setAttribute("data-points", String(data[0].length));
    }

    function lossChart() {
      const keys = Object.keys(state.metrics).filter((k) => k === "loss" || k === "val_loss");
      const tables = keys.map((k) => table(state.metrics[k], xKey, ["value"], finite));
      const data = tables.length ? joined(tables) : [[]];
      if (!charts.loss || charts.lossKeys !== keys.join(",")) {
        if (charts.loss) charts.loss.destroy();
        charts.lossKeys = keys.join(",");
        charts.loss = makeChart(lossBox, {
          height: 220,
          uplot: {
            scales: { x: xScale(xKey) },
            series: [{ label: X_AXES[xKey], value: xValue(xKey) },
              ...keys.map((k, i) => ({ label: k, stroke: COLORS[i], width: 1.5, spanGaps: true, value: (u, v) => fmt(v) }))],
            axes: [{ values: xKey === "wall_time" ? undefined : (u, vs) => vs.map(fmt) }, { values: (u, vs) => vs.map(fmt) }],
            hooks: { draw: [markers] },
          },
        });
      }
      charts.loss.set(data);
      const loss = state.metrics.loss;
      caption(lossCap, [
        keys.length ? null : "no 'loss' metric logged",
        loss ? loss.step.length.toLocaleString("en-US") + " points" : null,
        loss && loss.downsampled ? "downsampled (min and max per bucket)" : null,
      ]);
      lossCap.setAttribute("data-points", String(data[0].length));
      // One small chart per other metric (lr is drawn with B_simple above).
      const others = Object.keys(state.metrics)
        .filter((k) => !["loss", "val_loss", "lr"].includes(k) && !k.startsWith("b_precond"))
        .slice(0, 12);
      charts.metrics = charts.metrics || {};
      for (const k of others) {
        if (!charts.metrics[k]) {
          const b = el("div", { class: "chart", testid: "chart-metric" });
          metricsBox.appendChild(el("div", { class: "small-chart" }, el("h3", { text: k }), b));
          charts.metrics[k] = makeChart(b, {
            height: 150,
            uplot: {
              scales: { x: xScale(xKey) },
              series: [{ label: X_AXES[xKey], value: xValue(xKey) },
                { label: k, stroke: COLORS[(others.indexOf(k) + 2) % COLORS.length], width: 1.5, spanGaps: true, value: (u, v) => fmt(v) }],
              axes: [{ values: xKey === "wall_time" ? undefined : (u, vs) => vs.map(fmt) }, { values: (u, vs) => vs.map(fmt) }],
              legend: { show: false },
            },
          });
        }
        charts.metrics[k].set(table(state.metrics[k], xKey, ["value"], finite));
      }
    }

    function gradChart() {
      const data = table(state.grad, xKey, GRAD_COLUMNS, positive);
      if (!charts.grad) {
        charts.grad = makeChart(gradBox, {
          height: 220,
          uplot: {
            scales: { x: xScale(xKey), g: { distr: 3 }, t: { distr: 3 } },
            series: [{ label: X_AXES[xKey], value: xValue(xKey) },
              { label: "|G|²", stroke: COLORS[2], width: 1.5, scale: "g", spanGaps: true, value: (u, v) => fmt(v) },
              { label: "tr(Σ)", stroke: COLORS[4], width: 1.5, scale: "t", spanGaps: true, value: (u, v) => fmt(v) }],
            axes: [{ values: xKey === "wall_time" ? undefined : (u, vs) => vs.map(fmt) },
              { scale: "g", label: "|G|²", values: (u, vs) => vs.map(fmt) },
              { scale: "t", side: 1, label: "tr(Σ)", grid: { show: false }, values: (u, vs) => vs.map(fmt) }],
            hooks: { draw: [markers] },
          },
        });
      }
      charts.grad.set(data);
      caption(gradCap, [data[0].length.toLocaleString("en-US") + " points", "non-positive values are not drawn on the log scale"]);
      gradCap.setAttribute("data-points", String(data[0].length));
    }

    function draw() {
      if (charts.metrics) {
        for (const c of Object.values(charts.metrics)) c.destroy();
        clear(metricsBox);
        charts.metrics = null;
      }
      for (const k of ["noise", "loss", "grad"]) if (charts[k] && !charts[k].plot) delete charts[k];
      noiseChart();
      lossChart();
      gradChart();
    }

    function redraw() {
      noiseChart();
      lossChart();
      gradChart();
    }

    function showOverview(o) {
      state.overview = o;
      title.textContent = o.name;
      subtitle.textContent = o.id + " · started " + fmtTime(o.started_at) + " · " + fmtDuration(o.duration_s) +
        (o.source ? " · source " + o.source : "") + (o.coverage !== null ? " · coverage " + Math.round(100 * o.coverage) + "%" : "");
      const b = o.b_simple || {};
      const status = o.stale ? "running (no write for a while: stopped?)" : o.status;
      const items = [
        ["status", "kn-status", status, null],
        ["step", "kn-step", fmt(o.last_step), o.last_step],
        ["examples", "kn-examples", fmt(o.examples), o.examples],
        ["batch size", "kn-batch-size", fmt(o.batch_size), o.batch_size],
        ["B_simple", "kn-b-simple", fmt(b.value), b.value],
        ["band", "kn-b-simple-band", "[" + fmt(b.low) + ", " + fmt(b.high) + "]", null],
        ["loss", "kn-loss", fmt(o.loss && o.loss.value), o.loss && o.loss.value],
        ["lr", "kn-lr", fmt(o.lr && o.lr.value), o.lr && o.lr.value],
        ["alerts firing", "kn-alerts", String(o.alerts.firing.length), o.alerts.firing.length],
      ];
      clear(kn);
      for (const [label, testid, text, value] of items) {
        kn.appendChild(el("div", { class: "kn" }, el("dt", { text: label }),
          el("dd", { testid: testid, text: text, num: value === null || value === undefined ? null : value })));
      }
      for (const a of o.alerts.firing) {
        kn.appendChild(el("div", { class: "kn wide alert-firing", testid: "kn-firing" },
          el("dt", { text: "firing: " + a.rule + (a.layer ? " (" + a.layer + ")" : "") }),
          el("dd", { text: a.message + (a.action ? " → " + a.action : "") })));
      }
    }

    function addEvents(list) {
      for (const e of list) {
        state.events.push(e);
        const d = e.data && typeof e.data === "object" ? e.data : {};
        if (e.kind === "alert") {
          alertsBody.appendChild(el("tr", { testid: "alert-row", class: "state-" + String(d.state || "") },
            el("td", { class: "num", text: fmt(e.step) }),
            el("td", { text: d.state || "" }),
            el("td", { text: d.severity || "" }),
            el("td", { text: d.rule || "" }),
            el("td", { text: d.layer || "" }),
            el("td", { testid: "alert-message", text: e.message }),
            el("td", { testid: "alert-action", text: d.action || "" })));
        } else if (e.kind === "controller") {
          const before = d.before || {};
          const after = d.after || {};
          const change = (k) => fmt(before[k]) + " → " + fmt(after[k]);
          decisionsBody.appendChild(el("tr", { testid: "decision-row" },
            el("td", { class: "num", text: fmt(e.step) }),
            el("td", { text: d.policy || "" }),
            el("td", { text: change("batch_size") }),
            el("td", { text: change("accumulation") }),
            el("td", { text: change("lr_scale") }),
            el("td", { text: fmt(d.b_simple) + " [" + fmt(d.b_simple_low) + ", " + fmt(d.b_simple_high) + "]" }),
            el("td", { testid: "decision-reason", text: e.message })));
        } else {
          otherEvents.appendChild(el("li", { testid: "event" },
            el("span", { class: "muted", text: "step " + fmt(e.step) + " · " + e.kind + ": " }), e.message));
        }
      }
      if (!alertsBody.firstChild) alertsBody.appendChild(el("tr", { class: "empty" }, el("td", { colspan: 7, text: "No alert so far." })));
      else if (alertsBody.firstChild.className === "empty" && alertsBody.children.length > 1) alertsBody.removeChild(alertsBody.firstChild);
      if (!decisionsBody.firstChild) decisionsBody.appendChild(el("tr", { class: "empty" }, el("td", { colspan: 7, text: "No controller decision so far." })));
      else if (decisionsBody.firstChild.className === "empty" && decisionsBody.children.length > 1) decisionsBody.removeChild(decisionsBody.firstChild);
    }

    function showConfig(config) {
      clear(configBody);
      const keys = Object.keys(config || {}).sort();
      if (!keys.length) configBody.appendChild(el("tr", {}, el("td", { text: "(no config recorded)" })));
      for (const k of keys) {
        const v = config[k];
        configBody.appendChild(el("tr", { testid: "config-row" }, el("th", { text: k }),
          el("td", { testid: "config-value", text: typeof v === "string" ? v : JSON.stringify(v) })));
      }
    }

    async function loadLayers() {
      state.layersAt = Date.now();
      try {
        const doc = await api("/api/runs/" + encodeURIComponent(id) + "/layers", { points: 200 });
        if (!state.closed) drawHeatmap(heat, doc, xKey);
      } catch (e) {
        if (!state.closed) showError("Could not read the per-layer values: " + e.message);
      }
    }

    // Three requests in parallel (the server reads each in its own thread); the live stream starts from the
    // earliest cursor and appendSeries drops what a series already holds.
    async function loadSeries() {
      const enc = encodeURIComponent(id);
      const path = "/api/runs/" + enc + "/series";
      const rest = state.overview.metrics.filter((k) => k !== "lr");
      // The learning rate rides with the two-column request, so the three take about as long on a long run.
      const [noise, grad, other] = await Promise.all([
        api(path, { columns: NOISE_COLUMNS.join(","), metrics: "", points: POINTS }),
        api(path, { columns: GRAD_COLUMNS.join(","), metrics: "lr", points: POINTS }),
        rest.length ? api(path, { columns: "", metrics: rest.join(","), points: POINTS }) : null,
      ]);
      state.meas = noise.measurements;
      state.grad = grad.measurements;
      state.metrics = {};
      if (grad.metrics.lr && grad.metrics.lr.step.length) state.metrics.lr = grad.metrics.lr;
      if (other) Object.assign(state.metrics, other.metrics);
      const cursors = [noise.cursor, grad.cursor].concat(other ? [other.cursor] : []);
      return {
        step: Math.min(...cursors.map((c) => c.step)),
        metric_id: Math.min(...cursors.map((c) => c.metric_id)),
      };
    }

    async function load() {
      try {
        const o = await api("/api/runs/" + encodeURIComponent(id));
        if (state.closed) return;
        showOverview(o);
        showConfig(o.config);
        const [cursor, ev] = await Promise.all([
          loadSeries(),
          api("/api/runs/" + encodeURIComponent(id) + "/events", { limit: 10000 }),
        ]);
        if (state.closed) return;
        clear(alertsBody);
        clear(decisionsBody);
        clear(otherEvents);
        state.events = [];
        addEvents(ev.events);
        draw();
        loadLayers();
        state.cursor = { step: cursor.step, metric_id: cursor.metric_id, event_id: ev.cursor };
        follow();
      } catch (e) {
        if (!state.closed) {
          showError("Could not read run " + id + ": " + e.message);
          setLive("error", "bad");
        }
      }
    }

    function follow() {
      if (state.es) state.es.close();
      const c = state.cursor;
      state.es = stream("/api/runs/" + encodeURIComponent(id) + "/stream", {
        columns: NOISE_COLUMNS.concat(GRAD_COLUMNS).join(","), step: c.step, metric_id: c.metric_id, event_id: c.event_id,
      });
      setLive(state.overview.status === "running" ? "live" : state.overview.status, state.overview.status === "running" ? "on" : "");
      state.es.addEventListener("update", (msg) => {
        const doc = JSON.parse(msg.data);
        if (doc.reset) {
          state.es.close();
          load();
          return;
        }
        appendSeries(state.meas, doc.measurements);
        appendSeries(state.grad, doc.measurements);
        for (const [k, s] of Object.entries(doc.metrics)) {
          if (!state.metrics[k]) state.metrics[k] = emptySeries(["value"]);
          appendSeries(state.metrics[k], s);
        }
        addEvents(doc.events);
        showOverview(doc.overview);
        state.cursor = doc.cursor;
        setLive(doc.status === "running" ? "live · step " + fmt(doc.cursor.step) : doc.status, doc.status === "running" ? "on" : "");
        // Appending raw rows to downsampled ones grows the arrays: past a few times the budget, ask again.
        if (state.meas.step.length > 4 * POINTS) {
          state.es.close();
          load();
          return;
        }
        redraw();
        if (Date.now() - state.layersAt > 3000) loadLayers();
      });
      state.es.addEventListener("end", () => {
        state.es.close();
        setLive(state.overview ? state.overview.status : "stopped", "");
        loadLayers();
      });
      state.es.addEventListener("error", (msg) => {
        if (msg.data) showError(JSON.parse(msg.data).error);
        if (state.es.readyState === EventSource.CLOSED) setLive("disconnected", "bad");
        else setLive("reconnecting…", "bad");
      });
    }

    const onResize = () => {
      for (const c of [charts.noise, charts.loss, charts.grad]) if (c) c.resize();
      if (charts.metrics) for (const c of Object.values(charts.metrics)) c.resize();
    };
    window.addEventListener("resize", onResize);
    load();
    return {
      close() {
        state.closed = true;
        if (state.es) state.es.close();
        window.removeEventListener("resize", onResize);
        for (const c of [charts.noise, charts.loss, charts.grad]) if (c) c.destroy();
        if (charts.metrics) for (const c of Object.values(charts.metrics)) c.destroy();
      },
    };
  }

  // Vertical lines at the alerts (red firing, orange pending, green resolved) and controller decisions (blue).
  function drawMarkers(u, events, xKey) {
    if (!events.length) return;
    const ctx = u.ctx;
    const { left, top, width, height } = u.bbox;
    ctx.save();
    ctx.lineWidth = Math.max(1, devicePixelRatio);
    ctx.setLineDash([4 * devicePixelRatio, 3 * devicePixelRatio]);
    for (const e of events) {
      if (e.kind !== "alert" && e.kind !== "controller") continue;
      const x = e[xKey];
      if (x === null || x === undefined) continue;
      const px = u.valToPos(x, "x", true);
      if (!(px >= left && px <= left + width)) continue;
      const state = e.data && e.data.state;
      ctx.strokeStyle = e.kind === "controller" ? "rgba(36,113,163,0.7)"
        : state === "firing" ? "rgba(192,57,43,0.8)" : state === "resolved" ? "rgba(34,153,84,0.8)" : "rgba(185,119,14,0.8)";
      ctx.beginPath();
      ctx.moveTo(px, top);
      ctx.lineTo(px, top + height);
      ctx.stroke();
    }
    ctx.restore();
  }

  // The per-layer heat map: one row per layer (the API orders them noisiest first), colour = log10 of the value.
  function drawHeatmap(box, doc, xKey) {
    clear(box);
    if (!doc.layers.length || !doc.step.length) {
      box.appendChild(el("p", { class: "muted", text: "No per-layer values recorded (GNSMonitor(per_layer=False)?)." }));
      return;
    }
    const rowH = doc.layers.length > 40 ? 10 : 18;
    const labels = el("div", { class: "heat-labels" });
    for (const l of doc.layers) {
      labels.appendChild(el("div", { class: "heat-label", testid: "heatmap-layer", style: null, title: l.name, text: l.name, num: l.latest }));
    }
    for (const node of labels.children) node.style.height = rowH + "px";
    const canvas = el("canvas", { testid: "heatmap-canvas" });
    const tip = el("div", { class: "heat-tip", testid: "heatmap-tip" });
    const wrap = el("div", { class: "heat-wrap" }, labels, el("div", { class: "heat-canvas" }, canvas, tip));
    box.appendChild(wrap);
    let lo = Infinity;
    let hi = -Infinity;
    for (const l of doc.layers) {
      for (const v of l.values) {
        const p = positive(v);
        if (p !== null) {
          lo = Math.min(lo, Math.log10(p));
          hi = Math.max(hi, Math.log10(p));
        }
      }
    }
    if (!isFinite(lo)) {
      lo = 0;
      hi = 1;
    }
    if (hi - lo < 1e-9) hi = lo + 1;
    const width = Math.max(200, canvas.parentNode.clientWidth || 600);
    const height = rowH * doc.layers.length;
    const dpr = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
    canvas.style.width = width + "px";
    canvas.style.height = height + "px";
    const ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);
    const n = doc.step.length;
    const cw = width / n;
    doc.layers.forEach((l, i) => {
      l.values.forEach((v, j) => {
        const p = positive(v);
        ctx.fillStyle = p === null ? "#eeeeee" : viridis((Math.log10(p) - lo) / (hi - lo));
        ctx.fillRect(j * cw, i * rowH, Math.ceil(cw), rowH - 1);
      });
    });
    const xs = doc[xKey] || doc.step;
    const legend = el("div", { class: "caption", testid: "heatmap-caption" });
    caption(legend, [
      doc.layers.length + " of " + doc.total_layers + " layers",
      n + " columns" + (doc.downsampled ? " (each the " + doc.agg + " over " + doc.bucket_steps + " steps)" : ""),
      "colour: log10 " + doc.column + " from " + fmt(Math.pow(10, lo)) + " (dark) to " + fmt(Math.pow(10, hi)) + " (yellow)",
    ]);
    box.appendChild(legend);
    canvas.addEventListener("mousemove", (ev) => {
      const r = canvas.getBoundingClientRect();
      const j = Math.floor(((ev.clientX - r.left) / r.width) * n);
      const i = Math.floor((ev.clientY - r.top) / rowH);
      if (i < 0 || i >= doc.layers.length || j < 0 || j >= n) return;
      const l = doc.layers[i];
      const x = xs[j];
      tip.textContent = l.name + " · " + X_AXES[xKey] + " " + (xKey === "wall_time" ? fmtTime(x) : fmt(x)) +
        " · " + doc.column + " " + fmt(l.values[j]);
    });
  }

  function viridis(t) {
    const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
    t = Math.min(1, Math.max(0, t)) * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(t));
    const f = t - i;
    const c = stops[i].map((a, k) => Math.round(a + f * (stops[i + 1][k] - a)));
    return "rgb(" + c[0] + "," + c[1] + "," + c[2] + ")";
  }

  // Several runs overlaid: one column (or metric) of each, against examples seen by default.
  function compareView(app, ids, params) {
    let xKey = params.get("x") in X_AXES ? params.get("x") : "examples";
    let pick = params.get("metric") ? "metric:" + params.get("metric") : params.get("column") || "b_simple";
    setCrumbs(el("span", { text: "overlay of " + ids.length + " run(s)" }));
    setLive("", "");
    const select = el("select", { testid: "compare-column", "aria-label": "what to overlay" },
      ...MEASUREMENT_FIELDS.map((c) => el("option", { value: c, text: c })));
    const xSelect = el("select", { testid: "x-axis", "aria-label": "x axis" },
      ...Object.entries(X_AXES).map(([k, label]) => el("option", { value: k, text: label })));
    xSelect.value = xKey;
    const chartBox = el("div", { class: "chart", testid: "chart-compare" });
    const cap = el("div", { class: "caption", testid: "chart-compare-caption" });
    const list = el("ul", { class: "legend-list", testid: "compare-runs" });
    app.appendChild(el("section", { class: "card" }, el("h1", { text: "Overlay" }),
      el("label", { class: "control" }, "series ", select), el("label", { class: "control" }, " x axis ", xSelect),
      chartBox, cap, list));
    let chart = null;
    let closed = false;

    async function metricsOf() {
      // Offer every metric any of the runs logged.
      const names = new Set();
      for (const id of ids) {
        try {
          const o = await api("/api/runs/" + encodeURIComponent(id));
          o.metrics.forEach((m) => names.add(m));
        } catch (e) {
          /* reported by the overlay request */
        }
      }
      for (const m of Array.from(names).sort()) select.appendChild(el("option", { value: "metric:" + m, text: "metric " + m }));
      select.value = pick;
    }

    async function load() {
      const q = { runs: ids.join(","), points: POINTS };
      if (pick.startsWith("metric:")) q.metric = pick.slice(7);
      else q.column = pick;
      try {
        const doc = await api("/api/compare", q);
        if (closed) return;
        showError(null);
        const map = pick === "batch_size" || pick.startsWith("metric:") ? finite : positive;
        const tables = doc.runs.map((r) => table(r.series, xKey, ["value"], map));
        const data = joined(tables);
        if (chart) chart.destroy();
        const logY = !pick.startsWith("metric:") && pick !== "coverage" && pick !== "skipped_steps";
        chart = makeChart(chartBox, {
          height: 320,
          uplot: {
            scales: { x: xScale(xKey), y: logY ? { distr: 3 } : { auto: true } },
            series: [{ label: X_AXES[xKey], value: xValue(xKey) },
              ...doc.runs.map((r, i) => ({ label: r.name + " (" + r.id.slice(-6) + ")", stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true, value: (u, v) => fmt(v) }))],
            axes: [{ values: xKey === "wall_time" ? undefined : (u, vs) => vs.map(fmt) }, { values: (u, vs) => vs.map(fmt) }],
          },
        });
        chart.set(data);
        caption(cap, [doc.runs.length + " runs", data[0].length.toLocaleString("en-US") + " x values",
          logY ? "log scale; non-positive values not drawn" : null]);
        clear(list);
        doc.runs.forEach((r, i) => {
          const swatch = el("span", { class: "swatch" });
          swatch.style.background = COLORS[i % COLORS.length];
          list.appendChild(el("li", { testid: "compare-run" }, swatch, runLink(r.id, r.name),
            el("span", { class: "muted small", text: " " + r.id + " · " + r.status + " · " + r.series.rows.toLocaleString("en-US") + " rows" })));
        });
      } catch (e) {
        showError("Could not overlay the runs: " + e.message);
      }
    }

    function go() {
      const q = new URLSearchParams();
      if (pick.startsWith("metric:")) q.set("metric", pick.slice(7));
      else q.set("column", pick);
      q.set("x", xKey);
      window.location.hash = "#/compare/" + ids.map(encodeURIComponent).join(",") + "?" + q.toString();
    }
    select.addEventListener("change", () => {
      pick = select.value;
      go();
    });
    xSelect.addEventListener("change", () => {
      xKey = xSelect.value;
      go();
    });
    const onResize = () => chart && chart.resize();
    window.addEventListener("resize", onResize);
    metricsOf().then(load);
    return {
      close() {
        closed = true;
        window.removeEventListener("resize", onResize);
        if (chart) chart.destroy();
      },
    };
  }

  window.addEventListener("hashchange", route);
  route();
})();
