"""farflung's data-parallel algorithms in your own training loop.

torchrun --nproc-per-node=2 examples/own_loop.py cocktail
"""

import sys

import torch
import torch.distributed as dist

from farflung.parallel import distribute  # before init_process_group: see docs/data-parallel.md

dist.init_process_group("gloo")
torch.manual_seed(0)  # same initial model everywhere (distribute also broadcasts rank 0's)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
algo = distribute(model, opt, sys.argv[1] if len(sys.argv) > 1 else "cocktail", warmup_steps=5)

target = torch.randn(32, 1, generator=torch.Generator().manual_seed(0))
data = torch.Generator().manual_seed(1 + dist.get_rank())  # each rank its own data
for _ in range(300):
    x = torch.randn(64, 32, generator=data)
    loss = torch.nn.functional.mse_loss(model(x), x @ target)
    loss.backward()
    algo.step()  # sync gradients or model deltas, optimizer step, zero_grad

algo.close()  # the last sync, and the algorithm's own threads and groups, are done
with algo.eval_parameters() as m, torch.no_grad():
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(99))
    final = torch.nn.functional.mse_loss(m(x), x @ target).item()
sent = algo.comm.meter.snapshot().sent
print(f"rank {dist.get_rank()}: held-out mse {final:.4f}, bytes sent {sent}")
dist.destroy_process_group()
