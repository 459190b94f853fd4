"""The training engine, shared by every stage: the fit loop (``fit.py``: epochs, resume,
validation, early stopping, best and final models, the metrics log), the step loop
(``loop.py``), checkpoints, optimisers and schedules, the EMA of weights. A stage differs from
another in its method (``drray.methods``) and its config section.

No Ray here: the loop runs the same in a test, in a Ray Train worker and in a benchmark.
"""
