"""The router against real peers (see router_check.sh). Starts everything itself, checks, cleans up.

Tiers of the routing pai-serve, in fallback order:
  L2: refuse (nothing listens), hang (never answers; timeout 2 s), busy (429, Retry-After 1),
      broken (500), dropper (closes the connection; for a stream, after its role chunk), llama
      (llama-cpp-python's server on the default model)
  L3: peer (a second pai-serve on the default model)
Every tier but refuse sits behind a logging proxy. Exit status 0 when every check holds.
"""

import argparse
import http.client
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import openai

# Planted material (built from parts so that pai's own source tree holds no secret-looking literal).
PRIVATE_NOTE = (
    "The spare key to the allotment shed hangs behind the third loose brick on the north wall, and "
    "the padlock code is the year grandmother planted the pear tree by the compost heaps."
)
SECRET = "gh" + "p_" + "Zq8Xw2Lm4Nv6Bp0Rt3Ys5Ku7Hj9Gf1Dc2Ae4"
EMAIL = "grace.hopper" + "@" + "navy-computing.org"
PLANTED = ["allotment", "loose brick", SECRET, EMAIL, "PRIVATE-FLAG-7731"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except Exception:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


class Proxy:
    """A tier on loopback: logs each body, then behaves as `kind` says."""

    def __init__(self, name, kind, target=None):
        self.name, self.kind, self.target = name, kind, target
        self.log = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                proxy.log.append(body.decode("utf-8", "replace"))
                stream = json.loads(body or b"{}").get("stream", False)
                if proxy.kind == "hang":
                    time.sleep(60)
                    return
                if proxy.kind in ("busy", "broken"):
                    code = 429 if proxy.kind == "busy" else 500
                    out = json.dumps({"error": {"message": f"{proxy.name} says {code}"}}).encode()
                    self.send_response(code)
                    if code == 429:
                        self.send_header("Retry-After", "1")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                    return
                if proxy.kind == "dropper":
                    if stream:
                        self.send_response(200)
                        self.send_header("Content-Type", "text/event-stream")
                        self.end_headers()
                        chunk = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                        time.sleep(0.2)
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                # forward, streaming the answer back as it comes
                host, port = proxy.target
                conn = http.client.HTTPConnection(host, port, timeout=300)
                conn.request("POST", self.path, body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                self.send_response(resp.status)
                self.send_header("Content-Type", resp.getheader("Content-Type", "application/json"))
                self.end_headers()
                while True:
                    piece = resp.read1(4096)
                    if not piece:
                        break
                    self.wfile.write(piece)
                    self.wfile.flush()
                conn.close()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def start_pai_serve(bin_dir, model, home, logfile):
    proc = subprocess.Popen(
        [f"{bin_dir}/pai-serve", "serve", "--model", model, "--port", "0"],
        env={**os.environ, "PAI_HOME": home, "RUST_LOG": "warn"},
        stdout=subprocess.DEVNULL,
        stderr=open(logfile, "w"),
    )
    for _ in range(600):
        m = re.search(r"http://127\.0\.0\.1:\d+", open(logfile).read())
        if m:
            return proc, m.group(0)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    sys.stderr.write(open(logfile).read())
    raise SystemExit("pai-serve did not start")


def metric(text, name, **labels):
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--bin", required=True)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="pai-router-check-")
    procs = []
    failures = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    try:
        # The cloud tiers: llama.cpp's server and a second pai-serve, each behind a logging proxy.
        llama_port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", a.model, "--n_ctx", "2048",
             "--host", "127.0.0.1", "--port", str(llama_port), "--n_threads", "1"],
            stdout=subprocess.DEVNULL, stderr=open(f"{work}/llama.log", "w"),
        ))
        peer_proc, peer_url = start_pai_serve(a.bin, a.model, f"{work}/peer-home", f"{work}/peer.log")
        procs.append(peer_proc)
        wait_up(f"http://127.0.0.1:{llama_port}/v1/models")
        llama_model = json.load(urllib.request.urlopen(f"http://127.0.0.1:{llama_port}/v1/models"))["data"][0]["id"]
        peer_port = int(peer_url.rsplit(":", 1)[1])
        tiers = {
            "hang": Proxy("hang", "hang"),
            "busy": Proxy("busy", "busy"),
            "broken": Proxy("broken", "broken"),
            "dropper": Proxy("dropper", "dropper"),
            "llama": Proxy("llama", "forward", ("127.0.0.1", llama_port)),
            "peer": Proxy("peer", "forward", ("127.0.0.1", peer_port)),
        }
        refuse_url = f"http://127.0.0.1:{free_port()}/v1"

        # The owner's home: notes with a private one, ingested (which builds the privacy index).
        home = f"{work}/home"
        os.makedirs(f"{work}/notes", exist_ok=True)
        with open(f"{work}/notes/shed.md", "w") as f:
            f.write(f"---\nprivate: true\n---\n# The shed\n\n{PRIVATE_NOTE}\n")
        with open(f"{work}/notes/garden.md", "w") as f:
            f.write("# Garden\n\nSow the peas in March under fleece and net the brassicas against pigeons.\n")
        ingest = subprocess.run(
            [f"{a.bin}/pai-train", "ingest", "--source", f"{work}/notes:notes", "--model", a.model],
            env={**os.environ, "PAI_HOME": home}, capture_output=True, text=True,
        )
        check(ingest.returncode == 0 and os.path.exists(f"{home}/index/private.bin"),
              "ingest built the privacy index")

        def tier(name, level, url, model, timeout=2):
            return (f'[[router.tiers]]\nname = "{name}"\nlevel = {level}\nbase_url = "{url}"\n'
                    f'model = "{model}"\ntimeout_s = {timeout}\nprice_input_per_m = 0.5\n'
                    f'price_output_per_m = 1.5\n\n')
        with open(f"{home}/pai.toml", "w") as f:
            f.write("[router]\nlocal_model = \"base\"\nretries = 1\nbackoff_ms = 20\n"
                    "max_backoff_ms = 100\nbreaker_failures = 10\n\n")
            f.write(tier("refuse", 2, refuse_url, "x"))
            for name in ["hang", "busy", "broken", "dropper"]:
                f.write(tier(name, 2, tiers[name].url, "x"))
            f.write(tier("llama", 2, tiers["llama"].url, llama_model, 120))
            f.write(tier("peer", 3, tiers["peer"].url, "base", 120))
        router_proc, router_url = start_pai_serve(a.bin, a.model, home, f"{work}/router.log")
        procs.append(router_proc)
        client = openai.OpenAI(base_url=f"{router_url}/v1", api_key="none", max_retries=0, timeout=300)

        def ask(text, **extra):
            raw = client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": text}], max_tokens=8,
                temperature=0, extra_body=extra or None)
            return raw.headers, raw.parse()

        # 1. An ordinary request for L2: every failing tier is passed, llama.cpp answers.
        h, c = ask("Name three birds that visit a garden feeder.", tier="L2")
        route = c.model_extra["pai"]["route"]
        check(h["x-pai-tier"] == "llama" and c.choices[0].message.content is not None,
              f"L2 answered by llama.cpp after {h['x-pai-fallbacks']} fallbacks")
        check([f["target"] for f in route["fallbacks"]] == ["refuse", "hang", "busy", "broken", "dropper"]
              and [f["cause"] for f in route["fallbacks"]] == ["connect", "timeout", "429", "5xx", "connect"],
              f"fallbacks in order with their causes: {[(f['target'], f['cause']) for f in route['fallbacks']]}")

        # 2. The same, streamed: the dropper's stream breaks before its first token; llama.cpp streams.
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "Count to five."}], max_tokens=8,
            temperature=0, stream=True, extra_body={"tier": "L2"})
        text = "".join((ch.choices[0].delta.content or "") for ch in raw.parse() if ch.choices)
        check(raw.headers["x-pai-tier"] == "llama" and len(text) > 0,
              f"stream answered by llama.cpp ({text!r})")

        # 3. L3: the second pai-serve answers.
        h, c = ask("Summarise the water cycle in one line.", tier="L3")
        check(h["x-pai-tier"] == "peer", "L3 answered by the second pai-serve")

        # 4. Private material, each asking for a cloud tier: answered locally.
        private_cases = [
            (f"Please rewrite this nicely: {PRIVATE_NOTE}", {"tier": "L2"}, "private_index"),
            (f"Is this token still valid? {SECRET}", {"tier": "L3"}, "secret"),
            (f"Draft a note to {EMAIL} about the meeting", {"tier": "llama"}, "pii"),
            ("PRIVATE-FLAG-7731 what should I cook tonight?", {"tier": "L2", "private": True}, "flag"),
        ]
        for text, extra, detector in private_cases:
            h, c = ask(text, **extra)
            check(h["x-pai-tier"] == "local" and h["x-pai-route-rule"] == "private",
                  f"{detector}: kept local ({c.model_extra['pai']['route']['reasons'][0]})")

        # What each peer received: the ordinary requests, and none of the planted material.
        everything = "\n".join(b for p in tiers.values() for b in p.log)
        check("garden feeder" in everything, "the proxies log what reaches them")
        for planted in PLANTED:
            check(planted not in everything, f"{planted[:24]!r} never left the machine")

        # /metrics: the counts match what the peers saw.
        m = urllib.request.urlopen(f"{router_url}/metrics").read().decode()
        for target, cause, n in [("refuse", "connect", 2), ("hang", "timeout", 2), ("busy", "429", 2),
                                 ("broken", "5xx", 2), ("dropper", "connect", 1), ("dropper", "stream", 1)]:
            got = metric(m, "pai_router_fallbacks_total", target=target, cause=cause)
            check(got == n, f"fallbacks {target}/{cause}: {got:.0f} (want {n})")
        for name, attempts in [("hang", 4), ("busy", 4), ("broken", 4), ("dropper", 4), ("llama", 2), ("peer", 1)]:
            check(len(tiers[name].log) == attempts, f"{name} received {len(tiers[name].log)} (want {attempts})")
        check(metric(m, "pai_router_served_total", tier="llama", level="2") == 2, "served by llama: 2")
        check(metric(m, "pai_router_served_total", tier="peer", level="3") == 1, "served by peer: 1")
        check(metric(m, "pai_router_served_total", tier="local", level="1") == 4, "served locally: 4")
        check(metric(m, "pai_router_cost_usd_total", deployment="llama") > 0, "llama's cost accounted")

        # The egress ledger: every attempt that may have sent bytes, hashes only.
        out = subprocess.run([f"{a.bin}/pai-train", "egress", "--json"], env={**os.environ, "PAI_HOME": home},
                             capture_output=True, text=True, check=True).stdout
        records = [json.loads(line) for line in out.splitlines()]
        sent = sum(len(p.log) for p in tiers.values())
        check(len(records) == sent, f"egress ledger: {len(records)} records for {sent} requests received")
        check(all(r["secrets"] + r["pii"] + r["private_shingles"] == 0 and not r["flagged"] for r in records),
              "nothing flagged in the ledger")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    if failures:
        print(f"router check: {len(failures)} failed", file=sys.stderr)
        sys.exit(1)
    print("router check: passed")


if __name__ == "__main__":
    main()
