"""Chat templates (arjax.decode.chat): a Hugging Face tokenizer's own template renders and encodes exactly as
transformers' ``apply_chat_template`` does; the default template's text; the checks of OpenAI's messages;
a template read from and written to a tokenizer directory; each token's bytes. The HTTP route is tested
in tests/test_serve.py."""

import json

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from arjax.decode.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate, check_messages
from arjax.decode.sampling import FieldError
from arjax.train.data import default_corpus_text
from arjax.train.tokenizer import EOS_TOKEN, ByteTokenizer, CharTokenizer, HFTokenizer, load_tokenizer, train_bpe

# Qwen2's ChatML template, as its tokenizer_config.json writes it (tools branch dropped).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3's shape: the BOS written by the template, roles checked with raise_exception, trim/lstrip at work.
LLAMA = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Conversation roles must be system, user or assistant') }}
    {% endif %}
    {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + eos_token }}
{% endfor %}
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"""
MESSAGES = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Hi ✓"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "  Sum 2 and 2.  "},
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(default_corpus_text()[:30_000], encoding="utf-8")
    tok = train_bpe(str(path), 300)
    # The special tokens the templates write, added as transformers' tokenizers carry them.
    tok.tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<s>"])
    return tok


@pytest.mark.parametrize("template, bos", [(CHATML, None), (LLAMA, "<s>")], ids=["chatml", "llama"])
def test_a_tokenizers_template_renders_and_encodes_as_transformers_does(bpe, template, bos):
    transformers = pytest.importorskip("transformers")
    tok = HFTokenizer(bpe.tokenizer, eos_token=EOS_TOKEN, bos_token=bos, chat_template=template)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe.tokenizer, eos_token=EOS_TOKEN, bos_token=bos, chat_template=template
    )
    for messages in (MESSAGES, MESSAGES[1:2]):
        text = ChatTemplate(tok).render(messages)
        assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = hf.apply_chat_template(messages, add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
        assert ChatTemplate(tok).encode(messages) == list(ids)
    if template is LLAMA:
        assert text.startswith("<s>\n    <|start_header_id|>user")  # lstrip_blocks keeps a text line's indent
        with pytest.raises(FieldError, match="refused them: Conversation roles must be") as e:
            ChatTemplate(tok).render([{"role": "narrator", "content": "x"}])
        assert e.value.field == "messages"


def test_the_default_template_and_its_stop_string():
    chat = ChatTemplate(ByteTokenizer())
    assert chat.is_default and chat.source == DEFAULT_CHAT_TEMPLATE and chat.stops == ("<|end|>",)
    text = chat.render(check_messages(MESSAGES))
    assert text == (
        "<|system|>\nBe terse.<|end|>\n<|user|>\nHi ✓<|end|>\n<|assistant|>\nHello.<|end|>\n"
        "<|user|>\n  Sum 2 and 2.  <|end|>\n<|assistant|>\n"
    )
    assert chat.encode(check_messages(MESSAGES)) == list(text.encode())
    # A char vocabulary: a message's unknown character names the message; the template's own, the template.
    chars = CharTokenizer(sorted(set(text.replace("✓", ""))))
    with pytest.raises(FieldError, match=r"^messages\[1\]\.content: character '✓' is not in this character-level"):
        ChatTemplate(chars).encode(check_messages(MESSAGES))
    plain = CharTokenizer(sorted(set("Hi there")))
    with pytest.raises(FieldError, match="cannot encode the chat template's own text"):
        ChatTemplate(plain).encode([{"role": "user", "content": "Hi there"}])


def test_a_broken_template_is_refused_when_the_server_starts():
    with pytest.raises(ValueError, match="chat_template does not compile"):
        ChatTemplate(ByteTokenizer(), "{% for m in messages %}")


def test_messages_are_checked_and_named():
    assert check_messages(
        [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    ) == [{"role": "system", "content": "a\nb"}]
    assert check_messages([{"role": "assistant", "content": "x", "refusal": None, "tool_calls": None}]) == [
        {"role": "assistant", "content": "x"}
    ]
    bad = [
        ([], "messages must be a non-empty list"),
        ([5], r"messages\[0\] must be an object"),
        ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\]\.role must be one of"),
        ([{"role": "function", "content": "a"}], "no tool or function calling"),
        ([{"role": "user", "content": 5}], r"messages\[0\]\.content must be a string"),
        ([{"role": "user", "content": [{"type": "input_audio"}]}], "parts of type 'input_audio' are not supported"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], r"content\[0\] must be"),
        ([{"role": "user", "content": "a", "name": "bob"}], r"messages\[0\]\.name: participant names are not"),
        ([{"role": "assistant", "content": "a", "refusal": "no"}], r"refusal is not supported"),
    ]
    for messages, message in bad:
        with pytest.raises(FieldError, match=message) as e:
            check_messages(messages)
        assert e.value.field == "messages" and "\n" not in str(e.value)


def test_a_template_travels_with_the_tokenizer_directory(bpe, tmp_path):
    tok = HFTokenizer(bpe.tokenizer, eos_token=EOS_TOKEN, chat_template=CHATML)
    tok.save(str(tmp_path / "a"))
    assert json.loads((tmp_path / "a/tokenizer_config.json").read_text())["chat_template"] == CHATML
    assert load_tokenizer(str(tmp_path / "a")).chat_template == CHATML
    # transformers >= 4.43 writes chat_template.jinja; older configs may hold a list of named templates.
    (tmp_path / "a/chat_template.jinja").write_text(LLAMA)
    assert load_tokenizer(str(tmp_path / "a")).chat_template == LLAMA
    (tmp_path / "a/chat_template.jinja").unlink()
    config = json.loads((tmp_path / "a/tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]
    (tmp_path / "a/tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(str(tmp_path / "a")).chat_template == CHATML
    HFTokenizer(bpe.tokenizer, eos_token=EOS_TOKEN).save(str(tmp_path / "b"))
    assert load_tokenizer(str(tmp_path / "b")).chat_template is None  # the default template then


def test_each_tokens_bytes_rebuild_the_text(bpe):
    text = "naïve café — 日本語 ✓"
    for tok in (bpe, ByteTokenizer()):
        ids = tok.encode(text)
        assert b"".join(tok.token_bytes(t) for t in ids) == text.encode()
    assert ByteTokenizer().token_bytes(0xE6) == b"\xe6"  # part of a character: its own byte, not U+FFFD
