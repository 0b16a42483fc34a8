#!/usr/bin/env bash
# Newcomer runbook (deploy/README.md): a coordinator and 2 sites on one machine, the sites talking only to
# the coordinator's nginx proxy (mutual TLS, Fleet API only); a signed app bundle; the audit logs checked.
# Run from the repository root with the project's venv active (`make install && . .venv/bin/activate`) and
# nginx installed (`apt-get install nginx`). Everything goes under ./runs/demo (ignored by git and left out of the app bundle); Ctrl-C stops it.
set -euo pipefail
export FLWR_HOME=$PWD/runs/demo/flwr FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT

# 1. PKI: CA, server certificate, per-site node keys and TLS client certificates, CRL, signing keys
lungmae certs --out runs/demo/pki --server-name localhost --site site0 --site site1

# 2. two synthetic hospitals (small unlabelled scans: pretraining only) and their caches
lungmae synth --out runs/demo/sites --sites 2 --scans-per-site 2 --slices 40 --matrix 64 --preprocess-size 32 \
    --labelled-fraction 0 --workers 1
lungmae site prepare --config runs/demo/sites/site0/site.yaml --no-progress
lungmae site prepare --config runs/demo/sites/site1/site.yaml --no-progress

# 3. the coordinator: SuperLink on 127.0.0.1:9092 (+ SuperExec with its secret), nginx on 127.0.0.1:9091
cat > runs/demo/federation.yaml <<'YAML'
model: {name: tiny, overrides: {img-size: 32}}
phases:
  pretrain: {rounds: 1, local-epochs: 1, min-sites: 2, evaluate-every: 0}
  finetune: {rounds: 0}
round-timeout-s: 300
run-dir: run
server: {superlink: "127.0.0.1:9092", root-certificates: pki/ca/ca.crt,
         certificate: pki/server/server.pem, private-key: pki/server/server.key}
YAML
lungmae server start --config runs/demo/federation.yaml --database runs/demo/state/superlink.db \
    --proxy-listen 127.0.0.1:9091 > runs/demo/server.log 2>&1 &
until grep -q "Uvicorn running on https://127.0.0.1:9092" runs/demo/server.log; do sleep 2; done

# 4. register both sites' node keys (Control API: reachable on the server host only)
flwr supernode register runs/demo/pki/sites/site0/site0.pub lungmae --name site0
flwr supernode register runs/demo/pki/sites/site1/site1.pub lungmae --name site1

# 5. each site connects through the proxy with its client certificate and runs only signed bundles
for i in 0 1; do
  python - "$i" <<'PY'
import sys, yaml
i = sys.argv[1]; path = f"runs/demo/sites/site{i}/site.yaml"; pki = f"../../pki/sites/site{i}"
cfg = yaml.safe_load(open(path))
cfg["connection"] = {"superlink": "127.0.0.1:9091", "root-certificates": f"{pki}/ca.crt",
                     "auth-key": f"{pki}/site{i}.key", "node-port": 9094 + int(i)}
cfg["trust"] = {"trusted-keys": [f"{pki}/fab-signing.pub"], "client-certificate": f"{pki}/site{i}.client.pem",
                "client-key": f"{pki}/site{i}.client.key"}
cfg["training"]["max-local-epochs"] = 1
yaml.safe_dump(cfg, open(path, "w"), sort_keys=False)
PY
  lungmae site start --config runs/demo/sites/site$i/site.yaml > runs/demo/site$i.log 2>&1 &
done
until [ "$(flwr supernode list lungmae --format json | grep -c '"online"')" = 2 ]; do sleep 3; done
echo "both sites online"

# 6. what the network sees: a Control call through the proxy (403) and a call without a certificate (400)
curl -s --cacert runs/demo/pki/ca/ca.crt --cert runs/demo/pki/sites/site0/site0.client.pem \
    --key runs/demo/pki/sites/site0/site0.client.key -X POST https://127.0.0.1:9091/v1/control/list-runs; echo
curl -s --cacert runs/demo/pki/ca/ca.crt -X POST https://127.0.0.1:9091/v1/fleet/get-run \
    | grep -q "No required SSL certificate was sent" && echo "refused: no required SSL certificate was sent"

# 7. sign and submit the federation, follow it to the end (exit 0: completed)
lungmae server run --config runs/demo/federation.yaml --signing-key runs/demo/pki/signing/fab-signing.key --poll-s 2

# 8. the evidence: both chained logs intact, the bundle each site accepted and why
lungmae audit verify runs/demo/run --public-key runs/demo/pki/server/audit-signing.pub
lungmae audit verify runs/demo/sites/site0/state/site-audit.jsonl runs/demo/sites/site1/state/site-audit.jsonl
grep -h '"fab-accepted"' runs/demo/sites/site*/state/site-audit.jsonl | tail -n 2
