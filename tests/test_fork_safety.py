"""The deadlock of forked augmentation workers and the suite's hang guard.

GNU OpenMP is not fork-safe: a child forked after the parent ran torch on several threads waits forever in its first
multi-threaded op. ``nnssl.integration.fork_safety`` gives every forked child one torch thread; every nnssl trainer
registers it before nnU-Net forks its augmentation workers (the end-to-end runs at nnU-Net's default threads are in
each method's test module and in the README quickstart test).
"""

import sys
import time
from pathlib import Path

import pytest

from conftest import CommandHung, run_command

DIAGNOSTIC = Path(__file__).resolve().parents[1] / "benchmarks" / "fork_openmp_deadlock.py"


def test_a_child_forked_after_the_parents_openmp_pool_ran_finishes_with_the_handler():
    result = run_command([sys.executable, DIAGNOSTIC, "--case", "parent_pool_handler", "--wait", "60"], timeout=200)
    assert "finished (child used 1 torch thread(s))" in result.stdout


def test_the_trainers_register_the_handler_before_any_worker_is_forked(monkeypatch):
    import nnssl.integration.fork_safety as fork_safety
    from nnssl.trainers.base import nnsslTrainerMixin

    registered = []
    monkeypatch.setattr(fork_safety, "_registered", False)
    monkeypatch.setattr(fork_safety.os, "register_at_fork", lambda **hooks: registered.append(hooks))

    class Base:
        was_initialized = False

        def initialize(self):
            self.was_initialized = True
            self.forks_after = list(registered)  # what was registered when nnU-Net's own initialize ran

    class Trainer(nnsslTrainerMixin, Base):
        is_ddp = False

        def print_to_log_file(self, *args, **kwargs):
            pass

    trainer = Trainer()
    trainer.initialize()
    Trainer().initialize()  # a second trainer in the same process registers nothing more
    assert trainer.forks_after == registered and len(registered) == 1
    assert registered[0]["after_in_child"] is fork_safety._prepare_child


def test_the_hang_guard_kills_the_whole_process_group_and_says_hung(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = (f"import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(120)']); open({str(pid_file)!r}, 'w').write(str(child.pid)); "
              f"print('epoch 0: waiting for a batch', flush=True); time.sleep(120)")
    with pytest.raises(CommandHung, match=r"hung: no exit after 5 s \(killed\); last line: epoch 0: waiting for a batch"):
        run_command([sys.executable, "-c", script], timeout=5)
    grandchild = Path(f"/proc/{pid_file.read_text()}/status")
    deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously: the kernel may still be tearing it down
    while grandchild.exists() and "State:\tZ" not in grandchild.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not grandchild.exists() or "State:\tZ" in grandchild.read_text()  # killed (at most a zombie left)
