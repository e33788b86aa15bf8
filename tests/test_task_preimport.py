"""The barrier task's background imports: MLflow and DDP's dependencies load in a thread while
the rank meets its peers and reads its shard, and a failing import there changes nothing."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

from sparkml_dist.spark import task


def _fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter, as a fresh Python worker is, and return its stdout."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True,
                          capture_output=True, text=True, timeout=120).stdout


def test_preimport_loads_the_modules_in_a_background_thread():
    out = _fresh_python("""
        import sys, threading
        from sparkml_dist.spark import task
        late = [m for m in ("mlflow", "torch._dynamo") if m in sys.modules]
        thread = task._preimport()
        print(thread.name, thread.daemon, thread is not threading.main_thread())
        task._join_preimport(thread, 120)
        print(not thread.is_alive(), late, all(m in sys.modules for m in task.PREIMPORTS))
    """)
    # Importing the task module (as unpickling the barrier function does) loads neither MLflow
    # nor torch._dynamo, the slow ones: they are what the background thread is for.
    assert out.split("\n")[:2] == ["sparkml_dist-preimport True True", "True [] True"]


def test_a_failing_background_import_is_left_to_the_real_import():
    thread = task._preimport(("sparkml_dist_no_such_module", "json"))
    task._join_preimport(thread, 30)
    assert not thread.is_alive()  # it went on past the failure and finished


def test_join_is_bounded():
    release = threading.Event()
    thread = threading.Thread(target=release.wait, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    task._join_preimport(thread, 0.2)
    assert 0.15 <= time.perf_counter() - t0 < 5 and thread.is_alive()
    release.set()
