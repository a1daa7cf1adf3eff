"""Masked-LM data on small text files the tests write: loading and splits, trained
tokenizers, blocks, masking, the resumable rank-sharded order, and the errors."""

from __future__ import annotations

import pytest
import torch

from smoe.data.mlm import (BlockStream, check_block_fits, check_tokenizer_fits, group_into_blocks, load_texts,
                           mlm_collator, train_tokenizer)


@pytest.fixture(scope="module")
def splits(books, tmp_path_factory):
    return load_texts([str(books)], cache_dir=str(tmp_path_factory.mktemp("cache")), heldout_fraction=0.05)[0]


def test_lines_are_loaded_without_blanks_and_split_three_ways(splits):
    sizes = {name: len(split) for name, split in splits.items()}
    assert sum(sizes.values()) == 1200 and sizes["validation"] == sizes["test"] == 60
    assert all(line.strip() for line in splits["train"]["text"])


def test_a_hub_style_dataset_name_loads_through_datasets(books, tmp_path):
    data, source = load_texts(dataset=str(books), cache_dir=str(tmp_path))  # a local repo-like directory
    assert source == str(books) and len(data["train"]) + len(data["validation"]) + len(data["test"]) == 1200


@pytest.mark.parametrize("family, mask", [("bert", "[MASK]"), ("roberta", "<mask>")])
def test_trained_tokenizer_blocks_and_masking(splits, family, mask, tmp_path):
    tokenizer = train_tokenizer(splits["train"]["text"], family, vocab_size=300)
    assert tokenizer.mask_token == mask and len(tokenizer) <= 300
    tokenizer.save_pretrained(tmp_path)  # a transformers tokenizer, saved with the run
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path)("lazy dog")["input_ids"] == tokenizer("lazy dog")["input_ids"]
    blocks = group_into_blocks(splits["train"], tokenizer, block_size=32)
    assert blocks.cache_files  # datasets cached the mapped steps beside the loaded text
    assert len(blocks) > 40 and {len(ids) for ids in blocks["input_ids"]} == {32}
    first_line = tokenizer(splits["train"][0]["text"])["input_ids"]
    assert blocks[0]["input_ids"][:len(first_line)] == first_line  # lines concatenated in order
    torch.manual_seed(0)
    batch = mlm_collator(tokenizer)([blocks[i] for i in range(16)])
    masked = batch["labels"] != -100
    assert 0.08 < masked.float().mean() < 0.22  # 15 % of tokens
    special = torch.tensor([blocks[i]["special_tokens_mask"] for i in range(16)]).bool()
    assert not (masked & special).any()


def identity(rows):
    return {"input_ids": torch.tensor([r["input_ids"] for r in rows])}


def test_ranks_read_the_global_batch_and_resume_mid_epoch(splits):
    tokenizer = train_tokenizer(splits["train"]["text"], "bert", vocab_size=300)
    blocks = group_into_blocks(splits["train"], tokenizer, block_size=16)
    single = BlockStream(blocks, 8, identity, seed=3)
    ranks = [BlockStream(blocks, 8, identity, rank=r, world_size=2, seed=3) for r in (0, 1)]
    for _ in range(3):
        torch.testing.assert_close(single.next_batch()["input_ids"],
                                   torch.cat([s.next_batch()["input_ids"] for s in ranks]))
    resumed = BlockStream(blocks, 8, identity, seed=3)
    resumed.load_state_dict(single.state_dict())
    torch.testing.assert_close(resumed.next_batch()["input_ids"], single.next_batch()["input_ids"])
    epoch_two = BlockStream(blocks, 8, identity, seed=3)
    epoch_two.epoch = 1
    epoch_one = BlockStream(blocks, 8, identity, seed=3)
    assert not torch.equal(epoch_two.next_batch()["input_ids"], epoch_one.next_batch()["input_ids"])
    with pytest.raises(ValueError, match="batch_size"):
        BlockStream(blocks, 16, identity).load_state_dict(single.state_dict())


def test_bad_input_is_named(books, splits, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    with pytest.raises(ValueError, match="0 usable"):
        load_texts([str(blank)], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        load_texts([str(tmp_path / "nope.txt")])
    tokenizer = train_tokenizer(splits["train"]["text"], "roberta", vocab_size=300)
    with pytest.raises(ValueError, match=r"has \d+ tokens but the model's vocab_size is 100: set vocab_size="):
        check_tokenizer_fits(tokenizer, 100, "trained")
    with pytest.raises(ValueError, match="block_size 600 is longer than the model's 512 positions"):
        check_block_fits(600, 512)
    blocks = group_into_blocks(splits["validation"], tokenizer, block_size=64)
    with pytest.raises(ValueError, match="fewer than one batch"):
        BlockStream(blocks, len(blocks) + 1, None)
