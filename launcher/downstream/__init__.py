"""After pre-training: `smoe upcycle` (`convert`), `slim`, `finetune` (with its :mod:`.tasks`), `distill` and
`report`."""
