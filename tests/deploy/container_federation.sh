#!/bin/sh
# Run inside the lungmae image by tests/deploy/test_image.py: `lungmae certs` makes the PKI, two synthetic sites
# are prepared, a SuperLink with TLS and node authentication starts on the container's loopback, the sites'
# keys are registered, site0 passes `lungmae site preflight` against it, then two SuperNodes run one pretrain and
# one finetune round of the tiny model submitted by `flwr run` of the image's own app (/opt/lungmae).
set -eu
W=$(mktemp -d)
cd "$W"
export FLWR_HOME="$W/flwr"
PORT=19092
lungmae synth --out sites --sites 2 --scans-per-site 3 --slices 40 --matrix 64 --preprocess-size 32 --workers 1 >/dev/null
for i in 0 1; do lungmae site prepare --config "sites/site$i/site.yaml" --no-progress --workers 1 >/dev/null; done
lungmae certs --out pki --server-name localhost --server-ip 127.0.0.1 --site site0 --site site1 >/dev/null
flower-superlink --ssl-certfile pki/server/server.pem --ssl-keyfile pki/server/server.key \
  --ssl-ca-certfile pki/ca/ca.crt --enable-supernode-auth --disable-runtime-dependency-installation \
  --database "$W/superlink.db" --host 127.0.0.1 --port "$PORT" >superlink.log 2>&1 &
pids=$!
trap 'kill $pids 2>/dev/null || true' EXIT
python3 - "$PORT" <<'PY'
import socket, sys, time
for _ in range(600):
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0:
            sys.exit(0)
    time.sleep(0.2)
sys.exit("the SuperLink did not listen")
PY
mkdir -p "$FLWR_HOME"
printf '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:%s"\nroot-certificates = "%s"\n' \
  "$PORT" "$W/pki/ca/ca.crt" >"$FLWR_HOME/config.toml"
# each site: TLS with the consortium CA, its own key (registered at the SuperLink), a local node port
for i in 0 1; do
  python3 - "sites/site$i/site.yaml" "$PORT" "$((PORT + 10 + i))" "$W" "$i" <<'PY'
import sys, pathlib, yaml
path, port, node_port, w, i = pathlib.Path(sys.argv[1]), *sys.argv[2:]
cfg = yaml.safe_load(path.read_text())
cfg["connection"] = {"superlink": f"127.0.0.1:{port}", "node-port": int(node_port),
                     "root-certificates": f"{w}/pki/ca/ca.crt", "auth-key": f"{w}/pki/sites/site{i}/site{i}.key"}
cfg["training"]["max-local-epochs"] = 1
path.write_text(yaml.safe_dump(cfg, sort_keys=False))
PY
  flwr supernode register "pki/sites/site$i/site$i.pub" local --name "site$i" >/dev/null
done
echo "== preflight"
lungmae site preflight --config sites/site0/site.yaml --min-free-gb 0.1 || { echo "PREFLIGHT FAILED"; exit 1; }
for i in 0 1; do
  flower-supernode --superlink "127.0.0.1:$PORT" --root-certificates "$W/pki/ca/ca.crt" \
    --auth-supernode-private-key "$W/pki/sites/site$i/site$i.key" --host 127.0.0.1 --port "$((PORT + 10 + i))" \
    --node-config "site-config=\"$W/sites/site$i/site.yaml\"" >"supernode$i.log" 2>&1 &
  pids="$pids $!"
done
cat >federation.yaml <<YAML
model: {name: tiny, overrides: {img-size: 32, depth: 2, decoder-depth: 1}}
phases:
  pretrain: {rounds: 1, local-epochs: 1, min-sites: 2, evaluate-every: 0}
  finetune: {rounds: 1, local-epochs: 1, min-sites: 2, evaluate-every: 0}
round-timeout-s: 240
YAML
cp -r /opt/lungmae app   # flwr run packs the app folder; the image's copy is read-only for this user
flwr run app local --format json --run-config "federation-config='$W/federation.yaml' run-dir='$W/run'" >run.json
python3 - "$W" <<'PY'
import json, pathlib, subprocess, sys, time
w = pathlib.Path(sys.argv[1])
run_id = json.loads((w / "run.json").read_text())["run-id"]
status = ""
for _ in range(300):
    out = subprocess.run(["flwr", "list", "local", "--run-id", str(run_id), "--format", "json"], capture_output=True,
                         text=True, cwd=w)
    runs = json.loads(out.stdout).get("runs", []) if out.returncode == 0 else []
    status = runs[0].get("status", "") if runs else ""
    if status.startswith("finished"):
        break
    time.sleep(2)
print("== run status", status)
if status != "finished:completed":
    for log in sorted(w.glob("*.log")):
        print(f"--- {log.name}\n{log.read_text()[-3000:]}")
    sys.exit(1)
lines = [json.loads(x) for x in (w / "run" / "metrics.jsonl").read_text().splitlines()]
print("== rounds", [(x["round"], x["phase"], sorted(x["participation"]["replied"])) for x in lines])
PY
