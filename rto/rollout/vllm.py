"""The vLLM rollout engine: colocated with training, one engine spread over the torchrun ranks (GPU only).

- Launch: `LLM(..., distributed_executor_backend="external_launcher")` joins the torchrun processes, with
  tensor parallelism over all ranks; every rank passes the same prompts (gathered), gets the same outputs and
  keeps its own share. Sampling seeds are therefore equal on every rank.
- Memory: the engine sleeps (level 1: weights to CPU, KV cache freed) whenever training runs. Waking is staged,
  weights first (then the new weights are streamed in), KV cache only for generation, which avoids holding
  both next to the training state.
- Weight sync: the actor's parameters are gathered from FSDP2 one by one and streamed in buckets of
  `rollout.vllm_bucket_mb` through `LLM.apply_model(model.load_weights)`; the prefix cache is reset after.
- Log-probs: vLLM returns the sampled tokens' log-probs (`logprobs=0`, processed at the rollout temperature
  when the installed vLLM supports `logprobs_mode`).
- Stop tokens: every id of `stop_ids` (`rto.families.stop_token_ids`) stops a response (`stop_token_ids`).
vLLM is an optional dependency (`pip install rto[vllm]`); its tests are marked `vllm`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from rto.config import ConfigError, RolloutConfig
from rto.rollout.engine import RolloutBatch, assemble
from rto.rollout.weight_sync import stream_weights


class VLLMEngine:
    def __init__(
        self,
        lm: nn.Module,
        model_path: str,
        tokenizer,
        cfg: RolloutConfig,
        device: torch.device,
        seed: int,
        stop_ids: list[int] | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ):
        """stop_ids: the tokens that end a response, primary EOS first (`rto.families.stop_token_ids`; default:
        the tokenizer's EOS alone); all of them go to vLLM as `stop_token_ids`."""
        try:
            from vllm import LLM
        except ImportError as e:
            raise ConfigError("rollout.engine=vllm needs vLLM: pip install 'rto[vllm]' (GPU only)") from e
        self.lm, self.cfg, self.device = lm, cfg, device
        self.stop_ids = [tokenizer.eos_token_id] if stop_ids is None else [int(t) for t in stop_ids]
        self.pad_id = tokenizer.pad_token_id
        world = dist.get_world_size() if dist.is_initialized() else 1
        kwargs = dict(
            model=model_path,
            tokenizer=model_path,
            revision=revision,  # the actor's model.revision / trust_remote_code, as its weights were loaded
            tokenizer_revision=revision,
            trust_remote_code=trust_remote_code,
            tensor_parallel_size=world,
            seed=seed,
            distributed_executor_backend="external_launcher",
            enable_sleep_mode=True,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            enable_prefix_caching=True,
            dtype="bfloat16",
        )
        try:
            self.llm = LLM(**kwargs, logprobs_mode="processed_logprobs")
        except TypeError:  # older vLLM: raw log-probs (exact at temperature 1)
            self.llm = LLM(**kwargs)
        self.llm.sleep(level=1)
        self.weights_awake = False

    def sync_weights(self) -> None:
        self.llm.wake_up(tags=["weights"])
        self.weights_awake = True
        bucket_bytes = self.cfg.vllm_bucket_mb * 2**20

        def load(bucket):
            self.llm.apply_model(lambda model: model.load_weights(bucket))

        stream_weights(self.lm, load, bucket_bytes)
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[list[int]]) -> RolloutBatch:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not self.weights_awake:
            self.sync_weights()
        mine, everyone = _gather_prompts(prompts)
        self.llm.wake_up(tags=["kv_cache"])
        c = self.cfg
        params = SamplingParams(
            temperature=c.temperature,
            top_p=c.top_p,
            top_k=c.top_k or -1,
            max_tokens=c.max_new_tokens,
            logprobs=0,
            stop_token_ids=self.stop_ids,
        )
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in everyone], params, use_tqdm=False)
        self.llm.sleep(level=1)
        self.weights_awake = False
        outs = [outs[i] for i in mine]
        responses = [list(o.outputs[0].token_ids) for o in outs]
        logps = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
        return assemble(
            prompts,
            responses,
            logps,
            stop_ids=self.stop_ids,
            pad_id=self.pad_id,
            max_new_tokens=c.max_new_tokens,
            device=self.device,
        )


def _gather_prompts(prompts: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """All ranks' prompts in rank order, and the indices of this rank's own."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(range(len(prompts))), prompts
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, prompts)
    start = sum(len(p) for p in parts[: dist.get_rank()])
    return list(range(start, start + len(prompts))), [p for part in parts for p in part]
