"""ΔH — the realised entropy change of a step, on an evaluation batch (spec §6, ``shared/spec/ESTIMATORS.md``).

Target: ΔH = H(θ⁺) − H(θ), θ⁺ the step built from the update batch U, H the mean sequence entropy over the prompt
distribution. It is estimated on an **evaluation batch E** drawn independently of U (other prompt draws from the same
pool, fresh responses from π_θ). On U itself the importance weights are inflated exactly where the step moved: the
in-sample estimate carries the same-sample term that δH₁'s U-statistic removes (to first order it is the plug-in
−X̄·Δθ), several times the effect itself on an exactly enumerable policy. ``snis_delta_h(..., in_sample=True)``
labels such a number as the biased diagnostic it is.

**One S path.** S(θ) and S(θ⁺) are computed by the same teacher-forced code (``Policy.sequence_logprobs``: same
chunks, dtype and τ), so a zero step gives exactly ΔĤ = 0 in every dtype. The log-probabilities a sampler recorded
(``batch.logprobs``: KV cache, another precision or engine) are never an input: :func:`check_recorded_logprobs`
reports their largest difference from the teacher-forced S and warns (:class:`LogprobMismatchWarning`) above
``RECORDED_LOGPROB_TOLERANCE``·√layers·eps(dtype)·(T + |S|) per sequence — rounding of two paths in the model's dtype
grows with the number of tokens, the size of S and (as a random walk) the depth of the model; a larger gap means the two paths do not compute the same π (another
template, tokenizer, τ or model).

Two estimators of H(θ⁺) − H(θ) on E (N = B·G sequences):

* **Importance sampling** (:func:`snis_delta_h`; :mod:`.importance`, its weight diagnostics :mod:`.diagnostics`).
* **Common random numbers** (:func:`crn_delta_h`; :mod:`.crn`).

Public API: :func:`snis_delta_h` → :class:`SNISResult`; :func:`crn_delta_h` → :class:`CRNResult` (from two draws
already made: :func:`crn_from_draws`); :func:`entropy`
→ :class:`EntropyResult`; the pure parts :func:`importance_weighted_delta_h` → :class:`WeightedEstimate`,
:func:`weight_diagnostics` → :class:`WeightDiagnostics` and :func:`check_recorded_logprobs` → :class:`LogprobCheck`.
Nothing here modifies its inputs; there is no optimizer step and no undo.

Modules, lower ones never importing upper ones: ``_common`` (shared checks and helpers), ``diagnostics`` (Kish ESS,
PSIS k̂), ``recorded`` (the recorded-S check), ``passes`` (the teacher-forced passes at θ, :class:`Before`),
``importance`` (importance sampling), ``crn`` (common random numbers), ``entropy_estimate`` (Ĥ(θ)).
"""

from .crn import CRN_MAX_TOP_SHARE, CRN_MIN_CHANGED, INTEGRANDS, CRNResult, crn_delta_h, crn_from_draws, integrand_values
from .diagnostics import (KHAT_MIN_LOG_WEIGHT_RANGE, KHAT_MIN_MAX_RATIO, MIN_ESS_FRACTION, PSIS_MIN_SAMPLES, WeightDiagnostics,
                          weight_diagnostics)
from .entropy_estimate import EntropyResult, entropy
from .importance import (ESTIMATORS, NORMALIZATIONS, SNISResult, WeightedEstimate, check_snis_options,
                         default_estimator, default_normalize, importance_weighted_delta_h, snis_delta_h,
                         NORMALIZATION_LABELS)
from .passes import Before, sharded_pass, values_before
from .recorded import RECORDED_LOGPROB_TOLERANCE, LogprobCheck, LogprobMismatchWarning, check_recorded_logprobs

__all__ = [
    "MIN_ESS_FRACTION",
    "PSIS_MIN_SAMPLES",
    "KHAT_MIN_LOG_WEIGHT_RANGE",
    "KHAT_MIN_MAX_RATIO",
    "RECORDED_LOGPROB_TOLERANCE",
    "NORMALIZATIONS",
    "ESTIMATORS",
    "INTEGRANDS",
    "CRN_MIN_CHANGED",
    "CRN_MAX_TOP_SHARE",
    "WeightedEstimate",
    "importance_weighted_delta_h",
    "WeightDiagnostics",
    "weight_diagnostics",
    "LogprobCheck",
    "LogprobMismatchWarning",
    "check_recorded_logprobs",
    "check_snis_options",
    "default_estimator",
    "default_normalize",
    "NORMALIZATION_LABELS",
    "Before",
    "values_before",
    "integrand_values",
    "sharded_pass",
    "SNISResult",
    "snis_delta_h",
    "CRNResult",
    "crn_delta_h",
    "crn_from_draws",
    "EntropyResult",
    "entropy",
]
