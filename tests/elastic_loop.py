"""The worker of tests/test_elastic_agent.py: a gloo all-reduce of ones, forever, under torchrun.

Each agent's local rank 0 prints ``step I world W rank R sum S`` after every all-reduce (S == W when every
rank took part); ``init rank R world W restart N`` once its process group is up. The pause between steps
only keeps the output and the CPU load small; nothing waits on it.
"""

import os
import time

import torch
import torch.distributed as dist

rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
dist.init_process_group("gloo")
print(f"init rank {rank} world {world} restart {os.environ['TORCHELASTIC_RESTART_COUNT']}", flush=True)
ones = torch.ones(1)
step = 0
while True:
    step += 1
    dist.all_reduce(ones.fill_(1.0))
    if local == 0:
        print(f"step {step} world {world} rank {rank} sum {int(ones.item())}", flush=True)
    time.sleep(0.1)
