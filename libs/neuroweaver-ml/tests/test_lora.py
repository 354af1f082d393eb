import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel

from neuroweaver_ml.lora import find_lora_target_modules

LLAMA_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_llama_targets_are_all_projections(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert find_lora_target_modules(model) == LLAMA_TARGETS


def test_gpt2_conv1d_targets_exclude_head():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=64))
    assert find_lora_target_modules(model) == ["c_attn", "c_fc", "c_proj"]


def test_untied_lm_head_is_excluded(tiny_model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.model.layers[0].mlp.extra_head = torch.nn.Linear(32, 32)  # any new Linear inside a block counts
    targets = find_lora_target_modules(model)
    assert "lm_head" not in targets and "embed_tokens" not in targets and "extra_head" in targets


def test_4bit_targets(tiny_model_dir):
    import bitsandbytes as bnb

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=q, device_map={"": "cpu"})
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert find_lora_target_modules(model) == LLAMA_TARGETS
