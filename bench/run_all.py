"""Run every benchmark one after another (``--tiny`` for a quick functional pass).

Each benchmark prints its own table; the machine they ran on is printed first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as c

SCRIPTS = [
    ["relay_cost.py", "--profile"],
    ["tunnel_throughput.py"],
    ["stream_setup.py"],
    ["idle_devices.py"],
    ["concurrent_streams.py"],
    ["resume_overhead.py"],
]


def main() -> int:
    extra = sys.argv[1:]
    print("## Machine\n")
    for key, value in c.machine().items():
        print(f"- {key}: {value}")
    print(f"- kernel: {os.uname().release}")
    sys.stdout.flush()
    failed = 0
    for script, *options in SCRIPTS:
        if "--tiny" in extra:
            options = [o for o in options if o != "--profile"]
        start = time.monotonic()
        result = subprocess.run([sys.executable, str(c.BENCH / script), *options, *extra])
        print(f"\n({script}: {time.monotonic() - start:.0f} s, exit {result.returncode})")
        sys.stdout.flush()
        failed += result.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
