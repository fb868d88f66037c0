import pytest

from training.reference.digits import DIGIT_WORDS, PROMPT_TEMPLATES, digit_prompt, prompt_vocabulary
from training.reference.tokenizer import build_tokenizer, save_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(prompt_vocabulary(), max_length=16)


def test_every_prompt_round_trips(tokenizer):
    for digit in range(10):
        for template in range(len(PROMPT_TEMPLATES)):
            prompt = digit_prompt(digit, template)
            ids = tokenizer(prompt)["input_ids"]
            assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
            assert len(ids) == len(prompt.split()) + 2, "each prompt word is a single token"
            assert tokenizer.decode(ids, skip_special_tokens=True) == prompt


def test_digit_words_have_distinct_tokens(tokenizer):
    ids = {tokenizer(word)["input_ids"][1] for word in DIGIT_WORDS}
    assert len(ids) == 10


def test_unknown_words_fall_back_to_bytes(tokenizer):
    ids = tokenizer("a zebra, Seven!")["input_ids"]
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "azebra,seven!"


def test_padding_and_truncation_to_max_length(tokenizer):
    batch = tokenizer(["", "a handwritten digit seven " * 10], padding="max_length", truncation=True)
    assert all(len(ids) == 16 for ids in batch["input_ids"])
    assert batch["input_ids"][0][:2] == [tokenizer.bos_token_id, tokenizer.eos_token_id]


def test_saved_tokenizer_reloads_identically(tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    save_tokenizer(tokenizer, prompt_vocabulary(), tmp_path)
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    prompt = digit_prompt(3, 2)
    assert reloaded(prompt)["input_ids"] == tokenizer(prompt)["input_ids"]
    assert reloaded.model_max_length == 16
