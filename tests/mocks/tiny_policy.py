"""A tiny policy configuration for tests: the real architecture at a size that builds and runs in milliseconds."""

from fleet.policy.backbone import PolicyConfig

TINY = PolicyConfig(
    d_model=32,
    n_layers=1,
    n_heads=2,
    mlp_ratio=2,
    patch_size=16,
    max_instr_len=8,
    n_bins=16,
    head_layers=1,
    head_heads=2,
    head_mlp_ratio=2,
    n_euler=2,
    flow_train_noise=1,
)
