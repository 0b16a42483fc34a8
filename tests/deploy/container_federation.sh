#!/bin/sh
# Run inside the lungmae image by tests/deploy/test_image.py, with the product's own commands as a coordinator
# and two hospitals would run them: `lungmae certs` makes the PKI; `lungmae server start --proxy-listen` runs
# the SuperLink on the container's loopback behind the image's nginx (mutual TLS, Fleet only); the sites'
# keys are registered; site0 passes `lungmae site preflight` through the proxy with its client certificate;
# `lungmae site start` runs both sites through the proxy; `lungmae server run --signing-key` submits the
# image's own app (/opt/lungmae), signed, for one pretrain and one finetune round of the tiny model.
set -eu
W=$(mktemp -d)
cd "$W"
export FLWR_HOME="$W/flwr"
LINK=19092
PROXY=19443
lungmae synth --out sites --sites 2 --scans-per-site 3 --slices 40 --matrix 64 --preprocess-size 32 --workers 1 >/dev/null
for i in 0 1; do lungmae site prepare --config "sites/site$i/site.yaml" --no-progress --workers 1 >/dev/null; done
lungmae certs --out pki --server-name localhost --server-ip 127.0.0.1 --site site0 --site site1 >/dev/null
cat >federation.yaml <<YAML
model: {name: tiny, overrides: {img-size: 32, depth: 2, decoder-depth: 1}}
phases:
  pretrain: {rounds: 1, local-epochs: 1, min-sites: 2, evaluate-every: 0}
  finetune: {rounds: 1, local-epochs: 1, min-sites: 2, evaluate-every: 0}
round-timeout-s: 240
run-dir: $W/run
server: {superlink: "127.0.0.1:$LINK", root-certificates: pki/ca/ca.crt, certificate: pki/server/server.pem,
         private-key: pki/server/server.key}
YAML
lungmae server start --config federation.yaml --database state/superlink.db --proxy-listen "127.0.0.1:$PROXY" \
  >server.log 2>&1 &
pids=$!
trap 'kill $pids 2>/dev/null || true' EXIT
python3 - "$LINK" "$PROXY" <<'PY'
import socket, sys, time
for port in sys.argv[1:]:
    for _ in range(600):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", int(port))) == 0:
                break
        time.sleep(0.2)
    else:
        sys.exit(f"nothing listens on port {port}")
PY
echo "== server up"
# each site: the proxy's address, the consortium CA, its own node key (registered) and TLS client certificate,
# and only app bundles signed with the consortium key
for i in 0 1; do
  python3 - "sites/site$i/site.yaml" "$PROXY" "$((LINK + 10 + i))" "$W" "$i" <<'PY'
import sys, pathlib, yaml
path, port, node_port, w, i = pathlib.Path(sys.argv[1]), *sys.argv[2:]
cfg = yaml.safe_load(path.read_text())
pki = f"{w}/pki/sites/site{i}"
cfg["connection"] = {"superlink": f"127.0.0.1:{port}", "node-port": int(node_port),
                     "root-certificates": f"{w}/pki/ca/ca.crt", "auth-key": f"{pki}/site{i}.key"}
cfg["trust"] = {"trusted-keys": [f"{pki}/fab-signing.pub"], "client-certificate": f"{pki}/site{i}.client.pem",
                "client-key": f"{pki}/site{i}.client.key"}
cfg["training"]["max-local-epochs"] = 1
path.write_text(yaml.safe_dump(cfg, sort_keys=False))
PY
  flwr supernode register "pki/sites/site$i/site$i.pub" lungmae --name "site$i" >/dev/null
done
echo "== preflight"
lungmae site preflight --config sites/site0/site.yaml --min-free-gb 0.1 || { echo "PREFLIGHT FAILED"; exit 1; }
for i in 0 1; do
  FLWR_HOME="$W/site$i-home" lungmae site start --config "sites/site$i/site.yaml" >"site$i.log" 2>&1 &
  pids="$pids $!"
done
cp -r /opt/lungmae app   # the app folder is packed into the bundle; the image's copy is read-only for this user
if lungmae server run --config federation.yaml --app app --poll-s 2 --signing-key pki/signing/fab-signing.key \
     >runner.log 2>&1; then
  echo "== run status finished:completed"
else
  echo "== run status failed"
  for log in runner.log server.log state/proxy/error.log site0.log site1.log; do
    echo "--- $log"; tail -c 3000 "$log" 2>/dev/null || true
  done
  exit 1
fi
python3 - "$W" <<'PY'
import json, pathlib, sys
w = pathlib.Path(sys.argv[1])
lines = [json.loads(x) for x in (w / "run" / "metrics.jsonl").read_text().splitlines()]
print("== rounds", [(x["round"], x["phase"], sorted(x["participation"]["replied"])) for x in lines])
access = (w / "state" / "proxy" / "access.log").read_text()
print("== proxy requests", len(access.splitlines()))
PY
