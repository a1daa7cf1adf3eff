import os

# DeepSpeed picks its accelerator at import time; tests run on CPU ranks joined by gloo.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
