"""The viewer page's HTML, CSS and script (`viewer.build_page` fills in plotly.js and the run's data).

The script draws one plotly chart per metric group, a filterable list of dumped trajectories and,
for the chosen one, its tokens laid out as notebook cells (prompt, model text with its code, the
interpreter's output), coloured by provenance (or importance weight, version, |proximal - behaviour|),
with each token's values shown on hover and pinned on click. Element ids used by tests: #charts,
#traj-list, #traj-detail, #token-detail, filter controls #f-step #f-reward #f-finish #f-tools
#f-span #f-kind, #colour-by.
"""

PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>cir-actors run <!--RUN_NAME--></title>
<style>
body { font-family: system-ui, sans-serif; margin: 0; color: #1d1d1f; background: #fafafa; }
header { padding: 10px 18px; background: #23324a; color: white; }
header h1 { font-size: 18px; margin: 0; } header span { opacity: .75; font-size: 13px; }
section { padding: 8px 18px; }
h2 { font-size: 16px; margin: 10px 0 6px; }
#charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: 8px; }
.chart { background: white; border: 1px solid #ddd; border-radius: 6px; height: 260px; }
#traj-area { display: grid; grid-template-columns: minmax(420px, 38%) 1fr; gap: 12px; }
.filters { display: flex; flex-wrap: wrap; gap: 8px; margin-bottom: 6px; font-size: 13px; }
.filters label { display: flex; flex-direction: column; }
table { border-collapse: collapse; font-size: 12px; width: 100%; background: white; }
th, td { border-bottom: 1px solid #e4e4e4; padding: 3px 5px; text-align: left; }
#traj-list tbody tr { cursor: pointer; } #traj-list tbody tr:hover { background: #eef3ff; }
#traj-list tbody tr.sel { background: #d6e4ff; }
.tablewrap { max-height: 560px; overflow: auto; border: 1px solid #ddd; }
.summary { font-size: 13px; margin-bottom: 6px; line-height: 1.6; }
.badge { display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 12px; margin-right: 4px; }
.ok { background: #d9f5dd; } .bad { background: #fde0e0; } .neutral { background: #eee; }
.cell { margin: 6px 0; display: grid; grid-template-columns: 78px 1fr; }
.cell .lab { font: 12px monospace; color: #777; padding-top: 4px; }
.cell .body { background: white; border: 1px solid #ddd; border-radius: 4px; padding: 6px;
  font: 12.5px/1.55 ui-monospace, monospace; white-space: pre-wrap; word-break: break-word; }
.cell.prompt .body { background: #f3f3f3; max-height: 140px; overflow: auto; }
.cell.output .body { background: #fff6e8; border-color: #f0c27b; }
.cell.output.err .body { background: #ffeaea; border-color: #e58c8c; }
.tok { cursor: pointer; border-radius: 2px; }
.tok.p0 { color: #666; } .tok.p1 { background: #e2ecff; } .tok.p2 { background: #ffe2b8; }
.tok.code { font-weight: 600; }
.tok.clip { text-decoration: underline wavy #d00; }
.tok.pinned { outline: 2px solid #23324a; }
#token-detail { position: sticky; top: 0; background: #fffbe6; border: 1px solid #e6d48a; border-radius: 4px;
  padding: 6px 8px; font: 12px monospace; min-height: 36px; margin-bottom: 6px; z-index: 2; }
.legend span { margin-right: 10px; font-size: 12px; }
.tools td pre { margin: 0; white-space: pre-wrap; font-size: 11px; max-height: 120px; overflow: auto; }
</style></head>
<body>
<header><h1>cir-actors run: <!--RUN_NAME--></h1><span id="run-info"></span></header>
<section><h2>Curves</h2><div id="charts"></div></section>
<section><h2>Trajectories</h2>
<div id="traj-area">
 <div>
  <div class="filters">
   <label>step <select id="f-step"><option value="">all</option></select></label>
   <label>reward <select id="f-reward"><option value="">all</option><option value="pos">&gt; 0</option>
     <option value="nonpos">&le; 0</option></select></label>
   <label>finish <select id="f-finish"><option value="">all</option></select></label>
   <label>kind <select id="f-kind"><option value="">all</option></select></label>
   <label>tool errors <select id="f-tools"><option value="">all</option><option value="with">with errors</option>
     <option value="without">without</option><option value="calls">with tool calls</option></select></label>
   <label>version span &ge; <input id="f-span" type="number" min="0" value="0" style="width:4em"></label>
  </div>
  <div class="tablewrap"><table id="traj-list"><thead><tr><th>step</th><th>task</th><th>#</th><th>kind</th>
   <th>reward</th><th>finish</th><th>tools</th><th>err</th><th>versions</th><th>tokens</th></tr></thead>
   <tbody></tbody></table></div>
  <div id="list-count" style="font-size:12px;margin-top:4px"></div>
 </div>
 <div>
  <div id="token-detail">hover or click a token to see its values</div>
  <div class="legend">colour by <select id="colour-by"><option value="prov">provenance</option>
   <option value="weight">importance weight</option><option value="version">policy version</option>
   <option value="mismatch">|proximal - behaviour|</option></select>
   <span class="tok p0">prompt</span><span class="tok p1">sampled</span><span class="tok p2">interpreter</span>
   <span class="tok clip">clipped</span></div>
  <div id="traj-detail"></div>
 </div>
</div></section>
<script>/*PLOTLY_JS*/</script>
<script id="run-data" type="application/json">/*RUN_DATA*/</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("run-data").textContent);
const PROV = ["prompt", "sampled", "interpreter"];
const CLIP = ["", "low", "high", "dual"];
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const fmt = (x, d = 4) => (x === null || x === undefined) ? "—" : (typeof x === "number" ? +x.toFixed(d) : x);

function drawCharts() {
  $("run-info").textContent = `${DATA.steps} steps in metrics.jsonl, ${DATA.trajectories.length} dumped trajectories`;
  DATA.charts.forEach((c, i) => {
    const div = document.createElement("div");
    div.className = "chart"; div.id = "chart-" + i; div.dataset.title = c.title;
    $("charts").appendChild(div);
    const traces = Object.entries(c.series).map(([name, pts]) => ({
      x: pts.map((p) => p[0]), y: pts.map((p) => p[1]), name: name, mode: pts.length > 1 ? "lines+markers" : "markers",
      type: "scatter", marker: {size: 4}}));
    Plotly.newPlot(div, traces, {title: {text: c.title, font: {size: 13}, x: 0.01, xanchor: "left"},
      margin: {l: 45, r: 10, t: 30, b: 24}, legend: {font: {size: 10}, orientation: "h", y: -0.15},
      hovermode: "x unified", showlegend: traces.length > 1}, {displaylogo: false, responsive: true});
  });
}

function fillSelect(id, values) {
  const sel = $(id);
  [...new Set(values)].sort((a, b) => a.localeCompare(b, undefined, {numeric: true})).forEach((v) => {
    const o = document.createElement("option"); o.value = v; o.textContent = v; sel.appendChild(o); });
}

function passes(t) {
  const step = $("f-step").value, rew = $("f-reward").value, fin = $("f-finish").value;
  const kind = $("f-kind").value, tools = $("f-tools").value, span = +$("f-span").value || 0;
  const errs = t.num_interp_errors + t.num_interp_timeouts;
  if (step && String(t.step) !== step) return false;
  if (rew === "pos" && !(t.reward > 0)) return false;
  if (rew === "nonpos" && t.reward > 0) return false;
  if (fin && t.finish_reason !== fin) return false;
  if (kind && t.kind !== kind) return false;
  if (tools === "with" && errs === 0) return false;
  if (tools === "without" && errs > 0) return false;
  if (tools === "calls" && t.tool_calls.length === 0) return false;
  if (span && !(t.min_version >= 0 && t.max_version - t.min_version >= span)) return false;
  return true;
}

function drawList() {
  const body = document.querySelector("#traj-list tbody");
  body.innerHTML = "";
  const shown = DATA.trajectories.filter(passes);
  shown.forEach((t) => {
    const tr = document.createElement("tr");
    tr.dataset.id = t.id;
    const errs = t.num_interp_errors + t.num_interp_timeouts;
    tr.innerHTML = `<td>${t.step}</td><td>${esc(t.task_id)}</td><td>${t.sample_index}</td><td>${t.kind}</td>
      <td>${fmt(t.reward, 2)}</td><td>${t.finish_reason}</td><td>${t.tool_calls.length}</td><td>${errs}</td>
      <td>${t.min_version}..${t.max_version}</td><td>${t.token_ids.length}</td>`;
    tr.addEventListener("click", () => showTrajectory(t.id));
    body.appendChild(tr);
  });
  $("list-count").textContent = `${shown.length} of ${DATA.trajectories.length} trajectories`;
}

function tokenInfo(t, i) {
  const p = t.provenance[i];
  let s = `token ${i}  id ${t.token_ids[i]}  ${JSON.stringify(t.pieces[i])}  ${PROV[p]}  mask ${t.loss_mask[i]}`;
  if (p === 1) {
    s += `\nbehaviour ${fmt(t.behaviour_logprob[i])}  proximal ${fmt(t.proximal_logprob[i])}  ` +
      `current ${t.trained ? fmt(t.current_logprob[i]) : "— (not trained)"}  weight ${fmt(t.is_weight[i])}  ` +
      `ratio ${fmt(t.ratio[i])}  clip ${CLIP[t.clip[i]] || "none"}  version ${t.version[i]}`;
  }
  s += `\nturn ${t.turn[i]}  tokens since tool output ${t.since_tool[i] < 0 ? "—" : t.since_tool[i]}`;
  return s;
}

function colour(t, i, mode) {
  if (mode === "prov" || t.provenance[i] !== 1) return "";
  if (mode === "weight") {
    const w = Math.log(Math.max(t.is_weight[i], 1e-6)); // red above 1, blue below
    const a = Math.min(Math.abs(w) / 1.0, 1);
    return w > 0 ? `rgba(220,40,40,${a})` : `rgba(40,90,220,${a})`;
  }
  if (mode === "mismatch") {
    const d = Math.abs(t.proximal_logprob[i] - t.behaviour_logprob[i]);
    return `rgba(220,40,40,${Math.min(d / 0.5, 1)})`;
  }
  const hue = (t.version[i] * 67) % 360;
  return `hsl(${hue},70%,82%)`;
}

let CURRENT = null, PINNED = null;

function showTrajectory(id) {
  const t = DATA.trajectories.find((x) => x.id === id);
  if (!t) return;
  CURRENT = t; PINNED = null;
  document.querySelectorAll("#traj-list tbody tr").forEach((tr) => tr.classList.toggle("sel", tr.dataset.id === id));
  const v = t.verdict;
  const mode = $("colour-by").value;
  let html = `<div class="summary"><span class="badge ${v.correct ? "ok" : "bad"}">${esc(v.reason)}</span>
    reward <b>${fmt(t.reward, 3)}</b> · advantage ${fmt(t.advantage, 3)} · answer <b>${esc(t.extracted_answer ?? "—")}</b>
    · finish ${t.finish_reason} · budget ${t.budget} · tool calls ${t.num_executed}/${t.num_code_blocks}
    · errors ${t.num_interp_errors} · timeouts ${t.num_interp_timeouts} · versions ${t.min_version}..${t.max_version}
    · ${t.trained ? "trained" : '<span class="badge neutral">not trained (zero advantage)</span>'}
    · step ${t.step} · task ${esc(t.task_id)} #${t.sample_index}</div>`;
  // Cells: contiguous runs of one provenance; sampled runs mark the tokens of a ```python block as code.
  let cells = [], cur = null, out = 0, inCode = false, textSoFar = "";
  for (let i = 0; i < t.token_ids.length; i++) {
    const p = t.provenance[i];
    if (!cur || cur.p !== p) { cur = {p: p, toks: []}; cells.push(cur); if (p !== 1) { inCode = false; textSoFar = ""; } }
    textSoFar += t.pieces[i];
    if (p === 1) {
      const open = textSoFar.lastIndexOf("```python"), close = textSoFar.lastIndexOf("```");
      inCode = open >= 0 && close === open;  // the last fence seen opens a python block
    }
    cur.toks.push([i, p === 1 && inCode]);
  }
  let calls = 0;
  for (const c of cells) {
    let lab = c.p === 0 ? "prompt" : (c.p === 2 ? `Out[${++out}]` : "model");
    let cls = c.p === 0 ? "prompt" : (c.p === 2 ? "output" : "sampled");
    if (c.p === 2) { const call = t.tool_calls[calls++]; if (call && call.ok === false) cls += " err"; }
    const spans = c.toks.map(([i, code]) => {
      const bg = colour(t, i, mode);
      const klass = `tok p${c.p}${code ? " code" : ""}${t.clip[i] ? " clip" : ""}`;
      return `<span class="${klass}" data-i="${i}"${bg ? ` style="background:${bg}"` : ""}>${esc(t.pieces[i])}</span>`;
    }).join("");
    html += `<div class="cell ${cls}"><div class="lab">${lab}</div><div class="body">${spans}</div></div>`;
  }
  if (t.tool_calls.length) {
    html += `<h3 style="font-size:14px">Tool calls</h3><table class="tools"><tr><th>#</th><th>code</th><th>ok</th>
      <th>output / error</th><th>seconds</th></tr>` + t.tool_calls.map((c, k) => `<tr><td>${k + 1}</td>
      <td><pre>${esc(c.code ?? "")}</pre></td><td>${c.ok ? "yes" : "no"}</td>
      <td><pre>${esc(c.ok ? (c.output ?? "") : (c.error ?? c.output ?? ""))}</pre></td>
      <td>${fmt(c.duration_s, 3)}</td></tr>`).join("") + "</table>";
  }
  $("traj-detail").innerHTML = html;
  $("token-detail").textContent = "hover or click a token to see its values";
}

function onToken(ev, pin) {
  const el = ev.target.closest(".tok[data-i]");
  if (!el || !CURRENT) return;
  if (!pin && PINNED !== null) return;
  const i = +el.dataset.i;
  if (pin) {
    document.querySelectorAll(".tok.pinned").forEach((x) => x.classList.remove("pinned"));
    if (PINNED === i) { PINNED = null; return; }
    PINNED = i; el.classList.add("pinned");
  }
  $("token-detail").textContent = tokenInfo(CURRENT, i);
  $("token-detail").dataset.token = i;
}

drawCharts();
fillSelect("f-step", DATA.trajectories.map((t) => String(t.step)));
fillSelect("f-finish", DATA.trajectories.map((t) => t.finish_reason));
fillSelect("f-kind", DATA.trajectories.map((t) => t.kind));
["f-step", "f-reward", "f-finish", "f-kind", "f-tools", "f-span"].forEach((id) =>
  ["input", "change"].forEach((ev) => $(id).addEventListener(ev, drawList)));
$("colour-by").addEventListener("change", () => CURRENT && showTrajectory(CURRENT.id));
$("traj-detail").addEventListener("mouseover", (e) => onToken(e, false));
$("traj-detail").addEventListener("click", (e) => onToken(e, true));
drawList();
if (DATA.trajectories.length) showTrajectory(DATA.trajectories[0].id);
document.body.dataset.ready = "1";
</script></body></html>
"""
