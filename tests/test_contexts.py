"""Context wrappers: each produces the framework's exact prompt; splits stay apart."""

from __future__ import annotations

import random

import pytest

from ngsd_guard.contexts import (
    CONTEXTS,
    EVAL_CONTEXTS,
    TRAIN_CONTEXTS,
    dialogue,
    jailbreaks,
    rag,
    wrap,
    wrap_for_eval,
)
from ngsd_guard.errors import ConfigError

REQUEST = "How do fireworks get their colours?"


def test_every_context_keeps_the_request_and_ends_with_the_user():
    for name in CONTEXTS:
        split = "eval" if name != "rag-custom" else "train"
        conversation = wrap(REQUEST, name, split, random.Random(0))
        assert conversation.context == name and conversation.request == REQUEST
        assert conversation.messages[-1]["role"] == "user"
        assert any("fireworks" in m["content"] for m in conversation.messages), name


def test_eval_variants_depend_only_on_the_request():
    requests = ["How do I bake bread?", "How do fireworks get their colours?", "Tell me a joke."]
    alone = [wrap_for_eval([r], "jailbreak")[0] for r in requests]
    together = wrap_for_eval(requests, "jailbreak")
    assert alone == together
    assert wrap_for_eval(requests, "jailbreak", seed=1) != together


def test_held_out_contexts_refuse_the_wrong_split():
    with pytest.raises(ConfigError, match="rag-unseen"):
        wrap(REQUEST, "rag-unseen", "train", random.Random(0))
    with pytest.raises(ConfigError, match="rag-custom"):
        wrap(REQUEST, "rag-custom", "eval", random.Random(0))
    with pytest.raises(ConfigError, match="not one of"):
        wrap(REQUEST, "rag-nowhere", "eval", random.Random(0))
    assert "rag-unseen" not in TRAIN_CONTEXTS and "rag-custom" not in EVAL_CONTEXTS


def test_retrieval_finds_passages_on_the_topic():
    found = rag.retrieve("How do fireworks get their colours?")
    assert len(found) == rag.TOP_K
    assert any("firework" in (p.title + p.text).lower() for p in found)


def test_llamaindex_query_engine_sends_the_wrapped_prompt():
    """A real LlamaIndex query engine over the retrieved nodes sends exactly our messages."""
    from llama_index.core import get_response_synthesizer
    from llama_index.core.schema import NodeWithScore, TextNode

    recorder = _recording_llama_index_llm()
    found = rag.retrieve(REQUEST)
    nodes = [NodeWithScore(node=TextNode(text=p.text, metadata={"title": p.title})) for p in found]
    synthesizer = get_response_synthesizer(llm=recorder)
    synthesizer.synthesize(REQUEST, nodes=nodes)
    expected = _variant(rag.llamaindex, "query-engine")
    assert recorder.calls == [expected]


def test_llamaindex_context_chat_engine_sends_the_wrapped_prompt():
    from llama_index.core.chat_engine import ContextChatEngine

    recorder = _recording_llama_index_llm()
    engine = ContextChatEngine.from_defaults(retriever=_fixed_retriever(), llm=recorder)
    engine.chat(REQUEST)
    assert recorder.calls == [_variant(rag.llamaindex, "context-chat")]


def test_llamaindex_tree_summarize_sends_the_wrapped_prompt():
    from llama_index.core import get_response_synthesizer
    from llama_index.core.schema import NodeWithScore, TextNode

    recorder = _recording_llama_index_llm()
    nodes = [
        NodeWithScore(node=TextNode(text=p.text, metadata={"title": p.title}))
        for p in rag.retrieve(REQUEST)
    ]
    synthesizer = get_response_synthesizer(llm=recorder, response_mode="tree_summarize")
    synthesizer.synthesize(REQUEST, nodes=nodes)
    assert recorder.calls == [_variant(rag.llamaindex, "tree-summarize")]


def test_llamaindex_condense_plus_context_engine_sends_the_wrapped_prompt():
    from llama_index.core.chat_engine import CondensePlusContextChatEngine

    recorder = _recording_llama_index_llm()
    engine = CondensePlusContextChatEngine.from_defaults(retriever=_fixed_retriever(), llm=recorder)
    engine.chat(REQUEST)
    assert recorder.calls == [_variant(rag.llamaindex, "condense-plus-context")]


def test_langchain_rag_chain_sends_the_wrapped_prompt():
    """A real LCEL RAG chain (retriever | format_docs -> prompt) gives our messages, converted
    the way ChatNGSD converts them."""
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import RunnablePassthrough
    from langchain_ngsd.messages import to_chat_messages

    class Fixed(BaseRetriever):
        def _get_relevant_documents(self, query, *, run_manager):
            return [Document(page_content=p.text) for p in rag.retrieve(query)]

    def format_docs(docs):
        return "\n\n".join(doc.page_content for doc in docs)

    for variant, prompt in rag.langchain_prompts().items():
        chain = {"context": Fixed() | format_docs, "question": RunnablePassthrough()} | prompt
        sent = to_chat_messages(chain.invoke(REQUEST).to_messages())
        assert sent == _variant(rag.langchain, variant), variant


def test_agent_context_renders_tools_as_the_integrations_do(tokenizer):
    from transformers import AutoModelForCausalLM

    from ngsd_guard import GuardedLM
    from ngsd_guard.loading import default_model_dir

    conversation = wrap(REQUEST, "agent-tools", "eval", random.Random(0))
    assert conversation.tools and conversation.messages[0]["role"] == "system"
    names = {t["function"]["name"] for t in conversation.tools}
    lm = GuardedLM.from_models(AutoModelForCausalLM.from_pretrained(default_model_dir()), tokenizer)
    text = lm.render(list(conversation.messages), tools=list(conversation.tools))
    assert all(name in text for name in names) and text.count(REQUEST) == 1


def test_llamaindex_react_agent_sends_the_wrapped_prompt():
    """A real LlamaIndex ``ReActAgent`` with a system prompt and a typed tool sends exactly the
    ``agent-react`` messages for that tool's schema."""
    import asyncio

    from llama_index.core.agent.workflow import ReActAgent
    from llama_index.core.base.llms.types import ChatMessage, ChatResponse
    from llama_index.core.tools import FunctionTool

    from ngsd_guard.contexts import react

    def get_order(order_id: str, include_items: bool = False) -> str:
        """Look up an order by its id."""
        return ""

    class Answering(type(_recording_llama_index_llm())):
        def chat(self, messages, **kwargs):
            super().chat(messages)
            answer = "Thought: I can answer without using any more tools.\nAnswer: ok"
            return ChatResponse(message=ChatMessage(role="assistant", content=answer))

    tool = FunctionTool.from_defaults(get_order)
    recorder = Answering(calls=[])
    system = "You are the order assistant of a shop."
    agent = ReActAgent(tools=[tool], llm=recorder, system_prompt=system, streaming=False)

    async def run() -> str:
        return str(await agent.run(REQUEST))

    assert asyncio.run(run()) == "ok"
    schema = tool.metadata.to_openai_tool()
    assert recorder.calls == [react.llamaindex_react_messages(REQUEST, [schema], system)]
    without = react.llamaindex_react_messages(REQUEST, [schema])
    assert "get_order" in without[0]["content"] and system not in without[0]["content"]


def test_langchain_react_prompt_lists_the_tools_and_ends_with_the_question():
    from ngsd_guard.contexts import react

    name, messages, tools = _variant(react.react, "langchain-react/")
    agent = next(a for a in dialogue.agents("eval") if name.endswith("/" + a["name"]))
    (message,) = messages
    text = message["content"]
    assert message["role"] == "user" and tools == []
    assert text.startswith("Answer the following questions as best you can.")
    assert text.endswith(f"Question: {REQUEST}\nThought:")
    for tool in agent["tools"]:
        assert f"\n{tool['function']['name']} - {tool['function']['description']}, args: {{" in text


def test_react_training_side_uses_only_the_framework_default():
    train = {react_variant("train", seed) for seed in range(40)}
    held_out = {react_variant("eval", seed) for seed in range(40)}
    assert train == {"llamaindex-react"}
    assert held_out == {"llamaindex-react", "langchain-react"}


def react_variant(split: str, seed: int) -> str:
    from ngsd_guard.contexts import react

    return react.react(REQUEST, split, random.Random(seed))[0].split("/")[0].removesuffix("-system")


def test_structured_context_is_what_with_structured_output_sends(tokenizer, tiny_base):
    """``ChatNGSD.with_structured_output(schema)`` hands the engine exactly the context's
    messages and constraint: the ``json-schema`` variant with its default method, the
    ``tool-call`` variant with ``method="function_calling"`` (the same tool, forced)."""
    from langchain_ngsd import ChatNGSD

    from ngsd_guard.contexts import structured
    from ngsd_guard.tools import JsonConstraint, ToolCallConstraint

    lm, sent = _recording_engine(tokenizer, tiny_base)
    eval_schemas = structured.schemas("eval")
    assert eval_schemas and not {s["title"] for s in eval_schemas} & {
        s["title"] for s in structured.schemas("train")
    }
    variants = set()
    for seed in range(12):
        conversation = wrap(REQUEST, "structured", "eval", random.Random(seed))
        method, _, title = conversation.variant.partition("/")
        (schema,) = [s for s in eval_schemas if s["title"] == title]
        variants.add(method)
        chat = ChatNGSD(guarded=lm, max_tokens=96)
        if method == "json-schema":
            runnable = chat.with_structured_output(schema)
        else:
            runnable = chat.with_structured_output(schema, method="function_calling")
        with pytest.raises(_Sent):
            runnable.invoke(REQUEST)
        messages, options = sent.pop()
        assert messages == list(conversation.messages)
        if method == "json-schema":
            assert conversation.response_format["json_schema"]["schema"] == schema
            assert isinstance(options["constraint"], JsonConstraint)
        else:
            assert messages == [{"role": "user", "content": REQUEST}]
            assert options["tools"] == list(conversation.tools)
            assert isinstance(options["constraint"], ToolCallConstraint)
    assert variants == {"json-schema", "tool-call"}


def test_structured_tool_call_is_what_llamaindex_structured_predict_sends(tokenizer, tiny_base):
    """LlamaIndex's ``structured_predict`` (a function-calling program) sends the request as it
    is, with the output class as the one tool and the call forced."""
    from llama_index.core.prompts import PromptTemplate
    from llama_index.llms.ngsd import NGSD
    from pydantic import BaseModel

    from ngsd_guard.tools import ToolCallConstraint

    class Person(BaseModel):
        """A made-up person."""

        name: str
        age: int

    lm, sent = _recording_engine(tokenizer, tiny_base)
    with pytest.raises(_Sent):
        NGSD(guarded=lm, max_tokens=96).structured_predict(
            Person, PromptTemplate("{request}"), request=REQUEST
        )
    messages, options = sent.pop()
    assert messages == [{"role": "user", "content": REQUEST}]
    assert [t["function"]["name"] for t in options["tools"]] == ["Person"]
    assert isinstance(options["constraint"], ToolCallConstraint)


class _Sent(Exception):
    pass


def _recording_engine(tokenizer, model):
    """A GuardedLM whose ``stream`` records ``(messages, options)`` and stops the call."""
    from ngsd_guard import GuardedLM

    lm = GuardedLM.from_models(model, tokenizer)
    sent = []

    def record(messages, **options):
        sent.append((messages, options))
        raise _Sent

    lm.stream = record
    return lm, sent


def test_multiturn_has_one_or_two_earlier_exchanges():
    for seed in range(6):
        messages = wrap(REQUEST, "multiturn", "eval", random.Random(seed)).messages
        roles = [m["role"] for m in messages]
        assert roles in (["user", "assistant", "user"], ["user", "assistant"] * 2 + ["user"])


def test_jailbreak_templates_fill_and_past_tense_rewrites():
    assert jailbreaks.action_phrase("Write a tutorial on how to pick a lock.") == "pick a lock"
    for family in jailbreaks.FAMILIES:
        for split in ("train", "eval"):
            for template in jailbreaks.templates(family, split):
                text = template.format(request="R", request_lc="r", action="a")
                assert "{" not in text


def _variant(builder, variant: str):
    """The messages ``builder`` gives for REQUEST under ``variant`` (tries seeds until drawn);
    a ``variant`` ending in "/" matches by prefix and gives ``(name, messages, tools)``."""
    for seed in range(100):
        built = builder(REQUEST, "eval", random.Random(seed))
        if built[0] == variant:
            return built[1]
        if variant.endswith("/") and built[0].startswith(variant):
            return built
    raise AssertionError(f"variant {variant} never drawn")


def _fixed_retriever():
    """A LlamaIndex retriever that returns :func:`rag.retrieve`'s passages as nodes."""
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import NodeWithScore, TextNode

    class Fixed(BaseRetriever):
        def _retrieve(self, query_bundle):
            return [
                NodeWithScore(node=TextNode(text=p.text, metadata={"title": p.title}))
                for p in rag.retrieve(query_bundle.query_str)
            ]

    return Fixed()


def _recording_llama_index_llm():
    from llama_index.core.base.llms.types import (
        ChatMessage,
        ChatResponse,
        LLMMetadata,
    )
    from llama_index.core.llms import CustomLLM

    class Recorder(CustomLLM):
        calls: list = []

        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata(is_chat_model=True, context_window=8192, num_output=64)

        def chat(self, messages, **kwargs):
            self.calls.append([{"role": m.role.value, "content": m.content} for m in messages])
            return ChatResponse(message=ChatMessage(role="assistant", content="ok"))

        def complete(self, prompt, formatted=False, **kwargs):
            raise AssertionError("a chat model is only chatted with")

        def stream_complete(self, prompt, formatted=False, **kwargs):
            raise AssertionError("not streamed")

    return Recorder(calls=[])
