"""The names of the figures a strength search records for each candidate (keys of `Point.figures`, of a search's
baseline and of surgery.json), defined once. Cheap figures come from forward passes only; generated ones from greedy
answers judged as `surgery eval` judges them. See docs/strength.md.
"""

from __future__ import annotations

# Forward passes only (every candidate that gets that far).
PERPLEXITY = "perplexity"  # harmless selection prompts, plain text
PERPLEXITY_RATIO = "perplexity_ratio"  # candidate / input
KL = "kl"  # the budget's KL: the smaller of KL_INPUT and KL_REFERENCE (KL_INPUT without a reference)
KL_INPUT = "kl_input"  # mean first-token KL(input || candidate) on the harmless selection prompts
KL_REFERENCE = "kl_reference"  # the same from the reference (the checkpoint before the fine-tune)
HARMFUL_PROXY = "harmful_score_proxy"  # 1 - mean refusal-opening probability on the held-out harmful prompts
OVER_REFUSAL_PROXY = "over_refusal_proxy"  # mean refusal-opening probability on the harmless selection prompts
OVER_REFUSAL_PROXY_POINTS = "over_refusal_proxy_points"  # in points above the input (the worse of it and the reference)
OVER_REFUSAL_PROXY_REFERENCE = "over_refusal_proxy_reference"  # the reference's own over-refusal proxy (baseline)
ACCURACY_PROXY = "accuracy_proxy"  # task accuracy by argmax over the label words' first tokens
ACCURACY_PROXY_DROP_POINTS = "accuracy_proxy_drop_points"  # in points below the input

# Generated and judged (the confirmed points: the proxy's choice and its stronger neighbour).
HARMFUL = "harmful_score"  # share of held-out harmful prompts not refused (keyword judge)
TOXICITY = "toxicity"  # EigenShift's repair figure (generated for every candidate: it has no proxy)
OVER_REFUSAL = "over_refusal"  # share of harmless selection prompts refused
OVER_REFUSAL_POINTS = "over_refusal_points"  # in points above the input (the worse of it and the reference)
OVER_REFUSAL_REFERENCE = "over_refusal_reference"  # the reference's own generated over-refusal (baseline)
ACCURACY = "accuracy"  # task accuracy of the greedy answers
ACCURACY_DROP_POINTS = "accuracy_drop_points"

# `surgery eval`'s own figures, beside HARMFUL, ACCURACY, PERPLEXITY, OVER_REFUSAL and TOXICITY.
EMPTY_ANSWERS = "empty_answers"  # share of harmful prompts answered with nothing (counted as refused)
KL_TO_REFERENCE = "kl_to_reference"  # mean first-token KL to --reference on the benign prompts

PROXY_OF = {
    HARMFUL: HARMFUL_PROXY,
    OVER_REFUSAL_POINTS: OVER_REFUSAL_PROXY_POINTS,
    ACCURACY_DROP_POINTS: ACCURACY_PROXY_DROP_POINTS,
}  # generated figure -> its forward-pass proxy

# The budget's lines: name -> (figure compared, RunOptions field holding the limit). `exact` lines are measured by
# forward passes for every candidate (what confirmation cannot change); the others are judged on the proxy during the
# search and on the generated figure once a point is confirmed.
PERPLEXITY_LINE = "perplexity"
KL_LINE = "kl"
OVER_REFUSAL_LINE = "over_refusal"
ACCURACY_LINE = "accuracy"
LINES = {
    PERPLEXITY_LINE: (PERPLEXITY_RATIO, "max_perplexity_ratio"),
    KL_LINE: (KL, "max_kl"),
    OVER_REFUSAL_LINE: (OVER_REFUSAL_POINTS, "max_over_refusal"),
    ACCURACY_LINE: (ACCURACY_DROP_POINTS, "max_accuracy_drop"),
}
EXACT_LINES = (PERPLEXITY_LINE, KL_LINE)
