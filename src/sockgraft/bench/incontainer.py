"""A client runner that lives inside a container for the whole bench, so that a measurement costs a
fork and exec there, not a new `graft run`. Its children inherit how it is attached (netns, preload
environment, seccomp filter, fd-service socket).

Protocol on stdin/stdout, one JSON object per line:
    {"cmd": [...], "timeout": SECONDS}  ->  {"rc": N, "out": "...", "err": "..."}
(a command that timed out: rc -9, what it printed, and "timeout": true)
EOF at stdin ends the agent.
"""
from __future__ import annotations

import json
import subprocess
import sys


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def main() -> int:
    for line in sys.stdin:
        req = json.loads(line)
        try:
            p = subprocess.run(req["cmd"], capture_output=True, text=True, timeout=req.get("timeout", 120),
                               stdin=subprocess.DEVNULL)
            reply = {"rc": p.returncode, "out": p.stdout, "err": p.stderr}
        except subprocess.TimeoutExpired as e:
            reply = {"rc": -9, "out": _text(e.stdout), "err": _text(e.stderr), "timeout": True}
        except OSError as e:
            reply = {"rc": 127, "out": "", "err": str(e)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
