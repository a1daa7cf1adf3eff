"""An exported Transformer-XL loaded as a deployment loads it, in a bare environment: run by the
check's export-infer part as ``python -I scripts/gpu_check_bare.py EXPORT_DIR --device D --json F``.

Bare: smoe, DeepSpeed and datasets cannot be imported. ``-I`` leaves out PYTHONPATH (where the
check installs DeepSpeed and datasets on the GPU machine, and links smoe); where they are installed
beside torch (a development machine), an entry of None in ``sys.modules`` makes every import of
them fail and ``find_spec`` report them absent, as if they were not installed. Then: the model on
the device and on the CPU in fp32, two segments (the second after the first's memory) at every k,
the largest difference relative to the logits' scale; one forward loaded in bf16 on the device."""

import argparse
import importlib.util
import json
import sys

BARE = ("smoe", "deepspeed", "datasets")


def two_segments(model, ids) -> list:
    first = model(input_ids=ids[:, 0])
    return [first.logits, model(input_ids=ids[:, 1], mems=first.mems).logits]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()

    blocked = [name for name in BARE if importlib.util.find_spec(name) is not None]
    for name in BARE:
        sys.modules[name] = None
    import torch
    import transformers

    def load(dtype=torch.float32):
        return transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, trust_remote_code=True,
                                                                 dtype=dtype).to(args.device).eval()

    cpu = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, trust_remote_code=True).eval()
    device = load()
    config = cpu.config
    ids = torch.randint(config.vocab_size, (2, 2, 32), generator=torch.Generator().manual_seed(0))
    differences = {}
    with torch.no_grad():
        for k in range(1, config.num_experts + 1):
            cpu.set_top_k(k)
            device.set_top_k(k)
            want = two_segments(cpu, ids)
            got = two_segments(device, ids.to(args.device))
            differences[k] = max(((g.cpu() - w).abs().max() / w.abs().max().clamp_min(1.0)).item()
                                 for g, w in zip(got, want))
        bf16_logits = two_segments(load(torch.bfloat16), ids.to(args.device))
    imported = sorted(name for name, module in sys.modules.items() if name.split(".")[0] in BARE and module is not None)
    report = {"class": type(device).__name__, "transformers": transformers.__version__, "blocked": list(BARE),
              "installed_beside_torch": blocked, "imported": imported, "device": str(device.device),
              "device_vs_cpu": differences, "bf16_finite": all(bool(t.isfinite().all()) for t in bf16_logits)}
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
