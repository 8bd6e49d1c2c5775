"""Before/after timing of two checkouts of calibkern, alternated in fresh processes (no shared warm state).

    python benchmarks/ab_compare.py TREE_A TREE_B [--rounds 3] [--probe step|classwise]

Each round runs, in TREE_A then TREE_B, one probe, so a change is judged against the noise of the same machine
at the same time. ``step``: the median of 300 calls of ``ece`` (N = 10⁶, K = 4) and of 1000
``calibration_loss`` forward + backward passes (N = 65536, K = 4). ``classwise``: medians of ``classwise_ece``
and of a classwise ``CalibrationMeter.update`` (``metric_sums``) on each path of the classwise statistics
(SIMD lanes; short rows with 30 bins; K·M beyond the blocks' partials, at K = 1000 and K = 32000).
"""

import argparse
import subprocess
import sys

# what every probe starts with: calibkern from the tree in argv[1], a seeded generator, and the median of n timed
# calls after warm-up calls
PRELUDE = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[1])
import calibkern as ck
g = torch.Generator().manual_seed(0)

def median(f, n, warmup=1):
    for _ in range(warmup):
        f()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return sorted(times)[n // 2]
"""

STEP = PRELUDE + r"""
z, y = torch.randn(1_000_000, 4, generator=g) * 3, torch.randint(0, 4, (1_000_000,), generator=g)
zz, yy = torch.randn(65536, 4, generator=g).requires_grad_(), torch.randint(0, 4, (65536,), generator=g)
accuracy = torch.rand(10)

def loss():
    ck.calibration_loss(zz, yy, accuracy).backward()

print(f"ece {1e3 * median(lambda: ck.ece(z, y), 300, warmup=5):.3f} ms   "
      f"calibration_loss {1e6 * median(loss, 1000, warmup=5):.1f} µs")
"""

CLASSWISE = PRELUDE + r"""
parts = []
for n, k, m, repeats in ((1_000_000, 4, 10, 20), (100_000, 64, 30, 10), (20_000, 1000, 20, 10), (1000, 32000, 10, 5)):
    z, y = torch.randn(n, k, generator=g) * 3, torch.randint(0, k, (n,), generator=g)
    update = lambda: ck.CalibrationMeter(m, classwise=True).update(z, y)
    parts.append(f"N={n} K={k} M={m}: classwise_ece {1e3 * median(lambda: ck.classwise_ece(z, y, m), repeats):.2f} ms"
                 f" meter {1e3 * median(update, repeats):.2f} ms")
print("   ".join(parts))
"""
PROBES = {"step": STEP, "classwise": CLASSWISE}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--probe", choices=sorted(PROBES), default="step")
    args = parser.parse_args()
    for _ in range(args.rounds):
        for tree in args.trees:
            out = subprocess.run([sys.executable, "-c", PROBES[args.probe], tree], capture_output=True, text=True,
                                 check=True)
            print(f"{tree}: {out.stdout.strip()}", flush=True)


if __name__ == "__main__":
    main()
