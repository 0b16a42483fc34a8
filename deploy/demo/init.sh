#!/bin/sh
# One-shot initialisation of the compose demo (runs in the `init` service, idempotent):
# consortium PKI, two synthetic hospitals with prepared caches, and their site.yaml connection sections
# (through the coordinator's proxy, with each site's client certificate).
set -eu
STATE=/var/lib/lungmae
lungmae certs --out "$STATE/pki" --server-name coordinator --server-name localhost --server-ip 127.0.0.1 \
  --site site0 --site site1
if [ ! -f "$STATE/sites/site1/site.yaml" ]; then
  lungmae synth --out "$STATE/sites" --sites 2 --scans-per-site 6 --slices 48 --matrix 96 --preprocess-size 32
fi
for i in 0 1; do
  python - "$STATE" "$i" <<'PY'
import sys, pathlib, yaml
state, i = pathlib.Path(sys.argv[1]), sys.argv[2]
path = state / "sites" / f"site{i}" / "site.yaml"
cfg = yaml.safe_load(path.read_text())
site = state / f"pki/sites/site{i}"
# the coordinator's proxy (mutual TLS, Fleet API only), never the SuperLink itself
cfg["connection"] = {"superlink": "coordinator:9091", "root-certificates": str(state / "pki/ca/ca.crt"),
                     "auth-key": str(site / f"site{i}.key"), "node-port": 9094}
# run only app bundles signed with the consortium key (the runner signs with pki/signing/fab-signing.key);
# present this site's TLS client certificate to the proxy
cfg["trust"] = {"trusted-keys": [str(site / "fab-signing.pub")],
                "client-certificate": str(site / f"site{i}.client.pem"),
                "client-key": str(site / f"site{i}.client.key")}
path.write_text(yaml.safe_dump(cfg, sort_keys=False))
PY
  lungmae site prepare --config "$STATE/sites/site$i/site.yaml"
done
