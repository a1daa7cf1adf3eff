"""After pre-training: `smoe convert`, `slim`, `finetune` (with its :mod:`.tasks`), `distill` and
`report`."""
