"""Training on several processes: torchrun (one node or many) and ``lnm_train -num_gpus N``.

Every process runs the same trainer loop on its own GPU (NCCL, ``cuda:LOCAL_RANK``) or CPU slot (gloo); the
network's forward/backward in a training step goes through PyTorch's DistributedDataParallel, which averages
the gradients over the processes, so every process holds the same weights after every step.

The batch rule is nnU-Net's: the plan's batch is the *global* batch, split over the processes (rank r draws
``B // N`` nodes, one more for the first ``B % N`` ranks, each from its own seed of (seed, epoch, rank)); the
learning rate, steps per epoch and schedule stay the plan's. A run on N processes therefore optimises the same
recipe as a run on one, only each step's work is spread (documentation/scaling.md says why and what differs).

``DistributedRun`` is this process's place in the job; in a single process it is a world of one and every
method is the identity or does nothing, so the trainer has no branches on whether it is distributed.
"""
from __future__ import annotations

import math
import os
import socket
import sys
from collections import defaultdict
from dataclasses import replace
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from lnm_auto.plans.plans import ConfigurationPlan
from lnm_auto.training.progress import TrainingLog
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.threads import available_cores, requested_threads

RENDEZVOUS_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK")   # what torchrun's env:// rendezvous needs besides WORLD_SIZE


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.lstrip("-").isdigit():
        raise LNMError(f"${name} must be a whole number (set by torchrun), got '{value}'")
    return int(value)


def environment_world_size() -> int:
    """The number of processes torchrun (or -num_gpus) started for this job; 1 outside such a job."""
    return _env_int("WORLD_SIZE", 1)


def init_process_group(device: str) -> bool:
    """Join the job described by torchrun's environment (env:// rendezvous): NCCL for cuda, gloo for cpu; this
    process's torch threads become its share of the node's cores. False (nothing done) outside such a job."""
    world = environment_world_size()
    if world <= 1 or dist.is_initialized():
        return False
    missing = [k for k in RENDEZVOUS_ENV if not os.environ.get(k)]
    if missing:
        raise LNMError(f"$WORLD_SIZE is {world} but ${', $'.join(missing)} not set: start distributed training "
                       "with torchrun (or lnm_train -num_gpus N), which sets them")
    local_rank = _env_int("LOCAL_RANK", _env_int("RANK", 0))
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise LNMError(f"LOCAL_RANK {local_rank} has no GPU: this node has {torch.cuda.device_count()}; start at "
                           "most that many processes per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    elif device == "cpu":
        backend = "gloo"
    else:
        raise LNMError(f"distributed training runs on cuda (NCCL) or cpu (gloo), not {device}; use -device cuda or cpu")
    if requested_threads() is None:   # one torch thread per core would put N x cores threads on the node
        torch.set_num_threads(max(1, available_cores() // _env_int("LOCAL_WORLD_SIZE", world)))
    dist.init_process_group(backend, init_method="env://")
    return True


def destroy_process_group() -> None:
    """Leave the job's process group (if this process joined one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0 (every process before the group is joined reads torchrun's $RANK): the one that writes files."""
    return (dist.get_rank() if dist.is_initialized() else _env_int("RANK", 0)) == 0


class SilentTrainingLog(TrainingLog):
    """The training log of ranks other than 0: keeps the values, writes and prints nothing."""

    def print(self, *parts, echo: bool = True) -> None:
        """Nothing: rank 0 says it."""

    def plot(self, path, force: bool = True) -> None:
        """Nothing: rank 0 draws progress.png."""


class DistributedRun:
    """This process's place in a training job: rank, world size and what the trainer needs to run on it."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, local_world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_world_size = local_rank, local_world_size
        self._replica: nn.Module | None = None
        self._outside: tuple[int, list[nn.Parameter]] | None = None

    @classmethod
    def current(cls) -> "DistributedRun":
        """The job this process joined (``init_process_group``), or a world of one."""
        if not dist.is_initialized():
            return cls()
        rank, world = dist.get_rank(), dist.get_world_size()
        return cls(rank, world, _env_int("LOCAL_RANK", rank), _env_int("LOCAL_WORLD_SIZE", world))

    @property
    def is_main(self) -> bool:
        """Rank 0: writes checkpoints, logs, plots and validation files."""
        return self.rank == 0

    def describe_batch(self, batch_size: int) -> str:
        """How the plan's batch is split, for the log ('' in one process)."""
        if self.world_size == 1:
            return ""
        shares = [self._share(batch_size, r) for r in range(self.world_size)]
        return f", {self.world_size} processes (global batch {batch_size} = {'+'.join(map(str, shares))} per rank)"

    def device(self, name: str | torch.device) -> torch.device:
        """The device of this rank: ``cuda`` is this node's GPU number LOCAL_RANK."""
        device = torch.device(name)
        if self.world_size > 1 and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    # ---- data -------------------------------------------------------------------------------------
    def seed(self, epoch_seed: int) -> int:
        """This rank's seed from the (seed, epoch) seed: rank 0 keeps it (a one-process run is unchanged), the
        others get independent streams, so the ranks draw different batches and resume draws the same ones."""
        if self.rank == 0:
            return epoch_seed
        return int(np.random.SeedSequence([epoch_seed, self.rank]).generate_state(1)[0])

    def _share(self, batch_size: int, rank: int) -> int:
        return batch_size // self.world_size + (rank < batch_size % self.world_size)

    def batch_share(self, config: ConfigurationPlan) -> ConfigurationPlan:
        """``config`` with this rank's share of the plan's batch, which is the global batch: its ``B // N`` (+1 on
        the first ``B % N`` ranks) nodes, and its share of the batch's ``ceil(B * positive_fraction)`` oversampled
        positives, spread the same way, so the global batch holds exactly the plan's positives (as nnU-Net
        splits its foreground oversampling) rather than a rounded-up minimum on every rank."""
        if self.world_size == 1:
            return config
        r = config.recipe
        if self.world_size > r.batch_size:
            raise LNMError(f"{self.world_size} processes cannot share the plan's batch of {r.batch_size} nodes "
                           f"(configuration {config.name}): use at most {r.batch_size} processes, or plan a larger "
                           "batch")
        n, positives = self._share(r.batch_size, self.rank), self._share(math.ceil(r.batch_size * r.positive_fraction),
                                                                          self.rank)
        return replace(config, recipe=replace(r, batch_size=n, positive_fraction=fraction_drawing(positives, n)))

    def shard(self, records: pd.DataFrame) -> pd.DataFrame:
        """The rows this rank handles (every world_size-th one, from its rank on)."""
        return records if self.world_size == 1 else records.iloc[self.rank::self.world_size]

    def gather(self, values: np.ndarray, total: int, device: torch.device) -> np.ndarray:
        """Every rank's ``values`` for its ``shard`` of ``total`` rows, back in row order, on every rank."""
        if self.world_size == 1:
            return values
        longest = -(-total // self.world_size)
        comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
        mine = torch.zeros(longest, dtype=torch.float64, device=comm)
        mine[:len(values)] = torch.as_tensor(np.asarray(values, dtype=np.float64), device=comm)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine)
        out = np.empty(total, dtype=np.float64)
        for r, part in enumerate(parts):
            n = len(range(r, total, self.world_size))
            out[r::self.world_size] = part[:n].cpu().numpy()
        return out

    def node_leader_first(self, fn: Callable[..., None], *args) -> None:
        """Run ``fn`` on the first process of each node (the others would do the same file work), then wait."""
        if self.local_rank == 0:
            fn(*args)
        self.barrier()

    # ---- the step ---------------------------------------------------------------------------------
    def replica(self, network: nn.Module) -> nn.Module:
        """The DDP wrapper of ``network`` (made at the first step, after every weight was loaded), or the network
        itself in one process. ``static_graph``: every trainer uses the same parameters in every step, but not
        all of them (WSP's loss uses none of the classification heads); DDP learns which in the first step."""
        if self.world_size == 1:
            return network
        if self._replica is None or self._replica.module is not network:
            device = next(network.parameters()).device
            self._replica = nn.parallel.DistributedDataParallel(
                network, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True)
        return self._replica


    def synchronize_step(self, network: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After backward, what DDP does not cover: average the gradients of parameters the optimizer steps outside
        ``network`` (WSP's projection head), and give every rank rank 0's buffers (BatchNorm running statistics,
        which each rank's forward updated from its own batch), so weights, EMA teacher and validation agree."""
        if self.world_size == 1:
            return
        outside = self._parameters_outside(network, optimizer)
        if outside:
            has_grad = torch.tensor([p.grad is not None for p in outside], dtype=torch.float32,
                                    device=outside[0].device)
            dist.all_reduce(has_grad)
            for p, used in zip(outside, has_grad.tolist()):
                if used:   # a parameter no rank used keeps grad None, as in one process
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.world_size)
        broadcast_from_rank0(list(network.buffers()))

    def _parameters_outside(self, network: nn.Module, optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
        if self._outside is None or self._outside[0] != id(optimizer):
            inside = {id(p) for p in network.parameters()}
            self._outside = (id(optimizer), [p for g in optimizer.param_groups for p in g["params"]
                                             if id(p) not in inside and p.requires_grad])
        return self._outside[1]

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written the final checkpoint)."""
        if self.world_size > 1:
            dist.barrier()

    def training_log(self, fold_folder) -> TrainingLog:
        """Rank 0: the run's log file; the other ranks: a log that writes nothing."""
        return TrainingLog.for_run(fold_folder) if self.is_main else SilentTrainingLog(os.devnull)


def fraction_drawing(k: int, n: int) -> float:
    """The positive fraction f for which a batch of ``n`` draws exactly ``k`` positives (ceil(n * f) == k, the
    loaders' rule), as close to k / n as floats allow."""
    f = k / n
    while math.ceil(n * f) > k:
        f = math.nextafter(f, 0.0)
    return f


def broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values, one flat message per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        by_dtype[t.dtype].append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src=0)
        offset = 0
        for t in group:
            t.data.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


# ---- lnm_train -num_gpus N ----------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on this machine now (for the rendezvous of processes started here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_process(local_rank: int, world: int, port: int, entry: Callable[[list[str]], int], argv: list[str]):
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    code = entry(argv)
    if code:
        sys.exit(code)


def launch_local_processes(n: int, device: str, entry: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run ``entry(argv)`` in ``n`` processes on this machine, as ``torchrun --standalone --nproc_per_node n``
    would (one per GPU for cuda; ``n`` gloo processes for cpu). Returns the first failing exit status, else 0;
    when one process fails the others are stopped."""
    if n < 1:
        raise LNMError(f"-num_gpus must be at least 1, got {n}")
    if device.startswith("cuda") and torch.cuda.device_count() < n:
        raise LNMError(f"-num_gpus {n}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise LNMError(f"-num_gpus runs on cuda (NCCL) or cpu (gloo), not {device}")
    if environment_world_size() > 1:
        raise LNMError("-num_gpus starts its own processes; under torchrun leave it out (torchrun --nproc_per_node "
                       "says how many)")
    import torch.multiprocessing as mp
    try:
        mp.start_processes(_local_process, args=(n, free_port(), entry, argv), nprocs=n, join=True,
                           start_method="spawn")
    except mp.ProcessExitedException as e:   # that process printed its own error line
        return e.exit_code if e.exit_code and e.exit_code > 0 else 1
    return 0
