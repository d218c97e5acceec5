"""The Hugging Face model families the engine and `fa.patch_model` support, as tiny random models from configs."""

import torch
import transformers

from fusealign.head import head_of

V, H = 97, 32
COMMON = dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": ("LlamaConfig", COMMON),
    "qwen2": ("Qwen2Config", COMMON),
    "qwen3": ("Qwen3Config", {**COMMON, "head_dim": 8}),
    "mistral": ("MistralConfig", COMMON),
    "gemma2-softcap": ("Gemma2Config", {**COMMON, "head_dim": 8, "final_logit_softcapping": 2.0}),
    "gemma3-softcap": ("Gemma3TextConfig", {**COMMON, "head_dim": 8, "final_logit_softcapping": 3.0}),
    "gpt2-tied": ("GPT2Config", dict(vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=64)),
    "phi-bias-generic": ("PhiConfig", COMMON),  # no special case: get_decoder/get_output_embeddings, head bias
    "cohere-logit-scale": ("CohereConfig", {**COMMON, "logit_scale": 0.5}),
    # A vision-language model: the text config is nested, the backbone (base_model) also takes images. No softcap:
    # transformers 5.24's Gemma3ForConditionalGeneration ignores a text config's final_logit_softcapping (real
    # Gemma 3 configs have none), while head_of would apply it, as TRL's add_fused_lm_head does.
    "gemma3-vlm-nested": ("Gemma3Config", dict(
        text_config=transformers.Gemma3TextConfig(**COMMON, head_dim=8, final_logit_softcapping=None),
        vision_config=transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                      num_attention_heads=2, image_size=16, patch_size=8),
        mm_tokens_per_image=4)),
}


def build(family):
    cls_name, kw = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(0)
    if family == "gemma3-vlm-nested":
        model = transformers.Gemma3ForConditionalGeneration(cfg).float().eval()
    else:  # eval(): no dropout, two runs are compared
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if family == "gemma3-softcap":  # from_config may map a text config to the causal LM; make the head non-trivial
        assert head_of(model).softcap == 3.0
    return model


