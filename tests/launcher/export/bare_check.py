"""Run by the bare environment's python (torch, transformers and safetensors only): load each
exported directory as a deployment would and compare its logits at every k with what smoe gave.

argv: a JSON file of cases {"dir", "auto_class", "expected", "segments"} (remote code; the greedy tokens too
where the expected holds a prompt) or {"dir", "native", "expected", "text"} (transformers' own MoE class,
loaded once per k; text to tokenize, if any); prints one JSON line of results."""

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
    result = {"loaded_k": model.config.num_experts_per_tok, "class": type(model).__name__, "differences": {},
              "router_ks": sorted({m.top_k for m in model.modules() if m is not model and hasattr(m, "set_top_k")})}
    with torch.no_grad():
        for k, want in sorted(by_k.items()):
            model.set_top_k(k)
            got = logits(model, inputs, case["segments"])
            result["differences"][k] = difference(got, want)
            if "prompt" in expected:  # a decoder LM: its greedy tokens too
                result.setdefault("generated", {})[k] = generated(model, expected)
    try:
        model.set_top_k(model.config.num_experts + 1)
    except ValueError as error:
        result["refused"] = str(error)
    if "slice" in expected:  # one k per MoE layer, at load time
        sliced = auto_class.from_pretrained(case["dir"], trust_remote_code=True, layer_top_k=expected["slice"]["ks"])
        with torch.no_grad():
            result["slice_difference"] = difference(logits(sliced.eval(), inputs, case["segments"]),
                                                    expected["slice"]["logits"])
    bf16 = auto_class.from_pretrained(case["dir"], trust_remote_code=True, dtype=torch.bfloat16)
    result["bf16_buffers"] = sorted({str(b.dtype) for name, b in bf16.named_buffers() if name.endswith("proj.weight")})
    return result


def generated(model, expected: dict) -> list[int]:
    """The greedy continuation of the expected prompt."""
    prompt = expected["prompt"]
    tokens = model.generate(prompt, max_new_tokens=expected["new_tokens"], do_sample=False, pad_token_id=0)
    return tokens[0, prompt.shape[1]:].tolist()


def difference(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1.0)).item()


def check_native(case: dict) -> dict:
    """Loaded at each k as ``num_experts_per_tok=k`` says, without remote code: every tensor loaded, the
    logits and the greedy tokens smoe gave at that k."""
    expected = torch.load(case["expected"])
    result = {"differences": {}, "loaded_k": {}, "generated": {}, "loading_info": {}}
    for k, want in sorted(expected["logits"].items()):
        model, info = transformers.AutoModelForCausalLM.from_pretrained(case["dir"], num_experts_per_tok=k,
                                                                        output_loading_info=True)
        model.eval()
        result["class"] = type(model).__name__
        result["loading_info"][k] = {key: sorted(map(str, value)) for key, value in info.items() if value}
        result["loaded_k"][k] = sorted({m.top_k for m in model.modules() if hasattr(m, "top_k")})
        with torch.no_grad():
            result["differences"][k] = difference(model(**expected["inputs"]).logits, want)
            result["generated"][k] = generated(model, expected)
    if "slice" in expected:  # the model card's loop: each MoE layer's modules with a top_k get the layer's k
        moe_layers = [layer for layer in model.model.layers if any(hasattr(m, "top_k") for m in layer.modules())]
        for layer, k in zip(moe_layers, expected["slice"]["ks"], strict=True):
            for module in layer.modules():
                if hasattr(module, "top_k"):
                    module.top_k = k
        with torch.no_grad():
            result["slice_difference"] = difference(model(**expected["inputs"]).logits, expected["slice"]["logits"])
    return result


def check_case(case: dict) -> dict:
    result = check_native(case) if case.get("native") else check(case)
    if case.get("text"):  # the tokenizer went with it (the config it reads is remote code, unless native)
        tokenizer = transformers.AutoTokenizer.from_pretrained(case["dir"], trust_remote_code=not case.get("native"))
        result["tokenized"] = tokenizer(case["text"])["input_ids"]
    return result


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    importable = {name: importlib.util.find_spec(name) is not None for name in ("smoe", "deepspeed", "datasets")}
    print(json.dumps({"importable": importable, "transformers": transformers.__version__,
                      "cases": {name: check_case(case) for name, case in cases.items()}}))


if __name__ == "__main__":
    main()
