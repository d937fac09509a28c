"""Session 26, the lead's own fixes (issue 4).

- ``wrap_elbo`` passes DistributedDataParallel's options through (``static_graph=True`` and the
  like; the two-rank check that it reaches DDP and keeps the ranks in step is
  ``test_review_s25_fsdp.py::test_ddp_static_graph_keeps_the_ranks_in_step[static-wrap]``) and
  refuses, before anything else, the options it sets itself.
"""

from __future__ import annotations

import pytest
from torch import nn

import bbb
from bbb.train import distributed as D


@pytest.mark.parametrize(
    "option", ["device_ids", "output_device", "broadcast_buffers", "forward_sync_buffers"]
)
def test_wrap_elbo_refuses_the_ddp_options_it_sets_itself(option: str) -> None:
    model = nn.Sequential(bbb.BayesLinear(3, 2))
    elbo = bbb.ELBO(bbb.Categorical(), dataset_size=10)
    with pytest.raises(TypeError, match=f"wrap_elbo sets {option} itself"):
        D.wrap_elbo(model, elbo, **{option: None})
