"""The benchmarks' DeepSeek-V3 (8.5M parameters with a 4,096-word vocabulary): hidden 256, 4 layers
(the first dense), 8 heads, 16 routed experts top-4 in 4 groups + 1 shared, q_lora 128, kv_lora 64."""


def hf_config(**overrides):
    """A transformers `DeepseekV3Config` of the benchmark model; keyword arguments override fields."""
    from transformers import DeepseekV3Config

    base = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8,
                n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                max_position_embeddings=1024, tie_word_embeddings=False)
    return DeepseekV3Config(**{**base, **overrides})
