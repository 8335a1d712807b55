"""View a run: `python entrypoints/view.py RUN_DIR [--out page.html] [--last-steps N] [--serve PORT]`.

Writes one self-contained HTML page (charts of metrics.jsonl, the dumped trajectories token by
token; no network needed to open it) to RUN_DIR/view.html or --out; with --serve, also serves it
on 127.0.0.1:PORT until interrupted. See docs/viewer.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory (logging.run_dir)")
    p.add_argument("--out", default=None, help="where to write the page (default RUN_DIR/view.html)")
    p.add_argument("--last-steps", type=int, default=20, help="dumped steps to include (latest first; 0: none)")
    p.add_argument("--serve", type=int, default=None, metavar="PORT", help="also serve the page on this port")
    args = p.parse_args(argv)
    from cir_actors.ops.viewer import build_page

    try:
        page = build_page(args.run_dir, last_steps=args.last_steps)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run_dir) / "view.html"
    out.write_text(page, encoding="utf-8")
    print(f"wrote {out} ({len(page.encode()) / 1e6:.1f} MB)")
    if args.serve is not None:
        from cir_actors.ops.viewer import serve

        serve(out, args.serve)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
