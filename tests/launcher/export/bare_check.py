"""Run by the bare environment's python (torch, transformers and safetensors only): load each
exported directory as a deployment would and compare its logits at every k with what smoe gave.

argv: a JSON file of cases {"dir", "auto_class", "expected", "segments"}; prints one JSON line of results."""

import importlib.util
import json
import sys

import torch
import transformers


def logits(model, inputs: dict, segments: bool) -> torch.Tensor:
    if not segments:
        return model(**inputs).logits
    mems, out = None, []
    for segment in inputs["input_ids"].unbind(1):  # two segments, the second after the first's memory
        step = model(input_ids=segment, mems=mems)
        mems = step.mems
        out.append(step.logits)
    return torch.cat(out, dim=1)


def check(case: dict) -> dict:
    expected = torch.load(case["expected"])
    inputs, by_k = expected["inputs"], expected["logits"]
    auto_class = getattr(transformers, case["auto_class"])
    first = min(by_k)
    model = auto_class.from_pretrained(case["dir"], trust_remote_code=True, num_experts_per_tok=first).eval()
    result = {"loaded_k": model.config.num_experts_per_tok, "class": type(model).__name__, "differences": {}}
    with torch.no_grad():
        for k, want in sorted(by_k.items()):
            model.set_top_k(k)
            got = logits(model, inputs, case["segments"])
            result["differences"][k] = ((got - want).abs().max() / want.abs().max().clamp_min(1.0)).item()
    try:
        model.set_top_k(model.config.num_experts + 1)
    except ValueError as error:
        result["refused"] = str(error)
    bf16 = auto_class.from_pretrained(case["dir"], trust_remote_code=True, dtype=torch.bfloat16)
    result["bf16_buffers"] = sorted({str(b.dtype) for name, b in bf16.named_buffers() if name.endswith("proj.weight")})
    return result


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    importable = {name: importlib.util.find_spec(name) is not None for name in ("smoe", "deepspeed", "datasets")}
    print(json.dumps({"importable": importable, "transformers": transformers.__version__,
                      "cases": {name: check(case) for name, case in cases.items()}}))


if __name__ == "__main__":
    main()
