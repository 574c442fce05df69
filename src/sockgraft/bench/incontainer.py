"""A client runner that lives inside a container for the whole bench, so that a measurement costs a
fork and exec there, not a new `graft run`. Its children inherit how it is attached (netns, preload
environment, seccomp filter, fd-service socket).

Protocol on stdin/stdout, one JSON object per line:
    {"cmd": [...], "timeout": SECONDS}  ->  {"rc": N, "out": "...", "err": "..."}
EOF at stdin ends the agent.
"""
from __future__ import annotations

import json
import subprocess
import sys


def main() -> int:
    for line in sys.stdin:
        req = json.loads(line)
        try:
            p = subprocess.run(req["cmd"], capture_output=True, text=True, timeout=req.get("timeout", 120),
                               stdin=subprocess.DEVNULL)
            reply = {"rc": p.returncode, "out": p.stdout, "err": p.stderr}
        except subprocess.TimeoutExpired as e:
            reply = {"rc": -9, "out": "", "err": f"timed out after {e.timeout}s"}
        except OSError as e:
            reply = {"rc": 127, "out": "", "err": str(e)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
