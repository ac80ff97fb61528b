"""Run Triton kernels on the CPU: a child process with ``TRITON_INTERPRET=1`` (it must be set before
Triton is first imported, so the test process itself cannot switch to the interpreter)."""

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_interpreted(test_file: str, function: str, timeout: int = 600):
    """Call ``function()`` of ``test_file`` in the interpreter and return its JSON-serialisable result."""
    script = (f"import json, runpy; cases = runpy.run_path({str(test_file)!r}); "
              f"print('RESULTS' + json.dumps(cases[{function!r}]()))")
    path = os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS")]
    assert proc.returncode == 0 and lines, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULTS"):])
