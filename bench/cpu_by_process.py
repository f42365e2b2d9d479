"""Where a command's CPU goes, process by process (Ray's actors by their titles): a report.

    python bench/cpu_by_process.py [--top 25] -- python -m treegrpo_ray.run --config smoke.yaml ...

Runs the command and samples /proc every 0.3 s: each process's CPU seconds (user + system, its
own, not its children's) since this script first saw it, under its latest title (Ray renames a
worker `ray::<ActorClass>` once it hosts an actor), and the whole machine's busy CPU seconds over
the same wall time (the command is alone on the machine only if nothing else ran). A process that
lived less than one sampling interval is missed. Linux only. BENCHMARKS.md §3 has its figures for
one `mode=ray` run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import time

HZ = os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    with open("/proc/stat") as f:
        v = list(map(int, f.readline().split()[1:]))
    return (sum(v) - v[3] - v[4]) / HZ  # all but idle and iowait


def title(pid: str) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip() or None
    except OSError:
        return None


def sample(seen: dict, first: bool) -> None:
    me = str(os.getpid())
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        cpu, key = (int(fields[11]) + int(fields[12])) / HZ, (pid, fields[19])  # utime + stime; start time
        entry = seen.setdefault(key, {"title": "?", "base": cpu if first else 0.0, "cpu": 0.0})
        entry["cpu"] = max(entry["cpu"], cpu - entry["base"])
        entry["title"] = title(pid) or entry["title"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    seen: dict = {}
    sample(seen, first=True)
    busy0, start = machine_busy(), time.monotonic()
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        sample(seen, first=False)
        time.sleep(0.3)
    time.sleep(3)  # what the command started may still be exiting
    sample(seen, first=False)
    wall, busy = time.monotonic() - start, machine_busy() - busy0
    rows = sorted((e for e in seen.values() if e["cpu"] >= 0.05), key=lambda e: -e["cpu"])
    print(f"exit {proc.returncode}; wall {wall:.1f} s; machine busy {busy:.1f} CPU-s; "
          f"the processes below {sum(e['cpu'] for e in rows):.1f} CPU-s")
    for e in rows[:args.top]:
        print(f"{e['cpu']:7.1f}  {e['title'][:110]}")


if __name__ == "__main__":
    main()
