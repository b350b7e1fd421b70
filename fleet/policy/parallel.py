"""Data-parallel pretraining over local processes (torch.distributed, gloo over loopback).

On a 2-core machine one process on 2 torch threads spends much of a small step at OpenMP barriers;
two processes on one thread each, every one computing half the batch, are faster (measured here, batch
64 of the shipped model: 0.24 s a step on 2 threads; 0.20 s for 32 rows on 1 thread, with two such
processes running at once; the gradient all-reduce of 4.2 M floats adds 11.5 ms). Every rank holds the
same model (same seed, and rank 0's weights broadcast at the start) and, after each backward, the mean
gradient of all ranks, so the optimizer steps stay identical. Data collection is split by embodiment
(expert demonstrations and DAgger rollouts) and the results are broadcast, so every rank trains on the
same data.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from fleet.policy.demos import DemoSet

# seconds a policy-driven DAgger episode batch of 64 took per embodiment, 1 thread, the shipped checkpoint
# (franka 1.7, aloha 5.4, hello 1.9, leap 2.2): the weights that balance collection across ranks
COLLECT_COST = {"franka": 1.7, "aloha": 5.4, "hello": 1.9, "leap": 2.2}
TIMEOUT = timedelta(minutes=15)  # a collective that waits longer than this (a rank died) raises


def assign(names: tuple[str, ...] | list[str], world: int) -> dict[str, int]:
    """Embodiment -> rank that collects its data: greedy, most expensive first, onto the least loaded rank."""
    load = [0.0] * world
    owner: dict[str, int] = {}
    for name in sorted(names, key=lambda n: (-COLLECT_COST.get(n, 2.0), n)):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += COLLECT_COST.get(name, 2.0)
    return owner


def split_rows(rows: dict[str, int], world: int) -> dict[str, int]:
    """Each rank's share of each embodiment's rows (PretrainConfig checks they divide evenly)."""
    return {n: r // world for n, r in rows.items()}


def rendezvous_file() -> str:
    """A fresh path for the file store the ranks meet at (no port to race for)."""
    fd, path = tempfile.mkstemp(prefix="fleet-pretrain-", suffix=".store")
    os.close(fd)
    os.unlink(path)
    return path


def init(rank: int, world: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_params(model: torch.nn.Module) -> None:
    """Every rank takes rank 0's parameters and buffers."""
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, src=0)


def average_gradients(params: list[torch.nn.Parameter], loss: torch.Tensor, world: int) -> float:
    """Replace each parameter's gradient by the mean over ranks (one all-reduce of one flat buffer, the
    loss riding along); returns the mean loss. A parameter without a gradient counts as zero."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1)])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        if p.grad is None:
            p.grad = flat[offset : offset + n].view_as(p).clone()
        else:
            p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n
    return float(flat[-1])


def check_in_sync(model: torch.nn.Module) -> None:
    """Raise if any rank's weights differ from rank 0's (they must stay bit-identical)."""
    with torch.no_grad():
        mine = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        diff = torch.tensor([float((mine != ref).sum())])
        dist.all_reduce(diff)
    if diff.item():
        raise RuntimeError(f"data-parallel pretraining: {int(diff.item())} weights differ between ranks")


def share_demos(mine: dict[str, DemoSet], owner: dict[str, int], names: tuple[str, ...]) -> dict[str, DemoSet]:
    """Every rank ends with every embodiment's DemoSet, each broadcast from the rank that collected it."""
    return {n: _broadcast_demoset(mine.get(n), owner[n], n) for n in names}


def _broadcast_demoset(d: DemoSet | None, src: int, name: str) -> DemoSet:
    have = dist.get_rank() == src
    if have:
        instr = np.frombuffer(bytearray("\x00".join(d.instructions).encode()), np.uint8)
        header = torch.tensor(
            [len(d), *d.images.shape[1:], d.proprio.shape[1], *d.actions.shape[1:], d.successes, d.episodes, len(instr)]
        )
    else:
        header = torch.zeros(10, dtype=torch.long)
    dist.broadcast(header, src=src)
    n, h, w, c, p, t, a, successes, episodes, n_instr = (int(x) for x in header)

    def bcast(arr: np.ndarray | None, shape: tuple, dtype) -> np.ndarray:
        buf = torch.from_numpy(np.ascontiguousarray(arr)) if have else torch.empty(shape, dtype=dtype)
        dist.broadcast(buf, src=src)
        return buf.numpy()

    images = bcast(d.images if have else None, (n, h, w, c), torch.uint8)
    proprio = bcast(d.proprio if have else None, (n, p), torch.float32)
    actions = bcast(d.actions if have else None, (n, t, a), torch.float32)
    focus = bcast(d._focus_or_nan() if have else None, (n, 2), torch.float32)
    raw = bcast(instr if have else None, (n_instr,), torch.uint8)
    instructions = bytes(raw).decode().split("\x00") if n else []
    if have:
        return d
    return DemoSet(name, images, proprio, instructions, actions, successes, episodes, focus)
