"""Prompt pools (plain and conversational, with columns) and their rendering as TRL 1.16 tokenises prompts."""

from __future__ import annotations

import json
import types

import pytest

from funcprobe.prompts import PromptPool, load_prompt_pool, prompt_text, render_prompts, trl_prompts
from funcprobe.rewards import load_prompts_jsonl
from funcprobe.testing import char_tokenizer

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def chat_tokenizer(bos_template: bool = False, bos_post_processor: bool = False):
    tok = char_tokenizer()
    tok.chat_template = ("{{ bos_token }}" if bos_template else "") + TEMPLATE
    if bos_post_processor:  # a Llama-style tokenizer: tokenizer(text) adds a BOS
        from tokenizers import processors

        tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                                      special_tokens=[("<bos>", tok.bos_token_id)])
    return tok


def write(tmp_path, lines, name="pool.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_plain_pool_keeps_every_column(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": "1+1=", "answer": "2", "level": 1}), "",
                            json.dumps({"prompt": "2*3=", "answer": 6, "solution": "6"})])
    pool = load_prompt_pool(path)
    assert pool.prompts == ["1+1=", "2*3="] and not pool.conversational and len(pool) == 2
    assert pool.columns == {"answer": ["2", 6], "level": [1, None], "solution": [None, "6"]}
    assert pool.answers() == ["2", "6"] and pool.line_numbers == [1, 3]
    assert pool.where(1) == f"{path}, line 3"
    sub = pool.select([1, 1])
    assert sub.prompts == ["2*3=", "2*3="] and sub.columns["answer"] == [6, 6] and sub.line_numbers == [3, 3]


def test_conversational_pool(tmp_path):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+3?"}]
    pool = load_prompt_pool(write(tmp_path, [json.dumps({"prompt": messages, "answer": "5"})]))
    assert pool.conversational and pool.prompts == [messages] and pool.columns == {"answer": ["5"]}


@pytest.mark.parametrize("bad_line,message", [
    ("{not json", "line 2: invalid JSON"),
    (json.dumps(["x"]), "line 2: expected a JSON object"),
    (json.dumps({"question": "x"}), 'line 2: missing "prompt"'),
    (json.dumps({"prompt": ""}), 'line 2: "prompt" is empty'),
    (json.dumps({"prompt": 3}), 'line 2: "prompt" must be a string or a list'),
    (json.dumps({"prompt": []}), "line 2: .*empty list of messages"),
    (json.dumps({"prompt": [{"content": "x"}]}), 'line 2: message 0 .*"role" and "content"'),
    (json.dumps({"prompt": [{"role": "user", "content": "x"}, "hi"]}), "line 2: message 1"),
    (json.dumps({"prompt": [{"role": "", "content": "x"}]}), "line 2: message 0 has role ''"),
    (json.dumps({"prompt": [{"role": "user", "content": 3}]}), "line 2: message 0 has content of type int"),
    (json.dumps({"prompt": [{"role": "user", "content": "x"}]}), "line 2: .*conversational.*line 1.*one form"),
])
def test_bad_lines_name_file_line_and_fix(tmp_path, bad_line, message):
    path = write(tmp_path, [json.dumps({"prompt": "ok"}), bad_line])
    with pytest.raises(ValueError, match=message) as caught:
        load_prompt_pool(path)
    assert str(path) in str(caught.value)


def test_empty_pool(tmp_path):
    with pytest.raises(ValueError, match="no prompts"):
        load_prompt_pool(write(tmp_path, ["", " "]))


def test_load_prompts_jsonl_refuses_messages(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": [{"role": "user", "content": "x"}]})])
    with pytest.raises(ValueError, match="line 1.*must be a string here.*load_prompt_pool"):
        load_prompts_jsonl(path)


def test_render_plain_and_chat():
    tok = chat_tokenizer()
    assert render_prompts(["ab", "c"], tok) == [tok("ab")["input_ids"], tok("c")["input_ids"]]
    messages = [[{"role": "user", "content": "ab"}]]
    expected = tok("<user>ab<assistant>", add_special_tokens=False)["input_ids"]
    assert render_prompts(messages, tok) == [expected]
    assert render_prompts(messages, tok, chat_template="on") == [expected]
    assert render_prompts(["ab"], tok, chat_template="on") == [expected]        # wrapped as a user message
    assert render_prompts(["ab"], tok, chat_template="off") == [tok("ab")["input_ids"]]
    assert render_prompts(PromptPool(prompts=["ab"]), tok) == [tok("ab")["input_ids"]]
    assert prompt_text(messages[0], tok) == "<user>ab<assistant>" and prompt_text("ab", tok) == "ab"
    assert prompt_text("ab", tok, chat_template="on") == "<user>ab<assistant>"
    assert trl_prompts(["ab"], "on") == ([[{"role": "user", "content": "ab"}]], True)


def test_special_tokens_as_trl():
    """Plain text: the tokenizer's default add_special_tokens=True (a BOS here); chat: only what the template writes."""
    tok = chat_tokenizer(bos_post_processor=True)
    bos = tok.bos_token_id
    assert render_prompts(["ab"], tok)[0][0] == bos
    chat = render_prompts([[{"role": "user", "content": "ab"}]], tok)[0]
    assert bos not in chat
    templated = chat_tokenizer(bos_template=True, bos_post_processor=True)
    assert render_prompts([[{"role": "user", "content": "ab"}]], templated)[0].count(bos) == 1


def test_render_errors():
    tok = char_tokenizer()  # no chat template
    with pytest.raises(ValueError, match="no chat_template: use a tokenizer that has one.*--chat-template off"):
        render_prompts([[{"role": "user", "content": "ab"}]], tok)
    with pytest.raises(ValueError, match="no chat_template"):
        render_prompts(["ab"], tok, chat_template="on")
    with pytest.raises(ValueError, match="conversational.*chat template is off"):
        render_prompts([[{"role": "user", "content": "ab"}]], chat_tokenizer(), chat_template="off")
    with pytest.raises(ValueError, match="mix"):
        render_prompts(["ab", [{"role": "user", "content": "ab"}]], chat_tokenizer())
    with pytest.raises(ValueError, match="chat_template must be one of"):
        render_prompts(["ab"], tok, chat_template="yes")


def test_render_matches_trl_tokenize_prompts():
    """TRL's own GRPOTrainer._tokenize_prompts (on a stand-in trainer) gives the same ids, both forms."""
    pytest.importorskip("trl")
    from trl.trainer.grpo_trainer import GRPOTrainer

    for tok in (chat_tokenizer(bos_post_processor=True), chat_tokenizer(bos_template=True)):
        trainer = types.SimpleNamespace(processing_class=tok, _is_vlm=False, environment_factories=None, tools=None,
                                        chat_template=None, chat_template_kwargs={})
        for prompts in (["ab", "c1+2="], [[{"role": "user", "content": "ab"}],
                                          [{"role": "system", "content": "x"}, {"role": "user", "content": "c"}]]):
            trl_ids = GRPOTrainer._tokenize_prompts(trainer, prompts)[0]
            assert render_prompts(prompts, tok) == [list(row) for row in trl_ids]
