"""Function-calling data: a row's `tools`, its answers' `tool_calls`, tool results (fastsft.data,
fastsft.chat.templates). The definitions and calls must reach the rendered text (or the row is
refused), the calls are trained, the definitions and results are not."""

import json

import pytest

from fastsft import data as D
from fastsft.chat import templates as C
from fastsft.errors import DataError
from fastsft.run.answers import sample_prompts

from _tiny import CHATML_NO_MARKERS, make_recipe, quiet, write_jsonl

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather now in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {"name": "get_time", "description": "Local time in a zone", "parameters": {"type": "object"}}


def weather_row(city: str = "Oslo", *, args_as_string: bool = False) -> dict:
    args = {"city": city}
    return {
        "tools": [WEATHER, CLOCK],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Weather in {city}?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": json.dumps(args) if args_as_string else args,
                        },
                    }
                ],
            },
            {"role": "tool", "name": "get_weather", "content": '{"celsius": 3, "sky": "sleet"}'},
            {"role": "assistant", "content": f"It is 3 degrees with sleet in {city}."},
        ],
    }


@pytest.mark.parametrize("template", ["chatml", "qwen2.5", "llama3", "mistral", "chatml-no-markers"])
def test_calls_are_trained_definitions_and_results_are_not(tmp_path, tok, template):
    write_jsonl(tmp_path / "train.jsonl", [weather_row("Oslo"), weather_row("Lima", args_as_string=True)])
    if template == "chatml-no-markers":  # answers found by rendering turn by turn, calls found by name
        (tmp_path / "plain.jinja").write_text(CHATML_NO_MARKERS, encoding="utf-8")
        template = "plain.jinja"
    if template == "llama3":  # its control tokens, which the tiny tokenizer lacks
        tok.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    recipe = make_recipe(tmp_path, chat_template=template)
    rows, stats = D.preview_rows(recipe, tok, 2, log=quiet)
    assert stats["route"] == "pretokenized"
    for row, city in zip(rows, ["Oslo", "Lima"], strict=True):
        text, trained = row["text"], row["trained_text"]
        # the definitions are in the prompt (both tools), not trained
        assert "Weather now in a city" in text and "get_time" in text
        assert "Weather now in a city" not in trained and "get_time" not in trained
        # the call is trained, with its arguments as JSON (a string in the data is parsed, not quoted)
        assert "get_weather" in trained and f'{{"city": "{city}"}}' in trained
        assert '\\"city\\"' not in text
        # the tool's result is read, not trained; the final answer is trained
        assert "sleet" in text and '"celsius": 3' in text and '"celsius": 3' not in trained
        assert f"It is 3 degrees with sleet in {city}." in trained
        # the end-of-turn token closes both trained spans
        eot = C.end_of_turn_token(tok, tok.chat_template)
        assert trained.count(eot) == 2


def test_each_row_keeps_its_own_arguments(tmp_path, tok):
    """Rows whose calls take different arguments stay apart (as Arrow columns they would be merged
    into one struct type, every key in every call)."""
    other = weather_row("Oslo")
    other["messages"][2]["tool_calls"][0]["function"] = {
        "name": "get_time",
        "arguments": {"zone": "UTC", "fmt": 24},
    }
    write_jsonl(tmp_path / "train.jsonl", [weather_row("Oslo"), other])
    rows, _ = D.preview_rows(make_recipe(tmp_path, chat_template="chatml"), tok, 2, log=quiet)
    assert '{"city": "Oslo"}' in rows[0]["trained_text"] and '"zone"' not in rows[0]["text"]
    assert (
        '{"zone": "UTC", "fmt": 24}' in rows[1]["trained_text"]
        and '"city": "Oslo"}' not in rows[1]["trained_text"]
    )


def test_parquet_rows_lose_the_nulls_arrow_adds(tmp_path, tok):
    """In Parquet, every row's calls and tool schemas get every key any row has (null where absent);
    those nulls must not reach the rendered text."""
    import datasets

    other = weather_row("Lima")
    other["messages"][2]["tool_calls"][0]["function"] = {"name": "get_time", "arguments": {"zone": "UTC"}}
    other["tools"] = [
        {
            "type": "function",
            "function": {
                "name": "get_time",
                "parameters": {
                    "type": "object",
                    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                },
            },
        }
    ]
    datasets.Dataset.from_list([weather_row("Oslo"), other]).to_parquet(str(tmp_path / "train.parquet"))
    recipe = make_recipe(tmp_path, chat_template="chatml").with_overrides(["data.train=train.parquet"])
    rows, _ = D.preview_rows(recipe, tok, 2, log=quiet)
    assert '{"city": "Oslo"}' in rows[0]["trained_text"]
    assert '{"zone": "UTC"}' in rows[1]["trained_text"]
    for row in rows:
        assert "null" not in row["text"]


def test_a_template_that_drops_tools_is_refused(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [weather_row()])
    with pytest.raises(
        DataError,
        match=r"train.jsonl line 1: the chat template drops this row's tool definitions"
        r".*'get_weather'.*chatml",
    ):
        D.prepare_data(make_recipe(tmp_path, chat_template="gemma"), tok, log=quiet)
    calls_only = weather_row()
    del calls_only["tools"]
    write_jsonl(tmp_path / "train.jsonl", [calls_only])
    with pytest.raises(DataError, match=r"line 1: the chat template drops this row's tool calls"):
        D.prepare_data(make_recipe(tmp_path, chat_template="gemma"), tok, log=quiet)


def test_llama3_takes_one_call_per_answer(tmp_path, tok):
    row = weather_row()
    row["messages"][2]["tool_calls"].append({"name": "get_time", "arguments": {}})
    write_jsonl(tmp_path / "train.jsonl", [row])
    tok.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    with pytest.raises(
        DataError, match=r"line 1: the chat template fails on this row: Llama 3 takes one tool call"
    ):
        D.prepare_data(make_recipe(tmp_path, chat_template="llama3"), tok, log=quiet)
    # chatml writes both calls
    rows, _ = D.preview_rows(make_recipe(tmp_path, chat_template="chatml"), tok, 1, log=quiet)
    assert rows[0]["trained_text"].count("<tool_call>") == 2


def _with(mutate):
    row = weather_row()
    mutate(row)
    return row


@pytest.mark.parametrize(
    "row,problem",
    [
        (
            _with(lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="{city: Oslo")),
            r"message 3: tool call 1 \(get_weather\) `arguments` is not valid JSON",
        ),
        (
            _with(lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments=[1, 2])),
            r"`arguments` must be an object, got a list",
        ),
        (
            _with(lambda r: r["messages"][2]["tool_calls"][0]["function"].pop("name")),
            r"message 3: tool call 1 has no function `name`",
        ),
        (
            _with(lambda r: r["messages"][1].update(tool_calls=[{"name": "x", "arguments": {}}])),
            r"message 2 \(user\) has `tool_calls`: only assistant messages call tools",
        ),
        (
            _with(lambda r: r.update(tools={"name": "get_weather"})),
            r"`tools` must be a list of function definitions",
        ),
        (
            _with(lambda r: r.update(tools=[{"description": "no name"}])),
            r"`tools` item 1 has no function `name`",
        ),
        (_with(lambda r: r.update(tools=[{"type": "retrieval"}])), r"only function tools can be rendered"),
        (_with(lambda r: r["messages"][2].update(tool_calls=[])), r"`tool_calls` must be a non-empty list"),
        ({"text": "Plain text.", "tools": [WEATHER]}, r"`tools` is given but the row is not a conversation"),
    ],
)
def test_bad_tool_rows_are_named_by_line(tmp_path, tok, row, problem):
    first = {"text": "Fine."} if "text" in row else weather_row()
    write_jsonl(tmp_path / "train.jsonl", [first, row])
    with pytest.raises(DataError, match=r"train.jsonl line 2: " + ".*" + problem):
        D.prepare_data(make_recipe(tmp_path, chat_template="chatml"), tok, log=quiet)


def test_sharegpt_function_call_and_observation(tmp_path, tok):
    """The LLaMA-Factory / glaive sharegpt variant gives the same tokens and labels as the messages form."""
    sharegpt = {
        "tools": json.dumps([WEATHER, CLOCK]),
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Weather in Oslo?"},
            {
                "from": "function_call",
                "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}}),
            },
            {"from": "observation", "value": '{"celsius": 3, "sky": "sleet"}'},
            {"from": "gpt", "value": "It is 3 degrees with sleet in Oslo."},
        ],
    }
    write_jsonl(tmp_path / "train.jsonl", [sharegpt])
    got, stats = D.preview_rows(make_recipe(tmp_path, chat_template="qwen2.5"), tok, 1, log=quiet)
    assert stats["format"] == "sharegpt"
    write_jsonl(tmp_path / "train.jsonl", [weather_row()])
    want, _ = D.preview_rows(make_recipe(tmp_path, chat_template="qwen2.5"), tok, 1, log=quiet)
    assert got[0]["input_ids"] == want[0]["input_ids"]
    assert got[0]["labels"] == want[0]["labels"]


def test_trl_renders_a_tool_row_as_fastsft_does(tmp_path, tiny_model_dir, tok):
    """TRL given the same row (tools as a JSON string, its own tokenization) trains on what preview shows."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    write_jsonl(tmp_path / "train.jsonl", [weather_row()])
    shown = D.preview_rows(make_recipe(tmp_path, chat_template="chatml"), tok, 1, log=quiet)[0][0]
    row = weather_row()
    row["tools"] = json.dumps([WEATHER, {"type": "function", "function": CLOCK}])  # as fastsft normalises it
    row["messages"][2]["content"] = ""
    tok.chat_template = C.CHATML
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, assistant_only_loss=True
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=datasets.Dataset.from_list([row]),
        processing_class=tok,
    )
    theirs = trainer.train_dataset[0]
    assert theirs["input_ids"] == shown["input_ids"]
    assert theirs["labels"] == shown["labels"]


def test_report_prompts_carry_the_tools(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [weather_row(), {"messages": weather_row()["messages"]}])
    p = D.prepare_data(make_recipe(tmp_path, chat_template="chatml"), tok, log=quiet)
    prompts = sample_prompts(p.train)
    assert prompts[0]["messages"] == weather_row()["messages"][:2]
    assert prompts[0]["tools"][0]["function"]["name"] == "get_weather"
    assert prompts[1]["tools"] is None
    # the report's generation renders them: the prompt the model sees lists the tools
    text = tok.apply_chat_template(
        prompts[0]["messages"], tools=prompts[0]["tools"], tokenize=False, add_generation_prompt=True
    )
    assert "<tools>" in text and "get_time" in text
