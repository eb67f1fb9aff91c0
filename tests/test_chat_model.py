"""The built-in chat model (the base model tuned by `dsv3 sft`, shipped as an adapter) against the base model:
five simple factual and how-to questions taken word for word from its own training conversations (built by
`dsv3 data chat` from the Python FAQ, glossary and library reference), each answer scored by the reference
keywords of the document's answer that it contains. The chat model must score higher in total."""

import re

import torch

import dsv3
from dsv3.checkpoint.adapter import is_adapter, read_adapter_config
from dsv3.engine import LLM, EngineConfig, SamplingParams
from dsv3.tokenizer import load_tokenizer

# question (as in the training data) -> keywords of the reference answer in the documentation
QUESTIONS = {
    "How do I copy a file?": ["shutil", "copyfile"],  # faq/library: "The shutil module contains a copyfile function."
    "How do I convert a string to a number?": ["int", "float"],  # faq/programming
    "How do I send mail from a Python script?": ["smtplib"],  # faq/library: "Use the standard library module smtplib."
    "What does lambda mean in Python?": ["anonymous", "function", "expression"],  # glossary
    "Explain os.getcwd() in Python.": ["current", "working", "directory"],  # library/os
}


def keyword_score(answer: str, keywords: list[str]) -> float:
    """The fraction of `keywords` that occur as words in `answer` (case-insensitive)."""
    words = set(re.findall(r"[a-z0-9_]+", answer.lower()))
    return sum(k in words for k in keywords) / len(keywords)


def answers(path) -> list[str]:
    tok = load_tokenizer(path)
    llm = LLM(path, config=EngineConfig(device="cpu", dtype="float32", num_blocks=64))
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)
    return [o.text for o in outs]


def test_keyword_scoring():
    assert keyword_score("Use the shutil module's copyfile().", ["shutil", "copyfile"]) == 1.0
    assert keyword_score("Shutil!", ["shutil", "copyfile"]) == 0.5
    assert keyword_score("printing", ["int"]) == 0.0  # whole words only


def test_chat_model_answers_its_documents_better_than_the_base_model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chat, base = answers(dsv3.default_chat_model_path()), answers(dsv3.default_model_path())
    finally:
        torch.set_num_threads(threads)
    kws = list(QUESTIONS.values())
    chat_score = sum(keyword_score(a, k) for a, k in zip(chat, kws))
    base_score = sum(keyword_score(a, k) for a, k in zip(base, kws))
    assert chat_score > base_score, (chat_score, base_score, chat, base)


def test_chat_model_is_an_adapter_over_the_base_model():
    folder = dsv3.default_model_path().parent / "default-chat-model"
    assert is_adapter(folder)
    assert read_adapter_config(folder)["base_model"] == dsv3.default_model_path().resolve()
    assert (folder / "adapter.safetensors").stat().st_size < 4e6  # a few MB beside the 55 MB base
    merged = dsv3.default_chat_model_path()
    assert (merged / "config.json").read_text() == (dsv3.default_model_path() / "config.json").read_text()
