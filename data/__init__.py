"""Data loading for smoe (enwik8 byte streams, masked-LM corpora): arrives with the training issues."""
