"""Shows the cause of the augmentation-worker deadlock, and its fix, on this machine's torch build.

A child process forked from a parent that has run torch ops on several OpenMP threads, then running a multi-threaded
op itself (as batchgeneratorsv2's ``SpatialTransform`` does in an augmentation worker), waits forever with GNU
OpenMP: the pool's threads were not copied by ``fork()``. nnssl's after-fork handler
(``nnssl.integration.fork_safety``) gives every forked child one torch thread, and the child finishes.

    python benchmarks/fork_openmp_deadlock.py              # all three cases, one line each
    python benchmarks/fork_openmp_deadlock.py --case parent_pool_handler

Each case runs in a fresh interpreter; a child still running after --wait seconds counts as hung. Exit code 0 when
every case behaved as the line says it should on a GNU OpenMP build (no pool: finished; parent pool: hung; parent
pool with the handler: finished), 1 otherwise.
"""

import argparse
import subprocess
import sys

CASES = {"no_pool": "finished", "parent_pool": "hung", "parent_pool_handler": "finished"}

CHILD_SCRIPT = """
import multiprocessing, sys, torch
case, wait = sys.argv[1], float(sys.argv[2])
torch.set_num_threads(2)
if case != "no_pool":
    square = torch.randn(512, 512)
    for _ in range(5):
        square @ square  # the parent's OpenMP pool is now live
if case == "parent_pool_handler":
    from nnssl.integration.fork_safety import prepare_forked_children
    prepare_forked_children()

def worker(queue):
    x = torch.randn(256, 256)
    for _ in range(10):
        x @ x
    torch.matmul(torch.randn(64, 3, 3), torch.randn(64, 3, 3))  # SpatialTransform's batched rotation
    queue.put(torch.get_num_threads())

context = multiprocessing.get_context("fork")
queue = context.Queue()
child = context.Process(target=worker, args=(queue,), daemon=True)
child.start()
child.join(wait)
if child.is_alive():
    child.kill()
    print("hung")
else:
    print(f"finished (child used {queue.get()} torch thread(s))")
"""


def run_case(case: str, wait: float) -> str:
    result = subprocess.run([sys.executable, "-c", CHILD_SCRIPT, case, str(wait)], capture_output=True, text=True,
                            timeout=wait + 120)
    return (result.stdout.strip() or result.stderr.strip().splitlines()[-1]) if result.returncode == 0 else \
        f"error: {result.stderr.strip().splitlines()[-1]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--wait", type=float, default=20.0, help="seconds before a child counts as hung (default 20)")
    args = parser.parse_args()
    as_expected = True
    for case in CASES if args.case == "all" else [args.case]:
        outcome = run_case(case, args.wait)
        as_expected &= outcome.startswith(CASES[case])
        print(f"{case:22s} {outcome}  (expected on GNU OpenMP: {CASES[case]})")
    return 0 if as_expected else 1


if __name__ == "__main__":
    sys.exit(main())
