"""One training/evaluation loop shared by every stage; stages differ in a step function.

No Ray here: the loop runs the same in a test, in a Ray Train worker and in a benchmark.
"""
