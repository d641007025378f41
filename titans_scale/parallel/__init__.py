"""Tensor, sequence and data parallelism for Titans models, applied to the plain model from outside.

- ``groups``: process groups (TP x SP x DP) from megatron-core's ``parallel_state`` (SP = its context-
  parallel group): ``init_parallel(tp, sp)``, ``current_groups()``.
- ``tensor``: Megatron-style tensor parallelism (heads split, memories owned per head) and Megatron
  sequence parallelism between the TP regions.
- ``sequence``, ``relay``, ``all_to_all``: sequence parallelism with the memory chunks of one sequence
  split across ranks (relay wavefront, or head-parallel all-to-all).
- ``parallelize(model, parallel_cfg, groups)``: all of it, in place; ``full_parameters`` gathers back.
- ``checks``: one-line errors for layouts that cannot work; ``cpu_compat``: megatron-core on a CPU.
- ``spawn``: run a function on N local gloo processes (tests, benchmarks).

See docs/parallel.md.
"""

from .checks import check_model, check_sequence, check_zero_stage, validate_parallel
from .groups import ParallelGroups, current_groups, init_parallel
from .parallelize import ParallelPlan, full_parameters, parallelize

__all__ = [
    "ParallelGroups",
    "ParallelPlan",
    "check_model",
    "check_sequence",
    "check_zero_stage",
    "current_groups",
    "full_parameters",
    "init_parallel",
    "parallelize",
    "validate_parallel",
]
