"""The label-scarcity experiment behind `lungmae experiment`.

flwr-free: an in-process FedAvg over the same lungmae_core training functions the federated sites run.
"""
