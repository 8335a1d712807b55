"""The run viewer: one self-contained HTML page from a run directory (`entrypoints/view.py`).

    page = build_page("runs/demo")            # str: data and JavaScript inlined, no network at view time

What goes in: every numeric column of metrics.jsonl (dict columns such as `count/dropped_by_reason`
flattened to `count/dropped_by_reason.stale`), grouped into charts by `CHART_GROUPS` and, for
columns no group claims, by their prefix; and the trajectory dumps of the last `last_steps` steps
(`dumps.read_step`), per token. Charts are drawn by plotly.js, read at build time from the plotly
Python package (`plotly/package_data/plotly.min.js`); the page's own script (`ops/viewer_page.py`)
only lays out lists, filters and tokens. What this module does not do: compute anything the run
did not record (figures come from metrics.jsonl and the dumps as they are).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from cir_actors.learning.dumps import read_step

# (chart title, regular expression over column names); a column goes to the first group that matches.
CHART_GROUPS: tuple[tuple[str, str], ...] = (
    ("reward and accuracy", r"^(reward_mean|accuracy)$"),
    ("response length (tokens)", r"^response_len$"),
    ("tool calls and errors per response", r"^(tool_calls|code_blocks|interp_errors|interp_timeouts)_per_response$"),
    ("staleness (versions)", r"^staleness_(mean|hist\..*)$"),
    ("clip fractions", r"^train/(clip_frac_low|clip_frac_high|dual_clip_frac|is_cap_frac)$"),
    ("behaviour / learner mismatch", r"^train/(kl_prox_behav|logprob_abs_diff|kl_ref)$"),
    ("importance weight and ratio", r"^train/(is_weight_mean|is_weight_max|ratio_mean|ratio_max)$"),
    ("loss, grad norm, entropy", r"^train/(loss|grad_norm|entropy)$"),
    ("mismatch KL by turn", r"^train/turn/turn.*/mismatch_kl$"),
    ("mismatch KL by distance from the last tool output", r"^train/turn/dist.*/mismatch_kl$"),
    ("clip fraction (high) by turn", r"^train/turn/.*/clip_frac_high$"),
    ("clip fraction (low) by turn", r"^train/turn/.*/clip_frac_low$"),
    ("importance weight mean by turn", r"^train/turn/.*/is_weight_mean$"),
    ("importance weight max by turn", r"^train/turn/.*/is_weight_max$"),
    ("low-probability token rate by turn", r"^train/turn/.*/low_prob_rate$"),
    ("trained tokens by turn", r"^train/turn/.*/tokens$"),
    ("tool errors by turn", r"^train/turn/.*/tool_errors$"),
    ("throughput", r"^throughput/"),
    ("idle time (s, cumulative)", r"^idle/"),
    ("step time (s)", r"^time/(step_s|wait_batch_s|train_s|publish_s)$"),
    ("conservation counts (groups)", r"^count/.*groups"),
    ("conservation counts (trajectories)", r"^count/"),
    ("finish reasons", r"^finish_reasons\."),
    ("trajectory dumps", r"^dump/"),
)
_SKIP = {"step", "version", "train/step", "train/version"}


def load_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not JSON ({e.msg})") from None
    return rows


def _flatten(row: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, int | float) and not isinstance(vv, bool):
                    out[f"{k}.{kk}"] = float(vv)
        elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


def chart_series(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """[{title, series: {column: [[step, value], ...]}}] for every numeric column, grouped."""
    flat = [(r.get("step", i), _flatten(r)) for i, r in enumerate(rows)]
    columns: list[str] = []
    for _, f in flat:
        columns += [c for c in f if c not in columns and c not in _SKIP]
    charts: dict[str, dict[str, list]] = {}
    for col in columns:
        title = next((t for t, rx in CHART_GROUPS if re.search(rx, col)), None)
        if title is None:
            title = col.split("/")[0] if "/" in col else "other"
        charts.setdefault(title, {})[col] = [[s, f[col]] for s, f in flat if col in f]
    order = [t for t, _ in CHART_GROUPS]
    titles = sorted(charts, key=lambda t: (order.index(t) if t in order else len(order), t))
    return [{"title": t, "series": charts[t]} for t in titles]


def _round(a: np.ndarray, nd: int = 4) -> list:
    if a.dtype.kind == "f":
        return [None if not math.isfinite(x) else round(float(x), nd) for x in a]
    return a.tolist()


def load_trajectories(run_dir: Path, last_steps: int) -> list[dict[str, Any]]:
    """The dumps of the last `last_steps` steps, as JSON-ready dicts (arrays as lists)."""
    files = sorted((run_dir / "trajectories").glob("step_*.msgpack"))[-last_steps:] if last_steps else []
    out = []
    for path in files:
        header, records = read_step(path)
        for i, rec in enumerate(records):
            d = {k: (_round(v) if isinstance(v, np.ndarray) else v) for k, v in rec.items()}
            d["step"], d["id"] = header["step"], f"{header['step']}-{i}"
            out.append(d)
    return out


def _plotly_js() -> str:
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"plotly.js not found at {path} (the plotly package ships it; reinstall plotly)")
    return path.read_text(encoding="utf-8")


def build_page(run_dir: str | Path, last_steps: int = 20) -> str:
    """The HTML page of a run (a str; everything inlined)."""
    from cir_actors.ops.viewer_page import PAGE

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory '{run_dir}' does not exist")
    rows = load_metrics(run_dir)
    trajs = load_trajectories(run_dir, last_steps)
    if not rows and not trajs:
        raise ValueError(f"'{run_dir}' has neither metrics.jsonl nor trajectories/: not a run directory")
    data = {"run": str(run_dir.resolve().name), "charts": chart_series(rows), "trajectories": trajs,
            "steps": len(rows)}  # fmt: skip
    # "</" would end the <script> element early; JSON allows "<\/" for it.
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return (PAGE.replace("/*PLOTLY_JS*/", _plotly_js().replace("</script", "<\\/script"))
            .replace("/*RUN_DATA*/", blob).replace("<!--RUN_NAME-->", data["run"]))  # fmt: skip


def serve(page: Path, port: int, host: str = "127.0.0.1") -> None:
    """Serve the one page at / on host:port until interrupted (no directory listing, nothing else)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = Path(page).read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path not in ("/", "/index.html"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with ThreadingHTTPServer((host, port), Handler) as httpd:
        print(f"serving {page} on http://{host}:{httpd.server_address[1]}/ (Ctrl-C stops)", flush=True)
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass
