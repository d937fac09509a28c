"""Peer-library adapters of the benchmark (re-exported from :mod:`bbb.bench_peers`).

Install the peers with ``make bench`` (``pip install --no-deps bayesian-torch
blitz-bayesian-pytorch torchbnn pyro-ppl pyro-api opt_einsum``: bayesian-torch and blitz
declare torchvision, which would pull a multi-GB CUDA torch; they import and run without it).
"""

from __future__ import annotations

from bbb.bench_peers import (
    PEER_ESTIMATORS,
    PEERS,
    PYRO_MAX_ELEMENTS,
    available_peers,
    build_peer_step,
    pyro_elements,
)

__all__ = [
    "PEERS",
    "PEER_ESTIMATORS",
    "PYRO_MAX_ELEMENTS",
    "available_peers",
    "build_peer_step",
    "pyro_elements",
]
