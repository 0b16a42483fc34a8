"""The label-scarcity experiment behind `lungmae experiment` (flwr-free: in-process FedAvg over lungmae_core training)."""
