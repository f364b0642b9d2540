"""Tensor and expert parallelism over torch.distributed (one process per rank, launched by torchrun).

mesh      the layout (which slice each rank holds) and the collectives that join slices
moe       routed experts across ranks: sync-free all-reduce combine, all_to_all dispatch/combine
sharding  layout checks against a model config, and the loader's per-rank slicer
launch    process-group setup from torchrun's environment
memory    the planner behind `dsv3-run plan`
"""
