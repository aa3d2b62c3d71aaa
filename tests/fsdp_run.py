"""Run by tests/test_sharding.py under `accelerate launch --use_fsdp --fsdp_version 2` with 2
CPU processes: python fsdp_run.py METHOD key=value ...

accelerate turns FSDP on only for accelerator devices (with `cpu=True` it falls back to plain
multi-process gloo), while torch's FSDP2 itself runs on CPU over gloo. So this runner builds the
plugin from the launcher's FSDP_* variables, as accelerate would on GPUs, and sets the shared
accelerator state to FSDP: from there on the run takes accelerate's and demoalign's real FSDP2
code paths (fully_shard, sharded optimiser, gathered state dicts)."""

import sys

from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import demoalign.run
from demoalign.config import CONFIGS, load_config

_make_accelerator = demoalign.run.make_accelerator


def make_fsdp_accelerator(config):
    accelerator = _make_accelerator(config)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    accelerator.state.distributed_type = DistributedType.FSDP
    return accelerator


if __name__ == "__main__":
    demoalign.run.make_accelerator = make_fsdp_accelerator
    demoalign.run.train(load_config(CONFIGS[sys.argv[1]], None, sys.argv[2:]))
