#!/usr/bin/env python3
"""Crash soak (issue 15): changes and deliveries keep flowing while the engine is killed with
kill -9 at random moments and restarted. At the end it checks that every change the CLI
reported is in the history, no history entry is duplicated, the last image of the watched tag
was delivered at least once with a stable Idempotency-Key, nothing is stuck pending, and no log
line says `panicked`. Prints kills survived and violations found.

    scripts/soak.sh SECONDS [sqlite|nats]
"""
import hashlib, http.server, json, os, random, signal, socket, subprocess, sys, tempfile, threading, time
import urllib.request

SECONDS = int(sys.argv[1]) if len(sys.argv) > 1 else 60
STORE = sys.argv[2] if len(sys.argv) > 2 else "sqlite"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "debug", "istream")
work = tempfile.mkdtemp(prefix="istream-soak-")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, what, deadline=60):
    end = time.time() + deadline
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


# --- a registry, a receiver, optionally NATS -------------------------------------------------
reg_port = free_port()
with open(f"{work}/registry.yml", "w") as f:
    f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {work}/registry\nhttp:\n  addr: 127.0.0.1:{reg_port}\n")
registry = subprocess.Popen(["docker-registry", "serve", f"{work}/registry.yml"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
wait_port(reg_port, "docker-registry")
REG = f"127.0.0.1:{reg_port}"

received = []  # (digest, idempotency key)
lock = threading.Lock()


class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        try:
            digest = json.loads(body)["data"]["digest"]
        except Exception:
            digest = None
        with lock:
            received.append((digest, self.headers.get("idempotency-key")))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


rx = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
threading.Thread(target=rx.serve_forever, daemon=True).start()

nats = None
store_cfg = f'[store]\npath = "{work}/istream.db"\n'
if STORE == "nats":
    nats_port = free_port()
    nats_bin = os.environ.get("ISTREAM_TEST_NATS", os.path.join(ROOT, ".venv", "bin", "nats-server"))
    nats = subprocess.Popen([nats_bin, "-js", "-a", "127.0.0.1", "-p", str(nats_port), "-sd", f"{work}/nats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(nats_port, "nats-server")
    store_cfg = f'[store]\nkind = "nats"\n\n[nats]\nurl = "nats://127.0.0.1:{nats_port}"\n'

api_port = free_port()
with open(f"{work}/triggers.toml", "w") as f:
    f.write(f'[server]\nlisten = "127.0.0.1:{api_port}"\n\n{store_cfg}\n'
            '[delivery]\ninitial_backoff = "100ms"\nmax_backoff = "1s"\nmax_attempts = 1000\n\n'
            f'[[trigger]]\nname = "soak"\non = ["app:latest"]\nwebhook = {{ url = "http://127.0.0.1:{rx.server_port}/built" }}\n')

logs = open(f"{work}/engine.log", "ab")
engine = None


def start():
    global engine
    engine = subprocess.Popen([BIN, "serve", "--config", f"{work}/triggers.toml"], stdout=logs, stderr=logs)
    wait_port(api_port, "istream")


def cli(*args):
    return subprocess.run([BIN, "--server", f"http://127.0.0.1:{api_port}", *args], capture_output=True, text=True)


# --- a pusher that uploads blobs and a manifest, as a real client does ------------------------
def blob(repo, data):
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    r = urllib.request.urlopen(urllib.request.Request(f"http://{REG}/v2/{repo}/blobs/uploads/", method="POST"))
    loc = r.headers["Location"]
    url = (loc if loc.startswith("http") else f"http://{REG}{loc}") + ("&" if "?" in loc else "?") + "digest=" + d
    urllib.request.urlopen(urllib.request.Request(url, data=data, method="PUT", headers={"Content-Type": "application/octet-stream"}))
    return d


def push(n):
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Labels": {"n": str(n)}}, "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    layer = f"layer {n}".encode()
    m = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                    "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": len(cfg), "digest": blob("soak/app", cfg)},
                    "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": len(layer), "digest": blob("soak/app", layer)}]}).encode()
    urllib.request.urlopen(urllib.request.Request(f"http://{REG}/v2/soak/app/manifests/latest", data=m, method="PUT",
                                                  headers={"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"}))
    return "sha256:" + hashlib.sha256(m).hexdigest()


# --- the soak ----------------------------------------------------------------------------------
start()
reported, kills, n = [], 0, 0
deadline = time.time() + SECONDS
while time.time() < deadline:
    n += 1
    d = push(n)
    args = ["import-image", "app", f"--from={REG}/soak/app", "--confirm"] if n == 1 else ["import-image", "app"]
    o = cli(*args)
    if o.returncode == 0 and d in o.stdout:
        reported.append(d)
    if random.random() < 0.3:
        # A kill -9 at a random moment: right away, or while deliveries are in flight.
        time.sleep(random.random() * 0.2)
        engine.send_signal(signal.SIGKILL)
        engine.wait()
        kills += 1
        start()

# settle: the last start runs until every delivery is out
violations = []
end = time.time() + 60
pending = None
while time.time() < end:
    o = cli("triggers", "soak", "-o", "json")
    if o.returncode == 0:
        t = json.loads(o.stdout)[0]
        pending = t["pending"]
        if pending == 0 and t["last_fired"].get("default/app:latest") == (reported[-1] if reported else None):
            break
    time.sleep(0.2)
o = cli("get", "istag", "app", "-o", "json")
hist = json.loads(o.stdout)["history"] if o.returncode == 0 else []
digests = [h["digest"] for h in hist]
ids = [h["id"] for h in hist]
for d in reported:
    if d not in digests:
        violations.append(f"reported change {d} missing from the history")
if len(set(ids)) != len(ids):
    violations.append("a history entry id appears twice")
for a, b in zip(digests, digests[1:]):
    if a == b:
        violations.append(f"history repeats {a}")
if pending:
    violations.append(f"{pending} deliveries still pending")
with lock:
    keys = {}
    for digest, key in received:
        keys.setdefault(digest, set()).add(key)
if reported and reported[-1] not in keys:
    violations.append(f"the last image {reported[-1]} was never delivered")
for digest, ks in keys.items():
    if len(ks) != 1:
        violations.append(f"{digest} delivered with {len(ks)} different Idempotency-Keys")
engine.send_signal(signal.SIGTERM)
engine.wait(timeout=30)
logs.flush()
if b"panicked" in open(f"{work}/engine.log", "rb").read():
    violations.append("a log line says panicked")
registry.kill()
if nats:
    nats.kill()
print(f"soak ({STORE}, {SECONDS}s): {n} pushes, {len(reported)} changes reported, {kills} kills survived, "
      f"{len(received)} deliveries received, {len(violations)} violations")
for v in violations:
    print("  violation:", v)
sys.exit(1 if violations else 0)
