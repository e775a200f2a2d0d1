"""Run every benchmark of issue 13 and collect their tables into benchmarks/results/run_all[_quick].md.

    python benchmarks/run_all.py --quick     # < 15 minutes on a quiet 2-core machine
    python benchmarks/run_all.py             # the full run: a few hours

Each benchmark runs as its own process; one that fails is reported and the others still run.
Run it on a quiet machine: every ratio is measured within one run, but a busy machine adds noise.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, header_line, machine_header, markdown_table  # noqa: E402

from lnm_auto.utils.io import atomic_write_text  # noqa: E402

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("contention", "preprocessing_bound", "nnunet_compare", "training_speed", "cpu_levers", "inference_bound",
              "scaling")
SHARED_WORKDIR = {"nnunet_compare": "preprocessing_bound"}   # the same phantoms (same ids and sizes): made once


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lnm_bench"))
    args = ap.parse_args(argv)
    header, t_start = machine_header(), time.time()
    summary, sections = [], []
    for name in args.only:
        extra = ["--realistic"] if name == "scaling" and not args.quick else []
        cmd = [sys.executable, str(HERE / f"{name}.py"), *(["--quick"] if args.quick else []), *extra,
               "--workdir", str(args.workdir / SHARED_WORKDIR.get(name, name))]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd)
        result = RESULTS_DIR / f"{name}{'_quick' if args.quick else ''}.json"
        status = "failed" if rc else ("done" if result.is_file() and result.stat().st_mtime >= t0 else "skipped")
        summary.append({"benchmark": name, "status": status, "minutes": (time.time() - t0) / 60})
        if status == "done":
            rows = json.loads(result.read_text())["rows"]
            sections.append(f"## {name}\n\n" + markdown_table(rows))
    md = (f"# run_all{' --quick' if args.quick else ''}\n\n{header_line(header)}\n\n" + markdown_table(summary)
          + f"\ntotal {(time.time() - t_start) / 60:.1f} min\n\n" + "\n".join(sections))
    out = RESULTS_DIR / f"run_all{'_quick' if args.quick else ''}.md"
    atomic_write_text(out, md)
    print(md + f"\nwritten: {out}")
    return 1 if any(s["status"] == "failed" for s in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
