"""Evaluation: losses, FLOPs and active parameters (:mod:`.metrics`), the sweep by k and its
plot (:mod:`.sweep`), and `smoe eval` (:mod:`.run`)."""
