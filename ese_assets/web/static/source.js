// Source page: the interactive lightcurve (plotly.js, served locally) and the review buttons.
"use strict";

(function () {
  const plotDiv = document.getElementById("lightcurve");
  const sourceId = plotDiv.dataset.sourceId;
  const api = `/api/v1/sources/${ESE.pathQuote(sourceId)}`;
  const num = (text) => (text === "" || text === undefined ? null : Number(text));
  const median = num(plotDiv.dataset.median);
  const dipStart = num(plotDiv.dataset.dipStart);
  const dipEnd = num(plotDiv.dataset.dipEnd);
  let points = [];
  // MJD -> ISO date string (UTC) for the calendar axis; MJD 40587 is 1970-01-01.
  const isoOf = (mjd) => new Date((mjd - 40587) * 86400000).toISOString();

  function traces(normalize, showExcluded, dates) {
    const scale = normalize && median ? 1 / median : 1;
    const unit = normalize && median ? "flux / median" : "mJy/beam";
    const make = (rows, name, marker) => ({
      type: "scatter",
      mode: "markers",
      name,
      x: rows.map((p) => (dates ? isoOf(p.mjd) : p.mjd)),
      y: rows.map((p) => (p.flux_mjy === null ? null : p.flux_mjy * scale)),
      error_y: {
        type: "data",
        array: rows.map((p) => (p.flux_err_mjy === null ? 0 : p.flux_err_mjy * scale)),
        visible: true, thickness: 1, width: 0, color: marker.color,
      },
      customdata: rows.map((p) => [p.date_obs, p.image_path.split("/").pop(), p.quality_flag, p.mjd]),
      hovertemplate:
        "MJD %{customdata[3]:.4f}<br>%{customdata[0]} UTC<br>%{y:.4g} ± %{error_y.array:.2g} " +
        unit + "<br>%{customdata[1]}<br>quality_flag %{customdata[2]}<extra></extra>",
      marker,
    });
    const used = points.filter((p) => p.used);
    const excluded = points.filter((p) => !p.used);
    const out = [make(used, "measurements", { color: "#1f5fbf", size: 7 })];
    if (showExcluded && excluded.length) {
      out.push(make(excluded, "left out (quality flag)", { color: "#9aa0a6", size: 8, symbol: "x" }));
    }
    return { data: out, unit, scale };
  }

  function layout(unit, scale, dates) {
    const shapes = [];
    const x = (mjd) => (dates ? isoOf(mjd) : mjd);
    if (dipStart !== null && dipEnd !== null) {
      shapes.push({
        type: "rect", xref: "x", yref: "paper", x0: x(dipStart), x1: x(dipEnd), y0: 0, y1: 1,
        fillcolor: "rgba(192,57,43,0.12)", line: { width: 0 }, layer: "below",
      });
    }
    if (median) {
      shapes.push({
        type: "line", xref: "paper", x0: 0, x1: 1, yref: "y", y0: median * scale, y1: median * scale,
        line: { color: "#444", width: 1, dash: "dash" },
      });
    }
    return {
      margin: { l: 64, r: 16, t: 16, b: 48 },
      xaxis: dates
        ? { title: { text: "date (UTC)" }, type: "date" }
        : { title: { text: "MJD" }, zeroline: false, tickformat: ".1f" },
      yaxis: { title: { text: `peak flux density (${unit})` }, zeroline: false },
      shapes,
      hovermode: "closest",
      legend: { orientation: "h", y: 1.08 },
    };
  }

  function draw() {
    const normalize = document.getElementById("normalize").checked;
    const showExcluded = document.getElementById("show-excluded").checked;
    const dates = document.getElementById("dates").checked;
    const { data, unit, scale } = traces(normalize, showExcluded, dates);
    Plotly.react(plotDiv, data, layout(unit, scale, dates), { responsive: true, displaylogo: false });
    plotDiv.dataset.points = String(points.length);
  }

  ESE.getJSON(`${api}/lightcurve`).then((lc) => {
    points = lc.data_points;
    draw();
    plotDiv.dataset.ready = "true";
  }).catch((err) => {
    plotDiv.textContent = `Could not load the lightcurve: ${err.message}`;
  });
  document.getElementById("normalize").addEventListener("change", draw);
  document.getElementById("show-excluded").addEventListener("change", draw);
  document.getElementById("dates").addEventListener("change", draw);

  // Review: investigated / dismissed / reopen, with a note; the page reloads to show the history.
  const review = document.getElementById("review");
  const message = document.getElementById("review-message");
  const reviewer = document.getElementById("reviewer");
  if (reviewer) {
    reviewer.value = localStorage.getItem("ese_reviewer") || "";
    reviewer.addEventListener("change", () => localStorage.setItem("ese_reviewer", reviewer.value));
  }
  review.querySelectorAll("button[data-status]").forEach((button) => {
    button.addEventListener("click", async () => {
      const body = {
        status: button.dataset.status,
        notes: document.getElementById("note").value.trim() || null,
        by: (reviewer && reviewer.value.trim()) || "web",
      };
      review.querySelectorAll("button").forEach((b) => { b.disabled = true; });
      message.className = "message";
      message.textContent = "saving…";
      try {
        const result = await ESE.postJSON(`/api/ese/candidates/${ESE.pathQuote(sourceId)}/status`, body);
        const latest = result.candidates[result.candidates.length - 1];
        message.className = "message ok";
        message.textContent = `saved: ${latest.status}`;
        document.getElementById("review-status").textContent = latest.status;
        const badge = document.getElementById("status");
        badge.textContent = latest.status;
        badge.className = `status status-${latest.status}`;
        window.setTimeout(() => window.location.reload(), 600);
      } catch (err) {
        message.className = "message error";
        message.textContent = err.message;
        review.querySelectorAll("button").forEach((b) => { b.disabled = false; });
      }
    });
  });
})();
