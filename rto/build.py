"""The models a command trains or scores, loaded, checked and sharded in one order for every trainer.

`policy` loads a causal LM (the parity probe of its fused head runs inside `load_causal_lm`), refuses padding-free
batches for a family that cannot run them when the command asks for packing, wraps it in `PolicyModel` and
shards it (FSDP2 per decoder layer, then the root). `scalar` does the same for a critic or reward model.
"""

from __future__ import annotations

import torch
from torch import nn

from rto.config import ModelConfig, ParallelConfig
from rto.families import check_packing
from rto.models import PolicyModel, ScalarModel, check_vocabulary, load_causal_lm, load_scalar_model
from rto.parallel import freeze, shard


def policy(path: str, cfg: ModelConfig, what: str, parallel: ParallelConfig, device: torch.device, **kw):
    """(the sharded PolicyModel, the HF causal LM inside it); keywords as `_build`."""
    return _build(load_causal_lm(path, cfg, what), PolicyModel, what, parallel, device, **kw)


def scalar(path: str, cfg: ModelConfig, what: str, parallel: ParallelConfig, device: torch.device, **kw):
    """(the sharded ScalarModel, the HF model inside it): a critic or a reward model; keywords as `_build`. A frozen
    one scores (the reward model): it must have a trained head (`load_scalar_model(..., scorer=True)`)."""
    hf = load_scalar_model(path, cfg, what, scorer=kw.get("frozen", False))
    return _build(hf, ScalarModel, what, parallel, device, **kw)


def _build(
    hf: nn.Module,
    wrapper: type[nn.Module],
    what: str,
    parallel: ParallelConfig,
    device: torch.device,
    *,
    packing: str | None = None,
    frozen: bool = False,
    tokenizer=None,
) -> tuple[nn.Module, nn.Module]:
    """packing: the setting that asks for padding-free batches (e.g. "train.packing") when it is on, else None;
    tokenizer: the one whose ids the model reads (its vocabulary must fit the embedding)."""
    if tokenizer is not None:
        check_vocabulary(hf, tokenizer, what)
    if packing is not None:
        check_packing(hf, what, packing)
    root = shard(wrapper(hf), hf, parallel, device)
    return (freeze(root) if frozen else root), hf
