"""Stage 4, evaluate: an endpoint and held-out tokenized pairs in; eval.json, per-pair rows and eval.md out.

scorer.py   log-probs of chosen vs rejected through the OpenAI API, per model
stats.py    paired comparisons: McNemar's exact test, bootstrap confidence intervals
render.py   eval.md, margins.png, samples.md and the console table
"""
