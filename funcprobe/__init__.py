"""funcprobe: predicted (δH₁) and realised (ΔH) entropy change of one AdamW step on a LoRA policy.

The math is fixed in the project's spec (ESTIMATORS.md); every function here is pure over params dicts and batches.
"""

from ._version import __version__
from .adam import AdamState, adamw_update, update_decomposition
from .attribution import AttributionResult, attribute
from .batch import RolloutBatch, SequenceChunk
from .checkpoints import Checkpoint, load_adam_state, load_checkpoint
from .delta_h1 import DeltaH1Result, delta_h1
from .heldout import HeldoutResult, PairedDifference, delta_h1_heldout, paired_difference
from .memory import MemoryPlan, plan_memory
from .objective import Objective, compute_advantages
from .policy import Policy, load_policy
from .probe import Probe
from .realised import CRNResult, EntropyResult, SNISResult, crn_delta_h, entropy, snis_delta_h
from .sampling import DrawSpec, SampledBatch, draw_responses, redraw, sample_batch
from .sweep import LRSweepResult, lr_sweep
from .trajectory import CheckpointEntropy, EntropyChange, Trajectory, trajectory
from .trajectory_plot import plot_trajectory
from .update import apply_step, policy_gradient, rl_update, update_direction

__all__ = ["Policy", "load_policy", "RolloutBatch", "SequenceChunk", "AdamState", "adamw_update",
           "load_adam_state", "update_decomposition", "rl_update", "update_direction", "apply_step",
           "policy_gradient", "delta_h1", "DeltaH1Result", "snis_delta_h", "SNISResult", "crn_delta_h", "CRNResult",
           "entropy", "EntropyResult", "lr_sweep", "LRSweepResult", "Probe", "load_checkpoint", "Checkpoint",
           "sample_batch", "SampledBatch", "draw_responses", "redraw", "DrawSpec", "plan_memory", "MemoryPlan",
           "Objective", "compute_advantages", "attribute", "AttributionResult", "delta_h1_heldout", "HeldoutResult",
           "paired_difference", "PairedDifference", "trajectory", "Trajectory", "CheckpointEntropy", "EntropyChange",
           "plot_trajectory"]
