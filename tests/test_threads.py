"""The thread count a run takes when the config leaves it null."""

import torch
from torch import nn

from compresslab import threads
from compresslab.pipeline import run
from conftest import compose_cfg


def test_small_models_run_on_one_thread_and_large_ones_on_the_default():
    with torch.device("meta"):
        small, large = nn.Linear(100, 100), nn.Linear(5000, 5000)     # 10k and 25M weights
    assert threads.run_threads(None, small) == 1
    assert threads.run_threads(None, large) == threads.DEFAULT_THREADS
    assert threads.run_threads(2, small) == 2                          # the config wins


def test_a_run_with_threads_null_sets_one_thread_for_a_tiny_model(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    monkeypatch.setattr(threads, "DEFAULT_THREADS", 2)      # as on a 2-core machine
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    run(compose_cfg(["experiment=dln_factorization", "dataset.datamodule.d=12",
                     "dataset.datamodule.r=2", "method.stages.train.max_steps=5",
                     "method.stages.train.callbacks=[]", "threads=null"], tmp_path))
    assert seen[0] == 1
