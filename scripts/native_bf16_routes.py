"""How many routes a bf16 load of a native export changes: the share of (token, MoE layer) pairs whose
set of k experts differs between the exported model loaded in bf16 and in fp32 (transformers' router
computes its logits in the model's dtype; an upcycled router's logits are ~1e-6 apart, see
smoe.model.bert.ROUTER_LOGIT_STD). Random-weight Llamas upcycled to N experts, exported with
`native_export`, fed random token ids.

    python scripts/native_bf16_routes.py            # tiny (hidden 32) and larger (hidden 512) Llama, N = 8
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from smoe.launcher.export.native import native_export, set_native_top_k
from smoe.model.decoder import upcycle

SHAPES = {"tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2),
          "larger": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8)}


@torch.no_grad()
def routes(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Each MoE layer's chosen experts (sorted per token) for ``input_ids``."""
    chosen = []
    hooks = [module.register_forward_hook(lambda _, __, out: chosen.append(out[2].sort(dim=-1).values))
             for name, module in model.named_modules() if name.endswith(".gate")]
    try:
        model(input_ids=input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return chosen


def route_differences(directory: Path, input_ids: torch.Tensor, ks: list[int]) -> dict[int, list[float]]:
    """k -> per MoE layer, the share of tokens whose k experts differ between a bf16 and an fp32 load."""
    fp32 = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    differences = {}
    for k in ks:
        set_native_top_k(fp32, k)
        set_native_top_k(bf16, k)
        pairs = zip(routes(fp32, input_ids), routes(bf16, input_ids))
        differences[k] = [(a != b).any(dim=-1).float().mean().item() for a, b in pairs]
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048, help="random tokens fed (rows of 512)")
    parser.add_argument("--vocab", type=int, default=1000)
    args = parser.parse_args()
    ids = torch.randint(args.vocab, (args.tokens // 512, 512), generator=torch.Generator().manual_seed(0))
    ks = sorted({1, 2, args.num_experts // 2, args.num_experts - 1})
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        dense = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=args.vocab, max_position_embeddings=512,
                                                             **shape))
        model = upcycle(dense, num_experts=args.num_experts).eval()
        with tempfile.TemporaryDirectory() as tmp:
            native_export(model, Path(tmp) / "native")
            differences = route_differences(Path(tmp) / "native", ids, ks)
        for k, per_layer in differences.items():
            print(f"{name} (hidden {shape['hidden_size']}, N={args.num_experts}) k={k}: "
                  f"{sum(per_layer) / len(per_layer):.1%} of (token, layer) routes differ in bf16 "
                  f"(per layer: {', '.join(f'{share:.1%}' for share in per_layer)})")


if __name__ == "__main__":
    main()
