"""Tiny configs of Mixture-of-Experts families, built in the test (no downloads), for the MoE parity tests.

Each is 4 layers deep, hidden 32, 8 experts with top-2 routing unless the family needs otherwise, with the router
aux loss on (`output_router_logits=True`, a non-zero coefficient) and dropout where the config has it.
"""

from __future__ import annotations

import torch
import transformers
from families import instantiate

VOCAB = 96
DROPOUT = 0.1
AUX = 0.3

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    attention_dropout=DROPOUT,
    num_experts_per_tok=2,
    output_router_logits=True,
    router_aux_loss_coef=AUX,
)
_QWEN = dict(_COMMON, num_experts=8, moe_intermediate_size=16, norm_topk_prob=True)

FAMILIES: dict[str, tuple[str, dict]] = {
    # router jitter (multiplicative noise on the input) draws random numbers: the recompute must replay them
    "mixtral": ("MixtralConfig", dict(_COMMON, intermediate_size=16, num_local_experts=8, router_jitter_noise=0.1)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_QWEN, head_dim=8)),
    "olmoe": ("OlmoeConfig", dict(_COMMON, intermediate_size=16, num_experts=8)),
    # dense first layer (first_k_dense_replace), a shared expert, sigmoid grouped routing (n_group / topk_group)
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            _COMMON,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            num_key_value_heads=4,
        ),
    ),
    # shared expert with its own gate; the last layer dense (mlp_only_layers): a stack that mixes dense and MoE
    "qwen2_moe": ("Qwen2MoeConfig", dict(_QWEN, shared_expert_intermediate_size=32, mlp_only_layers=[3])),
    # attention sinks, sliding/full alternation, biased experts with a clamped SwiGLU
    "gpt_oss": (
        "GptOssConfig",
        dict(
            _COMMON,
            intermediate_size=16,
            num_local_experts=8,
            head_dim=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        ),
    ),
    # sparsemixer routing samples (uniform noise) in training, plus input jitter
    "phimoe": (
        "PhimoeConfig",
        dict(_COMMON, intermediate_size=16, num_local_experts=8, router_jitter_noise=0.1, input_jitter_noise=0.1),
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        dict(
            _QWEN,
            head_dim=8,
            shared_expert_intermediate_size=16,
            linear_conv_kernel_dim=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        ),
    ),
    "jamba": (
        "JambaConfig",
        dict(
            _COMMON,
            intermediate_size=16,
            num_experts=8,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=0,
            use_mamba_kernels=False,
            mamba_d_state=4,
            mamba_dt_rank=4,
        ),
    ),
    "granitemoe": ("GraniteMoeConfig", dict(_COMMON, intermediate_size=16, num_local_experts=8)),
    "granitemoeshared": (
        "GraniteMoeSharedConfig",
        dict(_COMMON, intermediate_size=16, num_local_experts=8, shared_intermediate_size=16),
    ),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1Config",
        dict(_COMMON, intermediate_size=16, num_experts=8, moe_topk=2, head_dim=8, num_shared_expert=1),
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        dict(
            _COMMON,
            moe_intermediate_size=16,
            moe_num_experts=8,
            moe_k=2,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
        ),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(
            _COMMON,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=1,
            first_k_dense_replace=1,
            head_dim=8,
        ),
    ),
    "minimax": (
        "MiniMaxConfig",
        dict(
            _COMMON,
            intermediate_size=16,
            num_local_experts=8,
            head_dim=8,
            layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            _COMMON,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            num_key_value_heads=4,
        ),
    ),
    "dots1": (
        "Dots1Config",
        dict(_COMMON, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1),
    ),
    "flex_olmo": ("FlexOlmoConfig", dict(_COMMON, intermediate_size=16, num_experts=8)),
    "lfm2_moe": (
        "Lfm2MoeConfig",
        dict(
            _COMMON,
            moe_intermediate_size=16,
            num_experts=8,
            num_dense_layers=1,
            layer_types=["conv", "full_attention", "conv", "full_attention"],
        ),
    ),
    # experts kept as flat 2D weights (not stacked [num_experts, ...]): stream whole in both modes
    "dbrx": (
        "DbrxConfig",
        dict(
            vocab_size=VOCAB,
            d_model=32,
            n_heads=4,
            n_layers=4,
            max_seq_len=128,
            output_router_logits=True,
            router_aux_loss_coef=AUX,
            attn_config=dict(kv_n_heads=2, attn_pdrop=DROPOUT, clip_qkv=8.0, rope_theta=10000.0),
            ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2),
        ),
    ),
    "jetmoe": (
        "JetMoeConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=4,
            num_key_value_heads=2,
            kv_channels=8,
            intermediate_size=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=128,
            attention_dropout=DROPOUT,
            output_router_logits=True,
            aux_loss_coef=AUX,
        ),
    ),
}

# More families, from their default configs with the widths above wherever the config has the field.
_SMALL = dict(
    _COMMON,
    head_dim=8,
    moe_intermediate_size=16,
    num_experts=8,
    num_local_experts=8,
    n_routed_experts=8,
    moe_topk=2,
    shared_expert_intermediate_size=16,
    first_k_dense_replace=1,
    num_dense_layers=1,
    n_group=1,
    topk_group=1,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
    sliding_window=4,
)
_GENERIC = {
    "afmoe": {},
    "cohere2_moe": {},
    "exaone_moe": {},
    "minimax_m2": {},
    "solar_open": {},
    "mimo_v2_flash": {},
    "laguna": {},
    "hy_v3": {},
    "granitemoe_swa": {},
    "kolibri1": {},
    "mellum": {},
    "qwen3_5_moe_text": {},
    "flint": {},
    "glm4_moe_lite": dict(num_key_value_heads=4),
    "axk1": dict(num_key_value_heads=4),
    "llama4_text": {},  # its experts module computes every expert: streams whole
}


def _generic(model_type: str, overrides: dict) -> tuple[str, dict]:
    import dataclasses

    config_class = transformers.CONFIG_MAPPING[model_type]
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class.__name__, {k: v for k, v in {**_SMALL, **overrides}.items() if k in names}


FAMILIES.update({name: _generic(name, overrides) for name, overrides in _GENERIC.items()})

# LoRA targets all linear layers and the stacked expert tensors, but for modules that are not plain linear maps in
# these families (peft would wrap them, but their forward returns a tuple or is unused on the CPU path).
LORA_EXCLUDE = {"phimoe": ["router"], "jamba": ["dt_proj"], "llama4_text": ["router"]}

# Families that balance experts without an aux loss (bias-corrected routing): they have no router logits to record.
NO_AUX_LOSS = {
    "deepseek_v3",
    "deepseek_v2",
    "hunyuan_v1_moe",
    "glm4_moe",
    "dots1",
    "lfm2_moe",
    "afmoe",
    "cohere2_moe",
    "exaone_moe",
    "solar_open",
    "mimo_v2_flash",
    "hy_v3",
    "kolibri1",
    "glm4_moe_lite",
    "axk1",
    "llama4_text",
}

# Families whose experts modules hf_offload routes; the rest stream whole (see the warning in the runtime).
ROUTED = [f for f in FAMILIES if f not in ("dbrx", "jetmoe", "llama4_text")]
# Tried on every run; the rest under `-m slow` (the suite stays fast on 2 cores).
CORE = ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "qwen2_moe", "gpt_oss", "phimoe"]


def build(family: str, seed: int = 0):
    """A randomly initialised fp32 MoE causal LM of `family` (same weights for the same seed)."""
    return instantiate(*FAMILIES[family], seed=seed)


EXPERT_TENSORS = ["gate_up_proj", "down_proj"]


def with_expert_lora(model, family: str | None = None):
    """LoRA on every linear layer and on the stacked expert tensors (peft `target_parameters`).

    peft's ParamWrapper refuses LoRA dropout, so adapters have none; the models keep their own dropout.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(123)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules="all-linear",
        target_parameters=EXPERT_TENSORS,
        exclude_modules=LORA_EXCLUDE.get(family),
        init_lora_weights=False,  # B non-zero: every adapter gets a gradient
    )
    return get_peft_model(model, config)


def many_experts_model():
    """qwen3_moe with 64 experts, top-2: most experts unrouted by a small batch."""
    config_class, kwargs = FAMILIES["qwen3_moe"]
    return instantiate(config_class, dict(kwargs, num_experts=64, num_experts_per_tok=2))


def record_expert_copies(streamer) -> list[tuple[int, int, tuple[int, ...]]]:
    """From now on, every routed expert copy of `streamer` as (layer, first slot position, experts)."""
    copies = []
    original = streamer._copy_experts

    def copy_experts(pack, slot, region, experts, start):
        copies.append((pack.index, start, tuple(experts)))
        original(pack, slot, region, experts, start)

    streamer._copy_experts = copy_experts
    return copies
