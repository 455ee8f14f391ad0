"""Log another process's resident memory (VmRSS) and peak (VmHWM) from /proc every few seconds, as JSON lines.

    python tools/rss_watch.py PID out.jsonl [--every 5]

A safety net for long measurements (tools/llama7b_memory.py writes its JSON only at the end): the tool resets
its VmHWM (/proc/self/clear_refs) at the start of each step, so the logged VmHWM is the running step's peak so
far. Stops when the process ends.
"""
import argparse
import json
import time


def read(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pid", type=int)
    ap.add_argument("out")
    ap.add_argument("--every", type=float, default=5.0)
    args = ap.parse_args()
    with open(args.out, "a") as f:
        while True:
            try:
                r = read(args.pid)
            except (FileNotFoundError, ProcessLookupError):
                break
            f.write(json.dumps(dict(t=time.time(), time=time.strftime("%H:%M:%S"), pid=args.pid,
                                    rss_gib=r["VmRSS"] / 2**30, hwm_gib=r["VmHWM"] / 2**30)) + "\n")
            f.flush()
            time.sleep(args.every)


if __name__ == "__main__":
    main()
