"""Rollouts on vLLM (`--rollout vllm`): one `vllm.LLM` in this process, colocated with the trainer (TRL's colocate
mode), taking `SamplingParams` and returning `Completion`s exactly as `HFGenerate` does.

The engine
  - runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): engine core and worker are plain objects here, so a
    weight push is a call with live tensors — nothing pickled, nothing written. With several ranks (torchrun,
    FSDP2) every rank holds its own engine on its own device, joined to the trainer's process group
    (`distributed_executor_backend="external_launcher"`, TRL's colocate setting), and samples its own prompts.
  - starts from a folder holding only the policy's config and tokenizer (`load_format="dummy"`: random weights),
    then takes the policy's weights from memory before its first rollout: no checkpoint is ever written.
  - samples from exactly the distribution the fused scorer computes. vLLM's `SamplingParams` from ours (temperature,
    top_p, top_k, max_tokens, n) with every other field neutral; stop at the tokenizer's EOS only — `stop_token_ids`,
    and a `generation_config` folder written from our flags (vLLM adds the eos ids of any generation config it reads
    to the stop tokens, even with generation_config="vllm"); `logprobs_mode="processed_logprobs"`: the log-prob of
    each sampled token under the distribution it was drawn from (z/T, then top-k, top-p), what the scorer's
    `sampling_logp_difference` compares (the default, raw_logprobs, ignores even the temperature).
  - seeds: one per prompt drawn from `params.seed` (vLLM gives a prompt's n samples seed + 0 … n − 1), so a rerun
    samples the same tokens, and a prompt's samples do not depend on the rest of the batch.

Weight push (`sync_weights`, before every rollout — every rollout follows a policy update, or is the first): the
policy's `state_dict()` items streamed through the worker's `reload_weights(weights_iterator=…,
is_checkpoint_format=True)`, whose layer-wise reload re-runs vLLM's post-load processing (fused qkv / gate-up,
padded vocabulary, CPU weight repacking). `state_dict()`, not `named_parameters()`: a tied head appears in the latter
only as the embedding, and vLLM's CPU backend keeps a packed copy of the LM head that only a reload of
`lm_head.weight` refreshes (the head would stay stale). Then `reset_prefix_cache()`: prompt blocks cached under the
old weights would be reused. FSDP2: every rank gathers each tensor (`DTensor.full_tensor()`, a collective, in the
same state-dict order on every rank) and pushes the full tensor into its own engine: full weights per rank, one
tensor at a time (the peak extra memory is the largest tensor, not the model).

Hazards of an in-process engine for the trainer around it, all handled here (`_Guard`):
  - vLLM's CPU worker replaces `torch.set_num_threads` process-wide with a no-op (and may change the thread count):
    the real function and the count are put back after the engine starts (`--threads` and every later call work).
  - `LLM(seed=…)` re-seeds torch, numpy and `random`; every `generate` draws from torch's global generator: the
    engine's creation and every call run with those generators saved and restored (`fork_rng`), so the trainer's
    random stream does not depend on the rollout engine.
  - environment variables vLLM sets (LD_PRELOAD, LD_LIBRARY_PATH, TORCHINDUCTOR_*, NUMEXPR_MAX_THREADS, …, inherited
    by any subprocess) are restored after the engine starts; its own VLLM_* stay.
  - in one process vLLM creates torch.distributed's default group (world 1) and destroys it at shutdown:
    `distributed.mark_foreign_world` records it, so that fusealign's `init_distributed` never takes it for a run of
    its own and `shutdown` leaves it to vLLM. Under torchrun the group is the trainer's; vLLM joins it and its
    shutdown destroys it — so `close()` must come after the run's last collective (the recipes close at the end).
  - usage statistics off (VLLM_NO_USAGE_STATS / VLLM_DO_NOT_TRACK: no thread posting to vLLM's server), no hub
    access (the model folder is local), vLLM's log at ERROR (VLLM_LOGGING_LEVEL; set yours to see more).
  - sleep mode does not exist on CPU (`--vllm-enable-sleep-mode` is refused there, one line); vLLM's CPU attention
    supports head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256 and 512 only (checked before the engine starts).
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import shutil
import tempfile
import time
import warnings
import weakref
from pathlib import Path
from typing import List, Optional

for _k, _v in (("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("VLLM_NO_USAGE_STATS", "1"), ("VLLM_DO_NOT_TRACK", "1"),
               ("VLLM_LOGGING_LEVEL", "ERROR")):
    os.environ.setdefault(_k, _v)  # read by vLLM at import and engine start: before `import vllm`
if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
    raise ImportError("fusealign's vLLM rollouts run the engine in the trainer's process: unset "
                      "VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# vLLM's Triton-kernel scan touches the deprecated torch.distributed.reduce_op in every module namespace.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
_env_before_import = dict(os.environ)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from vllm import LLM  # noqa: E402
    from vllm import SamplingParams as VLLMSamplingParams  # noqa: E402
    from vllm.inputs import TokensPrompt  # noqa: E402

from .distributed import DistInfo, mark_foreign_world, unwrap  # noqa: E402
from .errors import UserError  # noqa: E402
from .rollout import check_sleep_mode  # noqa: E402
from .sampling import Completion, SamplingParams  # noqa: E402

CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.32's CPU attention (CPU_ATTN)
CPU_KV_CACHE_GIB = 0.25


def _restore_env(before: dict) -> None:
    """Put back every variable vLLM added or changed, except its own VLLM_*."""
    for k in [k for k in os.environ if k not in before and not k.startswith("VLLM_")]:
        del os.environ[k]
    for k, v in before.items():
        if os.environ.get(k) != v and not k.startswith("VLLM_"):
            os.environ[k] = v


_restore_env(_env_before_import)


class _Guard:
    """Around vLLM's engine start and every call into it: the trainer's RNG streams, thread count and
    `torch.set_num_threads` as they were before (module docstring)."""

    def __init__(self, device: torch.device):
        self.devices = [device] if device.type == "cuda" else []

    @contextlib.contextmanager
    def __call__(self, *, env: bool = False):
        set_threads, threads = torch.set_num_threads, torch.get_num_threads()
        py, np_state = random.getstate(), np.random.get_state()
        env_before = dict(os.environ) if env else None
        try:
            with torch.random.fork_rng(devices=self.devices):
                yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)
            torch.set_num_threads = set_threads
            if torch.get_num_threads() != threads:
                set_threads(threads)
            if env_before is not None:
                _restore_env(env_before)


def _head_dim(config) -> int:
    config = getattr(config, "text_config", None) or config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _engine_dir(model, tok, root: Path) -> tuple:
    """(model folder: config + tokenizer, no weights; generation-config folder from our flags alone)."""
    from transformers import GenerationConfig

    model_dir, gen_dir = root / "model", root / "generation_config"
    config = unwrap(model).config
    config.save_pretrained(model_dir)  # vLLM builds the architecture from it; weights come from memory
    tok.save_pretrained(model_dir)
    # the checkpoint's generation_config.json (extra eos ids, repetition penalty, …) must not reach the sampler
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(gen_dir)
    return model_dir, gen_dir


def full_state_dict_items(model):
    """(name, full tensor) of the policy's state dict, in HF checkpoint names, one at a time. FSDP2-sharded tensors
    are gathered (`full_tensor()`: a collective, every rank in the same order). Tied heads: both names (see the module
    docstring)."""
    for name, t in unwrap(model).state_dict().items():
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        yield name, t.detach()


class VLLMGenerate:
    """A colocated `vllm.LLM` whose weights follow `model` (the policy, FSDP2-wrapped or not).

    `sample(prompts, params)` pushes the policy's current weights, then samples: prompts are token ids (with bos);
    returns len(prompts) · params.n `Completion`s, the n of a prompt consecutive, each with vLLM's own log-probs of
    its tokens (EOS included) under the distribution it sampled from. `greedy(prompts, max_new_tokens)` is the
    argmax continuation (log-probs of softmax(z), T not applied), for tests and benchmarks.
    """

    def __init__(self, model, tok, *, device: torch.device, max_model_len: int, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.3, kv_cache_gib: float = 0.0, enable_sleep_mode: bool = False,
                 seed: int = 0, info: DistInfo = DistInfo(), bf16: bool = True, block_size: Optional[int] = None,
                 max_num_seqs: int = 256):
        self.model, self.tok, self.info = model, tok, info
        self.device = torch.device(device)
        cpu = self.device.type == "cpu"
        config = unwrap(model).config
        check_sleep_mode(enable_sleep_mode, self.device)
        if cpu and _head_dim(config) not in CPU_HEAD_SIZES:
            raise UserError(f"--rollout vllm on CPU: the model's head_dim is {_head_dim(config)}, and vLLM's CPU "
                            f"attention runs head sizes {', '.join(map(str, CPU_HEAD_SIZES))} only; use --rollout hf")
        limit = getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None)
        if limit is not None and max_model_len > limit:
            raise UserError(f"--vllm-max-model-len {max_model_len}: the model has max_position_embeddings {limit}; "
                            f"lower it (or --max-length)")
        if dtype == "auto":
            dtype = "bfloat16" if (self.device.type == "cuda" and bf16) else "float32"
        self.max_model_len, self.dtype, self.sleep = max_model_len, dtype, enable_sleep_mode
        self.guard = _Guard(self.device)
        self._tmp = Path(tempfile.mkdtemp(prefix="fusealign-vllm-"))
        weakref.finalize(self, shutil.rmtree, str(self._tmp), True)  # the config folder goes with the engine
        model_dir, gen_dir = _engine_dir(model, tok, self._tmp)
        kv = kv_cache_gib or (CPU_KV_CACHE_GIB if cpu else 0.0)
        kw = dict(kv_cache_memory_bytes=int(kv * 2**30)) if kv else {}
        if block_size is not None:
            kw["block_size"] = block_size  # CPU's default 128: a prompt shorter than that never hits the cache
        if info.active:  # every rank its own engine inside the trainer's process group (TRL's colocate setting)
            kw["distributed_executor_backend"] = "external_launcher"
        had_world = dist.is_available() and dist.is_initialized()
        t0 = time.perf_counter()
        with self.guard(env=True):
            self.llm = LLM(model=str(model_dir), load_format="dummy", dtype=dtype, seed=seed,
                           max_model_len=max_model_len, max_num_batched_tokens=max(2048, max_model_len),
                           max_num_seqs=max_num_seqs, gpu_memory_utilization=gpu_memory_utilization,
                           enforce_eager=cpu,  # no torch.compile on CPU (minutes); CUDA graphs on GPU
                           enable_sleep_mode=enable_sleep_mode, generation_config=str(gen_dir),
                           logprobs_mode="processed_logprobs", enable_prefix_caching=True,
                           use_tqdm_on_load=False, **kw)
            if enable_sleep_mode:  # TRL: weights and KV cache freed until the first rollout
                self.llm.sleep(level=2)
        if not had_world and dist.is_available() and dist.is_initialized():
            mark_foreign_world()  # vLLM's own world-1 group: not the trainer's
        self.start_s = time.perf_counter() - t0
        self.last_sync_s = 0.0
        self.pushes = 0

    @classmethod
    def from_config(cls, cfg, model, tok, info: DistInfo = DistInfo(), *, seed: int = 0) -> "VLLMGenerate":
        """From a run's RolloutConfig fields (`--vllm-*`) and its --max-length / --device / --bf16."""
        from .runtime import resolve_device

        config = unwrap(model).config
        limit = getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None) or 1 << 30
        max_len = cfg.vllm_max_model_len or min(cfg.max_length, limit)
        return cls(model, tok, device=resolve_device(cfg.device), max_model_len=max_len, dtype=cfg.vllm_dtype,
                   gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, kv_cache_gib=cfg.vllm_kv_cache_gib,
                   enable_sleep_mode=cfg.vllm_enable_sleep_mode, seed=seed, info=info,
                   bf16=getattr(cfg, "bf16", True))

    # --- weights ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sync_weights(self) -> float:
        """Push the policy's current weights into the engine, in memory; reset its prefix cache. Seconds taken."""
        t0 = time.perf_counter()
        if self.sleep:
            self.llm.wake_up(tags=["weights"])
        with self.guard():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": full_state_dict_items(self.model),
                                                              "is_checkpoint_format": True})
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("vLLM refused to reset its prefix cache after a weight push (a request still "
                                   "running?): the next rollout could reuse prompts cached under the old weights")
        self.pushes += 1
        self.last_sync_s = time.perf_counter() - t0
        return self.last_sync_s

    # --- sampling ---------------------------------------------------------------------------------------------------
    def _check_lengths(self, prompts, max_new_tokens: int) -> None:
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_model_len:
            raise UserError(f"--rollout vllm: a prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the "
                            f"engine's --vllm-max-model-len {self.max_model_len}; raise it (or shorten the prompts)")

    def _generate(self, prompts, sampling_params) -> list:
        if self.sleep:
            self.llm.wake_up(tags=["kv_cache"])
        with self.guard():
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sampling_params,
                                     use_tqdm=False)
        if self.sleep:
            self.llm.sleep(level=2)  # weights go too: the next rollout pushes them again
        return outs

    def _completions(self, outs) -> List[Completion]:
        eos, out = self.tok.eos_token_id, []
        for request in outs:  # one per prompt, in prompt order
            for c in sorted(request.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = torch.tensor([lp[t].logprob for t, lp in zip(ids, c.logprobs)], dtype=torch.float32)
                ended = bool(ids) and ids[-1] == eos
                out.append(Completion(ids[:-1] if ended else ids, ended, lps))
        return out

    def _params(self, **kw):
        """vLLM SamplingParams with every field that shapes the distribution neutral but ours; EOS the only stop."""
        return VLLMSamplingParams(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, min_p=0.0,
                                  min_tokens=0, stop_token_ids=[self.tok.eos_token_id], ignore_eos=False, logprobs=0,
                                  detokenize=False, **kw)

    def sample(self, prompts: List[List[int]], params: SamplingParams) -> List[Completion]:
        self._check_lengths(prompts, params.max_new_tokens)
        self.sync_weights()
        g = torch.Generator().manual_seed(params.seed)
        seeds = torch.randint(0, 2**62, (len(prompts),), generator=g).tolist()  # children: seed + 0 … n − 1
        sps = [self._params(n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                            max_tokens=params.max_new_tokens, seed=s) for s in seeds]
        return self._completions(self._generate(prompts, sps))

    def greedy(self, prompts: List[List[int]], max_new_tokens: int, *, sync: bool = True) -> List[Completion]:
        self._check_lengths(prompts, max_new_tokens)
        if sync:
            self.sync_weights()
        return self._completions(self._generate(prompts, self._params(temperature=0.0, max_tokens=max_new_tokens)))

    def close(self) -> None:
        """Shut the engine down (under torchrun: after the run's last collective — it destroys the default group)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            with self.guard():
                del llm
                gc.collect()
        shutil.rmtree(self._tmp, ignore_errors=True)

