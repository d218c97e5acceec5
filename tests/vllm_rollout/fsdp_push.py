"""Run by test_fsdp_vllm.py under `torchrun --nproc-per-node 2` (gloo, CPU): the policy FSDP2-sharded over the two
ranks, one vLLM engine per rank inside the trainer's process group (external_launcher). Checks, on every rank: the
engine's greedy output equals HF generate on a plain replica of the full weights, before and after an FSDP2 update,
and the update changed it; the replica's weights come from torch's own full-state-dict gather (not ours). Prints one
JSON line per rank."""

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from fusealign.engine.distributed import init_distributed, run, shard
from fusealign.engine.models import model_from_config
from fusealign.engine.study import task

tied = sys.argv[1] == "tied"
tok = task.tokenizer()
EOS = tok.eos_token_id
info = init_distributed("cpu")
assert info.world_size == 2
torch.manual_seed(0)
model = model_from_config(task.model_config(tie_word_embeddings=tied), seed=0).eval()
with torch.no_grad():
    for n, p in model.named_parameters():
        if "norm" not in n:
            p.normal_(0.0, 0.35)
replica = copy.deepcopy(model)
policy = shard(model, info, bf16=False)

from fusealign.engine.rollout_vllm import VLLMGenerate  # noqa: E402

engine = VLLMGenerate(policy, tok, device=torch.device("cpu"), max_model_len=64, kv_cache_gib=1 / 16, info=info)
g = torch.Generator().manual_seed(10 + info.rank)  # each rank its own prompts
ps = [[tok.bos_token_id] + torch.randint(4, len(task.VOCAB), (5,), generator=g).tolist() for _ in range(4)]


@torch.no_grad()
def hf_greedy(m, max_new=12):
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=EOS, pad_token_id=tok.pad_token_id)
    out = []
    for p in ps:
        ids = torch.tensor([p])
        row = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)[0, len(p):].tolist()
        out.append(row[: row.index(EOS)] if EOS in row else row)
    return out


before = [o.ids for o in engine.greedy(ps, 12)]  # the push gathers every tensor: a collective on both ranks
ok_before = before == hf_greedy(replica)
opt = torch.optim.Adam(policy.parameters(), lr=3e-2)
target = torch.randint(4, len(task.VOCAB), (2, 24), generator=torch.Generator().manual_seed(2 + info.rank))
for _ in range(8):  # an FSDP2 update (each rank its own batch; gradients averaged by FSDP)
    opt.zero_grad()
    loss = run(policy, lambda m: m(input_ids=target, labels=target).loss)
    loss.backward()
    opt.step()
full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
replica.load_state_dict({k.removeprefix("inner."): v for k, v in full.items() if k.startswith("inner.")})
after = [o.ids for o in engine.greedy(ps, 12)]
print(json.dumps({"rank": info.rank, "tied": tied, "before_equal_hf": ok_before, "after_equal_hf": after ==
                  hf_greedy(replica), "changed": after != before, "push_s": engine.last_sync_s,
                  "start_s": engine.start_s}), flush=True)
dist.barrier()  # the run's last collective, then the engine (its shutdown destroys the default group)
engine.close()
if dist.is_initialized():
    dist.destroy_process_group()
