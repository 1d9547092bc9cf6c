"""Multi-process training with DDP (gloo, two CPU processes through torchrun): the teacher pass
is sharded, every rank runs the same number of steps, and the replicas agree on every
parameter after the optimisation steps."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_epoch_batches_shard_the_permutation():
    from training.engine.data import epoch_batches

    for n, world, bs in [(10, 2, 2), (7, 2, 2), (5, 3, 1), (4, 1, 3)]:
        per_rank = [epoch_batches(n, bs, epoch=3, seed=1, rank=r, world_size=world) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1                       # same number of steps
        flat = [i for b in per_rank for batch in b for i in batch]
        assert set(flat) == set(range(n))                                 # every sample is seen
        if n % (world * bs) == 0:
            assert len(flat) == n                                         # ... exactly once
        assert all(len(batch) == bs for b in per_rank for batch in b)
    a = epoch_batches(10, 2, epoch=0, seed=1)
    assert a == epoch_batches(10, 2, epoch=0, seed=1) and a != epoch_batches(10, 2, epoch=1, seed=1)


def test_torchrun_two_ranks_agree_after_steps(tmp_path):
    out = tmp_path / "ddp"
    sets = [f"data.args.root={ROOT / 'test/data/nuscenes/dororo99_v1.0-extract_3samples'}",
            "data.args.cameras=[CAM_FRONT]", "data.max_points=1500", "optim.epochs=1", "optim.batch_size=1",
            f"teacher.cache_dir={tmp_path / 'cache'}", f"run.out_dir={out}", "run.progress=false",
            "run.save_rank_states=true", "run.device=cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "training/pretrain.py", "--config", "config/pretrain_demo.yaml"]
    for s in sets:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # 3 samples over 2 ranks: both ranks ran 2 steps (the permutation wraps around)
    from training.engine.state import load_state
    st = load_state(out / "last.pt")
    assert st["world_size"] == 2 and st["global_step"] == 2 and st["epoch"] == 1
    # the sharded teacher pass filled the cache for all three samples (1 camera each)
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 3

    r0 = torch.load(out / "rank0_model.pt", weights_only=True)
    r1 = torch.load(out / "rank1_model.pt", weights_only=True)
    from clip2scene_core.models import build_model
    from clip2scene_core.config import from_dict
    from clip2scene_core.models import ModelConfig
    torch.manual_seed(0)
    init = build_model(from_dict(ModelConfig, st["model_config"])).state_dict()
    params = [k for k in r0 if not any(s in k for s in ("running_", "num_batches"))]
    assert params
    for k in params:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
    moved = [k for k in params if not torch.equal(r0[k], init[k])]
    assert len(moved) > len(params) // 2                                  # the steps did update them
    for k in params:                                                      # rank 0 saved the same weights
        assert torch.equal(st["model"][k], r0[k])
