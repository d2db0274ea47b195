"""`nanoseek serve` under abusive traffic: limits, memory after a burst, the cost of an abort.

    python benchmarks/serve_limits.py MODEL_DIR [--out benchmarks/results/serve_limits.json]

Starts the real server as a subprocess (eager decode, so start-up is quick) and measures:
  - the median latency of /health, a 400 and a 1-token completion on a keep-alive connection;
  - each limit 100x over: the time to its refusal, and /health's slowest answer meanwhile;
  - resident memory (RSS) at rest, at the peak of a burst of large requests (concurrent 2048-prompt
    completions and long chats), and at rest again: the issue's bar is "back within 10% of the start";
  - aborting a streamed request whose 2048 prompts are queued: the time from the client's hang-up to an
    idle engine, against the same for 64 prompts (aborting costs the request's own work only).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(model_dir: str, compiled: bool = False) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", model_dir, "--port", "0", "--log-level", "warning",
                          *([] if compiled else ["--no-compile"])],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if " at http://" in line:
            url = line.split(" at ", 1)[1].strip().removesuffix("/v1")
            threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()    # drain
            return p, url
    raise RuntimeError("the server did not start")


def wait_idle(url: str, timeout: float = 120) -> float:
    t = time.perf_counter()
    while time.perf_counter() - t < timeout:
        if httpx.get(url + "/health").json()["running"] == 0 and \
                "nanoseek_waiting_requests 0" in httpx.get(url + "/metrics").text:
            return time.perf_counter() - t
        time.sleep(0.005)
    raise TimeoutError("the engine did not become idle")


def limits(url: str, context: int) -> list[dict]:
    big = context * 100 * 8
    cases = [("chat, 100x the context", "/v1/chat/completions", {"messages": [{"role": "user", "content": "7" * big}]}),
             ("completion, 100x the context", "/v1/completions", {"prompt": "7" * big}),
             ("prompts, 100x the 2048 cap", "/v1/completions", {"prompt": ["1+1="] * 204800}),
             ("n x prompts x max_tokens, 100x --max-request-tokens", "/v1/completions",
              {"prompt": ["1+1="] * 2048, "n": 64, "max_tokens": 800})]
    out, health, stop = [], [], threading.Event()

    def poll():
        with httpx.Client(timeout=10) as h:
            while not stop.is_set():
                t = time.perf_counter()
                h.get(url + "/health")
                health.append(time.perf_counter() - t)
                time.sleep(0.01)
    th = threading.Thread(target=poll)
    th.start()
    try:
        for name, path, body in cases:
            content = json.dumps(body).encode()
            health.clear()
            t = time.perf_counter()
            r = httpx.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=120)
            took = time.perf_counter() - t
            time.sleep(0.05)
            out.append({"case": name, "body_mb": round(len(content) / 2**20, 1), "status": r.status_code,
                        "seconds": round(took, 3), "health_max_ms": round(max(health, default=0) * 1e3, 1)})
            print(json.dumps(out[-1]), flush=True)
        # the body limit: a client declaring 100x --max-body-mb is answered before it has sent the body
        # (timed from its headers to the 413, on a raw socket: httpx would upload all 800 MB first)
        import socket
        host, port = url.removeprefix("http://").rsplit(":", 1)
        health.clear()
        with socket.create_connection((host, int(port))) as s:
            t = time.perf_counter()
            s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {800 << 20}\r\n\r\n".encode() + b'{"prompt": "' + b"7" * 65536)
            head = s.recv(65536).decode(errors="replace")
            took = time.perf_counter() - t
        out.append({"case": "body, 100x --max-body-mb (declared)", "body_mb": 800.0,
                    "status": int(head.split()[1]), "seconds": round(took, 3),
                    "health_max_ms": round(max(health, default=0) * 1e3, 1)})
        print(json.dumps(out[-1]), flush=True)
    finally:
        stop.set()
        th.join()
    return out


def burst(url: str, pid: int) -> dict:
    rest = rss_mb(pid)
    peak, stop = [rest], threading.Event()

    def watch():
        while not stop.is_set():
            peak.append(rss_mb(pid))
            time.sleep(0.05)
    th = threading.Thread(target=watch)
    th.start()
    bodies = [("/v1/completions", {"prompt": [f"{i}+{i}=" for i in range(2048)], "max_tokens": 4})] * 6 + \
             [("/v1/chat/completions", {"messages": [{"role": "user", "content": "12+34=? " * 400}],
                                        "max_tokens": 8})] * 16
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        codes = list(ex.map(lambda pb: httpx.post(url + pb[0], json=pb[1], timeout=600).status_code, bodies))
    took = time.perf_counter() - t
    stop.set()
    th.join()
    wait_idle(url)
    time.sleep(2)
    after = rss_mb(pid)
    return {"requests": len(bodies), "statuses": sorted(set(codes)), "seconds": round(took, 1),
            "rss_rest_mb": round(rest), "rss_peak_mb": round(max(peak)), "rss_after_mb": round(after),
            "after_vs_rest": round(after / rest, 3)}


def latency(url: str, reps: int = 30) -> dict:
    """Median milliseconds of a keep-alive client's /health, a 400 and a 1-token completion (each response
    used to wait ~40 ms for the client's delayed ACK: no TCP_NODELAY on served connections)."""
    import statistics
    calls = {"health": lambda c: c.get(url + "/health"),
             "400": lambda c: c.post(url + "/v1/completions", json={"prompt": "hi", "temperature": 9}),
             "1-token completion": lambda c: c.post(url + "/v1/completions", json={"prompt": "1+1=", "max_tokens": 1})}
    out = {}
    with httpx.Client(timeout=30) as c:
        for name, call in calls.items():
            call(c)
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                call(c)
                times.append(time.perf_counter() - t)
            out[name] = round(statistics.median(times) * 1e3, 2)
    return out


def abort_cost(url: str, prompts: int) -> float:
    body = {"prompt": [f"{i}+1=" for i in range(prompts)], "max_tokens": 64, "stream": True}
    with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break                      # the first token is out: hang up
    return wait_idle(url)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--out", default="benchmarks/results/serve_limits.json")
    ap.add_argument("--compiled", action="store_true", help="serve with the default compiled decode (warm-up "
                    "compiles every batch bucket at start-up) instead of eager")
    ap.add_argument("--bursts", type=int, default=4)
    args = ap.parse_args()
    proc, url = start(args.model_dir, args.compiled)
    try:
        context = httpx.get(url + "/v1/models").json()["data"][0]["max_model_len"]
        httpx.post(url + "/v1/completions", json={"prompt": "1+1=", "max_tokens": 4}, timeout=60)
        res = {"latency_ms": latency(url)}
        print(json.dumps(res["latency_ms"]), flush=True)
        res["limits"] = limits(url, context)
        res["bursts"] = []
        for _ in range(args.bursts):                          # later bursts: is the growth a one-off?
            res["bursts"].append(burst(url, proc.pid))
            print(json.dumps(res["bursts"][-1]), flush=True)
        res["abort_idle_seconds"] = {str(n): round(min(abort_cost(url, n) for _ in range(3)), 4) for n in (64, 2048)}
        print(json.dumps(res["abort_idle_seconds"]), flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from nanoseek.calibrate import cpu_name
    res["cpu"] = cpu_name()
    res["command"] = f"python benchmarks/serve_limits.py {args.model_dir}" + (" --compiled" if args.compiled else "")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
