"""Process group, FSDP2 sharding and the collectives the trainers need.

`torchrun --nproc_per_node=N -m rto <cmd>` gives N ranks (NCCL on GPU, gloo on CPU); plain `rto <cmd>` runs
one rank in a group of its own, so there is one code path. Parallelism is applied from outside the model in
a fixed order: activation checkpointing, then `fully_shard` per decoder layer, then the root.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from rto.config import ParallelConfig

# Our root units return per-token tensors that are views (gathers, squeezes); nothing modifies them in place.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = 1800) -> Dist:
    """Join the torchrun group, or start a one-rank group when launched without torchrun."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ:
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            # After an elastic restart the store still holds the dead round's addresses; a prefix per restart
            # keeps a new round from connecting to them (seen as gloo "connection refused" on restart).
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
            store = dist.TCPStore(
                addr, port, world, is_master=not agent_store and rank == 0, timeout=timedelta(seconds=timeout_s)
            )
            store = dist.PrefixStore(f"rto/restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
            )
        else:
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=timeout_s)
            )
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=device)


def close_distributed() -> None:
    """End the process group ourselves, after the last collective and before the interpreter exits.

    Left to interpreter teardown, the group's store and backend threads are destroyed in no fixed order, which
    aborted a finished rank now and then ("terminate called without an active exception", exit -6, mostly after
    an elastic restart); NCCL warns about it or hangs. Every `rto` command calls this on every exit path.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class CollectiveError(RuntimeError):
    """A collective timed out or lost a peer: another rank hung or died."""


@contextmanager
def named_collectives(what: str):
    """Re-raise a backend timeout or a lost peer inside `what` as an error that says where it happened."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        text = str(e)
        lowered = text.lower()
        if isinstance(e, CollectiveError) or not any(
            k in lowered for k in ("timed out", "timeout", "closed by peer", "connection reset")
        ):
            raise
        cause = "timed out" if "time" in lowered else "lost a peer"
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise CollectiveError(
            f"rank {rank}: a collective {cause} during {what}; another rank is probably hung or dead (see its log). "
            f"Backend message: {text.splitlines()[0][:300]}"
        ) from e


def decoder_layers(hf_model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of an HF model (the classes it lists in `_no_split_modules`)."""
    names = set(getattr(hf_model, "_no_split_modules", None) or ())
    layers = [m for m in hf_model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(hf_model).__name__} names no decoder-layer class in _no_split_modules")
    return layers


def shard(root: nn.Module, hf_model: nn.Module, cfg: ParallelConfig, device: torch.device) -> nn.Module:
    """Activation checkpointing (optional), then fully_shard on each decoder layer, then on `root`."""
    if cfg.activation_checkpointing:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")
    kwargs = {}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    elif device.type == "cuda":
        root.to(device)
    for layer in decoder_layers(hf_model):
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)
    return root


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def all_reduce_sum(x: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64, device=device).clone()
    dist.all_reduce(t)
    return t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor from a DTensor shard (a collective: every rank must call it), or t itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU copy of a module's state dict; every rank must call it (it gathers)."""
    return {k: full_tensor(v).detach().cpu() for k, v in module.state_dict().items()}


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm over (DTensor) parameters (0: measure only); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return full_tensor(norm)


def barrier() -> None:
    dist.barrier()
