"""Tensor and expert parallelism over torch.distributed (one process per rank, launched by torchrun).

mesh      the collectives over process groups (the layout itself: dsv3.core.layout.Mesh)
moe       routed experts across ranks: sync-free all-reduce combine, all_to_all dispatch/combine
sharding  layout checks against a model config, and the loader's per-rank slicer
launch    process-group setup from torchrun's environment
memory    the planner behind `dsv3-run plan`
"""
