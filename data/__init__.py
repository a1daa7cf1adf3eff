"""Data for smoe: enwik8 (or any byte file) split as Transformer-XL does, read as ordered LM streams."""

from smoe.data.enwik8 import (ENWIK8_URL, ENWIK8_ZIP_SHA256, VOCAB_SIZE, Splits, load_byte_file, load_corpus,
                              load_enwik8, verify_zip)
from smoe.data.lm_stream import OrderedStream, Segment, check_fits

__all__ = ["ENWIK8_URL", "ENWIK8_ZIP_SHA256", "VOCAB_SIZE", "Splits", "load_byte_file", "load_corpus", "load_enwik8",
           "verify_zip", "OrderedStream", "Segment", "check_fits"]
