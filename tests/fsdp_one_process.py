"""Run by tests/test_sharding.py: python fsdp_one_process.py MODEL_DIR RENDEZVOUS_FILE

One process over gloo, torch's fully_shard on the tiny model in fp32. There a "gather" of a
parameter is the process's own shard and a cast to fp32 changes nothing, so a careless copy
would share the training weights' storage, and releasing the copy would free them."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from demoalign.logprobs import SequenceScorer
from demoalign.sharding import GatheredCopy, is_sharded

dist.init_process_group("gloo", init_method=f"file://{sys.argv[2]}", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
lm = AutoModelForCausalLM.from_pretrained(sys.argv[1])
scorer = SequenceScorer(lm)
for layer in lm.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(scorer, mesh=mesh)
assert is_sharded(lm)
optimizer = torch.optim.SGD(scorer.parameters(), lr=0.1)

holder = GatheredCopy(torch.float32)
copy = holder.materialise(lm)
shards = {p.to_local().untyped_storage().data_ptr() for p in lm.parameters()}
assert not shards & {p.untyped_storage().data_ptr() for p in copy.parameters()}, "shared storage"
holder.release()

ids = torch.tensor([[5, 9, 13, 21, 7, 3]])
labels = ids.clone()
labels[:, :2] = -100
logp, _ = scorer(ids, torch.ones_like(ids), labels)
(-logp.sum()).backward()
optimizer.step()

copy = holder.materialise(lm)  # refreshed in place from the updated shards
for (name, p), q in zip(copy.named_parameters(), lm.parameters()):
    assert torch.equal(p, q.full_tensor()), name
dist.destroy_process_group()
print("gathered copy ok")
