"""`smoe convert DENSE_DIR OUT_DIR`: a dense BERT/RoBERTa masked-LM checkpoint (a local
transformers directory) turned into an SMoE one.

Every weight is copied; each selected layer's MLP is split into N experts (see
:func:`smoe.model.bert.weighted_experts`: at k = N with equal weights the converted
model is the dense one). The output is a transformers directory with our config
fields, loadable with ``AutoModelForMaskedLM.from_pretrained`` once ``smoe.model.bert``
is imported; the tokenizer is copied along when the dense directory has one.
"""

from __future__ import annotations

from pathlib import Path

from smoe.data.mlm import TOKENIZER_FILES
from smoe.launcher.runtime import log


def add_arguments(parser) -> None:
    parser.add_argument("dense_dir", help="a transformers BertForMaskedLM or RobertaForMaskedLM directory")
    parser.add_argument("out_dir", help="where to write the SMoE model")
    parser.add_argument("--num-experts", type=int, default=16, help="N (must divide intermediate_size; default 16)")
    parser.add_argument("--method", default="smoe-dropout", help="router method (default smoe-dropout)")
    parser.add_argument("--k", type=int, help="top-k saved in the config (default N)")
    parser.add_argument("--moe-layers", default="all", help="all, early, middle, later or every-2")
    parser.add_argument("--combine-scale", default="1", help="1 (the paper's, masked-LM's default) or N (inverted "
                                                             "dropout). The experts are scaled so that k = N gives "
                                                             "the dense model either way")


def run(args) -> None:
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    from smoe.model.bert import MODELS, from_dense
    from smoe.model.feedforward import combine_scale_value

    if args.num_experts < 1:
        raise ValueError(f"--num-experts {args.num_experts} must be at least 1 (and divide intermediate_size)")
    if args.k is not None and not 1 <= args.k <= args.num_experts:
        raise ValueError(f"--k {args.k} must be between 1 and --num-experts ({args.num_experts})")
    combine_scale = combine_scale_value(args.combine_scale, args.num_experts)
    dense_dir = Path(args.dense_dir)
    if not (dense_dir / "config.json").is_file():
        raise FileNotFoundError(f"{dense_dir} holds no config.json: pass a directory written by save_pretrained")
    family = AutoConfig.from_pretrained(dense_dir).model_type
    if family not in MODELS:
        raise ValueError(f"{dense_dir} is a '{family}' model: smoe convert takes bert or roberta")
    dense = AutoModelForMaskedLM.from_pretrained(dense_dir)
    model = from_dense(dense, family, method=args.method, num_experts=args.num_experts,
                       top_k=args.k or args.num_experts, moe_layers=args.moe_layers, combine_scale=combine_scale)
    model.save_pretrained(args.out_dir)
    if any((dense_dir / name).is_file() for name in TOKENIZER_FILES):
        AutoTokenizer.from_pretrained(dense_dir).save_pretrained(args.out_dir)
    else:
        log.note(f"no tokenizer in {dense_dir}; only the model was written")
    log.info(f"wrote {args.out_dir}: {family} with {args.num_experts} experts per selected layer "
             f"({args.method}, moe_layers={args.moe_layers}, combine_scale={combine_scale:g})")
