"""Healing: full-parameter distillation of the pruned model from the original (distill.py). Pure torch: the
Ray Train layer (searchllm.cluster.train) runs `distill.train` on each worker; tests and benchmarks run it
in-process."""
