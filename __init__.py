"""smoe: SMoE-Dropout transformers on DeepSpeed expert parallelism.

The repository root is this package; its folders are the subpackages:
``smoe.routing`` (routers, top-k schedules), ``smoe.model`` (experts, the MoE layer,
dense baselines), ``smoe.data`` and ``smoe.launcher`` (the ``smoe`` command).
"""

__version__ = "0.1.0"
