"""`make bench`: every benchmark module's rows in one table, kvmpy beside QEMU.

Each module in bench/ offers run() -> [{"name", "kvmpy", "qemu", "unit", ["better"], ["note"]}].
The ratio column is kvmpy/qemu for higher-is-better rows and qemu/kvmpy for
lower-is-better ones, so above 1.0 always means kvmpy is ahead.
"""

from __future__ import annotations

import importlib
import sys
import traceback

from bench.parts import run_parts

MODULES = ("bench.kvm", "bench.virtio", "bench.img", "bench.nbd", "bench.tcg", "bench.boot", "bench.firmware",
           "bench.nested", "bench.usernet", "bench.display", "bench.tcp")
# Modules whose parts() run each with its own deadline (bench/parts.py): their guests
# and VMMs can hang, and one that does must not stop the run.
SPLIT_INTO_PARTS = {"bench.kvm", "bench.virtio", "bench.tcp"}
LOWER_IS_BETTER_UNITS = {"s", "ms", "seconds"}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if v < 100 else f"{v:,.0f}"
    return str(v)


def main(argv: list[str]) -> int:
    wanted = [m if m.startswith("bench.") else f"bench.{m}" for m in argv] or list(MODULES)
    rows = []
    for name in wanted:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            found = run_parts(mod.parts()) if name in SPLIT_INTO_PARTS else mod.run()
            for row in found:
                rows.append((name.split(".")[1], row))
        except Exception as e:  # one broken benchmark must not hide the others
            traceback.print_exc()
            rows.append((name.split(".")[1], {"name": "(failed)", "kvmpy": None, "qemu": None, "unit": "",
                                               "note": f"{type(e).__name__}: {e}"}))
    print(f"{'area':<7} {'benchmark':<44} {'kvmpy':>12} {'qemu':>12} {'unit':<9} {'ratio':>7}  note")
    for area, r in rows:
        k, q = r.get("kvmpy"), r.get("qemu")
        better = r.get("better") or ("lower" if r.get("unit") in LOWER_IS_BETTER_UNITS else "higher")
        ratio = "-"
        if k and q:
            ratio = f"{(k / q if better == 'higher' else q / k):.2f}"
        print(f"{area:<7} {r['name']:<44} {_fmt(k):>12} {_fmt(q):>12} {r.get('unit', ''):<9} {ratio:>7}  "
              f"{r.get('note', '')}")
    print("ratio > 1 means kvmpy is ahead of QEMU on that row")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
