"""Process group, FSDP2 sharding and the collectives the trainers need.

`torchrun --nproc_per_node=N -m rto <cmd>` gives N ranks (NCCL on GPU, gloo on CPU); plain `rto <cmd>` runs
one rank in a group of its own, so there is one code path. Parallelism is applied from outside the model in
a fixed order: activation checkpointing, then `fully_shard` per decoder layer, then the root.

On one rank there is nothing to shard, and FSDP2 would still copy every parameter in and out of its all-gather
buffers and allocate fresh gradients in every backward, so `shard` leaves the root whole there (unless
`parallel.single_rank_fsdp`): a `OneRankModule` with plain tensors, whose forward runs under bf16 autocast when
mixed precision is on (fp32 weights, gradients and optimizer state, as FSDP2 keeps them). The helpers below take
plain tensors and DTensors alike, and DCP checkpoints move between the two layouts (any rank count resumes).
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from rto.config import ConfigError, ParallelConfig

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
    """Activation checkpointing (optional), then fully_shard on each decoder layer, then on `root`; on one rank
    (unless parallel.single_rank_fsdp) `root` itself on `device`, made a `OneRankModule` (`unsharded`)."""
    if cfg.activation_checkpointing:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")
    if world_size() == 1 and not cfg.single_rank_fsdp:
        return unsharded(root, device, bf16, cpu_offload=cfg.cpu_offload)
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


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class OneRankModule:
    """Mixed into a root that `shard` leaves whole on one rank (FSDP2's own class swap, without FSDP2): the
    FSDPModule calls the loops make (`set_requires_gradient_sync`) do nothing, and with mixed precision the forward
    runs under bf16 autocast. `isinstance(m, OneRankModule)` tells such a root; `compute_dtype` is its autocast
    dtype (None: none)."""

    compute_dtype: torch.dtype | None = None

    def set_requires_gradient_sync(self, requires_gradient_sync: bool, *, recurse: bool = True) -> None:
        """Nothing to synchronise on one rank."""

    def forward(self, *args, **kwargs):
        with compute_precision(self):
            return super().forward(*args, **kwargs)


_ONE_RANK_CLASSES: dict[type, type] = {}


def unsharded(root: nn.Module, device: torch.device, bf16: bool, *, cpu_offload: bool = False) -> nn.Module:
    """`root` on `device` as a `OneRankModule`; with `bf16` (and parameters not bf16 already) its forward runs
    under bf16 autocast, and so does the fused head (`rto::linear_logprobs` casts its inputs under autocast, as
    FSDP2's bf16 parameters would give it). ConfigError for what only FSDP2 does: CPU offload, and bf16 on CPU
    (the CPU head, `rto_kernels.chunked`, would take bf16 logits from autocast in its forward only)."""
    fsdp = "set parallel.single_rank_fsdp=true (FSDP2 on one rank)"
    if cpu_offload:
        raise ConfigError(f"parallel.cpu_offload=true needs FSDP2, which a one-rank run skips: {fsdp}")
    bf16 = bf16 and any(p.dtype != torch.bfloat16 for p in root.parameters() if p.is_floating_point())
    if bf16 and device.type != "cuda":
        why = "the CPU head does not follow autocast"
        raise ConfigError(f"parallel.mixed_precision=bf16 on CPU needs FSDP2 on one rank ({why}): {fsdp}, or off")
    root.to(device)
    cls = type(root)
    if not isinstance(root, OneRankModule):
        if cls not in _ONE_RANK_CLASSES:
            _ONE_RANK_CLASSES[cls] = type(f"OneRank{cls.__name__}", (OneRankModule, cls), {})
        root.__class__ = _ONE_RANK_CLASSES[cls]
    root.compute_dtype = torch.bfloat16 if bf16 else None
    if bf16:
        _head_autocast(device.type)
    return root


_HEAD_AUTOCAST: set[str] = set()


def _head_autocast(device_type: str) -> None:
    """Under autocast the fused head's op casts hidden states, weight and bias to bf16 (autocast would leave it
    the fp32 residual stream and fp32 weights: the slow fp32 kernel)."""
    if device_type not in _HEAD_AUTOCAST:
        import rto_kernels  # noqa: F401  (registers the rto:: ops)

        torch.library.register_autocast("rto::linear_logprobs", device_type, torch.bfloat16)
        _HEAD_AUTOCAST.add(device_type)


def compute_precision(module: nn.Module):
    """The autocast a `OneRankModule`'s forward runs under (bf16 with mixed precision), else nothing (FSDP2 roots
    cast their parameters themselves); also for code that runs the root's submodules with gradients."""
    dtype = module.compute_dtype if isinstance(module, OneRankModule) else None
    if dtype is None:
        return nullcontext()
    return torch.autocast(next(module.parameters()).device.type, dtype=dtype)


@contextmanager
def compute_parameters(module: nn.Module):
    """For a no-grad phase of a `OneRankModule` under mixed precision (generation): its floating parameters
    hold bf16 copies for the duration, as FSDP2's unsharded parameters do, and get their fp32 values back after.
    Nothing for other modules."""
    dtype = module.compute_dtype if isinstance(module, OneRankModule) else None
    params = [p for p in module.parameters() if dtype is not None and p.is_floating_point() and p.dtype != dtype]
    kept = [p.data for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.data = p.data.to(dtype)
        yield
    finally:
        for p, data in zip(params, kept):
            p.data = data


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
    """Clip the global gradient norm over (DTensor or plain) parameters (0: measure only); returns the norm before
    clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return full_tensor(norm)


def barrier() -> None:
    dist.barrier()
