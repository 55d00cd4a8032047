// η–V diagram: every source, candidates coloured by status; click a point to open its page.
"use strict";

(function () {
  const div = document.getElementById("etav");
  const colors = { active: "#c0392b", investigated: "#b7791f", dismissed: "#6b7280" };
  ESE.getJSON("/api/v1/eta-v").then((rows) => {
    const ok = rows.filter((r) => r.eta_metric > 0 && r.v_index > 0);
    const groups = [["not flagged", null], ["active", "active"], ["investigated", "investigated"], ["dismissed", "dismissed"]];
    const kind = ok.length > 20000 ? "scattergl" : "scatter";
    const data = groups.map(([name, status]) => {
      const sel = ok.filter((r) => (r.status || null) === status);
      return {
        type: kind, mode: "markers", name: `${name} (${sel.length})`,
        x: sel.map((r) => Math.log10(r.eta_metric)),
        y: sel.map((r) => Math.log10(r.v_index)),
        customdata: sel.map((r) => [r.source_id, r.n_obs, r.mean_flux_mjy, r.eta_metric, r.v_index]),
        hovertemplate: "%{customdata[0]}<br>η %{customdata[3]:.3g}, V %{customdata[4]:.3g}" +
          "<br>n_obs %{customdata[1]}, mean %{customdata[2]:.3g} mJy<extra></extra>",
        marker: status === null
          ? { color: "rgba(31,95,191,0.45)", size: 6 }
          : { color: colors[status], size: 11, symbol: "diamond", line: { color: "#000", width: 1 } },
      };
    });
    Plotly.newPlot(div, data, {
      margin: { l: 64, r: 16, t: 16, b: 48 },
      xaxis: { title: { text: "log₁₀ η" } },
      yaxis: { title: { text: "log₁₀ V" } },
      hovermode: "closest",
      legend: { orientation: "h", y: 1.06 },
    }, { responsive: true, displaylogo: false });
    div.on("plotly_click", (event) => {
      const id = event.points[0].customdata[0];
      window.location.href = `/sources/${ESE.pathQuote(id)}`;
    });
    const skipped = rows.length - ok.length;
    document.getElementById("etav-note").textContent =
      `${ok.length} sources plotted` + (skipped ? `; ${skipped} without positive η and V not shown.` : ".");
    div.dataset.ready = "true";
  }).catch((err) => { div.textContent = `Could not load the statistics: ${err.message}`; });
})();
