"""The benchmarks time the model's own GPU, not the current one: `smoe bench infer` and `smoe slice`
synchronize the model's device, `smoe bench layer` and scripts/gpu_bench.py record their CUDA events on that device's
stream. A model on cuda:1 while cuda:0 is current needs two GPUs to run, so the CUDA calls are
replaced by recorders here: what is checked is which device each call names."""

import torch

from smoe.launcher.bench import infer, layer

SECOND_GPU = torch.device("cuda", 1)


def test_bench_infer_synchronizes_the_models_device(monkeypatch):
    synchronized = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synchronized.append(device))
    infer.median_seconds(lambda: None, SECOND_GPU, repeats=2)
    assert synchronized == [SECOND_GPU] * 4  # before and after each timed forward


def test_bench_layer_records_its_events_on_the_stream_of_the_tensors_device(monkeypatch):
    recorded = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self, stream=None):
            recorded.append(stream)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"the current stream of {device}")
    layer.moment(SECOND_GPU)
    assert recorded == ["the current stream of cuda:1"]
    assert isinstance(layer.moment(torch.device("cpu")), float)  # the CPU is timed by the host clock
