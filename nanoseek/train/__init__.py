"""Training stages, each an explicit loop: pretrain, sft, grpo, distill (+ sample, evaluate, r1_zero)."""
