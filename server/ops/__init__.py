"""Operating the coordinator, apart from the federation itself: the consortium's certificates (``certs.py``),
the Flower SuperLink process and the CLI's connection to it (``superlink.py``), submitting and following a run
across SuperLink restarts (``run_control.py``), and the nginx mutual-TLS proxy in front of it (``proxy.py``).
docs/deployment.md and deploy/README.md describe the operations."""
