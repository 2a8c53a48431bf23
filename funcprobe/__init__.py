"""funcprobe: predicted (δH₁) and realised (ΔH) entropy change of one AdamW step on a LoRA policy.

The math is fixed in the project's spec (ESTIMATORS.md); every function here is pure over params dicts and batches.
"""

from .batch import RolloutBatch, SequenceChunk
from .policy import Policy, load_policy

__all__ = ["Policy", "load_policy", "RolloutBatch", "SequenceChunk"]
__version__ = "0.1.0"
